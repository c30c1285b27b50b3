"""Scoring: per-epoch validation during training, and ``cloudfree evaluate`` against the composite baseline.

Metrics come from ``pipeline.train.metrics`` (UnCRtainTS conventions: per image over the bands on [0, 1]
reflectance, then the mean over images; no centre crops, no clamping of predictions). Two pixel sets:
``all`` = valid target pixels, ``cloud`` = valid target pixels that the latest optical input does not see
(cloud, shadow, nodata: the ``cloud`` map of ``pipeline.train.samples``); for a ``refine`` model only those its
fill took from an earlier date (``scored_cloud``). Images without cloud pixels do not enter the cloud means; the
counts are reported. ``evaluate`` adds per band group scores (visible < 700 nm,
NIR 700-1000 nm, SWIR > 1000 nm) and scores the ``composite`` baseline (most recent clear pixel) on the very
same samples and synthetic clouds, so the table compares like with like. Of the flood-aware scores of
``cloudfree benchmark`` it adds the water-under-cloud F1 (``cloud_water_f1``: the prediction's MNDWI water map
against the target's own, on the cloud pixels); the PSNR on flooded pixels needs a flood layer the dataset's
cubes do not hold, so it is the benchmark's alone.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from models.base import CloudRemovalModel
from models.refine import filled_pixels
from models.spec import InputSpec
from pipeline.errors import DataError
from pipeline.sensors import SENSORS
from pipeline.train.metrics import WaterIndex, image_metrics, water_f1, water_index, water_map
from pipeline.train.runtime import Runtime, open_split
from pipeline.train.samples import AssembledDataset, family_sensor, model_inputs

METRICS = ("psnr", "ssim", "sam", "mae", "rmse")  # the table's columns; metrics.json has corr / ndvi_mae too
GROUPS = {"visible": (0.0, 700.0), "nir": (700.0, 1000.0), "swir": (1000.0, 1e9)}


def band_groups(family: str, bands: Iterable[str]) -> dict[str, list[int]]:
    """Indices of ``bands`` per group by centre wavelength (bands without one, e.g. thermal, are left out)."""
    sensor = SENSORS[family_sensor(family)]
    out: dict[str, list[int]] = {g: [] for g in GROUPS}
    for i, b in enumerate(bands):
        wl = sensor.band(b).wavelength_nm if b in sensor.band_names else None
        if wl is None or sensor.band(b).units != "reflectance":
            continue
        for g, (lo, hi) in GROUPS.items():
            if lo <= wl < hi:
                out[g].append(i)
    return {g: idx for g, idx in out.items() if idx}


def image_scores(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, cloud: torch.Tensor,
                 ndvi_bands: tuple[int, int] | None = None, water: WaterIndex | None = None) -> list[dict[str, float]]:
    """Per-image metrics: list of ``{psnr, ..., cloud_psnr, ...}`` (NaN where an image has no such pixels).

    ``valid`` and ``cloud`` are (B, H, W) or (B, 1, H, W). With a ``water`` index, ``cloud_water_f1``: the F1 of
    the prediction's water map against the target's on the cloud pixels (NaN without water there).
    """
    v = valid.reshape(valid.shape[0], 1, *valid.shape[-2:]).float()
    c = cloud.reshape(cloud.shape[0], 1, *cloud.shape[-2:]).float()
    per = image_metrics(pred.float(), target.float(), v, c, ndvi_bands)
    frac = (c * v).mean((1, 2, 3))
    rows = [{**{k: float(t[i]) for k, t in per.items()}, "cloud_fraction": float(frac[i])}
            for i in range(pred.shape[0])]
    if water is not None:
        where = (c * v)[:, 0] > 0.5
        pw, tw = water_map(pred, water), water_map(target, water)
        for i, row in enumerate(rows):
            row["cloud_water_f1"] = water_f1(pw[i], tw[i], where[i])
    return rows


def scored_cloud(batch: Mapping[str, Any], spec: InputSpec) -> torch.Tensor:
    """(B, H, W) the cloud pixels a method is scored on: those the latest optical input does not see, and for a
    ``needs_composite`` model only those its fill took from an earlier date.

    A ``refine`` model corrects the fill's pixels only; where no earlier date was clear, ``reconstruct`` writes no
    data (provenance 3), the benchmark leaves the pixel unscored, and the batch's composite holds the target's own
    cloudy value there, the same for the model and its baseline. Scored, those pixels set the validation score:
    99.6 % of the composite's squared error on the synthetic 128-px build's validation split, so checkpoint
    selection could not see a correction that cut the error on the filled pixels by a quarter.
    """
    cloud = batch["cloud"]
    if spec.needs_composite:
        cloud = cloud * filled_pixels(batch["composite_info"])[:, 0].to(cloud.dtype)
    return cloud


def ndvi_indices(bands: tuple[str, ...]) -> tuple[int, int] | None:
    """(nir, red) indices for the NDVI error when both bands are predicted."""
    for nir, red in (("B8", "B4"), ("SR_B5", "SR_B4")):
        if nir in bands and red in bands:
            return bands.index(nir), bands.index(red)
    return None


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean over images of each metric, ignoring NaN (images without pixels of that set)."""
    if not rows:
        return {}
    out: dict[str, float] = {}
    for k in rows[0]:
        # +inf (exact reconstruction) stays, as in pipeline.train.metrics
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    out["n_images"] = float(len(rows))
    out["n_images_cloud"] = float(sum(1 for r in rows if not math.isnan(r.get("cloud_psnr", float("nan")))))
    if "cloud_water_f1" in rows[0]:
        out["n_images_water"] = float(sum(1 for r in rows if not math.isnan(r["cloud_water_f1"])))
    return out


