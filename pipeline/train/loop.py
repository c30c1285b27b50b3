"""The training stage: one loop for regression and GAN models, single process or ``torchrun`` DDP.

``train(config, data_dir, out)`` reads the split cubes lazily (``pipeline.dataset.cubes.CubeDataset``), assembles
model inputs per the model's ``InputSpec`` (``pipeline.train.samples``: synthetic clouds, flips, rotations),
and optimises the registry's loss (``models.registry.model_loss``; GAN models alternate a discriminator step
with the generator step, least squares or WGAN-GP per the model's config). Per epoch it validates with the
metrics of ``pipeline.train.evaluate``, keeps the best checkpoint by ``config.monitor`` (``RUN/model.pt`` +
``model.json``), writes ``RUN/train_state.pt`` for exact resume, logs to TensorBoard (``RUN/tb``) and stops
early after ``patience`` epochs without improvement.

Determinism: shuffling comes from ``DistributedSampler(seed, epoch)`` (also with one process), augmentation
from ``(seed, epoch, sample index)``, so a resumed or a DDP run sees the same global batches as a straight
single-process run; model RNG (dropout) is restored from the checkpoint. DDP: the generator is wrapped in
``DistributedDataParallel``; a GAN discriminator's gradients are averaged explicitly (it is called several
times per step, which DDP's reducer does not allow). Validation, logging and checkpoints happen on rank 0;
the monitored value is broadcast so every rank steps its scheduler and stops together.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from models.base import CloudRemovalModel
from models.spec import InputSpec, ModelOutput
from pipeline.errors import CheckpointError, CloudfreeError, DataError
from pipeline.files import OutputLock
from pipeline.train.checkpoint import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    atomic_torch_save,
    check_spec_matches,
    load_weights,
    meta_fill,
    read_meta,
    rng_state,
    safe_load,
    save_model,
    set_rng_state,
    unwrap,
)
from pipeline.train.config import TrainConfig, TrainConfigError
from pipeline.train.evaluate import validate
from pipeline.train.runtime import Runtime, dataset_fingerprint, open_split, setup_runtime, teardown_runtime
from pipeline.train.samples import AssembledDataset, model_inputs
from pipeline.train.schedule import BudgetCosine

log = logging.getLogger(__name__)

__all__ = ["train", "TrainResult", "TrainingError"]


class TrainingError(CloudfreeError):
    """Training cannot continue (non-finite loss, model that cannot be trained, ...)."""


# --------------------------------------------------------------------------- data


def _loader(ds: Dataset, batch: int, rt: Runtime, cfg: TrainConfig, *, shuffle: bool,
            sharded: bool) -> tuple[DataLoader, DistributedSampler | None]:
    sampler: DistributedSampler | None = None
    if sharded:
        # also with one process: the same permutation as a DDP run of the same global batch
        sampler = DistributedSampler(ds, num_replicas=rt.world, rank=rt.rank, shuffle=shuffle, seed=cfg.seed,
                                     drop_last=False)
    workers = cfg.num_workers
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, shuffle=False, num_workers=workers,
                        pin_memory=rt.device.type == "cuda", drop_last=False, persistent_workers=False,
                        prefetch_factor=2 if workers else None)
    return loader, sampler


# --------------------------------------------------------------------------- model, optimiser, losses


@dataclass
class Parts:
    model: nn.Module  # possibly DDP-wrapped
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    resolved: dict[str, Any]
    spec: InputSpec
    disc: nn.Module | None = None
    d_optimizer: torch.optim.Optimizer | None = None
    adversarial: Any = None
    steps_per_epoch: int = 1

    @property
    def bare(self) -> CloudRemovalModel:
        model = unwrap(self.model)
        assert isinstance(model, CloudRemovalModel)  # build_parts wraps a registry model
        return model


def _optimizer(params: Any, name: str, lr: float, betas: tuple[float, float], wd: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=betas[0], weight_decay=wd)


def build_parts(cfg: TrainConfig, rt: Runtime, steps_per_epoch: int) -> Parts:
    from models.errors import ModelError
    from models.registry import adversarial_loss, build_model, model_loss, resolve_config

    try:
        resolved = resolve_config(cfg.model, cfg.model_params)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
        model = build_model(cfg.model, resolved)
        loss = model_loss(cfg.model, resolved, vgg_weights=cfg.vgg_weights)
        adv = adversarial_loss(cfg.model, resolved)
    except ModelError as exc:
        raise TrainConfigError(f"model {cfg.model!r}: {exc}") from None
    if not getattr(model, "trainable", True):
        raise TrainingError(f"model {cfg.model!r} needs no training (it has no weights); "
                            "score it with `cloudfree evaluate` next to a trained model")
    spec = model.spec
    model = model.to(rt.device)
    loss = loss.to(rt.device)
    if rt.channels_last:
        # torch's stubs lack the memory_format keyword that Module.to accepts
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    disc = None
    if getattr(model, "is_gan", False):
        disc = model.discriminator().to(rt.device)
        if rt.channels_last:
            disc = disc.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # as above
    net: nn.Module = model  # possibly wrapped below; Parts.bare gives the model back
    if rt.distributed:
        if rt.device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        device_ids = [rt.local_rank] if rt.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
        if disc is not None:
            for p in disc.parameters():  # identical start on every rank (init already seeded, this makes sure)
                dist.broadcast(p.data, 0)
    oc, sc = cfg.resolved_optimizer(), cfg.resolved_scheduler()
    opt = _optimizer(net.parameters(), oc.name, oc.lr, oc.betas, oc.weight_decay)
    d_opt = None
    if disc is not None:
        d_opt = _optimizer(disc.parameters(), oc.name, oc.d_lr or oc.lr, oc.betas, oc.weight_decay)
    sched: torch.optim.lr_scheduler.LRScheduler | BudgetCosine | None
    if sc.kind == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=cfg.monitor_mode, factor=sc.factor,
                                                           patience=sc.patience, min_lr=sc.min_lr)
    elif sc.kind == "cosine":
        sched = BudgetCosine(opt, cfg.epochs, cfg.time_limit_s, sc.min_lr)
    else:
        sched = None
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    return Parts(net, loss, opt, sched, scaler, resolved, spec, disc, d_opt, adv, steps_per_epoch)


# --------------------------------------------------------------------------- state


@dataclass
class LoopState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps so far
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0


def _state_dict(parts: Parts, st: LoopState, cfg: TrainConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": parts.bare.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else {},
        "scaler": parts.scaler.state_dict(),
        "rng": rng_state(),
        "loop": {"epoch": st.epoch, "step": st.step, "best_value": st.best_value, "best_epoch": st.best_epoch,
                 "bad_epochs": st.bad_epochs, "history": st.history, "elapsed_s": st.elapsed_s},
        "train_config": cfg.model_dump(mode="json"),
        "resolved": parts.resolved,
    }
    if parts.disc is not None:
        assert parts.d_optimizer is not None  # build_parts makes both or neither
        out["disc"] = parts.disc.state_dict()
        out["d_optimizer"] = parts.d_optimizer.state_dict()
    return out


def _restore(parts: Parts, out: Path, cfg: TrainConfig) -> LoopState:
    path = out / STATE_FILE
    state = safe_load(path, "training state")
    need = ("model", "optimizer", "rng", "loop", "resolved")
    if not isinstance(state, dict) or any(k not in state for k in need):
        missing = [k for k in need if k not in (state or {})]
        raise CheckpointError(f"{path} lacks {missing}; it was not written by `cloudfree train`")
    if state["resolved"] != parts.resolved:
        raise CheckpointError(f"{path}: the run was trained with model parameters {state['resolved']}, not "
                              f"{parts.resolved}; resume with the same --config or use a new --out")
    load_weights(parts.model, state["model"], path, cfg.model)
    try:
        parts.optimizer.load_state_dict(state["optimizer"])
        if parts.scheduler is not None and state.get("scheduler"):
            parts.scheduler.load_state_dict(state["scheduler"])
        parts.scaler.load_state_dict(state.get("scaler", {}))
        if parts.disc is not None:
            assert parts.d_optimizer is not None  # build_parts makes both or neither
            load_weights(parts.disc, state["disc"], path, f"{cfg.model} discriminator")
            parts.d_optimizer.load_state_dict(state["d_optimizer"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: optimiser/scheduler state does not fit this run ({exc}); "
                              "resume with the same settings or use a new --out") from None
    set_rng_state(state["rng"])
    lp = state["loop"]
    return LoopState(lp["epoch"], lp["step"], lp["best_value"], lp["best_epoch"], lp["bad_epochs"], list(lp["history"]),
                     lp.get("elapsed_s", 0.0))


# --------------------------------------------------------------------------- steps


def _all_finite(loss: torch.Tensor, rt: Runtime) -> bool:
    ok = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if rt.distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # one bad rank stops all ranks at the same step
    return bool(ok.item())


def _raise_nonfinite(what: str, loss: torch.Tensor, batch: Mapping[str, Any], st: LoopState, rt: Runtime) -> None:
    finite_here = bool(torch.isfinite(loss.detach()).all())
    where = f"rank {rt.rank}: " if rt.distributed else ""
    if finite_here:
        raise TrainingError(f"{where}training stopped at epoch {st.epoch + 1}, step {st.step}: "
                            f"another rank had a non-finite {what}")
    ids = list(batch.get("sample_id", []))
    raise TrainingError(
        f"{where}non-finite {what} ({loss.detach().float().item()}) at epoch {st.epoch + 1}, step {st.step}; "
        f"batch samples: {ids}. Check those samples' inputs (cloudfree build-dataset report), lower the learning rate "
        "or tighten --grad-clip")


def _average_grads(module: nn.Module, rt: Runtime) -> None:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads or not rt.distributed:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= rt.world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset: offset + n].view_as(g))
        offset += n


def _clip(params: Any, cfg: TrainConfig) -> None:
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)


def _fp32(out: ModelOutput) -> ModelOutput:
    if out.mean.dtype == torch.float32:
        return out
    return ModelOutput(mean=out.mean.float(), var=None if out.var is None else out.var.float(),
                       extras={k: v.float() if torch.is_floating_point(v) else v for k, v in out.extras.items()})


def train_step(parts: Parts, batch: Mapping[str, Any], cfg: TrainConfig, rt: Runtime,
               st: LoopState) -> dict[str, float]:
    """One optimiser step (plus ``d_steps`` discriminator steps for GANs); returns detached loss parts."""
    inputs = rt.to_device(model_inputs(batch))
    logs: dict[str, torch.Tensor] = {}
    with rt.autocast():
        out = parts.model(inputs)
    if parts.disc is not None:
        assert parts.d_optimizer is not None  # build_parts makes both or neither
        cond = parts.bare.condition(inputs)
        fake = out.mean.detach()
        for p in parts.disc.parameters():
            p.requires_grad_(True)
        for _ in range(cfg.d_steps):
            with rt.autocast():
                d_loss, d_parts = parts.adversarial.discriminator_loss(parts.disc, inputs["target"], fake, cond)
            if not _all_finite(d_loss, rt):
                _raise_nonfinite("discriminator loss", d_loss, batch, st, rt)
            parts.d_optimizer.zero_grad(set_to_none=True)
            parts.scaler.scale(d_loss).backward()
            _average_grads(parts.disc, rt)
            parts.scaler.unscale_(parts.d_optimizer)
            _clip(parts.disc.parameters(), cfg)
            parts.scaler.step(parts.d_optimizer)
            logs.update(d_parts)
            logs["d_total"] = d_loss.detach()
        for p in parts.disc.parameters():  # the generator step must not train D
            p.requires_grad_(False)
    # losses in fp32 (MS-SSIM, cosine and NLL terms lose too much in bf16); the discriminator still runs autocast
    out = _fp32(out)
    total, g_parts = parts.loss(out, inputs)
    if parts.disc is not None:
        with rt.autocast():
            g_adv, adv_parts = parts.adversarial.generator_loss(parts.disc, out.mean, parts.bare.condition(inputs))
        total = total + g_adv.float()
        g_parts = {**g_parts, **adv_parts, "total": total.detach()}
    if not _all_finite(total, rt):
        _raise_nonfinite("loss", total, batch, st, rt)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(total).backward()
    parts.scaler.unscale_(parts.optimizer)
    _clip(parts.model.parameters(), cfg)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    logs.update(g_parts)
    return {k: float(v) for k, v in logs.items()}


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int | None
    best_value: float | None
    monitor: str
    history: list[dict[str, float]]
    stopped_early: bool
    seconds: float  # this invocation (a resumed run does not count the earlier sessions' time)
    samples_per_s: float
    total_seconds: float = 0.0  # every session of the run, what time_limit_s is compared with


def _check_out(out: Path, resume: bool) -> None:
    has_run = (out / STATE_FILE).exists() or (out / META_FILE).exists()
    if has_run and not resume:
        raise CheckpointError(
            f"{out} already holds a training run; pass --resume to continue it or choose a new --out folder")
    if resume and not (out / STATE_FILE).exists():
        raise CheckpointError(f"--resume: {out / STATE_FILE} not found; start a new run without --resume")


def _spec_of(cfg: TrainConfig) -> InputSpec:
    from models.errors import ModelError
    from models.registry import model_spec

    try:
        return model_spec(cfg.model, cfg.model_params)
    except ModelError as exc:
        raise TrainConfigError(f"model {cfg.model!r}: {exc}") from None


def _improved(value: float, st: LoopState, mode: str) -> bool:
    if math.isnan(value):
        return False
    if st.best_value is None:
        return True
    return value > st.best_value if mode == "max" else value < st.best_value


def _broadcast_value(value: float, rt: Runtime) -> float:
    if not rt.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t.item())


@dataclass
class _Run:
    """One training run in progress: what its steps share (built by ``_setup``)."""

    cfg: TrainConfig
    rt: Runtime
    out: Path
    parts: Parts
    st: LoopState
    train_ds: AssembledDataset
    sampler: DistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    writer: Any  # TensorBoard SummaryWriter on rank 0, None elsewhere
    manifest_sha: str | None
    progress: bool
    start_epoch: int
    t_start: float  # perf_counter of a straight run's start: a resumed run counts its earlier time
    samples_seen: int = 0
    t_train: float = 0.0
    t_session: float = field(default_factory=time.perf_counter)  # this invocation's start, resumed or not


def train(
    cfg: TrainConfig,
    data_dir: Path | None,
    out: Path,
    *,
    resume: bool = False,
    train_data: Dataset | None = None,
    val_data: Dataset | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg.model`` on ``data_dir`` (or the given raw-sample datasets) into the run folder ``out``."""
    out = Path(out)
    rt = setup_runtime(cfg)
    try:
        with contextlib.ExitStack() as held:
            _lock_run_folder(held, out, rt)
            run = _setup(cfg, rt, data_dir, out, resume, train_data, val_data, progress)
            try:
                stopped_early = _epoch_loop(run)
            finally:
                if run.writer is not None:
                    run.writer.close()
            return _result(run, stopped_early)
    finally:
        teardown_runtime(rt)


