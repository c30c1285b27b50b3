"""Self-supervised training data from an AOI's own archive: a ``self-supervised`` build on the synthetic archive
(clear targets, every earlier date as observed, S1 near each, a temporal hold-out), on which the field's models
train with their own input specs (one short CPU run each) and ``refine`` trains on top of the composite."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.dataset.build import build_dataset
from pipeline.regions import parse_region
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train
from tests.regions_fixtures import tiny_region

HOLDOUT = "2021-08-10"


@pytest.fixture(scope="module")
def selfsup(tmp_path_factory):
    region = parse_region(tiny_region(
        "tiny-selfsup", window={"start": "2021-07-01", "end": "2021-08-31"},
        selection={"rule": "self-supervised", "input_dates": 3, "max_gap_days": 40, "holdout_from": HOLDOUT},
        patch={"size": 64, "stride": 64}, splits={"train": 0.5, "val": 0.25, "test": 0.25, "block_size": 1,
                                                  "seed": 0}))
    out = tmp_path_factory.mktemp("selfsup") / "ds"
    report = build_dataset(region, "synthetic", out, workers=2, progress=False, mask_method="cloudscore")
    return out, report


def test_targets_are_clear_and_the_holdout_splits_dates_and_patches(selfsup):
    out, report = selfsup
    m = pd.read_parquet(out / "manifest.parquet")
    targets = m[m.role == "target"]
    assert (targets.cloud_fraction + targets.shadow_fraction <= 0.02 + 1e-9).all()
    late = targets.datetime >= pd.Timestamp(HOLDOUT, tz="UTC")
    assert set(targets[late].split) <= {"test"} and set(targets[~late].split) <= {"train", "val"}
    assert late.any() and (~late).any()
    split_of_patch = m.groupby("patch_id").split.nunique()
    assert (split_of_patch == 1).all()  # no patch in two splits
    # every sample has its three earlier dates as observed, cloudy ones included, and S1 near each
    per_sample = m[m.sensor == "s2_l1c"].groupby(["patch_id", "split"]).size()
    assert per_sample.min() >= 4
    assert (m[m.role.str.startswith("input_")].cloud_fraction > 0.05).any()
    assert m.role.eq("sar_target").sum() == len(targets)
    assert any("temporal hold-out" in r for r in report.rejected_candidates)


@pytest.mark.parametrize("name, params", [
    ("crgennet", {"base": "small"}),
    ("uncrtaints", {"base": "small"}),
    ("cafusion", {"base": "small"}),
    ("refine", {"base": "small", "base_channels": 8, "depth": 2, "sar_bands": ["VV", "VH"]}),
])
def test_models_train_on_self_supervised_samples_with_their_own_specs(tmp_path, selfsup, name, params):
    out, _ = selfsup
    cfg = TrainConfig(model=name, model_params=params, epochs=1, batch_size=2, num_workers=0, seed=0,
                      max_steps_per_epoch=2, patience=None, augment={"crop": 32})
    res = train(cfg, out, tmp_path / "run", progress=False)
    _, meta = load_checkpoint(tmp_path / "run")
    assert res.epochs_run == 1 and meta["model"] == name
    assert meta["metrics"]["cloud_psnr"] == meta["metrics"]["cloud_psnr"]  # validated: a number, not NaN


def test_evaluate_scores_refine_against_the_fill_it_corrects(tmp_path, selfsup):
    from models.registry import build_model, resolve_config
    from pipeline.train.checkpoint import save_model
    from pipeline.train.evaluate import evaluate

    out, _ = selfsup
    cfg = resolve_config("refine", {"base": "small", "base_channels": 8, "depth": 1})
    model = build_model("refine", cfg)
    save_model(tmp_path, model, {"model": "refine", "config": cfg, "spec": model.spec.to_dict(), "metrics": {}})
    result = evaluate(tmp_path, out, split="val")
    assert result["composite"]["method"].startswith("harmonized fill")
    # untrained, the model is the composite: the same scores to the last digit (NaN where both have nothing to score)
    np.testing.assert_equal(result["results"]["model"]["all"], result["results"]["composite"]["all"])
    assert result["results"]["model"]["all"]["cloud_psnr"] > 20


def test_a_holdout_that_leaves_no_sample_says_what_to_move(tmp_path):
    from pipeline.dataset.selection import SelectionError

    region = parse_region(tiny_region(
        "tiny-selfsup", window={"start": "2021-07-01", "end": "2021-08-31"},
        selection={"rule": "self-supervised", "input_dates": 3, "max_gap_days": 40, "holdout_from": "2021-06-01"},
        patch={"size": 64, "stride": 64}, splits={"train": 0.8, "val": 0.2, "test": 0.0, "block_size": 1, "seed": 0}))
    with pytest.raises(SelectionError, match=r"no sample is left after the temporal hold-out from 2021-06-01 .*move "
                                             r"selection.holdout_from between the archive's clear dates or unset it"):
        build_dataset(region, "synthetic", tmp_path / "ds", workers=1, progress=False, mask_method="cloudscore")
    assert not (tmp_path / "ds" / "manifest.parquet").exists()
