"""``cloudfree export-model RUN --format torchscript|onnx``: a deployable model file, checked against eager.

Models take a dict batch; the exported graph takes positional tensors ``optical``, ``optical_mask``
[, ``sar``] [, ``composite``, ``composite_info``] (``input_names``; shapes per ``models/spec.py``) and returns
``mean`` [, ``var``]. The export is traced on a
sample batch of the checkpoint's input spec, then run on a second, differently drawn batch and compared
with the eager model (max abs difference <= ``atol``); a mismatch is an error and nothing is written.
Files land next to the checkpoint: ``RUN/model.torchscript.pt`` or ``RUN/model.onnx``, each with a
``.json`` beside it (inputs, outputs, shapes, the max difference measured).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from models.spec import InputSpec
from pipeline.errors import CloudfreeError
from pipeline.files import write_text_atomic
from pipeline.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


class ExportError(CloudfreeError):
    """The exported model cannot be produced or does not match the eager model."""


class PositionalAdapter(nn.Module):
    """Dict-batch model -> positional tensors in, tuple of tensors out (what tracing and ONNX need)."""

    def __init__(self, model: nn.Module, spec: InputSpec, has_var: bool) -> None:
        super().__init__()
        self.model, self.names, self.has_var = model, input_names(spec), has_var

    def forward(self, *inputs: torch.Tensor):
        out = self.model(dict(zip(self.names, inputs)))
        return (out.mean, out.var) if self.has_var else (out.mean,)


def input_names(spec: InputSpec) -> list[str]:
    """The exported graph's inputs, in order."""
    return (["optical", "optical_mask"] + (["sar"] if spec.sar_bands else [])
            + (["composite", "composite_info"] if spec.needs_composite else []))


def example_inputs(spec: InputSpec, size: int, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    t, c = spec.optical_dates, len(spec.optical_bands)
    optical = torch.rand(batch, t, c, size, size, generator=g) * 0.5
    mask = (torch.rand(batch, t, 1, size, size, generator=g) > 0.6).float()
    optical = optical * (1 - mask)
    out = [optical, mask]
    if spec.sar_bands:
        out.append(torch.rand(batch, t + 1, len(spec.sar_bands), size, size, generator=g))
    if spec.needs_composite:
        hidden = mask[:, -1]
        out.append(torch.rand(batch, len(spec.out_bands), size, size, generator=g) * 0.5)
        out.append(torch.cat([hidden, torch.zeros_like(hidden), 0.1 * hidden], 1))
    return tuple(out)


def export_model(run_dir: Path, fmt: Literal["torchscript", "onnx"] = "torchscript", *, size: int = 64,
                 atol: float = 1e-4, opset: int = 18) -> Path:
    """Export the run's model; returns the written file. ``size`` must be a size the model accepts."""
    run_dir = Path(run_dir)
    model, meta = load_checkpoint(run_dir)
    spec: InputSpec = model.spec
    model = model.float().eval()
    ex = example_inputs(spec, size, batch=1, seed=0)
    check = example_inputs(spec, size, batch=2, seed=1)
    with torch.no_grad():
        probe = model(_as_batch(spec, ex))
    adapter = PositionalAdapter(model, spec, probe.var is not None).eval()
    names_in = input_names(spec)
    names_out = ["mean"] + (["var"] if probe.var is not None else [])
    with torch.no_grad():
        expected = adapter(*check)
    with warnings.catch_warnings():
        # torch 2.13 marks torch.jit and the TorchScript-based ONNX exporter deprecated; both still work and
        # the result is verified below, so the warnings are noise for the user
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        path, diff = _export(fmt, run_dir, adapter, ex, check, expected, names_in, names_out, opset)
    if diff > atol:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"{fmt} export of {run_dir} differs from the eager model by {diff:.2e} (> {atol:g}); the architecture "
            "has data-dependent control flow the exporter cannot capture - use the checkpoint with PyTorch instead"
        )
    other = _other_size_ok(fmt, path, adapter, spec, 2 * size, atol)
    info = {"format": fmt, "file": path.name, "model": meta["model"], "model_sha256": meta.get("model_sha256"),
            "inputs": _declared_inputs(fmt, path, names_in), "outputs": names_out, "traced_size": size,
            "any_size": other, "max_abs_diff": diff, "atol": atol, "spec": spec.to_dict(),
            "note": "inputs per models/spec.py; batch is dynamic; height/width too when any_size is true, "
                    "otherwise feed traced_size x traced_size patches"}
    if not other:
        log.warning(
            "%s: the exported graph only accepts %d x %d inputs (sizes are baked into the trace)", path, size, size
        )
    write_text_atomic(path.with_name(path.name + ".json"), json.dumps(info, indent=2))
    log.info("exported %s (max |diff| %.2e)", path, diff)
    return path


