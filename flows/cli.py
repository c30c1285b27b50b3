"""The ``cloudfree`` entry point: the library's commands (``pipeline.cli``) plus ``cloudfree demo``.

It lives here, above both ``pipeline`` and ``flows``, because the demo runs the Prefect flows and the
library never imports the orchestration layer. ``python -m pipeline.cli`` (what ``torchrun`` starts)
has every command but ``demo``.

``cloudfree demo``: the whole product on the synthetic archive in a few minutes (``make demo``).

build-dataset (zhengzhou-demo) -> train-model (small U-Net) -> reconstruct-aoi, as Prefect flow runs on a
temporary local server; prints where the COG, STAC item and quicklook are and the trained model's test
metrics next to the composite baseline. The flows live in ``flows/`` and are imported only when the
command runs, so the rest of the CLI does not load Prefect.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import typer

from pipeline.cli import app, main
from pipeline.cli.app import console, parse_date

if TYPE_CHECKING:
    from flows.demo import DemoResult


@app.command("demo")
def demo_cmd(
    epochs: int = typer.Option(12, "--epochs", help="Training epochs of the small U-Net."),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps-per-epoch", help="Cap on optimiser steps per epoch (quicker, worse model)."
    ),
    train_seconds: float = typer.Option(
        240.0, "--train-seconds", help="Stop training after the epoch that passes this many seconds (0: no limit)."
    ),
    date: str = typer.Option(
        "2021-07-22", "--date", help="Reconstruction date (a Sentinel-2 overpass inside the region's window)."
    ),
    data_root: Path = typer.Option(Path("data"), "--data-root", help="Datasets go to DATA_ROOT/zhengzhou-demo."),
    run: Path = typer.Option(Path("runs/zhengzhou-demo-unet"), "--run", help="Training run folder."),
    out: Path = typer.Option(Path("out/demo"), "--out", help="Folder of the COG, provenance, STAC item and quicklook."),
    quiet: bool = typer.Option(
        False, "--quiet", help="Only warnings on the console (the flow runs' log lines are still stored by Prefect)."),
) -> None:
    """Run build-dataset -> train-model -> reconstruct-aoi on zhengzhou-demo (synthetic, offline) and report."""
    import logging

    # Before Prefect is imported (it reads the level once). The runs' INFO lines always reach Prefect's database
    # (`prefect server start` shows them afterwards); --quiet only raises the console handlers' level below.
    if os.environ.get("PREFECT_LOGGING_LEVEL", "").upper() != "DEBUG":
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
    logging.getLogger("pipeline").setLevel(logging.INFO)
    if quiet:  # Prefect's console handler, here and in the temporary server it starts
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"

    from prefect.settings import PREFECT_HOME

    from flows.demo import DemoConfig, run_demo

    # the temporary server's SQLite file lives there; on a fresh clone the folder does not exist yet
    Path(PREFECT_HOME.value()).expanduser().mkdir(parents=True, exist_ok=True)

    cfg = DemoConfig(
        date=parse_date(date),
        data_root=data_root,
        run=run,
        out=out,
        epochs=epochs,
        max_steps_per_epoch=max_steps,
        train_seconds=train_seconds or None,
    )
    t0 = time.perf_counter()
    console.rule("[bold]cloudfree demo[/]: zhengzhou-demo, synthetic archive (a simulation, no network needed)")

    def step(text: str) -> None:
        console.rule(f"[bold cyan]{text}[/]  [dim]({time.perf_counter() - t0:.0f} s)[/]", align="left")

    with _console_level(logging.WARNING if quiet else None):
        result = run_demo(cfg, step)
    _report(result, time.perf_counter() - t0)


def _print_choice(result: "DemoResult") -> None:
    """Which reconstruction the demo hands over, and the truth scores it was chosen by."""
    from rich.table import Table

    from flows.demo import MODEL_MARGIN_DB

    cands = result.candidates
    share = next(iter(cands.values()))["hidden_share"]
    table = Table(title=f"Demo date against the simulator's cloud-free truth (hidden pixels: {share:.0%} of the AOI)",
                  header_style="bold")
    table.add_column("method")
    for head in ("hidden PSNR dB", "hidden MAE", "water F1 hidden"):
        table.add_column(head, justify="right")
    for name, c in cands.items():
        label = f"{name} (chosen)" if name == result.chosen else name
        table.add_row(label, f"{c['hidden_psnr']:.2f}", f"{c['hidden_mae']:.4f}",
                      f"{c['water_f1']:.3f}" if math.isfinite(c["water_f1"]) else "-")
    console.print(table)
    model = next((n for n in cands if n != "composite"), None)
    if model is not None:
        gap = cands[model]["hidden_psnr"] - cands["composite"]["hidden_psnr"]
        mae_m, mae_c = cands[model]["hidden_mae"], cands["composite"]["hidden_mae"]
        if result.chosen == model:
            text = f"The demo's output is {model}: {gap:+.2f} dB over the composite on the hidden pixels."
        else:
            text = (f"The demo's output is the composite: {model} scores {gap:+.2f} dB against it on the hidden "
                    f"pixels (MAE {mae_m:.4f} vs {mae_c:.4f}), and a model must gain {MODEL_MARGIN_DB:.1f} dB without "
                    "losing on MAE to replace the training-free default.")
        console.print(text, highlight=False)


@contextmanager
def _console_level(level: int | None) -> Iterator[None]:
    """Raise the root logger's handlers (the console: Prefect's or the CLI's own) to ``level`` for the block; the
    loggers keep their levels, so Prefect's API handler still stores every INFO line of the runs."""
    import logging

    handlers = logging.getLogger().handlers if level is not None else []
    before = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(max(h.level, level or 0))
    try:
        yield
    finally:
        for h, lv in zip(handlers, before):
            h.setLevel(lv)