def _lock_run_folder(held: contextlib.ExitStack, out: Path, rt: Runtime) -> None:
    """Rank 0 holds the run folder's lock; under DDP every rank learns whether it got it, so a refusal stops all
    ranks instead of leaving the others waiting in the first collective."""
    refused: CloudfreeError | None = None
    if rt.main:
        try:
            held.enter_context(OutputLock(out, "train"))
        except CloudfreeError as exc:
            refused = exc
    if _broadcast_value(float(refused is not None), rt):
        raise refused or CheckpointError(f"{out} is in use by another training run (rank 0 could not lock it)")


def _setup(cfg: TrainConfig, rt: Runtime, data_dir: Path | None, out: Path, resume: bool, train_data: Dataset | None,
           val_data: Dataset | None, progress: bool) -> _Run:
    """Check the run folder, open the splits, build model and loaders, restore a resumed run's state."""
    _check_out(out, resume)
    if resume and (out / META_FILE).exists():
        meta = read_meta(out)
        check_spec_matches(meta, cfg.model, _spec_of(cfg), out / META_FILE)
        if _spec_of(cfg).needs_composite and meta_fill(meta) != cfg.composite_fill:
            raise TrainConfigError(
                f"{out / META_FILE}: the run corrects fills made with composite_fill "
                f"{meta_fill(meta).differences(cfg.composite_fill, 'this config')}; "
                "resume with the same composite_fill or train into a new --out folder")
    raw_train = train_data if train_data is not None else open_split(data_dir, cfg.train_split)
    raw_val = val_data if val_data is not None else open_split(data_dir, cfg.val_split)
    batch = cfg.resolved_batch_size()
    if batch % rt.world:
        raise TrainConfigError(f"batch_size {batch} is the global batch and must divide evenly over {rt.world} ranks")
    per_rank = batch // rt.world
    # the spec decides the assembly; build the model first (seeded, so every rank agrees)
    parts = build_parts(cfg, rt, steps_per_epoch=1)
    train_ds = AssembledDataset(raw_train, parts.spec, train=True, seed=cfg.seed, augment=cfg.augment,
                                fill=cfg.composite_fill)
    val_ds = AssembledDataset(raw_val, parts.spec, train=False, seed=cfg.seed, augment=cfg.augment,
                              fill=cfg.composite_fill)
    train_loader, sampler = _loader(train_ds, per_rank, rt, cfg, shuffle=True, sharded=True)
    assert sampler is not None  # sharded loaders always have one
    val_loader, _ = _loader(val_ds, per_rank, rt, cfg, shuffle=False, sharded=False)
    st = _restore(parts, out, cfg) if resume else LoopState()
    if cfg.init_from is not None and not resume:  # a resumed run's weights are its own by now
        _init_weights(parts, cfg)
    manifest_sha = dataset_fingerprint(data_dir)
    writer = _writer(out, rt)  # last: nothing between here and train()'s try may leave it open
    return _Run(cfg, rt, out, parts, st, train_ds, sampler, train_loader, val_loader, writer, manifest_sha, progress,
                start_epoch=st.epoch, t_start=time.perf_counter() - st.elapsed_s)


