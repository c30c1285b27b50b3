"""``cloudfree regions list|show|validate|new`` and ``cloudfree scenes``."""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
from pathlib import Path
from typing import Any, List, Optional, Tuple

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from pipeline.cli.app import app, console, err_console, parse_date
from pipeline.errors import CloudfreeError, RegionError
from pipeline.regions import (
    MAX_MEGAPIXELS_ENV,
    SENSOR_FAMILIES,
    Region,
    estimate_size,
    geojson_bounds,
    list_regions,
    load_region,
    max_megapixels,
    parse_region,
    regions_dir,
)
from pipeline.sources.registry import SourceName, SourceSpec

regions_app = typer.Typer(help="Areas of interest: list, show, validate and create region files.",
                          no_args_is_help=True)
app.add_typer(regions_app, name="regions")


class Family(str, enum.Enum):
    s1 = "s1"
    s2 = "s2"
    landsat = "landsat"


def _print_table(table: Table) -> None:
    # piped or captured output has no terminal width; 80 columns would cut scene ids, so widen it
    need = Measurement.get(console, console.options.update(width=10_000), table).maximum
    out = console if console.is_terminal or need <= console.width else Console(width=need)
    out.print(table)


def _bbox_text(region: Region) -> str:
    try:
        w, s, e, n = region.lonlat_bounds()
    except CloudfreeError:
        return "?"
    return f"[{w:g}, {s:g}, {e:g}, {n:g}]"


@regions_app.command("list")
def list_cmd() -> None:
    """Table of the region files in the regions folder (CLOUDFREE_REGIONS_DIR overrides it)."""
    table = Table(title=f"regions in {regions_dir()}")
    for col in ("name", "bbox", "crs", "resolution", "window", "sensors", "active"):
        table.add_column(col, no_wrap=col in ("name", "window"))
    for name in list_regions():
        try:
            r = load_region(name)
        except RegionError as exc:
            # one broken file must not hide the others; `regions validate` prints the full reason
            table.add_row(name, f"[red]invalid: {escape(str(exc).splitlines()[0])}[/]", "", "", "", "", "")
            continue
        table.add_row(
            r.name,
            _bbox_text(r),
            r.target_crs(),
            f"{r.resolution:g} m",
            f"{r.window.start}..{r.window.end}",
            ", ".join(r.sensors),
            "yes" if r.active else "no",
        )
    _print_table(table)


@regions_app.command("show")
def show_cmd(name: str = typer.Argument(..., help="Region name (regions/NAME.yaml) or path to a YAML file.")) -> None:
    """The validated region (defaults filled in) and its derived grid: CRS, size, patch count."""
    r = load_region(name)
    dumped = yaml.safe_dump(
        r.model_dump(mode="json", exclude_none=True), sort_keys=False, default_flow_style=None, width=10_000
    )
    # markup=False: rich would take "[s1, s2]" for a style tag and print "sensors:" empty
    console.print(dumped.rstrip(), highlight=False, soft_wrap=True, markup=False)
    g = r.grid()
    size, stride = r.patch.size, r.patch.stride or r.patch.size
    left, bottom, right, top = g.bounds
    console.print(
        "\n# derived grid\n"
        f"crs: {g.crs}\n"
        f"size: {g.width} x {g.height} px at {r.resolution:g} m\n"
        f"bounds: [{left:.0f}, {bottom:.0f}, {right:.0f}, {top:.0f}]\n"
        f"patches: {len(r.patches())} of {size} px, stride {stride}",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )


def _print_size(region: Region) -> None:
    """The region's size estimate and, over the limit, what build-dataset and reconstruct will do about it."""
    est = estimate_size(region)
    for line in est.lines():
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    limit = max_megapixels()
    if est.megapixels > limit:
        err_console.print(
            f"[yellow]warning:[/] {est.megapixels:,.1f} Mpx is over the {limit:g} Mpx limit ({MAX_MEGAPIXELS_ENV}): "
            "build-dataset and reconstruct refuse it without --yes; shrink the bbox or use a coarser resolution",
            highlight=False, soft_wrap=True)


