"""``reconstruct-aoi``: AOI + date + checkpoint -> cloud-free COG, provenance, source dates, STAC Item, quicklook.

One Prefect task, ``reconstruct``, runs ``pipeline.reconstruct.run.reconstruct`` over the whole AOI: the blocks
are computed inside it (one after the other, or on a dask cluster when ``CLOUDFREE_DASK`` names one), not as
Prefect tasks of their own. A watcher thread follows the sidecar progress file that reconstruct rewrites after
every block (``.<stem>.progress.json`` in the output folder, the same file that makes a rerun resume) and turns
it into a progress artifact and "block i of n written" lines in the run's log. On the synthetic archive, with
``score_truth``, a second task scores the COG against the simulator's true cloud-free scene (all pixels and
pixels under cloud on the date); a checkpoint's own evaluation (``eval-<split>/metrics.json`` of train-model)
joins the metrics table.

Artifact keys name the region, the date and the model (``reconstruct-<region>-<yyyymmdd>-<model>``), so a run
of one model never replaces another model's latest artifacts.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.artifacts import BlockProgress, library_logs_to_runs, publish_markdown, publish_quicklook, publish_table
from flows.common import CACHED, SOURCE_TASK, run_cached, source_tags, task_runner
from flows.params import ReconstructParams
from pipeline.reconstruct.config import ReconstructConfig
from pipeline.regions import Region

METRICS = ("psnr", "ssim", "sam", "mae", "rmse")  # reported against the simulator's truth
PIXEL_GROUPS = (("all", ""), ("cloud-covered", "cloud_"))  # label, prefix of the metric keys
PROGRESS_POLL_S = 1.0  # how often the watcher reads the progress file (a few hundred bytes per block)


def _dask_address() -> str | None:
    spec = os.environ.get("CLOUDFREE_DASK", "").strip()
    return spec if spec and spec != "local" else None


def model_name(checkpoint: str) -> str:
    """The model's name as reconstruct puts it in the output file names: ``composite`` or the run's ``model``."""
    if checkpoint == "composite":
        return "composite"
    from pipeline.train.checkpoint import read_meta

    return str(read_meta(Path(checkpoint))["model"])


def progress_file(region: Region, date: dt.date, checkpoint: str, out: str) -> Path:
    """Where reconstruct records its finished blocks (``pipeline.reconstruct.run.OutputPaths.progress``)."""
    from pipeline.reconstruct.run import OutputPaths

    return OutputPaths(Path(out), f"{region.name}_{date:%Y%m%d}_{model_name(checkpoint)}").progress


def _blocks_done(path: Path) -> tuple[str, frozenset[str]] | None:
    try:
        data = json.loads(path.read_text())
        return str(data.get("fingerprint")), frozenset(data.get("done", []))
    except (OSError, ValueError, AttributeError, TypeError):  # not there yet, or gone (the run committed)
        return None


def _watch(path: Path, before: tuple[str, frozenset[str]] | None, progress: BlockProgress, stop: threading.Event,
           poll_s: float) -> None:
    """Report the progress file's block count whenever it changes, until ``stop`` is set. The file as it was
    before the run (``before``: an interrupted run's, maybe of other settings) counts once this run rewrites it."""
    started = time.monotonic()
    ours = False
    reported = resumed = -1
    while not stop.wait(poll_s):
        now = _blocks_done(path)
        if now is None or (not ours and now == before) or len(now[1]) == reported:
            continue
        if not ours:  # the same settings as the file before: a resumed run, those blocks were already there
            resumed = len(before[1]) if before is not None and before[0] == now[0] else 0
        ours = True
        reported = len(now[1])
        progress.update(reported, time.monotonic() - started, resumed)


@task(name="reconstruct", **SOURCE_TASK, **CACHED)
def reconstruct_task(region: Region, date: dt.date, checkpoint: str, out: str, config: ReconstructConfig,
                     checkpoint_sha256: str) -> dict[str, Any]:
    """Run the block-wise reconstruction (every block in this one task, tracked by a progress artifact); returns
    output paths, input dates and COG/STAC validation."""
    from pipeline.reconstruct.run import reconstruct
    from pipeline.reconstruct.tiling import plan_blocks

    logger = get_run_logger()
    grid = region.grid()
    total = len(plan_blocks(grid.height, grid.width, config.block))
    model = model_name(checkpoint)
    what = f"{region.name} {date} {model}"
    logger.info("%s: %d block(s) of up to %d x %d px over %d x %d px", what, total, config.block, config.block,
                grid.width, grid.height)
    progress = BlockProgress(f"reconstruct-progress-{region.name}-{date:%Y%m%d}-{model}", total, what, logger)
    stop = threading.Event()
    path = progress_file(region, date, checkpoint, out)
    # the thread gets this task's context: the API client settings (a test harness's temporary server included)
    watcher = threading.Thread(target=contextvars.copy_context().run, name="reconstruct-progress", daemon=True,
                               args=(_watch, path, _blocks_done(path), progress, stop, PROGRESS_POLL_S))
    watcher.start()
    try:
        # the scheduler is where this task runs, not what it computes: chosen here, so it stays out of the cache key
        r = reconstruct(region, date, checkpoint, out, config.model_copy(update={"dask_address": _dask_address()}))
    finally:
        stop.set()
        watcher.join()
    progress.update(r.blocks_total)
    logger.info("%s: %d of %d blocks computed%s", r.cog, r.blocks_computed, r.blocks_total,
                " (resumed)" if r.resumed else "")
    for warning in r.warnings:
        logger.warning("%s %s: %s", region.name, date, warning)
    return {
        "cog": str(r.cog), "provenance": str(r.provenance), "stac": str(r.stac), "quicklook": str(r.quicklook),
        "uncertainty": str(r.uncertainty) if r.uncertainty else None,
        "source_days": str(r.source_days) if r.source_days else None, "warnings": list(r.warnings),
        "fill": r.fill, "model": model,
        "blocks": r.blocks_total, "blocks_computed": r.blocks_computed, "resumed": r.resumed,
        "optical_dates": [d.isoformat() for d in r.plan.optical_dates],
        "sar_dates": [d.isoformat() for d in r.plan.sar_dates], "scene_ids": r.plan.scene_ids(),
        "target_scene_ids": [s.id for s in r.plan.target_scenes], "optical_sensor": r.plan.optical_sensor,
        "validation": r.validation,
    }


@task(name="score-against-truth", **CACHED)
def truth_metrics_task(region: Region, result: dict[str, Any], source_options: dict[str, Any]) -> dict[str, Any] | None:
    """Synthetic archive only: metrics of the COG against the simulator's true cloud-free scene of the date."""
    import numpy as np
    import rasterio
    import torch

    from pipeline.masking.codes import is_contaminated
    from pipeline.sources.synthetic.source import SyntheticSource
    from pipeline.train.metrics import compute_metrics

    if not result["target_scene_ids"]:
        return None
    src = SyntheticSource(**source_options)
    grid = region.grid()
    with rasterio.open(result["cog"]) as ds:
        names = list(ds.descriptions)
        # float before filling: a uint16 COG (DN, 0 = nodata) has no NaN
        pred = ds.read(masked=True).astype(np.float32).filled(np.nan)
        if ds.dtypes[0] == "uint16":
            pred = pred * np.float32(ds.scales[0]) + np.float32(ds.offsets[0])
    wanted = set(result["target_scene_ids"])
    scenes = [s for s in src.search(region, region.window.start, region.window.end, "s2") if s.id in wanted]
    if not scenes:
        return None
    truth = src.truth(scenes[0], grid)
    tnames = [str(b) for b in truth["clear"]["band"].values]
    bands = [b for b in names if b in tnames]
    target = np.stack([truth["clear"].sel(band=b).values for b in bands]).astype(np.float32)
    pred = pred[[names.index(b) for b in bands]]
    valid = np.isfinite(pred).all(0) & np.isfinite(target).all(0)
    cloud = is_contaminated(truth["mask"].values)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.nan_to_num(np.clip(a, 0, 1), nan=0.0)).float()[None]

    m = compute_metrics(t(pred), t(target), torch.from_numpy(valid)[None, None].float(),
                        torch.from_numpy(cloud)[None, None].float())
    cloud_fraction = float(cloud[valid].mean()) if valid.any() else float("nan")
    return {"scene_id": scenes[0].id, "bands": bands, "cloud_fraction": cloud_fraction, "metrics": m}


