"""Checkpoints: ``RUN/model.pt`` + ``RUN/model.json`` for inference, ``RUN/train_state.pt`` for exact resume.

- ``model.pt``: the model's state dict only (best epoch by the monitored metric);
- ``model.json``: ``model``, ``config`` (the resolved hyper-parameters the registry rebuilds it from), ``spec``
  (``InputSpec.to_dict()``), ``normalization``, ``manifest_sha256``, ``metrics`` (validation, best epoch),
  ``epoch``, ``model_sha256`` (of ``model.pt``), ``software``;
- ``train_state.pt``: the LAST epoch's model, optimiser(s), scheduler, grad scaler, RNG states (torch, CUDA,
  Python, NumPy as tensors/lists), epoch counters and the early-stopping bookkeeping.

Every file is loaded with ``torch.load(weights_only=True)``: nothing in a checkpoint can run code. Every
file is written to a temp file and renamed, so a crash never leaves half a checkpoint. A missing, corrupt
or mismatched file is a ``CheckpointError`` naming the file and the fix, never a pickle traceback.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from models.base import CloudRemovalModel
from models.spec import InputSpec
from pipeline import __version__
from pipeline.errors import CheckpointError
from pipeline.files import atomic_output, sha256_file, write_text_atomic
from pipeline.harmonize import FillConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
META_FILE = "model.json"
STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1
NORMALIZATION = {
    "optical": "reflectance clipped to [0, 1] (S2 DN / 10000)",
    "sar": {"VV": [-25.0, 0.0], "VH": [-32.5, 0.0], "scaled_to": [0, 1]},
}
_REQUIRED_META = ("model", "config", "spec")


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def safe_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with a one-line ``CheckpointError`` for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: {what} is missing; point to a run folder written by `cloudfree train`"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - junk bytes make torch.load fail in many ways (IndexError, KeyError...)
        raise CheckpointError(
            f"{path} is not a readable {what} ({type(exc).__name__}: {_first_sentence(str(exc))}); the file is corrupt "
            "or not written by `cloudfree train` - copy it again or retrain"
        ) from None


def _first_sentence(text: str, limit: int = 120) -> str:
    """The library's reason without its multi-paragraph advice, cut at a word so the line never stops mid-word."""
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    line = line.split(". ")[0].rstrip(".")
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line


def save_model(run_dir: Path, model: torch.nn.Module, meta: Mapping[str, Any]) -> dict:
    """Write ``model.pt`` (state dict) then ``model.json`` (with the weights' sha256); returns the meta written."""
    run_dir = Path(run_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    atomic_torch_save(state, run_dir / MODEL_FILE)
    full = {"format_version": FORMAT_VERSION, "software": f"cloudfree {__version__}", "normalization": NORMALIZATION,
            **dict(meta), "model_sha256": sha256_file(run_dir / MODEL_FILE)}
    write_text_atomic(run_dir / META_FILE, json.dumps(full, indent=2, sort_keys=True, default=_json_default))
    return full


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_meta(run_dir: Path) -> dict:
    """``model.json`` of a run, checked for the keys inference and evaluation need."""
    path = Path(run_dir) / META_FILE
    if Path(run_dir).is_file():
        raise CheckpointError(
            f"{run_dir} is a file; --checkpoint takes the run folder that holds it (the --out folder of `cloudfree "
            f"train`, with {MODEL_FILE} and {META_FILE}), e.g. {Path(run_dir).parent}"
        )
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"checkpoint folder {run_dir} does not exist; pass the --out folder of `cloudfree train`")
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found; {run_dir} is not a finished training run "
            "(train writes model.json after the first epoch)"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); the file is corrupt - copy it again or retrain"
        ) from None
    missing = [k for k in _REQUIRED_META if k not in meta] if isinstance(meta, dict) else list(_REQUIRED_META)
    if missing:
        raise CheckpointError(f"{path} lacks field(s) {missing}; it was not written by `cloudfree train`")
    try:
        InputSpec.from_dict(meta["spec"])
    except TypeError as exc:
        raise CheckpointError(f"{path}: field 'spec' is not a valid input spec ({exc})") from None
    return meta


