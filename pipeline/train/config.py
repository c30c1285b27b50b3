"""Training configuration: one pydantic model, each model's published optimiser defaults, config files.

``cloudfree train --config small|paper|FILE``: ``small``/``paper`` pick the registry's architecture preset;
FILE is a YAML or JSON mapping of ``TrainConfig`` fields (``model_params`` holds architecture / loss
overrides on top of ``base: small|paper``). Command-line flags override the file.

This module stays free of torch: ``cloudfree train`` and the flow parameters read their defaults from
``TrainConfig`` at import time, and the CLI must start fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import CloudfreeError, describe_validation
from pipeline.harmonize import FillConfig


class TrainConfigError(CloudfreeError):
    """A training config file or field is invalid."""


class AugmentConfig(BaseModel):
    """How training samples are perturbed; evaluation uses the same cloud model with a fixed seed, no flips."""

    model_config = ConfigDict(extra="forbid")

    flips: bool = Field(True, description="random horizontal/vertical flips (training only)")
    rot90: bool = Field(True, description="random 90-degree rotations (training only; 180 only for non-square patches)")
    cloud_source: Literal["mixed", "real", "simulated"] = Field(
        "mixed", description="where pasted cloud masks come from: other dates of the sample, a random field, or either")
    cover_min: float = Field(0.15, ge=0.0, le=1.0, description="smallest simulated cloud cover fraction")
    cover_max: float = Field(0.7, ge=0.0, le=1.0, description="largest simulated cloud cover fraction")
    thin_prob: float = Field(0.25, ge=0.0, le=1.0, description="chance that a pasted cloud is thin (max opacity < 1)")
    shadow: bool = Field(True, description="add a darkened, displaced cloud shadow")
    crop: int | None = Field(
        None, ge=8, description="random square crop of this side (training only; validation sees whole patches)")
    donor_pixels_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="chance that a real cloud mask brings its date's own pixels (real cloud "
                                         "spectra, thin edges and shadows) rather than a simulated white cloud")
    input_cloud_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="chance per clear input date to get synthetic clouds "
                                         "(models without the target date; training only)")


class OptimConfig(BaseModel):
    """Optimiser of the generator (and, for GAN models, of the discriminator)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["adam", "adamw", "sgd"] = Field("adam", description="adam, adamw or sgd (sgd: momentum = betas[0])")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW betas; SGD uses the first as momentum")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (decoupled for adamw)")
    d_lr: float | None = Field(None, description="discriminator learning rate (GAN models); defaults to lr")


class SchedulerConfig(BaseModel):
    """Learning-rate schedule, stepped once per epoch."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["plateau", "cosine", "none"] = Field(
        "plateau", description="plateau: ReduceLROnPlateau on the monitored metric; cosine: annealing over all epochs, "
        "or over time_limit_s when that ends the run first")
    factor: float = Field(0.1, gt=0, lt=1, description="ReduceLROnPlateau: lr multiplier")
    patience: int = Field(10, ge=0, description="ReduceLROnPlateau: epochs without improvement before lowering lr")
    min_lr: float = Field(0.0, ge=0, description="lower bound of the learning rate")


class ModelDefaults(BaseModel):
    """What the model's authors published (or a stated choice where they did not)."""

    optimizer: OptimConfig = Field(description="published optimiser")
    scheduler: SchedulerConfig = Field(SchedulerConfig(), description="published learning-rate schedule")
    batch_size: int = Field(8, description="published (global) batch size")
    source: str = Field("", description="where these settings come from, recorded in model.json")


# Published training settings (REFERENCES.md and the papers' code); "not published" marks our choice.
MODEL_DEFAULTS: dict[str, ModelDefaults] = {
    "crgennet": ModelDefaults(optimizer=OptimConfig(lr=1e-3, betas=(0.5, 0.999)), batch_size=8,
                              source="CRGenNet official code: Adam 1e-3, ReduceLROnPlateau, batch 8, 200 epochs"),
    "srggan": ModelDefaults(optimizer=OptimConfig(lr=1e-4, betas=(0.5, 0.999)), batch_size=4,
                            source="SRG-GAN: Adam 1e-4, batch 4"),
    "uncrtaints": ModelDefaults(optimizer=OptimConfig(lr=1e-2), batch_size=4, source="UnCRtainTS: lr 1e-2, batch 4"),
    "cafusion": ModelDefaults(optimizer=OptimConfig(lr=1e-4), batch_size=8,
                              source="cloud-aware SAR fusion: Adam 1e-4 (batch not published)"),
    "cmsn": ModelDefaults(optimizer=OptimConfig(lr=1e-4), batch_size=8, source="not published: Adam 1e-4, batch 8"),
    "unet": ModelDefaults(optimizer=OptimConfig(lr=1e-3), batch_size=8, source="baseline: Adam 1e-3, batch 8"),
    # a correction that starts at zero: a smaller step keeps the first epochs from undoing the composite
    "refine": ModelDefaults(optimizer=OptimConfig(lr=3e-4), batch_size=8,
                            source="not published: Adam 3e-4, batch 8 (a correction of the composite)"),
}
_FALLBACK = ModelDefaults(optimizer=OptimConfig(), source="generic: Adam 1e-3, batch 8")

