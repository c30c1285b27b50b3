"""``cloudfree preview``: an RGB quicklook PNG of the scene nearest to a date."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import typer

from pipeline.cli.app import app, console
from pipeline.errors import SourceError
from pipeline.regions import load_region
from pipeline.sensors import S1_DB_RANGE, get_sensor
from pipeline.sources.base import Scene
from pipeline.sources.registry import SourceName, SourceSpec

MAX_DAYS = 3
LISTED_DAYS = 30


def nearest_scene(scenes: list[Scene], when: dt.date, max_days: int = MAX_DAYS) -> Scene:
    """The scene closest in time to ``when`` (the least cloudy on ties); an error lists the nearest dates."""
    if not scenes:
        raise SourceError(f"no scenes within {LISTED_DAYS} days of {when}; pick a date inside the region's window")
    best = min(scenes, key=lambda s: (abs((s.date - when).days), s.cloud_cover if s.cloud_cover is not None else 0.0))
    if abs((best.date - when).days) > max_days:
        near = sorted({s.date for s in scenes}, key=lambda d: abs((d - when).days))[:5]
        raise SourceError(
            f"no scene within ±{max_days} days of {when}; nearest dates: "
            f"{', '.join(d.isoformat() for d in sorted(near))}; pass one of them with --date"
        )
    return best


def sar_quicklook(da) -> np.ndarray:  # noqa: ANN001 (xarray DataArray)
    """False colour for S1: R = VV, G = VH, B = VV - VH, each scaled over the field's dB ranges."""
    from pipeline.reconstruct.quicklook import rgb_quicklook  # xarray and PIL load only when a preview runs

    vv = da.sel(band="VV").values
    vh = da.sel(band="VH").values
    lo_vv, hi_vv = S1_DB_RANGE["VV"]
    lo_vh, hi_vh = S1_DB_RANGE["VH"]
    rgb = np.stack(
        [(vv - lo_vv) / (hi_vv - lo_vv), (vh - lo_vh) / (hi_vh - lo_vh), np.clip((vv - vh) / 15.0, 0, 1)], axis=-1
    )
    return rgb_quicklook(rgb, gain=1.0)


@app.command()
def preview(
    region: str = typer.Argument(..., help="Region name (regions/NAME.yaml) or path to a region YAML file."),
    date: dt.datetime = typer.Option(
        ..., "--date", formats=["%Y-%m-%d"], help="Date (YYYY-MM-DD); the nearest scene within ±3 days is shown."
    ),
    source: SourceName = typer.Option(
        SourceName.synthetic, "--source", help="Data source: synthetic (offline), local or earthengine."
    ),
    root: Path | None = typer.Option(None, "--root", help="Folder of GeoTIFFs for --source local."),
    sensor: str = typer.Option(
        "s2", "--sensor", help="Sensor family (s2, landsat, s1) or key (s2_l1c, landsat8_l2, ...)."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="PNG file to write."),
    gain: float | None = typer.Option(
        None, "--gain", help="Fixed reflectance gain instead of the 2-98 % percentile stretch (e.g. 3.5)."
    ),
) -> None:
    """Write an RGB quicklook of the scene nearest to --date over the region."""
    from pipeline.reconstruct.quicklook import rgb_quicklook, save_png

    reg = load_region(region)
    when = date.date()
    src = SourceSpec.parse(source, root).build()
    scenes = src.search(reg, when - dt.timedelta(days=LISTED_DAYS), when + dt.timedelta(days=LISTED_DAYS), sensor)
    scene = nearest_scene(scenes, when)
    sens = get_sensor(scene.sensor)
    grid = reg.grid()
    if sens.family == "s1":
        img = sar_quicklook(src.read(scene, grid, ["VV", "VH"]))
    else:
        if sens.rgb is None:
            raise SourceError(f"sensor {sens.key} has no true-colour bands; use --sensor s2 or landsat")
        da = src.read(scene, grid, list(sens.rgb))
        img = rgb_quicklook(da, bands=sens.rgb, gain=gain)
    save_png(output, img)
    cover = "" if scene.cloud_cover is None else f", cloud cover {scene.cloud_cover:.0%}"
    console.print(f"wrote {output} ({scene.id}, {scene.date}{cover}, {img.shape[1]}x{img.shape[0]})", highlight=False)