def _init_weights(parts: Parts, cfg: TrainConfig) -> None:
    """Fine-tuning: the weights of a finished run, checked for the same model and input spec."""
    assert cfg.init_from is not None
    src = Path(cfg.init_from)
    meta = read_meta(src)
    check_spec_matches(meta, cfg.model, parts.spec, src / META_FILE,
                       fix=f"--init-from a run of {cfg.model!r} with the same model parameters")
    load_weights(parts.model, safe_load(src / MODEL_FILE, "model weights"), src / MODEL_FILE, cfg.model)
    note = ""
    if parts.spec.needs_composite and meta_fill(meta) != cfg.composite_fill:
        # allowed on purpose: moving a correction onto a better fill is what fine-tuning it is for
        note = f"; it learned to correct another fill ({meta_fill(meta).differences(cfg.composite_fill, 'this run')})"
    monitor = meta.get("monitor") or {}
    value = monitor.get("value")
    log.info("weights from %s (epoch %s, %s %s)%s", src, meta.get("epoch"), monitor.get("name"),
             f"{value:.4f}" if isinstance(value, (int, float)) else value, note)


def _epoch_loop(run: _Run) -> bool:
    """Epochs from the first not yet run up to ``cfg.epochs``; True when early stopping ended them."""
    cfg, st = run.cfg, run.st
    if run.start_epoch == 0 and (run.parts.spec.needs_composite or run.cfg.init_from is not None):
        _composite_baseline(run)
    for epoch in range(run.start_epoch, cfg.epochs):
        epoch_logs = _train_epoch(run, epoch)
        out_of_time = cfg.time_limit_s is not None and time.perf_counter() - run.t_start >= cfg.time_limit_s
        out_of_time = bool(_broadcast_value(float(out_of_time), run.rt))  # rank 0's clock decides for all ranks
        st.epoch = epoch + 1
        validated = out_of_time or st.epoch == cfg.epochs or st.epoch % cfg.val_every == 0
        metrics, improved = _end_epoch(run, epoch, epoch_logs, validated)
        st.history.append({"epoch": st.epoch, **epoch_logs, **metrics})
        st.elapsed_s = time.perf_counter() - run.t_start
        _checkpoint(run, epoch_logs, metrics, improved=improved, validated=validated)
        if cfg.patience is not None and st.bad_epochs >= cfg.patience:
            log.info("early stop: %s did not improve for %d validations", cfg.monitor, cfg.patience)
            return True
        if out_of_time:
            log.info("time limit %.0f s reached after epoch %d", cfg.time_limit_s, st.epoch)
            return False
    return False


