"""Common base of every registered model: input-spec handling and batch validation."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .bands import LANDSAT_SR_BANDS, S1_BANDS, S2_BANDS
from .errors import ModelConfigError, ModelInputError
from .spec import InputSpec, ModelOutput

SPEC_KEYS = ("optical_sensor", "optical_bands", "optical_dates", "includes_target_date", "sar_bands", "needs_mask")


def default_bands(sensor: str) -> tuple[str, ...]:
    if sensor == "s2":
        return S2_BANDS
    if sensor == "landsat":
        return LANDSAT_SR_BANDS
    raise ModelConfigError(f"optical_sensor={sensor!r} is not supported; use 's2' or 'landsat'")


class CloudRemovalModel(nn.Module):
    """Base class: holds ``spec`` and validates batches against it.

    Subclasses set ``name``, ``is_gan``, ``trainable`` and implement ``forward(batch) -> ModelOutput``.
    Images inside ``forward`` are in [0, 1]; tanh models map to [-1, 1] and back internally.
    """

    name: ClassVar[str] = "base"
    is_gan: ClassVar[bool] = False
    trainable: ClassVar[bool] = True

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.spec = spec

    @staticmethod
    def build_spec(cfg: dict[str, Any]) -> InputSpec:
        """The ``InputSpec`` of an architecture config (without building the model); every model defines it."""
        raise NotImplementedError

    @property
    def n_optical(self) -> int:
        return len(self.spec.optical_bands)

    @property
    def n_sar(self) -> int:
        return len(self.spec.sar_bands)

    @property
    def n_out(self) -> int:
        return len(self.spec.out_bands)

    def discriminator(self) -> nn.Module:
        raise ModelConfigError(f"model {self.name!r} is not a GAN: it has no discriminator (is_gan=False)")

    def condition(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Conditioning inputs a conditional discriminator sees next to the image: (B, K, H, W) in [0, 1]."""
        opt, _, sar = self.inputs(batch)
        parts = [opt.flatten(1, 2)]
        if sar is not None:
            parts.append(sar.flatten(1, 2))
        return torch.cat(parts, 1)

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Validated (optical (B,T,C,H,W), optical_mask (B,T,1,H,W) or None, sar (B,T+1,S,H,W) or None)."""
        spec = self.spec
        if "optical" not in batch:
            raise ModelInputError(
                f"{self.name}: batch has no 'optical' tensor (keys: {sorted(batch)}); build it per models/spec.py"
            )
        opt = batch["optical"]
        want = (spec.optical_dates, len(spec.optical_bands))
        if opt.dim() != 5 or tuple(opt.shape[1:3]) != want:
            raise ModelInputError(
                f"{self.name}: batch['optical'] has shape {tuple(opt.shape)}, expected (B, {want[0]} dates, "
                f"{want[1]} bands {spec.optical_bands}, H, W); fetch the inputs named by model_spec('{self.name}')"
            )
        b, t, _, h, w = opt.shape
        mask = batch.get("optical_mask")
        if mask is not None and tuple(mask.shape) != (b, t, 1, h, w):
            raise ModelInputError(
                f"{self.name}: batch['optical_mask'] has shape {tuple(mask.shape)}, expected {(b, t, 1, h, w)}"
            )
        if spec.needs_mask and mask is None:
            raise ModelInputError(
                f"{self.name}: needs batch['optical_mask'] (B, {t}, 1, H, W) (spec.needs_mask=True); add the cloud mask"
            )
        sar = None
        if spec.sar_bands:
            sar = batch.get("sar")
            want_sar = (b, t + 1, len(spec.sar_bands), h, w)
            if sar is None or tuple(sar.shape) != want_sar:
                got = None if sar is None else tuple(sar.shape)
                raise ModelInputError(
                    f"{self.name}: batch['sar'] is {got}, expected {want_sar} (S1 {spec.sar_bands} nearest to each of "
                    f"the {t} optical dates and the target date)"
                )
        return opt, mask, sar


def spec_from_config(cfg: dict[str, Any], **fixed: Any) -> InputSpec:
    """InputSpec from the spec keys of a resolved config; ``fixed`` is what the architecture dictates.

    A config that asks for something the architecture cannot do (another date count, SAR for an
    optical-only model, bands the sensor does not have) is an error, never silently overridden.
    """
    kw = {k: cfg[k] for k in SPEC_KEYS if k in cfg}
    for k, v in fixed.items():
        if k in kw and (tuple(kw[k]) if isinstance(kw[k], (list, tuple)) else kw[k]) != v:
            raise ModelConfigError(
                f"config {k}={kw[k]!r} is not possible for this architecture (it requires {v!r}); remove the key"
            )
        kw[k] = v
    sensor = kw.setdefault("optical_sensor", "s2")
    known = default_bands(sensor)
    bands = tuple(kw.get("optical_bands") or known)
    bad = [b for b in bands if b not in known]
    if bad or len(set(bands)) != len(bands):
        raise ModelConfigError(
            f"optical_bands {list(bands)}: unknown or repeated {bad or 'band'} for optical_sensor={sensor!r}; choose "
            f"from {list(known)}"
        )
    kw["optical_bands"] = bands
    sar = tuple(kw.get("sar_bands", S1_BANDS))
    if any(b not in S1_BANDS for b in sar) or len(set(sar)) != len(sar):
        raise ModelConfigError(f"sar_bands {list(sar)}: choose from {list(S1_BANDS)} (Sentinel-1 GRD polarisations)")
    kw["sar_bands"] = sar
    if int(kw.get("optical_dates", 1)) < 1:
        raise ModelConfigError(f"optical_dates={kw['optical_dates']!r} must be >= 1")
    return InputSpec(**kw)


def clamp_unit(y: torch.Tensor) -> torch.Tensor:
    """``y`` clamped to [0, 1] in value, identity in gradient (straight-through).

    For residual models (input + correction): a hard clamp would freeze saturated pixels for good.
    """
    return y + (y.clamp(0.0, 1.0) - y).detach()


def to_tanh(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0


def from_tanh(x: torch.Tensor) -> torch.Tensor:
    return (x + 1.0) * 0.5


__all__ = [
    "CloudRemovalModel",
    "ModelOutput",
    "spec_from_config",
    "default_bands",
    "to_tanh",
    "from_tanh",
    "clamp_unit",
    "SPEC_KEYS",
]
