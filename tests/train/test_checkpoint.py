"""Checkpoint files: weights_only loading, atomic writes, clear errors for missing/corrupt/mismatched files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from models.registry import build_model, resolve_config
from pipeline.errors import CheckpointError
from pipeline.train.checkpoint import (
    META_FILE,
    MODEL_FILE,
    load_checkpoint,
    rng_state,
    safe_load,
    save_model,
    set_rng_state,
)


def _save_unet(run, config="small"):
    cfg = resolve_config("unet", config)
    model = build_model("unet", cfg)
    save_model(run, model, {"model": "unet", "config": cfg, "spec": model.spec.to_dict(), "metrics": {"psnr": 1.0}})
    return model


def test_roundtrip_weights_only_and_meta(tmp_path):
    model = _save_unet(tmp_path)
    state = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    assert set(state) == set(model.state_dict())
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["model"] == "unet" and meta["spec"]["optical_bands"] == list(model.spec.optical_bands)
    assert len(meta["model_sha256"]) == 64 and "normalization" in meta
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="model.json not found"):
        load_checkpoint(tmp_path)
    _save_unet(tmp_path)
    (tmp_path / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match="model.pt not found"):
        load_checkpoint(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_weights_are_a_one_line_error_not_a_pickle_traceback(tmp_path):
    _save_unet(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"\x80\x04garbage that is not a zip nor a pickle")
    with pytest.raises(CheckpointError, match="not a readable model state dict") as info:
        load_checkpoint(tmp_path)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # a pickle of arbitrary objects is refused by weights_only, also reported cleanly
    torch.save({"x": object.__new__(json.JSONDecoder)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt is not a readable"):
        safe_load(tmp_path / "evil.pt", "model state dict")


def test_weights_replaced_after_training_are_detected(tmp_path):
    _save_unet(tmp_path)
    other = build_model("unet", "small")
    torch.save(other.state_dict(), tmp_path / MODEL_FILE)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path)


def test_weights_of_another_band_set_or_model(tmp_path):
    _save_unet(tmp_path, {"base": "small", "optical_bands": ["B4", "B3", "B2"]})
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["config"] = resolve_config("unet", "small")  # claims 13 bands
    meta.pop("model_sha256")
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="different model or band set.*shape mismatch"):
        load_checkpoint(tmp_path)
    meta["model"] = "srggan"
    meta["config"] = resolve_config("srggan", "small")
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="different model or band set.*missing key"):
        load_checkpoint(tmp_path)


def test_corrupt_or_foreign_meta(tmp_path):
    _save_unet(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"model": "unet"}))
    with pytest.raises(CheckpointError, match=r"lacks field\(s\) \['config', 'spec'\]"):
        load_checkpoint(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"model": "nonesuch", "config": {}, "spec": {}}))
    with pytest.raises(CheckpointError, match="cannot rebuild model 'nonesuch'"):
        load_checkpoint(tmp_path)


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