def _composite_baseline(run: _Run) -> None:
    """Epoch 0 of a model that corrects the composite: the untrained model IS the composite, so validating it scores
    the training-free baseline, and saving it makes that the checkpoint until an epoch beats it on validation. A run
    whose training never helps hands over the composite, not a worse model. A fine-tuned run (``init_from``) starts
    the same way from the weights it was given, so it never hands back worse than it started."""
    cfg, st = run.cfg, run.st
    value, metrics = _validate_epoch(run.parts, run.val_loader, run.rt, cfg, run.writer, -1, {})
    st.best_value, st.best_epoch = value, 0
    first: dict[str, Any] = {"epoch": 0, **metrics}
    if run.rt.main:
        start = "the weights of init_from" if cfg.init_from is not None else "the untrained model = the composite"
        log.info("epoch 0 (%s): %s=%.4f", start, cfg.monitor, value)
        if cfg.init_from is not None and run.parts.spec.needs_composite:
            # a fine-tuned correction's floor is the weights it was given, which may score under the fill it
            # corrects: say by how much, so nobody reads a fine-tuned run's "best" as a gain over the composite
            composite = _untrained_score(run)
            first[f"composite_{cfg.monitor}"] = composite
            log.info("the composite itself (an untrained %s): %s=%.4f", cfg.model, cfg.monitor, composite)
        save_model(run.out, run.parts.bare, _meta(cfg, run.parts, st, metrics, run.manifest_sha))
    st.history.append(first)
    if run.rt.distributed:
        dist.barrier()


