"""``cloudfree regions list|show|validate`` and ``cloudfree scenes``."""

from __future__ import annotations

import datetime as dt
import enum
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from pipeline.cli.app import app, console, err_console
from pipeline.errors import CloudfreeError, RegionError
from pipeline.regions import Region, list_regions, load_region, regions_dir
from pipeline.sources.registry import SourceName, SourceSpec

regions_app = typer.Typer(help="Areas of interest: list, show and validate region files.", no_args_is_help=True)
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
            table.add_row(name, f"[red]invalid: {str(exc).splitlines()[0]}[/]", "", "", "", "", "")
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
    console.print(dumped.rstrip(), highlight=False, soft_wrap=True)
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
    )


@regions_app.command("validate")
def validate_cmd(file: Path = typer.Argument(..., help="Region YAML file to check.")) -> None:
    """Exit 0 and print "ok" when FILE is a valid region; otherwise print why and exit 2."""
    try:
        load_region(file)  # also opens a GeoJSON geometry file, so a broken one fails here
    except RegionError as exc:
        # the error IS this command's answer, so it is printed here rather than left to main()
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print("ok")


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