_MAXIMISE = ("psnr", "ssim", "corr")


class TrainConfig(BaseModel):
    """Everything ``cloudfree train`` needs besides the data and the run folder."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(..., description="registry name (cloudfree models list)")
    model_params: str | dict[str, Any] = Field(
        "small", description="'small', 'paper' or overrides on top of base: small|paper")
    epochs: int = Field(20, ge=1, description="total epochs (a resumed run continues up to this number)")
    batch_size: int | None = Field(
        None, ge=1, description="GLOBAL batch (split over DDP ranks); default: the model's published one")
    optimizer: OptimConfig | None = Field(None, description="default: the model's published optimiser")
    scheduler: SchedulerConfig | None = Field(None, description="default: the model's published schedule")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm (None: no clipping)")
    d_steps: int = Field(1, ge=1, description="discriminator steps per generator step (GAN models)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto | fp32 | bf16 | fp16 (auto: bf16 autocast on CUDA, fp32 on CPU)")
    # Off by default: on an H200 it slowed every paper config's training step (bench/training.py --cuda, bf16:
    # CRGenNet 43.7 -> 36.8 samples/s, UnCRtainTS 14.3 -> 11.6, CA-Fusion 68.4 -> 64.2). Measured, not profiled:
    # their Swin windows, attention and pixel-(un)shuffle reshape NCHW views, which channels_last turns into copies.
    channels_last: bool = Field(False, description="channels_last memory format on CUDA (slower for the zoo's models)")
    seed: int = Field(0, description="seeds weights, shuffling and augmentation (same seed: same run)")
    deterministic: bool = Field(True, description="torch deterministic algorithms where PyTorch has them")
    monitor: str = Field("cloud_psnr", description="validation metric that picks the best checkpoint")
    patience: int | None = Field(10, ge=1, description="early stopping: epochs without improvement (None: off)")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on optimiser steps per epoch (quick runs)")
    time_limit_s: float | None = Field(
        None, gt=0, description="stop after the epoch during which this many seconds passed")
    val_every: int = Field(1, ge=1, description="validate every N epochs (and always after the last one)")
    log_every: int = Field(10, ge=1, description="TensorBoard scalars every N steps")
    image_every: int = Field(1, ge=1, description="TensorBoard image grids every N epochs")
    train_split: str = Field("train", description="cube split trained on (cubes/SPLIT.zarr)")
    val_split: str = Field("val", description="cube split validated on every val_every epochs")
    vgg_weights: str | None = Field(None, description="torchvision vgg16 state dict for perceptual/style losses")
    init_from: str | None = Field(
        None, description="fine-tuning: a finished run folder (of `cloudfree train`) whose model.pt starts the "
        "weights; same model and input spec, fresh optimiser; a composite-taking model may have learned another fill")
    augment: AugmentConfig = Field(AugmentConfig(), description="synthetic clouds, flips, rotations, crops")
    composite_fill: FillConfig = Field(
        FillConfig(), description="the harmonized fill that models taking a composite (refine) learn to correct; the "
        "checkpoint records it and reconstruct fills with it")

    @property
    def monitor_mode(self) -> Literal["max", "min"]:
        return "max" if self.monitor.removeprefix("cloud_") in _MAXIMISE else "min"

    def defaults(self) -> ModelDefaults:
        return MODEL_DEFAULTS.get(self.model, _FALLBACK)

    def resolved_optimizer(self) -> OptimConfig:
        return self.optimizer or self.defaults().optimizer

    def resolved_scheduler(self) -> SchedulerConfig:
        return self.scheduler or self.defaults().scheduler

    def resolved_batch_size(self) -> int:
        return self.batch_size or self.defaults().batch_size


def train_default(name: str) -> Any:
    """``TrainConfig``'s default of field ``name``: the one place front ends (CLI, flow parameters) take it from."""
    return TrainConfig.model_fields[name].get_default(call_default_factory=True)


def load_train_config(config: str | Path | None, model: str, **overrides: Any) -> TrainConfig:
    """``small``/``paper``/None or a YAML/JSON file -> TrainConfig; ``overrides`` (not None) win."""
    data: dict[str, Any] = {}
    if config is None or str(config) in ("small", "paper"):
        data["model_params"] = str(config or "small")
    else:
        path = Path(config)
        if not path.is_file():
            raise TrainConfigError(f"--config {config}: not 'small', 'paper' or an existing YAML/JSON file")
        try:
            text = path.read_text()
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TrainConfigError(f"{path}: not valid YAML/JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise TrainConfigError(f"{path}: expected a mapping of training settings, got {type(loaded).__name__}")
        data.update(loaded)
    if data.get("model", model) != model:
        raise TrainConfigError(
            f"--config {config} is for model {data['model']!r} but --model is {model!r}; make them agree")
    data["model"] = model
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        where = f"training config {config}" if config else "training options"
        raise TrainConfigError(f"{where}: {describe_validation(exc)}") from None
