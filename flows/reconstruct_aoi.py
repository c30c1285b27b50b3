"""``reconstruct-aoi``: AOI + date + checkpoint -> cloud-free COG, provenance, source dates, STAC Item, quicklook.

``pipeline.reconstruct.run.reconstruct`` does the work block by block (resumable through its progress file, on a
dask cluster when ``CLOUDFREE_DASK`` names one). On the synthetic archive, with ``score_truth``, a second task
scores the COG against the simulator's true cloud-free scene (all pixels and pixels under cloud on the date).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.artifacts import publish_markdown, publish_quicklook, publish_table
from flows.common import CACHED, SOURCE_TASK, run_cached, source_tags, task_runner
from flows.params import ReconstructParams
from pipeline.reconstruct.config import ReconstructConfig
from pipeline.regions import Region

METRICS = ("psnr", "ssim", "sam", "mae", "rmse")  # reported against the simulator's truth
PIXEL_GROUPS = (("all", ""), ("cloud-covered", "cloud_"))  # label, prefix of the metric keys


def _dask_address() -> str | None:
    spec = os.environ.get("CLOUDFREE_DASK", "").strip()
    return spec if spec and spec != "local" else None


@task(name="reconstruct", **SOURCE_TASK, **CACHED)
def reconstruct_task(region: Region, date: dt.date, checkpoint: str, out: str, config: ReconstructConfig,
                     checkpoint_sha256: str) -> dict[str, Any]:
    """Run the block-wise reconstruction; returns output paths, input dates and COG/STAC validation."""
    from pipeline.reconstruct.run import reconstruct

    logger = get_run_logger()
    # the scheduler is where this task runs, not what it computes: chosen here, so it stays out of the cache key
    r = reconstruct(region, date, checkpoint, out, config.model_copy(update={"dask_address": _dask_address()}))
    logger.info("%s: %d of %d blocks computed%s", r.cog, r.blocks_computed, r.blocks_total,
                " (resumed)" if r.resumed else "")
    for warning in r.warnings:
        logger.warning("%s %s: %s", region.name, date, warning)
    return {
        "cog": str(r.cog), "provenance": str(r.provenance), "stac": str(r.stac), "quicklook": str(r.quicklook),
        "uncertainty": str(r.uncertainty) if r.uncertainty else None,
        "source_days": str(r.source_days) if r.source_days else None, "warnings": list(r.warnings),
        "fill": r.fill,
        "blocks": r.blocks_total, "optical_dates": [d.isoformat() for d in r.plan.optical_dates],
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
        pred = ds.read(masked=True).filled(np.nan).astype(np.float32)
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


def summary_markdown(params: ReconstructParams, region: Region, result: dict[str, Any],
                     truth: dict[str, Any] | None) -> str:
    simulated = " (SIMULATED archive)" if params.source == "synthetic" else ""
    lines = [f"# Reconstruction of {region.name} on {params.date}", "",
             f"- checkpoint: `{params.checkpoint}`; source: `{params.source}`{simulated}",
             f"- optical input dates ({result['optical_sensor']}): {', '.join(result['optical_dates']) or 'none'}",
             f"- S1 dates: {', '.join(result['sar_dates']) or 'none'}",
             f"- scenes used: {len(result['scene_ids'])}", "", "| output | path |", "|---|---|"]
    lines += [f"| {k} | `{result[k]}` |" for k in ("cog", "provenance", "source_days", "uncertainty", "stac",
                                                  "quicklook") if result.get(k)]
    lines += ["", "Validation: " + ", ".join(f"{k}: {v}" for k, v in result["validation"].items())]
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
            lines.append(f"| {label} | " + " | ".join(f"{m.get(pre + k, float('nan')):.4f}" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


@flow(name="reconstruct-aoi", task_runner=task_runner())
def reconstruct_aoi(params: ReconstructParams) -> dict[str, Any]:
    """Cloud-free COG + provenance + STAC Item + quicklook of an AOI on a date."""
    logger = get_run_logger()
    region = params.resolved_region()
    logger.info("reconstructing %s on %s with %s from the %s source into %s", region.name, params.date,
                params.checkpoint, params.source, params.out)
    task_ = reconstruct_task.with_options(tags=source_tags(params.source))
    result = run_cached(task_, _outputs, region, params.date, params.checkpoint, params.out, params.config(),
                        _checkpoint_sha(params.checkpoint))
    truth = truth_metrics_task(region, result, params.source_options) if params.score_truth else None
    key = f"{region.name}-{params.date:%Y%m%d}"
    publish_markdown(f"reconstruct-{key}", summary_markdown(params, region, result, truth),
                     f"Reconstruction of {region.name} on {params.date}")
    if truth:
        m = truth["metrics"]
        rows = [{"pixels": label, **{k: round(float(m.get(pre + k, float("nan"))), 4) for k in METRICS}}
                for label, pre in PIXEL_GROUPS]
        publish_table(f"reconstruct-metrics-{key}", rows, f"COG vs true clear scene, {region.name} {params.date}")
    publish_quicklook(f"quicklook-{key}", result["quicklook"], f"{region.name} {params.date}: observed | reconstructed")
    logger.info("COG: %s", result["cog"])
    logger.info("STAC item: %s", result["stac"])
    logger.info("quicklook: %s", result["quicklook"])
    result["truth"] = truth
    return result