def _outputs(result: dict[str, Any]) -> list[str | None]:
    return [result["cog"], result["provenance"], result["stac"], result["quicklook"], result["uncertainty"],
            result.get("source_days")]


def _checkpoint_sha(checkpoint: str) -> str:
    # part of the cache key: retraining into the same folder must not reuse the old reconstruction
    if checkpoint == "composite":
        return "composite"
    from pipeline.files import sha256_file

    return sha256_file(Path(checkpoint) / "model.pt")


def _validation_lines(validation: dict[str, Any]) -> list[str]:
    """reconstruct's check results (``{file: COG ok, 'stac_core': ok, 'stac_extensions': {schema: verdict}}``)
    as a readable list."""
    lines = []
    for name, ok in validation.items():
        if name == "stac_core":
            lines.append(f"- STAC Item core schema: {'valid' if ok else '**INVALID**'}")
        elif name == "stac_extensions":
            for uri, verdict in (ok or {}).items():
                # .../projection/v2.0.0/schema.json -> projection v2.0.0
                parts = [p for p in str(uri).split("/") if p]
                label = " ".join(parts[-3:-1]) if len(parts) >= 3 else str(uri)
                lines.append(f"- STAC extension {label}: {verdict}")
        else:
            lines.append(f"- `{name}`: {'valid Cloud Optimized GeoTIFF' if ok else '**NOT a valid COG**'}")
    return lines


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def benchmark(checkpoint: str) -> list[dict[str, Any]]:
    """The checkpoint's own scores from train-model (``eval-<split>/metrics.json``: the model and the composite
    baseline on a held-out split), if they belong to these weights; [] for ``composite`` or none."""
    if checkpoint == "composite":
        return []
    from pipeline.train.checkpoint import read_meta

    sha = read_meta(Path(checkpoint)).get("model_sha256")
    out = []
    for f in sorted(Path(checkpoint).glob("eval-*/metrics.json")):
        try:
            ev = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(ev, dict) and "results" in ev and (sha is None or ev.get("model_sha256") == sha):
            out.append(ev)
    return out


