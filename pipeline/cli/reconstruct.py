"""``cloudfree reconstruct``: AOI + date + checkpoint -> cloud-free COG, provenance, source dates, STAC Item,
quicklook.

The options are the fields of ``pipeline.reconstruct.config.ReconstructConfig`` (``--max-age-days`` and
``--fit``: of its ``fill``): their defaults, help texts and rules live there, and a bad value comes back as one
line naming the option (exit code 2).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, List, Optional

import typer

from pipeline.cli.app import app, console, err_console, parse_date
from pipeline.cli.dataset import YES_HELP
from pipeline.errors import DataError, cli_option
from pipeline.harmonize import FillConfig
from pipeline.reconstruct.config import AuxDates, Compression, OutType, ReconstructConfig, Unobserved
from pipeline.regions import check_size, load_region
from pipeline.sources.registry import SourceName, SourceSpec


class Fit(str, enum.Enum):
    local = "local"
    global_ = "global"
    none = "none"


def _option(field: str) -> Any:
    """A typer option of a config field: the config's default and description, spelled ``--field-name``."""
    info = ReconstructConfig.model_fields[field]
    return typer.Option(info.default, cli_option(field), help=info.description)


def _fill_option(field: str) -> Any:
    """A typer option of a ``fill`` field (checkpoint composite)."""
    info = FillConfig.model_fields[field]
    return typer.Option(info.default, cli_option(field), help=f"Checkpoint composite: {info.description}")


def _spelled(field: str) -> str:
    # fill.max_age_days is --max-age-days on the command line
    return cli_option(field.removeprefix("fill."))


@app.command("reconstruct")
def reconstruct_cmd(
    region: str = typer.Argument(..., help="Region name (regions/NAME.yaml) or path to a region YAML file."),
    date: List[str] = typer.Option(
        ..., "--date", help="Target date YYYY-MM-DD; repeat for several dates (a VRT stacks them)."),
    checkpoint: str = typer.Option(
        "composite", "--checkpoint", help="Training run folder (model.pt + model.json) or 'composite' (no training)."),
    source: SourceName = typer.Option(SourceSpec.model_fields["name"].default, "--source",
                                      help="Where the input scenes come from."),
    out: Path = typer.Option(Path("out"), "--out", help="Output folder (created if missing)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of GeoTIFFs for --source local."),
    keep_clear: bool = _option("keep_clear"),
    dask_address: Optional[str] = _option("dask_address"),
    tile: int = _option("tile"),
    overlap: int = _option("overlap"),
    batch_size: int = _option("batch_size"),
    block: int = _option("block"),
    dtype: OutType = _option("dtype"),
    compress: Compression = _option("compress"),
    mask_method: str = _option("mask_method"),
    sar_max_days: int = _option("sar_max_days"),
    aux_dates: AuxDates = _option("aux_dates"),
    device: Optional[str] = _option("device"),
    max_age_days: int = _fill_option("max_age_days"),
    fit: Fit = _fill_option("fit"),
    shadow_check_px: int = _fill_option("shadow_check_px"),
    class_offsets: int = _fill_option("class_offsets"),
    shadow_sar_change_db: str = typer.Option(
        f"{FillConfig.model_fields['shadow_sar_change_db'].default:g}", "--shadow-sar-change-db",
        help=f"Checkpoint composite: {FillConfig.model_fields['shadow_sar_change_db'].description} Pass 'none' "
        "for no S1 test."),
    fill_unobserved: Unobserved = _option("fill_unobserved"),
    yes: bool = typer.Option(False, "--yes", "-y", help=YES_HELP),
) -> None:
    """Reconstruct cloud-free imagery for REGION on --date: COG, provenance, source dates, STAC Item, quicklook.

    --checkpoint composite (the default, no training) fills what the date does not see clearly from the most recent
    clear earlier date, harmonized to the date's radiometry; a training run folder runs its model instead.
    """
    if sar_max_days < 0:
        raise DataError(f"--sar-max-days {sar_max_days}: a number of days cannot be negative; pass 0 (S1 on the same "
                        f"day) or more, e.g. the default {ReconstructConfig.model_fields['sar_max_days'].default}")
    config = ReconstructConfig.parse({
        "source": SourceSpec.parse(source, root), "keep_clear": keep_clear, "dask_address": dask_address, "tile": tile,
        "overlap": overlap, "batch_size": batch_size, "block": block, "dtype": dtype, "compress": compress,
        "mask_method": mask_method, "sar_max_days": sar_max_days, "aux_dates": aux_dates, "device": device,
        "fill": {"max_age_days": max_age_days, "fit": Fit(fit).value, "shadow_check_px": shadow_check_px,
                 "class_offsets": class_offsets,
                 "shadow_sar_change_db": None if shadow_sar_change_db.lower() == "none" else shadow_sar_change_db},
        "fill_unobserved": fill_unobserved,
    }, option=_spelled)
    dates = [parse_date(d) for d in date]
    aoi = load_region(region)
    # before any scene is read: the hidden intermediates alone can fill a disk
    check_size(aoi, yes=yes, dtype=OutType(config.dtype).value)
    for d in dates:
        if not aoi.window.start <= d <= aoi.window.end:
            # a date outside the window is allowed (reconstruct searches back from the date itself), but it is
            # often a typo, and a model trained on the window has not seen that season
            err_console.print(
                f"[yellow]warning:[/] --date {d} is outside region {aoi.name}'s window {aoi.window.start}.."
                f"{aoi.window.end} (its dataset's dates); reconstructing anyway - check the date, or widen the window",
                highlight=False, soft_wrap=True)
    from pipeline.reconstruct.run import reconstruct_dates  # torch, rasterio: only once a command runs

    with console.status(f"reconstructing {region} on {', '.join(map(str, dates))} ..."):
        results, vrt = reconstruct_dates(region, dates, checkpoint, out, config)
    for r in results:
        resumed = f" (resumed, {r.blocks_computed}/{r.blocks_total} blocks computed)" if r.resumed else ""
        console.print(f"[green]wrote[/] {r.cog}{resumed}")
        for extra in (r.provenance, r.source_days, r.uncertainty, r.stac, r.quicklook):
            if extra is not None:
                console.print(f"      {extra}")
        project = r.cog.with_suffix(".qgs")
        if project.exists():
            console.print(f"      {project}  (QGIS project: every layer styled; each .tif also has its .qml)")
        for warning in r.warnings:
            console.print(f"[yellow]warning:[/] {r.plan.target_date}: {warning}")
    if vrt is not None:
        console.print(f"[green]wrote[/] {vrt}")
