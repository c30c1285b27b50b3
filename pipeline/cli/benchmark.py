"""``cloudfree benchmark``: reconstruction methods scored against a truth hidden under real clouds of the archive.

The cases, the scores and the files are described in ``pipeline.reconstruct.benchmark``; this module parses
the options and prints the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.cli.app import app, console, parse_date
from pipeline.reconstruct.cases import PERSISTENT_K
from pipeline.sources.registry import SourceName, SourceSpec


@app.command("benchmark")
def benchmark_cmd(
    region: Optional[str] = typer.Argument(
        None, help="Region name (regions/NAME.yaml) or region YAML file; leave out with --root to benchmark the "
        "whole local archive (its first scene's footprint and its date range)."),
    source: Optional[SourceName] = typer.Option(
        None, "--source", help="Where the archive's scenes come from (default: local with --root, else synthetic)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of GeoTIFFs for --source local."),
    out: Path = typer.Option(Path("benchmark"), "--out",
                             help="Output folder: benchmark.json, benchmark.md, quicklooks/ (created if missing)."),
    methods: Optional[str] = typer.Option(
        None, "--methods", help="Comma-separated methods: composite (the default of reconstruct), last-clear, "
        "global-fit, or training run folders (default: every training-free variant)."),
    persistent: int = typer.Option(
        PERSISTENT_K, "--persistent", help="Persistent-cloud cases: also paste real clouds onto this many dates "
        "before each target (0: the standard cases only)."),
    target: Optional[List[str]] = typer.Option(
        None, "--target", help="Only this clear target date YYYY-MM-DD; repeat for several (default: every one)."),
    simulator: bool = typer.Option(
        True, "--simulator/--no-simulator", help="Where the source knows its truth (synthetic): also score each "
        "cloudy date under its own cloud against the simulator's cloud-free truth (variant 'simulator')."),
    max_cases: Optional[int] = typer.Option(
        None, "--max-cases", help="Run only this many (target, cloud) pairs, spread evenly over all of them."),
) -> None:
    """Score reconstruction methods on truth-known cases: clear dates of the archive hidden under its real clouds."""
    from pipeline.errors import SourceError

    if region is None and root is None:
        raise SourceError("give a REGION (name or YAML file), or --root DIR to benchmark a whole local archive")
    name = source.value if source is not None else (SourceName.local.value if root is not None else None)
    spec = SourceSpec.parse(name or SourceSpec.model_fields["name"].default, root)

    from pipeline.reconstruct.benchmark import run_benchmark, table_columns  # torch, rasterio
    from pipeline.regions import load_region

    aoi = load_region(region) if region is not None else None
    targets = [parse_date(d, "--target") for d in target] if target else None
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None
    with console.status("benchmark ...") as status:
        report = run_benchmark(aoi, spec.build(), out, methods=chosen, persistent=persistent, max_cases=max_cases,
                               targets=targets, simulator=simulator,
                               progress=lambda text: status.update(f"benchmark: {text}"))

    from rich.table import Table

    s = report.series
    heads, rows = table_columns(report.means)
    table = Table(title=f"benchmark {s.region.name} ({s.source_name}, {len(s.dates)} {s.sensor} dates): means over "
                  "cases; hidden = the pixels under the pasted cloud", title_justify="left")
    table.add_column("")
    for variant, name in heads:
        table.add_column(f"{variant}\n{name}", justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    warned = sum(bool(r["warnings"]) for c in report.cases for r in c.methods.values())
    if warned:
        console.print(f"[yellow]{warned} of {len(report.cases) * len(report.methods)} reconstruction(s) warned[/] "
                      "(e.g. pixels with no clear observation); their warnings are in benchmark.json")
    console.print(f"[green]wrote[/] {report.out / 'benchmark.json'}, {report.out / 'benchmark.md'} and "
                  f"{len(report.cases)} quicklook(s) in {report.out / 'quicklooks'} ({report.seconds:.0f} s)")