def _untrained_score(run: _Run) -> float:
    """The monitored validation metric of an untrained model that corrects the composite, i.e. of the composite."""
    from models.registry import build_model

    with torch.random.fork_rng(devices=[]):  # the run's own random stream must not notice
        plain = build_model(run.cfg.model, run.parts.resolved).to(run.rt.device)
    metrics, _ = validate(plain, run.val_loader, run.rt, want_images=False)
    return float(metrics[run.cfg.monitor])


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """One pass over the training split; returns the mean loss parts as ``train_<part>``."""
    parts, cfg, rt, st, writer = run.parts, run.cfg, run.rt, run.st, run.writer
    run.sampler.set_epoch(epoch)
    run.train_ds.set_epoch(epoch)
    parts.model.train()
    if parts.disc is not None:
        parts.disc.train()
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    n_steps = 0
    for b in _limited(run.train_loader, cfg.max_steps_per_epoch):
        logs = train_step(parts, b, cfg, rt, st)
        st.step += 1
        n_steps += 1
        run.samples_seen += len(b["sample_id"]) * rt.world
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        if writer is not None and st.step % cfg.log_every == 0:
            for k, v in logs.items():
                writer.add_scalar(f"train/{k}", v, st.step)
            writer.add_scalar("train/lr", parts.optimizer.param_groups[0]["lr"], st.step)
    run.t_train += time.perf_counter() - t0
    if n_steps == 0:
        raise DataError(f"split {cfg.train_split!r} yielded no batches; the dataset is empty")
    return {f"train_{k}": v / n_steps for k, v in sums.items()}


