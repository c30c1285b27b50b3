"""``cloudfree build-dataset REGION --source synthetic|local|earthengine --out DIR [--max-patches N]``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.table import Table

from pipeline.cli.app import app, console
from pipeline.dataset.config import BuildConfig
from pipeline.errors import cli_option
from pipeline.regions import DEFAULT_MAX_MEGAPIXELS, MAX_MEGAPIXELS_ENV, check_size, load_region
from pipeline.sources.registry import SourceName, SourceSpec

if TYPE_CHECKING:
    from pipeline.dataset.build import BuildReport

YES_HELP = (f"Run even when the region is over the size limit ({MAX_MEGAPIXELS_ENV}, default "
            f"{DEFAULT_MAX_MEGAPIXELS:g} Mpx = 1,000 km² at 10 m; `regions validate` prints the estimate).")

# Kept light at import time (BuildConfig is pydantic only): `cloudfree --help` and `regions list` must not
# pay for torch and zarr; the build itself is imported in the command body.


def _option(name: str, *flags: str) -> Any:
    """A ``typer.Option`` whose default and help are the ``BuildConfig`` field's, so each is written once."""
    f = BuildConfig.model_fields[name]
    return typer.Option(f.default, *flags, help=f.description)


def print_summary(report: BuildReport) -> None:
    """The build summary as rich tables: scenes, splits, rejections, cloud histogram, work done."""
    sim = " [yellow](SIMULATED data)[/]" if report.simulated else ""
    console.print(f"[bold]{report.region}[/] -> {report.out}{sim}  rule [cyan]{report.rule}[/] on "
                  f"{' + '.join(report.families)}, mask [cyan]{report.mask_method}[/]")
    scenes = Table(title="scenes", show_edge=False)
    scenes.add_column("sensor")
    scenes.add_column("found", justify="right")
    scenes.add_column("used", justify="right")
    for s, n in sorted(report.scenes.items()):
        scenes.add_row(s, str(n), str(report.scenes_used.get(s, 0)))
    console.print(scenes)
    kept = f"kept: {report.patches_kept}/{report.patches_total} patches, {report.samples} samples"
    splits = Table(title=kept, show_edge=False)
    splits.add_column("split")
    splits.add_column("patches", justify="right")
    splits.add_column("samples", justify="right")
    for s in ("train", "val", "test"):
        splits.add_row(s, str(report.split_patches.get(s, 0)), str(report.split_samples.get(s, 0)))
    console.print(splits)
    rej = Table(title="patches rejected", show_edge=False)
    rej.add_column("reason")
    rej.add_column("patches", justify="right")
    for r, n in sorted(report.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
        rej.add_row(r, str(n))
    if not report.rejected:
        rej.add_row("none", "0")
    console.print(rej)
    console.print("cloud+shadow cover of optical patch-dates:")
    from pipeline.dataset.build import histogram_lines

    for line in histogram_lines(report.cloud_histogram):
        console.print("  " + line, highlight=False)
    console.print(
        f"files: {report.files} ({report.files_written} written, {report.files_skipped} verified and skipped, "
        f"{report.files_repaired} repaired); masks: {report.masks_computed} computed, {report.masks_cached} cached; "
        f"cubes rewritten: {', '.join(report.cubes_written) or 'none'}; {report.elapsed:.1f} s",
        highlight=False,
    )
    console.print(f"report: {report.out / 'report.md'}", highlight=False)


@app.command("build-dataset")
def build_dataset_cmd(
    region: str = typer.Argument(..., help="Region name (regions/NAME.yaml) or path to a region YAML file."),
    source: SourceName = typer.Option(
        SourceSpec.model_fields["name"].default, "--source",
        help="Where pixels come from: synthetic (offline simulator), local or earthengine.",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Dataset folder; rerunning into the same folder resumes and repairs it."
    ),
    max_patches: Optional[int] = _option("max_patches", "--max-patches"),
    workers: Optional[int] = _option("workers", "--workers"),
    mask_method: str = _option("mask_method", "--mask-method"),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of GeoTIFFs for --source local."),
    seed: int = typer.Option(0, "--seed", help="Simulator seed for --source synthetic."),
    progress: bool = _option("progress", "--progress/--no-progress"),
    yes: bool = typer.Option(False, "--yes", "-y", help=YES_HELP),
) -> None:
    """Select patches, export GeoTIFFs + manifest.parquet, write Zarr cubes and report.md."""
    spec = SourceSpec.parse(source, root, {"seed": seed} if source is SourceName.synthetic else None)
    config = BuildConfig.parse(cli_option, source=spec, max_patches=max_patches, workers=workers,
                               mask_method=mask_method, progress=progress)
    check_size(load_region(region), yes=yes)  # before any scene is read: a too large AOI fails in seconds
    from pipeline.dataset.build import run_build

    print_summary(run_build(region, out, config))