def _export(fmt: str, run_dir: Path, adapter: nn.Module, ex: tuple, check: tuple, expected: tuple,
            names_in: list[str], names_out: list[str], opset: int) -> tuple[Path, float]:
    if fmt == "torchscript":
        path = run_dir / "model.torchscript.pt"
        return path, _torchscript(adapter, ex, check, expected, path)
    if fmt == "onnx":
        path = run_dir / "model.onnx"
        return path, _onnx(adapter, ex, check, expected, path, names_in, names_out, opset)
    raise ExportError(f"--format {fmt!r}: use torchscript or onnx")


def _declared_inputs(fmt: str, path: Path, names_in: list[str]) -> list[str]:
    if fmt != "onnx":
        return names_in
    import onnx

    return [i.name for i in onnx.load(str(path)).graph.input]


def _other_size_ok(fmt: str, path: Path, adapter: nn.Module, spec: InputSpec, size: int, atol: float) -> bool:
    """Does the exported graph also reproduce the eager model at another patch size?"""
    xs = example_inputs(spec, size, batch=1, seed=2)
    with torch.no_grad():
        want = adapter(*xs)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            if fmt == "torchscript":
                got = torch.jit.load(str(path))(*xs)
            else:
                import onnxruntime as ort

                sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                declared = {i.name for i in sess.get_inputs()}
                names = input_names(spec)
                got = tuple(
                    torch.from_numpy(g)
                    for g in sess.run(None, {n: x.numpy() for n, x in zip(names, xs) if n in declared})
                )
    except (RuntimeError, ValueError, torch.jit.Error) + _ort_errors() as exc:
        log.info("%s does not run at %d px: %s", path, size, str(exc).splitlines()[0][:200])
        return False
    got = got if isinstance(got, tuple) else (got,)
    return all(g.shape == w.shape for g, w in zip(got, want)) and _max_diff(got, want) <= atol


def _ort_errors() -> tuple[type[Exception], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as s

    return (s.Fail, s.InvalidArgument, s.RuntimeException, s.NotImplemented)


def _as_batch(spec: InputSpec, xs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    return dict(zip(input_names(spec), xs))


def _max_diff(a: tuple, b: tuple) -> float:
    return max(float((x.detach().float() - y.detach().float()).abs().max()) for x, y in zip(a, b))


def _publish(tmp_path: Path, path: Path) -> None:
    # NamedTemporaryFile creates 0600 files; an exported model is shared like the run's other outputs (umask).
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)
    tmp_path.replace(path)


def _torchscript(adapter: nn.Module, ex: tuple, check: tuple, expected: tuple, path: Path) -> float:
    try:
        with torch.no_grad():
            traced = torch.jit.trace(adapter, ex, check_trace=False, strict=False)
    except (RuntimeError, TypeError) as exc:
        raise ExportError(
            f"torchscript tracing failed ({str(exc).splitlines()[0]}); use the PyTorch checkpoint or --format onnx"
        ) from None
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        torch.jit.save(traced, str(tmp_path))
        loaded = torch.jit.load(str(tmp_path))
        with torch.no_grad():
            got = loaded(*check)
        got = got if isinstance(got, tuple) else (got,)
        _publish(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return _max_diff(got, expected)


def _onnx(adapter: nn.Module, ex: tuple, check: tuple, expected: tuple, path: Path, names_in: list[str],
          names_out: list[str], opset: int) -> float:
    import onnx
    import onnxruntime as ort

    dyn = {n: {0: "batch", ex[i].dim() - 2: "height", ex[i].dim() - 1: "width"} for i, n in enumerate(names_in)}
    dyn.update({n: {0: "batch", 2: "height", 3: "width"} for n in names_out})
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".onnx", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        try:
            torch.onnx.export(adapter, ex, str(tmp_path), input_names=names_in, output_names=names_out,
                              dynamic_axes=dyn, opset_version=opset, dynamo=False)
        except (RuntimeError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:
            raise ExportError(
                f"ONNX export failed ({str(exc).splitlines()[0]}); use --format torchscript or the PyTorch checkpoint"
            ) from None
        onnx.checker.check_model(str(tmp_path))
        sess = ort.InferenceSession(str(tmp_path), providers=["CPUExecutionProvider"])
        # inputs the model ignores (e.g. the mask of a model without needs_mask) are dropped from the graph
        declared = {i.name for i in sess.get_inputs()}
        got = sess.run(None, {n: x.numpy() for n, x in zip(names_in, check) if n in declared})
        _publish(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return _max_diff(tuple(torch.from_numpy(g) for g in got), expected)