def _end_epoch(run: _Run, epoch: int, epoch_logs: dict[str, float], validated: bool) -> tuple[dict[str, float], bool]:
    """Validation (when due), early-stopping bookkeeping and the scheduler step; returns (metrics, improved)."""
    parts, cfg, st = run.parts, run.cfg, run.st
    plateau = isinstance(parts.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    metrics: dict[str, float] = {}
    improved = False
    if validated:
        value, metrics = _validate_epoch(parts, run.val_loader, run.rt, cfg, run.writer, epoch, epoch_logs)
        if plateau:
            worst = float("-inf") if cfg.monitor_mode == "max" else float("inf")
            parts.scheduler.step(value if not math.isnan(value) else worst)
        improved = _improved(value, st, cfg.monitor_mode)
        if improved:
            st.best_value, st.best_epoch, st.bad_epochs = value, epoch + 1, 0
        else:
            st.bad_epochs += 1
    elif run.writer is not None:
        for k, v in epoch_logs.items():
            run.writer.add_scalar(f"epoch/{k}", v, epoch + 1)
    if isinstance(parts.scheduler, BudgetCosine):
        # rank 0's clock, as for the time limit: every rank must step at the same rate
        parts.scheduler.step(epoch + 1, _broadcast_value(time.perf_counter() - run.t_start, run.rt))
    return metrics, improved


def _checkpoint(run: _Run, epoch_logs: dict[str, float], metrics: dict[str, float], *, improved: bool,
                validated: bool) -> None:
    """Rank 0 writes the best model and the exact-resume state after every epoch; all ranks wait for it."""
    cfg, st = run.cfg, run.st
    if run.rt.main:
        if improved:
            save_model(run.out, run.parts.bare, _meta(cfg, run.parts, st, metrics, run.manifest_sha))
        atomic_torch_save(_state_dict(run.parts, st, cfg), run.out / STATE_FILE)
        if validated:
            best = st.best_value if st.best_value is not None else float("nan")
            log.info("epoch %d/%d %s=%.4f (best %.4f @ %d)", st.epoch, cfg.epochs, cfg.monitor, metrics[cfg.monitor],
                     best, st.best_epoch or 0)
        if run.progress:
            _print_epoch(st.epoch, cfg, epoch_logs, metrics)
    if run.rt.distributed:
        dist.barrier()


def _result(run: _Run, stopped_early: bool) -> TrainResult:
    st = run.st
    return TrainResult(run.out, st.epoch - run.start_epoch, st.best_epoch, st.best_value, run.cfg.monitor, st.history,
                       stopped_early, time.perf_counter() - run.t_session,
                       run.samples_seen / run.t_train if run.t_train else 0.0,
                       total_seconds=time.perf_counter() - run.t_start)


def _validate_epoch(parts: Parts, loader: DataLoader, rt: Runtime, cfg: TrainConfig, writer: Any, epoch: int,
                    epoch_logs: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Validation on rank 0 (TensorBoard scalars + image grid); every rank gets the monitored value."""
    metrics: dict[str, float] = {}
    value = float("nan")
    if rt.main:
        want_images = writer is not None and (epoch + 1) % cfg.image_every == 0
        metrics, images = validate(parts.bare, loader, rt, want_images=want_images)
        if cfg.monitor not in metrics:
            raise TrainConfigError(
                f"monitor {cfg.monitor!r} is not a validation metric; choose one of {sorted(metrics)}")
        value = metrics[cfg.monitor]
        if writer is not None:
            for k, v in {**epoch_logs, **metrics}.items():
                writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            writer.add_scalar("epoch/lr", parts.optimizer.param_groups[0]["lr"], epoch + 1)
            for name, grid in images.items():
                writer.add_images(f"val/{name}", grid, epoch + 1, dataformats="NCHW")
    return _broadcast_value(value, rt), metrics


def _limited(loader: DataLoader, limit: int | None) -> Iterator[dict[str, Any]]:
    for i, b in enumerate(loader):
        if limit is not None and i >= limit:
            break
        yield b


def _writer(out: Path, rt: Runtime):
    if not rt.main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(out / "tb"))


def _meta(cfg: TrainConfig, parts: Parts, st: LoopState, metrics: dict[str, float],
          manifest_sha: str | None) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "config": parts.resolved,
        "spec": parts.spec.to_dict(),
        "manifest_sha256": manifest_sha,
        "metrics": metrics,
        "epoch": st.epoch,
        "monitor": {"name": cfg.monitor, "mode": cfg.monitor_mode, "value": metrics.get(cfg.monitor)},
        "train": cfg.model_dump(mode="json", exclude={"model", "model_params"}),
        "optimizer_source": cfg.defaults().source,
    }


def _print_epoch(epoch: int, cfg: TrainConfig, logs: dict[str, float], metrics: dict[str, float]) -> None:
    from rich.console import Console

    keys = [k for k in ("psnr", "cloud_psnr", "ssim", "sam") if k in metrics]
    Console(stderr=True).print(
        f"epoch {epoch}/{cfg.epochs}  loss {logs.get('train_total', float('nan')):.4f}  "
        + "  ".join(f"{k} {metrics[k]:.3f}" for k in keys), highlight=False)