@regions_app.command("validate")
def validate_cmd(file: Path = typer.Argument(..., help="Region YAML file to check.")) -> None:
    """Exit 0 and print "ok" and the region's size (pixels, disk, memory) when FILE is a valid region; otherwise print
    why and exit 2."""
    try:
        region = load_region(file)  # also opens a GeoJSON geometry file, so a broken one fails here
        console.print("ok")
        _print_size(region)
    except RegionError as exc:
        # the error IS this command's answer, so it is printed here rather than left to main()
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _sensor_list(values: List[str]) -> list[str]:
    """``--sensors s1,s2`` or ``--sensors s1 --sensors s2`` -> ["s1", "s2"]."""
    out = [s.strip().lower() for v in values for s in v.split(",") if s.strip()]
    unknown = [s for s in out if s not in SENSOR_FAMILIES]
    if unknown or not out:
        raise RegionError(f"--sensors {','.join(values)!r}: unknown sensor(s) {unknown or 'none given'}; use some of "
                          f"{', '.join(SENSOR_FAMILIES)}, e.g. --sensors s1,s2")
    return list(dict.fromkeys(out))


def _geojson_geometry(path: Path, out: Path) -> tuple[str, tuple[float, float, float, float]]:
    """A region's ``geometry`` value (the GeoJSON path relative to the region file) and the AOI's bounds."""
    where = f"--geojson {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegionError(f"{where}: file not found; pass the path of a GeoJSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise RegionError(f"{where}: not valid GeoJSON ({why}); pass a .geojson file with a Polygon") from None
    bounds = geojson_bounds(data, where)
    try:
        rel = os.path.relpath(path.resolve(), out.resolve().parent)
    except ValueError:  # another drive on Windows: only an absolute path reaches it
        rel = str(path.resolve())
    return Path(rel).as_posix(), bounds


