"""``cloudfree build-dataset REGION --source synthetic|local|earthengine --out DIR [--max-patches N]``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from pipeline.cli.app import app, console
from pipeline.errors import DataError
from pipeline.masking.config import METHODS
from pipeline.sources.registry import SourceName, SourceSpec

if TYPE_CHECKING:
    from pipeline.dataset.build import BuildReport

# Kept light at import time: `cloudfree --help` and `regions list` must not pay for torch and zarr.
MASK_METHODS = ("cheapest",) + METHODS


def print_summary(report: BuildReport) -> None:
    """The build summary as rich tables: scenes, splits, rejections, cloud histogram, work done."""
    sim = " [yellow](SIMULATED data)[/]" if report.simulated else ""
    console.print(f"[bold]{report.region}[/] -> {report.out}{sim}  rule [cyan]{report.rule}[/] on {' + '.join(report.families)}, mask [cyan]{report.mask_method}[/]")
    scenes = Table(title="scenes", show_edge=False)
    scenes.add_column("sensor")
    scenes.add_column("found", justify="right")
    scenes.add_column("used", justify="right")
    for s, n in sorted(report.scenes.items()):
        scenes.add_row(s, str(n), str(report.scenes_used.get(s, 0)))
    console.print(scenes)
    splits = Table(title=f"kept: {report.patches_kept}/{report.patches_total} patches, {report.samples} samples", show_edge=False)
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
    source: SourceName = typer.Option(SourceName.synthetic, "--source", help="Where pixels come from: synthetic (offline simulator), local or earthengine."),
    out: Path = typer.Option(..., "--out", help="Dataset folder; rerunning into the same folder resumes and repairs it."),
    max_patches: Optional[int] = typer.Option(None, "--max-patches", min=1, help="Keep at most N patches (dealt round-robin over the splits)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Concurrent writer threads (default: min(4, CPUs))."),
    mask_method: str = typer.Option(
        "cheapest", "--mask-method",
        help=f"Cloud mask: {', '.join(MASK_METHODS)}. 'cheapest' uses Cloud Score+ cs_cdf where the source has it, else 'auto'.",
    ),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of GeoTIFFs for --source local."),
    seed: int = typer.Option(0, "--seed", help="Simulator seed for --source synthetic."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Select patches, export GeoTIFFs + manifest.parquet, write Zarr cubes and report.md."""
    spec = SourceSpec.parse(source, root, {"seed": seed} if source is SourceName.synthetic else None)
    from pipeline.dataset.build import build_dataset

    report = build_dataset(region, spec.name, out, max_patches=max_patches, workers=workers, mask_method=mask_method,
                           source_options=spec.kwargs(), progress=progress)
    print_summary(report)