@torch.no_grad()
def predict(model: nn.Module, batch: Mapping[str, Any], rt: Runtime) -> torch.Tensor:
    """The model's mean prediction for a batch of assembled samples, in fp32."""
    inputs = rt.to_device(model_inputs(batch))
    with rt.autocast():
        out = model(inputs)
    return out.mean.float()


def _rgb(x: torch.Tensor, idx: tuple[int, int, int], lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ((x[:, list(idx)] - lo) / (hi - lo)).clamp(0, 1)


def image_grid(batch: Mapping[str, Any], pred: torch.Tensor, spec: InputSpec, n: int = 4) -> dict[str, torch.Tensor]:
    """input | prediction | target RGB strips (N, 3, H, 3W) with the target's 2-98 % stretch, for TensorBoard."""
    from models.bands import rgb_indices

    out_idx = rgb_indices(spec.out_bands)
    in_idx = rgb_indices(spec.optical_bands)
    if out_idx is None or in_idx is None:
        return {}
    tgt = batch["target"][:n].float().cpu()
    pr = pred[:n].float().cpu()
    inp = batch["optical"][:n, -1].float().cpu()
    q = tgt[:, list(out_idx)].flatten(1)
    lo = q.quantile(0.02, dim=1).view(-1, 1, 1, 1)
    hi = (q.quantile(0.98, dim=1).view(-1, 1, 1, 1)).clamp_min(lo + 1e-3)
    strip = torch.cat([_rgb(inp, in_idx, lo, hi), _rgb(pr, out_idx, lo, hi), _rgb(tgt, out_idx, lo, hi)], dim=-1)
    return {"input_prediction_target": strip}


@torch.no_grad()
def validate(model: CloudRemovalModel, loader: DataLoader, rt: Runtime,
             want_images: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Mean metrics over the loader (all + cloud pixels) and, optionally, an image grid of the first batch."""
    was_training = model.training
    model.eval()
    rows: list[dict[str, float]] = []
    images: dict[str, torch.Tensor] = {}
    try:
        for b in loader:
            pred = predict(model, b, rt).cpu()
            rows += image_scores(pred, b["target"], b["target_valid"], scored_cloud(b, model.spec),
                                 ndvi_indices(model.spec.out_bands))
            if want_images and not images:
                images = image_grid(b, pred, model.spec)
    finally:
        model.train(was_training)
    return mean_scores(rows), images


# --------------------------------------------------------------------------- cloudfree evaluate


def composite_for(spec: InputSpec, n_dates: int) -> tuple[nn.Module, InputSpec]:
    """The ``composite`` baseline set up for the same bands and the same target-date convention as ``spec``."""
    from models.registry import build_model, resolve_config

    base = resolve_config("composite", "small")
    avail = n_dates if spec.includes_target_date else n_dates - 1
    dates = max(1, min(int(base["optical_dates"]), avail))
    model = build_model("composite", {"base": "small", "optical_dates": dates, "optical_bands": list(spec.out_bands),
                                      "optical_sensor": spec.optical_sensor,
                                      "includes_target_date": spec.includes_target_date, "sar_bands": []})
    return model.eval(), model.spec


def evaluate(run_dir: Path, data_dir: Path, split: str = "test", out: Path | None = None, *, batch_size: int = 8,
             num_workers: int = 0, seed: int = 0) -> dict[str, Any]:
    """Score a training run and the composite baseline on ``split``; writes ``metrics.json`` + ``metrics.md``.

    ``seed`` draws the synthetic clouds of target-date models; it is fixed (not the training seed) so every
    model evaluated on a split faces the same clouds.
    """
    from pipeline.files import write_text_atomic
    from pipeline.train.checkpoint import load_checkpoint, meta_fill

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    model, meta = load_checkpoint(run_dir)
    spec: InputSpec = model.spec
    raw = open_split(data_dir, split)
    first = raw[0]
    family = spec.optical_sensor
    if family not in first:
        have = [k for k in ("s2", "landsat") if k in first]
        raise DataError(f"{data_dir} holds {have} optical data but the checkpoint's model needs {family!r}; "
                        "evaluate on a dataset of that sensor")
    n_dates = int(np.asarray(first[family]).shape[0])
    comp, comp_spec = composite_for(spec, n_dates)
    rt = Runtime.local()
    model.to(rt.device)
    comp.to(rt.device)
    fill = meta_fill(meta)  # a refine model is scored against the fill it was trained to correct
    ds_model = AssembledDataset(raw, spec, train=False, seed=seed, fill=fill)
    ds_comp = AssembledDataset(raw, comp_spec, train=False, seed=seed, fill=fill)
    kw: dict[str, Any] = dict(batch_size=batch_size, shuffle=False, num_workers=num_workers)
    groups = band_groups(family, spec.out_bands)
    # the cubes hold no flood layer, so only the water F1 of the flood-aware scores can be computed here
    water = water_index(spec.out_bands)
    scores: dict[str, dict[str, list]] = {name: {"all": [], **{g: [] for g in groups}}
                                          for name in ("model", "composite")}
    for bm, bc in zip(DataLoader(ds_model, **kw), DataLoader(ds_comp, **kw)):
        if bm["sample_id"] != bc["sample_id"] or not torch.equal(bm["cloud"], bc["cloud"]):
            raise RuntimeError("model and composite batches disagree on samples or cloud maps")  # a bug, not user input
        valid, cloud = bm["target_valid"][:, 0], scored_cloud(bm, spec)
        for name, m, b in (("model", model, bm), ("composite", comp, bc)):
            # a refine model's baseline is the harmonized fill it corrects, which its batch already holds
            pred = bm["composite"] if name == "composite" and spec.needs_composite else predict(m, b, rt).cpu()
            scores[name]["all"] += image_scores(pred, b["target"], valid, cloud, ndvi_indices(spec.out_bands), water)
            for g, idx in groups.items():
                scores[name][g] += image_scores(pred[:, idx], b["target"][:, idx], valid, cloud)
    result = {
        "checkpoint": str(run_dir),
        "model": meta["model"],
        "model_sha256": meta.get("model_sha256"),
        "data": str(data_dir),
        "split": split,
        "n_samples": len(raw),
        "cloud_seed": seed,
        "cloud_pixels": "valid target pixels the latest optical input does not see (cloud, shadow, nodata)"
                        + (" and the fill took from an earlier date (the pixels the model corrects)"
                           if spec.needs_composite else ""),
        "band_groups": {g: [spec.out_bands[i] for i in idx] for g, idx in groups.items()},
        "water_index": str(water) if water is not None else None,
        "composite": ({"method": "harmonized fill (pipeline.harmonize, the refine model's input)"}
                      if spec.needs_composite else {"method": "recent", "optical_dates": comp_spec.optical_dates}),
        "evaluated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "results": {name: {k: mean_scores(v) for k, v in s.items()} for name, s in scores.items()},
        "simulated": bool(getattr(raw, "attrs", {}).get("simulated", False)),
    }
    out = Path(out) if out is not None else run_dir / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metrics.json", json.dumps(result, indent=2, default=float))
    write_text_atomic(out / "metrics.md", markdown_table(result))
    return result


def baseline_label(result: Mapping[str, Any]) -> str:
    """The name of what ``result`` scored the model against, as tables show it.

    A refine run's baseline is the harmonized fill (the output composite); every other model's is the plain most
    recent clear pixel, which is not the composite a reconstruct writes: naming both "composite" read as two
    different scores for one method.
    """
    method = str(result.get("composite", {}).get("method", "recent"))
    return "harmonized fill" if method.startswith("harmonized") else "last clear (not harmonized)"


def _fmt(v: float, k: str) -> str:
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.2f}" if k in ("psnr", "sam") else f"{v:.3f}" if k == "f1" else f"{v:.4f}"


def _water_lines(result: Mapping[str, Any]) -> list[str]:
    """The water-under-cloud F1 of each method, when some image had water under its cloud."""
    res = result["results"]
    f1 = {who: res[who]["all"].get("cloud_water_f1", math.nan) for who in ("model", "composite")}
    if all(math.isnan(v) for v in f1.values()):
        return []
    n = int(res["model"]["all"].get("n_images_water", 0))
    cells = ", ".join(f"{result['model'] if who == 'model' else 'composite'} {_fmt(v, 'f1')}" for who, v in f1.items())
    return ["", f"Water-under-cloud F1 ({result.get('water_index')} of the prediction against the same index on the "
            f"target, on the cloud pixels; mean over the {n} image(s) with water there): {cells}."]


def markdown_table(result: Mapping[str, Any]) -> str:
    """The evaluation as markdown: one table for all/cloud pixels, one per band group (PSNR / MAE)."""
    res = result["results"]
    name = result["model"]
    base = baseline_label(result)
    lines = [f"# {name} vs {base} on `{result['split']}` ({result['n_samples']} samples)", "",
             f"Cloud pixels: {result['cloud_pixels']}.", ""]
    head = ("| method | " + " | ".join(f"{k.upper()} all" for k in METRICS) + " | "
            + " | ".join(f"{k.upper()} cloud" for k in METRICS) + " |")
    lines += [head, "|" + "---|" * (1 + 2 * len(METRICS))]
    for who in ("model", "composite"):
        s = res[who]["all"]
        label = name if who == "model" else base
        lines.append(f"| {label} | " + " | ".join(_fmt(s.get(k, float('nan')), k) for k in METRICS) + " | "
                     + " | ".join(_fmt(s.get(f"cloud_{k}", float('nan')), k) for k in METRICS) + " |")
    groups = [g for g in GROUPS if g in res["model"]]
    if groups:
        group_head = " | ".join(f"{g} PSNR all | {g} PSNR cloud | {g} MAE cloud" for g in groups)
        lines += ["", f"| method | {group_head} |", "|" + "---|" * (1 + 3 * len(groups))]
        for who in ("model", "composite"):
            label = name if who == "model" else base
            cells = []
            for g in groups:
                s = res[who][g]
                cells += [_fmt(s["psnr"], "psnr"), _fmt(s["cloud_psnr"], "psnr"), _fmt(s["cloud_mae"], "mae")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Band groups: " + "; ".join(f"{g}: {', '.join(b)}" for g, b in result["band_groups"].items())]
    lines += _water_lines(result)
    if result.get("simulated"):
        lines += ["", "Data: synthetic archive (simulation)."]
    return "\n".join(lines) + "\n"