@regions_app.command("new")
def new_cmd(
    name: str = typer.Argument(..., help="Region name: a lower-case slug (letters, digits, '-'), also the file name."),
    bbox: Optional[Tuple[float, float, float, float]] = typer.Option(
        None, "--bbox", help="AOI as W S E N in degrees (EPSG:4326), e.g. --bbox 67.9 26.4 68.0 26.5."),
    geojson: Optional[Path] = typer.Option(
        None, "--geojson", help="AOI from a GeoJSON Polygon/MultiPolygon file instead of --bbox (the region refers "
        "to the file, relative to the region file)."),
    event_date: str = typer.Option(..., "--event-date", help="Date of the event, YYYY-MM-DD."),
    days_before: int = typer.Option(
        30, "--days-before", help="Search window starts this many days before the event (pre-event references and "
        "TCSEN12's 30-day input gap)."),
    days_after: int = typer.Option(30, "--days-after", help="Search window ends this many days after the event."),
    sensors: List[str] = typer.Option(
        ["s1", "s2"], "--sensors", help="Sensor families, comma-separated or repeated: s1, s2, landsat."),
    resolution: Optional[float] = typer.Option(
        None, "--resolution", help="Pixel size in metres (default: 10, or 30 for a Landsat-only region)."),
    description: str = typer.Option("", "--description", help="One line about the AOI and the event."),
    active: bool = typer.Option(
        False, "--active/--inactive", help="Let the nightly build-dataset/new-aoi deployment build its dataset."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Region file to write (default: NAME.yaml in the regions folder)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a region file for a new AOI from a bbox or a GeoJSON file and an event date; its defaults (the TCSEN12
    rule, S1 tolerance following the S1 constellation of the dates) build a dataset as they are.

    A place-name lookup (geocoding) needs the network and is not offered: look the bbox up and pass --bbox.
    """
    if (bbox is None) == (geojson is None):
        raise RegionError("give exactly one of --bbox W S E N or --geojson FILE for the AOI")
    event = parse_date(event_date, "--event-date")
    for option, days in (("--days-before", days_before), ("--days-after", days_after)):
        if days < 0:
            raise RegionError(f"{option} {days}: a number of days cannot be negative; pass 0 or more, e.g. 30")
    families = _sensor_list(sensors)
    path = out or regions_dir() / f"{name}.yaml"
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise RegionError(f"--out {path}: a region file ends in .yaml; pass e.g. --out {path.with_suffix('.yaml')}")
    if path.exists() and not force:
        raise RegionError(f"{path} exists; pass --force to overwrite it or choose another --out / NAME")
    data: dict[str, Any] = {"name": name}
    if description:
        data["description"] = description
    data["active"] = active
    if geojson is not None:
        data["geometry"], bounds = _geojson_geometry(geojson, path)
    else:
        assert bbox is not None
        bounds = bbox
        data["bbox"] = list(bbox)
    data.update({
        "crs": "auto",
        "resolution": resolution if resolution is not None else (10 if "s2" in families or "landsat" not in families
                                                                   else 30),
        "event_date": event,
        "window": {"start": event - dt.timedelta(days=days_before), "end": event + dt.timedelta(days=days_after)},
        "sensors": families,
    })
    # checked before anything is written; a GeoJSON AOI is checked (and sized) by its bounds, as its grid is made
    plain = {k: v for k, v in data.items() if k != "geometry"}
    region = parse_region({**plain, "bbox": bounds}, str(path))
    if path.parent.resolve() == regions_dir().resolve() and path.stem != name:
        raise RegionError(f"--out {path}: files in the regions folder are named after the region; use "
                          f"--out {path.with_name(name + '.yaml')} or NAME {path.stem}")
    aoi = f"--geojson {geojson}" if geojson is not None else "--bbox " + " ".join(f"{v:g}" for v in bounds)
    header = (f"# cloudfree regions new {name} {aoi} --event-date {event} --days-before {days_before} "
              f"--days-after {days_after}\n# selection, patch and splits are the defaults; the S1 tolerance "
              "(selection.sar_max_days) follows the S1 revisit over the window unless set here.\n")
    body = yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=None, width=10_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body, encoding="utf-8")
    load_region(path)  # the file as written, GeoJSON path included
    console.print(f"wrote {path}", highlight=False, soft_wrap=True, markup=False)
    _print_size(region)


def _plain(value: Any) -> Any:
    """Tuples as lists: YAML's safe dumper has no tuples."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _parse_date(value: Optional[dt.datetime]) -> Optional[dt.date]:
    return value.date() if value is not None else None


@app.command("scenes")
def scenes_cmd(
    region: str = typer.Argument(..., help="Region name or YAML path."),
    source: SourceName = typer.Option(SourceName.synthetic, "--source", help="Where scenes come from."),
    sensor: Optional[Family] = typer.Option(
        None, "--sensor", help="One sensor family (default: all the region's sensors)."
    ),
    start: Optional[dt.datetime] = typer.Option(
        None, "--start", formats=["%Y-%m-%d"], help="First date (default: the region's window start)."
    ),
    end: Optional[dt.datetime] = typer.Option(
        None, "--end", formats=["%Y-%m-%d"], help="Last date (default: the region's window end)."
    ),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of GeoTIFFs for --source local."),
) -> None:
    """Scenes a source has over REGION in its window: id, time, sensor, cloud %."""
    r = load_region(region)
    first, last = _parse_date(start) or r.window.start, _parse_date(end) or r.window.end
    if last < first:
        raise CloudfreeError(f"--end {last} is before --start {first}; swap them")
    options = SourceSpec.parse(source, root).kwargs()
    from pipeline.sources.registry import get_source

    src = get_source(source.value, **options)
    families = [sensor.value] if sensor else list(r.sensors)
    found = sorted((s for fam in families for s in src.search(r, first, last, fam)), key=lambda s: (s.datetime, s.id))

    table = Table(title=f"{r.name}: {len(found)} scene(s) from {source.value}, {first}..{last}")
    table.add_column("id", no_wrap=True, overflow="fold")
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("sensor", no_wrap=True)
    table.add_column("cloud %", justify="right", no_wrap=True)
    for s in found:
        when = s.datetime.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        if s.properties.get("date_known") is False:
            when += " (pseudo)"
        cloud = "-" if s.cloud_cover is None else f"{100 * s.cloud_cover:.1f}"
        table.add_row(s.id, when, s.sensor, cloud)
    _print_table(table)
