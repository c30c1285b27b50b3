"""export-model: TorchScript and ONNX files that reproduce the eager model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.registry import build_model, resolve_config
from pipeline.errors import CheckpointError
from pipeline.train.checkpoint import load_checkpoint, save_model
from pipeline.train.export import example_inputs, export_model


def _run(tmp_path, name, config):
    cfg = resolve_config(name, config)
    torch.manual_seed(0)
    model = build_model(name, cfg)
    save_model(tmp_path, model, {"model": name, "config": cfg, "spec": model.spec.to_dict(), "metrics": {}})
    return tmp_path


@pytest.mark.parametrize("name", ["unet", "uncrtaints"])
def test_torchscript_matches_eager(tmp_path, name):
    run = _run(tmp_path, name, "small")
    path = export_model(run, "torchscript", size=32)
    info = json.loads(path.with_name(path.name + ".json").read_text())
    assert info["max_abs_diff"] <= 1e-4 and info["inputs"][:2] == ["optical", "optical_mask"] and info["any_size"]
    scripted = torch.jit.load(str(path))
    model, _ = load_checkpoint(run)
    xs = example_inputs(model.spec, 48, batch=3, seed=7)  # another size and batch than traced
    batch = {"optical": xs[0], "optical_mask": xs[1], **({"sar": xs[2]} if len(xs) > 2 else {})}
    with torch.no_grad():
        eager = model(batch)
        got = scripted(*xs)
    torch.testing.assert_close(got[0], eager.mean, atol=1e-4, rtol=1e-4)
    if name == "uncrtaints":
        assert info["outputs"] == ["mean", "var"]
        torch.testing.assert_close(got[1], eager.var, atol=1e-4, rtol=1e-4)


def test_onnx_matches_eager_with_dynamic_size(tmp_path):
    import onnxruntime as ort

    run = _run(tmp_path, "unet", "small")
    path = export_model(run, "onnx", size=32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["optical", "optical_mask", "sar"]
    model, _ = load_checkpoint(run)
    xs = example_inputs(model.spec, 40, batch=2, seed=3)
    got = sess.run(None, {n: x.numpy() for n, x in zip(["optical", "optical_mask", "sar"], xs)})[0]
    with torch.no_grad():
        eager = model({"optical": xs[0], "optical_mask": xs[1], "sar": xs[2]}).mean.numpy()
    np.testing.assert_allclose(got, eager, atol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_refine_model_exports_with_its_composite_inputs(tmp_path, fmt):
    from pipeline.train.export import input_names

    cfg = resolve_config("refine", {"base": "small", "base_channels": 8, "depth": 1, "sar_bands": ["VV", "VH"]})
    torch.manual_seed(0)
    model = build_model("refine", cfg)
    with torch.no_grad():  # a trained correction, not the zero one an untrained model adds
        torch.nn.init.normal_(model.net.head.weight, std=0.05)
    save_model(tmp_path, model, {"model": "refine", "config": cfg, "spec": model.spec.to_dict(), "metrics": {}})
    path = export_model(tmp_path, fmt, size=32)
    names = ["optical", "optical_mask", "sar", "composite", "composite_info"]
    assert input_names(model.spec) == names
    info = json.loads(path.with_name(path.name + ".json").read_text())
    assert info["max_abs_diff"] <= 1e-4 and info["inputs"] == names
    xs = example_inputs(model.spec, 32, batch=2, seed=5)
    with torch.no_grad():
        eager = model.eval()(dict(zip(names, xs))).mean
    if fmt == "torchscript":
        got = torch.jit.load(str(path))(*xs)[0]
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})[0])
    assert (eager - xs[3]).abs().max() > 1e-3  # the correction is in the graph
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)


def test_onnx_drops_unused_inputs_and_reports_fixed_sizes(tmp_path):
    run = _run(tmp_path / "srggan", "srggan", {"base": "small", "loss": {"perceptual": 0, "style": 0}})
    path = export_model(run, "onnx", size=32)  # srggan ignores optical_mask: the graph has no such input
    info = json.loads(path.with_name(path.name + ".json").read_text())
    assert info["inputs"] == ["optical", "sar"] and info["max_abs_diff"] <= 1e-4
    run = _run(tmp_path / "crgennet", "crgennet", {"base": "small", "loss": {"perceptual": 0}})
    path = export_model(run, "torchscript", size=32)  # Swin window sizes are baked into the trace
    assert json.loads(path.with_name(path.name + ".json").read_text())["any_size"] is False


def test_export_of_missing_run_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_model(tmp_path / "nope", "onnx")