def metrics_table(model: str, truth: dict[str, Any] | None, evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (what was scored, method, pixel set): this COG against the simulator's truth, and the
    checkpoint's evaluation next to the composite baseline."""
    from pipeline.train.evaluate import baseline_label

    rows: list[dict[str, Any]] = []
    if truth:
        m = truth["metrics"]
        for label, pre in PIXEL_GROUPS:
            rows.append({"scored on": f"this COG vs true clear scene {truth['scene_id']}", "method": model,
                         "pixels": label, **{k: round(float(m.get(pre + k, math.nan)), 4) for k in METRICS}})
    for ev in evaluations:
        where = f"{ev.get('split', '?')} split of {ev.get('data', '?')} ({ev.get('n_samples', '?')} samples)"
        for who, method in (("model", ev.get("model", model)), ("composite", baseline_label(ev))):
            s = ev["results"].get(who, {}).get("all", {})
            for label, pre in PIXEL_GROUPS:
                rows.append({"scored on": where, "method": method, "pixels": label,
                             **{k: round(float(s.get(pre + k, math.nan)), 4) for k in METRICS}})
    return rows


def summary_markdown(params: ReconstructParams, region: Region, result: dict[str, Any],
                     truth: dict[str, Any] | None, evaluations: list[dict[str, Any]] | None = None) -> str:
    """The run's report: inputs, output files, checks, provenance shares, metrics."""
    from pipeline.train.evaluate import baseline_label

    simulated = " (SIMULATED archive)" if params.source == "synthetic" else ""
    model = result.get("model") or model_name(params.checkpoint)
    blocks = f"{result['blocks']} block(s)"
    if "blocks_computed" in result and result["blocks_computed"] != result["blocks"]:
        blocks += f", {result['blocks_computed']} computed in this run (the rest resumed)"
    lines = [f"# Reconstruction of {region.name} on {params.date} ({model})", "",
             f"- checkpoint: `{params.checkpoint}`; source: `{params.source}`{simulated}",
             f"- optical input dates ({result['optical_sensor']}): {', '.join(result['optical_dates']) or 'none'}",
             f"- S1 dates: {', '.join(result['sar_dates']) or 'none'}",
             f"- scenes used: {len(result['scene_ids'])}; {blocks}", "", "| output | path |", "|---|---|"]
    lines += [f"| {k} | `{result[k]}` |" for k in ("cog", "provenance", "source_days", "uncertainty", "stac",
                                                  "quicklook") if result.get(k)]
    lines += ["", "## Checks", "", *_validation_lines(result["validation"])]
    if result.get("warnings"):
        lines += ["", "**Warnings:**", ""] + [f"- {w}" for w in result["warnings"]]
    fill = result.get("fill")
    if fill:
        c = fill["counts"]
        total = max(1, sum(c.values()))
        lines += ["", "## Provenance", "", "| class | pixels | share |", "|---|---:|---:|"]
        lines += [f"| {label} | {c[k]} | {100 * c[k] / total:.1f} % |" for k, label in (
            ("observed", "0 observed clear"), ("filled", "1 filled from another date"),
            ("no_clear", "3 no clear observation"), ("nodata", "255 nodata"))]
        lines += ["", "| fill date | age (days) | pixels | harmonization |", "|---|---:|---:|---|"]
        lines += [f"| {d['date']} | {d['age_days']} | {d['filled_pixels']} | {', '.join(d['harmonization'])}"
                  f"{' (' + d['warning'] + ')' if 'warning' in d else ''} |" for d in fill["dates"]]
    if truth:
        m = truth["metrics"]
        cover = f"{truth['scene_id']}, {100 * truth['cloud_fraction']:.1f} % under cloud/shadow"
        lines += ["", f"## Against the simulator's true clear scene ({cover})", "",
                  "| pixels | PSNR | SSIM | SAM | MAE | RMSE |", "|---|---:|---:|---:|---:|---:|"]
        for label, pre in PIXEL_GROUPS:
            lines.append(f"| {label} | " + " | ".join(_fmt(m.get(pre + k)) for k in METRICS) + " |")
    for ev in evaluations or []:
        lines += ["", f"## The checkpoint's evaluation: {ev.get('split')} split of `{ev.get('data')}` "
                      f"({ev.get('n_samples')} samples)", "",
                  "| method | pixels | PSNR | SSIM | SAM | MAE | RMSE |", "|---|---|---:|---:|---:|---:|---:|"]
        for who, method in (("model", ev.get("model", model)), ("composite", baseline_label(ev))):
            s = ev["results"].get(who, {}).get("all", {})
            for label, pre in PIXEL_GROUPS:
                lines.append(f"| {method} | {label} | " + " | ".join(_fmt(s.get(pre + k)) for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


@flow(name="reconstruct-aoi", task_runner=task_runner())
def reconstruct_aoi(params: ReconstructParams) -> dict[str, Any]:
    """Cloud-free COG + provenance + STAC Item + quicklook of an AOI on a date (one task runs all blocks)."""
    library_logs_to_runs()
    logger = get_run_logger()
    region = params.resolved_region()
    logger.info("reconstructing %s on %s with %s from the %s source into %s", region.name, params.date,
                params.checkpoint, params.source, params.out)
    task_ = reconstruct_task.with_options(tags=source_tags(params.source))
    result = run_cached(task_, _outputs, region, params.date, params.checkpoint, params.out, params.config(),
                        _checkpoint_sha(params.checkpoint))
    truth = truth_metrics_task(region, result, params.source_options) if params.score_truth else None
    evaluations = benchmark(params.checkpoint)
    model = result["model"]
    key = f"{region.name}-{params.date:%Y%m%d}-{model}"
    what = f"{region.name} on {params.date} ({model})"
    publish_markdown(f"reconstruct-{key}", summary_markdown(params, region, result, truth, evaluations),
                     f"Reconstruction of {what}")
    rows = metrics_table(model, truth, evaluations)
    if rows:
        publish_table(f"reconstruct-metrics-{key}", rows, f"Metrics of {what}: PSNR dB, SSIM, SAM degrees, MAE, RMSE")
    elif params.source == "synthetic":
        logger.info("no metrics table: pass score_truth=true to score the COG against the simulator's true scene")
    size = publish_quicklook(f"quicklook-{key}", result["quicklook"], f"{what}: observed | reconstructed")
    logger.info("COG: %s", result["cog"])
    logger.info("STAC item: %s", result["stac"])
    logger.info("quicklook: %s (artifact %.0f kB with its thumbnail)", result["quicklook"], size / 1e3)
    result["truth"] = truth
    return result