def meta_spec(meta: Mapping[str, Any]) -> InputSpec:
    return InputSpec.from_dict(meta["spec"])


def meta_fill(meta: Mapping[str, Any]) -> FillConfig:
    """The harmonized fill a composite-taking model was trained to correct (``TrainConfig.composite_fill``). Runs
    written before it was recorded were trained on the then default, which had no missed-shadow check; runs written
    before the check's S1 test existed ran its optical test alone, and runs written before the fill's class offsets
    existed were trained without them."""
    recorded = (meta.get("train") or {}).get("composite_fill")
    if recorded is None:
        return FillConfig(shadow_check_px=0, class_offsets=0)
    recorded = dict(recorded)
    recorded.setdefault("class_offsets", 0)  # recorded before the fill had class offsets
    if "shadow_check_px" not in recorded:
        recorded["shadow_check_px"] = 0
    else:
        recorded.setdefault("shadow_sar_change_db", None)
    try:
        return FillConfig.model_validate(recorded)
    except ValueError as exc:
        raise CheckpointError(f"model.json: train.composite_fill is not a fill configuration of this version ({exc}); "
                              "retrain the model with this version") from None


def build_from_meta(meta: Mapping[str, Any], where: Path) -> CloudRemovalModel:
    from models.errors import ModelError
    from models.registry import build_model

    try:
        return build_model(meta["model"], meta["config"])
    except ModelError as exc:
        raise CheckpointError(f"{where}: cannot rebuild model {meta['model']!r} from its config ({exc})") from None


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: Path, name: str) -> None:
    """``load_state_dict(strict=True)`` with a readable error when the weights belong to another model/config."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where} does not hold a state dict of tensors; it was not written by `cloudfree train`")
    own = unwrap(model).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(x for x in (
            f"{len(missing)} missing key(s) e.g. {missing[:2]}" if missing else "",
            f"{len(unexpected)} unexpected key(s) e.g. {unexpected[:2]}" if unexpected else "",
            f"shape mismatch e.g. {shapes[:2]}" if shapes else "") if x)
        raise CheckpointError(
            f"{where} holds weights of a different model or band set than {name!r} ({detail}); use the model.json "
            "written with these weights, or train this model/config anew")
    unwrap(model).load_state_dict(state, strict=True)


def load_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[CloudRemovalModel, dict]:
    """Rebuild the model of a training run from ``model.json`` and load ``model.pt``.

    Returns ``(model.eval(), meta)``.
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    path = run_dir / MODEL_FILE
    state = safe_load(path, "model state dict")
    want = meta.get("model_sha256")
    if want and sha256_file(path) != want:
        raise CheckpointError(
            f"{path} does not match the sha256 recorded in {run_dir / META_FILE}; the weights were replaced or "
            "damaged - copy the run folder again"
        )
    model = build_from_meta(meta, run_dir / META_FILE)
    load_weights(model, state, path, meta["model"])
    return model.to(map_location).eval(), meta


def check_spec_matches(meta: Mapping[str, Any], model: str, spec: InputSpec, where: Path,
                       fix: str = "a new --out folder") -> None:
    """Resuming or fine-tuning needs the same architecture and input spec as the checkpoint."""
    if meta.get("model") != model:
        raise CheckpointError(
            f"{where} is a checkpoint of model {meta.get('model')!r}, not {model!r}; "
            f"use --model {meta.get('model')} or {fix}"
        )
    theirs = InputSpec.from_dict(meta["spec"])
    if theirs != spec:
        diff = {k: (v, getattr(spec, k)) for k, v in theirs.to_dict().items() if getattr(spec, k) != v}
        raise CheckpointError(
            f"{where}: the checkpoint's input spec differs from {model!r} as configured now "
            f"(checkpoint vs now: {diff}); use {fix}"
        )


# --- RNG states: all as tensors / lists so train_state.pt loads with weights_only=True ---------------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # legacy=True (the default) gives the MT19937 tuple
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