def _baseline_note(ev: dict) -> str:
    from pipeline.train.evaluate import baseline_label

    if baseline_label(ev) == "harmonized fill":
        return "the harmonized fill the model corrects (the training-free composite)."
    # not the output composite above: the test split's samples hold only the dates the model sees
    return "the most recent clear observation, not harmonized (the demo's composite above is the harmonized fill)."


def _report(result: "DemoResult", total: float) -> None:
    import rasterio
    from rich.table import Table

    from flows.artifacts import metrics_rows
    from pipeline.train.evaluate import baseline_label

    rec, ds, tr = result.reconstruction, result.dataset, result.training
    console.rule(
        f"[bold green]done in {total:.0f} s[/] (" + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()) + ")"
    )
    with rasterio.open(rec["cog"]) as src:
        crs, bands, shape = src.crs.to_string(), list(src.descriptions), (src.height, src.width)
    files = Table(title="Outputs", show_header=True, header_style="bold")
    files.add_column("what")
    files.add_column("path", overflow="fold")  # full paths, never truncated: users copy them
    files.add_row(
        "cloud-free COG", f"{rec['cog']}  ({crs}, {shape[1]}x{shape[0]} px, bands {', '.join(b or '?' for b in bands)})"
    )
    files.add_row("provenance", rec["provenance"])
    if rec.get("uncertainty"):
        files.add_row("uncertainty", rec["uncertainty"])
    files.add_row("STAC item", rec["stac"])
    files.add_row("quicklook", rec["quicklook"])
    for name, cand in result.candidates.items():
        if name != result.chosen:
            files.add_row(f"{name} (not chosen)", cand["result"]["cog"])
    files.add_row("dataset", f"{ds['out']}  ({ds['samples']} samples, report.md)")
    files.add_row("checkpoint", f"{tr['run_dir']}  (model.pt + model.json, TensorBoard in tb/)")
    console.print(files)
    if result.candidates:
        _print_choice(result)
    ev = tr.get("evaluation")
    if ev:
        rows = metrics_rows(ev)
        # metrics as rows, (method, pixel set) as columns: fits an 80-column terminal without wrapping headers
        table = Table(
            title=f"Test split ({ev['n_samples']} samples): trained {ev['model']} vs {baseline_label(ev)}",
            header_style="bold",
        )
        table.add_column("metric", no_wrap=True)
        for r in rows:
            name = "baseline" if r["method"] == baseline_label(ev) else r["method"]
            table.add_column(f"{name} all", justify="right", no_wrap=True)
            table.add_column(f"{name} cloud", justify="right", no_wrap=True)
        for label, key, fmt in (
            ("PSNR dB", "psnr", "{:.2f}"),
            ("SSIM", "ssim", "{:.4f}"),
            ("SAM °", "sam", "{:.2f}"),
            ("MAE", "mae", "{:.4f}"),
        ):
            cells = [fmt.format(r[f"{key}_{part}"]) if r[f"{key}_{part}"] == r[f"{key}_{part}"] else "-"
                     for r in rows for part in ("all", "cloud")]
            table.add_row(label, *cells)
        f1s = [r.get("water_f1_cloud", math.nan) for r in rows]
        if any(math.isfinite(f1) for f1 in f1s):  # water-under-cloud F1: scored on the cloud pixels only
            table.add_row("water F1",
                          *[c for f1 in f1s for c in ("-", f"{f1:.3f}" if math.isfinite(f1) else "-")])
        console.print(table)
        water = (f" Water F1: {ev['water_index']} of the prediction against the target's, on the cloud pixels."
                 if ev.get("water_index") else "")
        console.print(
            f"baseline = {_baseline_note(ev)} Cloud pixels: {ev['cloud_pixels']}."
            f"{water} Data: synthetic archive (simulation).",
            highlight=False,
        )
    console.print(
        "Open the COG and quicklook in QGIS, or: prefect server start, then browse the flow runs' artifacts.",
        highlight=False,
    )


__all__ = ["app", "main"]
