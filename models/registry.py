"""The model registry: one name per architecture, its input spec, and its ``small`` / ``paper`` configs.

Training-loop contract (what ``pipeline.train.loop`` builds on)
------------------------------------------------------------
::

    cfg   = resolve_config(name, "small" | "paper" | {overrides..., "base": "small"|"paper"})
    model = build_model(name, cfg)              # CloudRemovalModel: .spec (InputSpec), .is_gan, .trainable
    spec  = model_spec(name, cfg)               # == model.spec; fetch exactly these sensors/bands/dates
    loss  = model_loss(name, cfg, vgg_weights=PATH_OR_None)   # nn.Module; move it to the device too
    out   = model(batch)                        # ModelOutput: .mean (B,C,H,W) in [0,1], .var or None, .extras
    total, parts = loss(out, batch)             # scalar tensor to backprop; parts: {name: detached scalar}

    if model.is_gan:                            # discriminator step, then the generator's adversarial term
        disc = model.discriminator()            # its own optimizer; state dict saved beside the generator's
        adv  = adversarial_loss(name, cfg)      # AdversarialLoss (least squares or WGAN-GP, weight from cfg)
        d_total, d_parts = adv.discriminator_loss(disc, batch["target"], out.mean.detach(), model.condition(batch))
        g_adv, g_parts   = adv.generator_loss(disc, out.mean, model.condition(batch))   # already weighted
        total = total + g_adv

- ``batch`` follows ``models/spec.py``; losses use ``batch['target']`` and, when present, ``target_valid``
  (pixels with 0 do not count) and ``optical_mask`` (cloud-weighted / cloud-local terms).
- ``model.trainable`` is False for ``composite``: evaluate it, never optimise it (it has no parameters).
- Store ``resolve_config(...)`` (a plain JSON-able dict) as ``config`` in ``model.json``;
  ``build_model(name, that_dict)`` rebuilds the same architecture, ``model_spec`` the same InputSpec.
- Perceptual / style losses need VGG16 ImageNet weights from a file the user names (torchvision ``vgg16``
  state-dict format); without it ``model_loss`` raises ``ModelConfigError`` saying how to fix it —
  or set those loss weights to 0 in the config's ``loss`` dict.
- Everything raises ``models.errors.ModelError`` (a ``ValueError``) for bad names, keys, or batches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import cafusion, cmsn, composite, crgennet, refine, srggan, uncrtaints, unet
from .base import CloudRemovalModel
from .errors import ModelConfigError
from .losses import AdversarialLoss, build_loss
from .spec import InputSpec


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type[CloudRemovalModel]
    small: dict[str, Any]
    paper: dict[str, Any]
    description: str
    reference: str = ""
    loss_defaults: dict[str, Any] = field(default_factory=dict)
    # The small (CPU) preset may switch off loss terms that need files nobody has offline (ImageNet VGG16):
    # an explicit, documented preset, not a fallback; `--vgg-weights` with config 'paper' restores them.
    small_loss: dict[str, Any] = field(default_factory=dict)


def _entry(name: str, module: Any, cls: type[CloudRemovalModel], description: str, reference: str = "") -> ModelEntry:
    return ModelEntry(name, cls, module.SMALL, module.PAPER, description, reference, getattr(module, "LOSS", {}),
                      getattr(module, "SMALL_LOSS", {}))


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        _entry("crgennet", crgennet, crgennet.CRGenNet,
               "S1 t1 + S1 t2 + cloudy S2 t1 -> S2 t2; FusionAttention, Swin tower, multi-scale GAN",
               "Duan, Belgiu & Stein, ISPRS J. Photogramm. Remote Sens. 2026"),
        _entry("srggan", srggan, srggan.SRGGAN, "U-Net GAN with Sobel/edge structural guidance, PatchGAN"),
        _entry("cmsn", cmsn, cmsn.CMSN, "three Landsat dates; ResFFTConv, multi-temporal aggregation, coarse->refined"),
        _entry("uncrtaints", uncrtaints, uncrtaints.UnCRtainTS,
               "multi-date S1+S2, MBConv + temporal attention, mean and variance (SSCR / UnCRtainTS family)",
               "Ebel et al., CVPRW 2023"),
        _entry("cafusion", cafusion, cafusion.CAFusion,
               "cloud-attentive SAR fusion: pixel-unshuffle, residual dense + Swin blocks, cloud-weighted loss"),
        _entry("composite", composite, composite.Composite, "no training: most recent clear pixel or clear median"),
        _entry("unet", unet, unet.UNet, "plain SAR + optical U-Net"),
        _entry("refine", refine, refine.Refine,
               "a learned correction of the harmonized composite (residual: untrained = the composite); S1 optional"),
    )
}


def list_models() -> list[str]:
    return sorted(MODELS)


def _entry_for(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ModelConfigError(f"unknown model {name!r}; choose one of {list_models()}")
    return MODELS[name]


def resolve_config(name: str, config: str | dict[str, Any] = "small") -> dict[str, Any]:
    """Full config dict: a preset name, or a dict of overrides on top of ``config.get('base', 'paper')``.

    A dict that is already complete (as stored in model.json) resolves to itself.
    """
    e = _entry_for(name)
    if isinstance(config, str):
        if config not in ("small", "paper"):
            raise ModelConfigError(f"{name}: config={config!r}; use 'small', 'paper' or a dict of overrides")
        loss = copy.deepcopy(e.loss_defaults) | (copy.deepcopy(e.small_loss) if config == "small" else {})
        return copy.deepcopy(e.small if config == "small" else e.paper) | {"loss": loss}
    if not isinstance(config, dict):
        raise ModelConfigError(f"{name}: config must be 'small', 'paper' or a dict, got {type(config).__name__}")
    over = dict(config)
    base = resolve_config(name, over.pop("base", "paper"))
    unknown = sorted(set(over) - set(base) - {"optical_bands", "sar_bands", "optical_sensor", "includes_target_date"})
    if unknown:
        raise ModelConfigError(f"{name}: unknown config key(s) {unknown}; allowed: {sorted(set(base) | {'base'})}")
    loss_over = over.pop("loss", None) or {}
    bad = sorted(set(loss_over) - set(base["loss"]))
    if bad:
        raise ModelConfigError(f"{name}: unknown loss key(s) {bad}; allowed: {sorted(base['loss'])}")
    base["loss"].update(loss_over)
    base.update(over)
    for k in ("optical_bands", "sar_bands"):
        if k in base and base[k] is not None:
            base[k] = list(base[k])
    return base


def build_model(name: str, config: str | dict[str, Any] = "small") -> CloudRemovalModel:
    cfg = resolve_config(name, config)
    arch = {k: v for k, v in cfg.items() if k != "loss"}
    return _entry_for(name).cls(**arch)


def model_spec(name: str, config: str | dict[str, Any] = "small") -> InputSpec:
    cfg = resolve_config(name, config)
    return _entry_for(name).cls.build_spec(cfg)


def model_info(name: str) -> dict[str, Any]:
    e = _entry_for(name)
    return {
        "name": e.name,
        "description": e.description,
        "reference": e.reference,
        "is_gan": e.cls.is_gan,
        "trainable": e.cls.trainable,
        "spec_small": model_spec(name, "small").to_dict(),
        "spec_paper": model_spec(name, "paper").to_dict(),
        "small": resolve_config(name, "small"),
        "paper": resolve_config(name, "paper"),
    }


def model_loss(name: str, config: str | dict[str, Any] = "small", vgg_weights: str | None = None) -> nn.Module:
    """The generator / regression loss: ``loss(output, batch) -> (total, parts)``."""
    cfg = resolve_config(name, config)
    return build_loss(name, cfg["loss"], model_spec(name, cfg), vgg_weights=vgg_weights)


def adversarial_loss(name: str, config: str | dict[str, Any] = "small") -> AdversarialLoss | None:
    """Adversarial helper for GAN models (None otherwise), configured by ``loss.adversarial`` / ``loss.adv_weight``."""
    cfg = resolve_config(name, config)
    if not _entry_for(name).cls.is_gan:
        return None
    lc = cfg["loss"]
    return AdversarialLoss(kind=lc.get("adversarial", "lsgan"), weight=float(lc.get("adv_weight", 0.01)),
                           gp_weight=float(lc.get("gp_weight", 10.0)))


__all__ = ["MODELS", "ModelEntry", "build_model", "model_spec", "model_info", "list_models", "resolve_config",
           "model_loss", "adversarial_loss"]
