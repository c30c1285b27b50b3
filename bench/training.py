"""Training benchmarks and the zhengzhou-demo result.

Default (``make bench``):
  1. trainer overhead: ``pipeline.train.loop.train_step`` vs a bare PyTorch step (forward, loss, backward, clip,
     Adam) on the same model and the same pre-assembled batches, and a full ``train()`` epoch vs a bare loop over
     the same DataLoader (data assembly included in both);
  2. CPU samples/s of small ``unet`` and ``crgennet`` at 128 x 128;
  3. with a CUDA GPU: training samples/s of the paper configs (CRGenNet with its VGG16 perceptual term and GAN,
     UnCRtainTS, CA-Fusion) at 256 x 256 and their published batch sizes, fp32 vs bf16 autocast vs bf16 +
     channels_last, through ``train_step``; ``--cuda`` runs this part alone.
``--demo``: build ``zhengzhou-demo`` from the synthetic source (skipped when already built), train a small unet and
a small crgennet for ``--minutes`` each on CPU, evaluate both next to the composite baseline on the test split,
print the tables.

    python bench/training.py [--demo --minutes 4 --data data/zhengzhou-demo --runs runs/bench]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.registry import build_model, model_loss, resolve_config  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.loop import LoopState, build_parts, setup_runtime, train, train_step  # noqa: E402
from pipeline.train.samples import AssembledDataset, AugmentConfig, model_inputs  # noqa: E402

CRGEN_NO_VGG = {"base": "small", "loss": {"perceptual": 0.0}}  # no ImageNet VGG weights offline


def _toy(n: int, size: int, dates: int = 3):
    from tests.train.test_samples import toy_raw_samples

    return toy_raw_samples(n, dates=dates, size=size, seed=0)


def _batches(cfg: TrainConfig, spec, raw, batch: int, n: int) -> list[dict]:
    ds = AssembledDataset(raw, spec, train=True, seed=0, augment=cfg.augment)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)
    out = []
    while len(out) < n:
        out += list(loader)
    return out[:n]


def bare_steps(
    model_name: str, params, batches: list[dict], device: torch.device, amp=None, channels_last=False
) -> float:
    """Seconds per step of the plainest correct loop: forward, loss, backward, clip, Adam step."""
    torch.manual_seed(0)
    model = build_model(model_name, params).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = model_loss(model_name, params).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for b in batches:
        inp = {k: v.to(device) for k, v in model_inputs(b).items()}
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
            out = model(inp)
            loss, _ = loss_fn(out, inp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def trainer_steps(cfg: TrainConfig, batches: list[dict]) -> float:
    rt = setup_runtime(cfg)
    parts = build_parts(cfg, rt, 1)
    parts.model.train()
    st = LoopState()
    times = []
    for b in batches:
        t = time.perf_counter()
        train_step(parts, b, cfg, rt, st)  # includes the host->device copy the bare loop does outside its timer
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        st.step += 1
    return statistics.median(times[2:])


def overhead(model_name: str, params, size: int, batch: int, steps: int) -> dict:
    cfg = TrainConfig(model=model_name, model_params=params, batch_size=batch, num_workers=0, precision="fp32",
                      optimizer={"lr": 1e-3}, grad_clip=1.0)
    spec = build_model(model_name, params).spec
    raw = _toy(batch * 4, size)
    batches = _batches(cfg, spec, raw, batch, steps)
    dev = torch.device("cpu")
    # interleave to share the machine's load fairly between the two
    bare, ours = [], []
    for _ in range(3):
        bare.append(bare_steps(model_name, resolve_config(model_name, params), batches, dev))
        ours.append(trainer_steps(cfg, batches))
    b, o = min(bare), min(ours)
    return {"model": model_name, "size": size, "batch": batch, "bare_s_per_step": b, "trainer_s_per_step": o,
            "step_overhead_pct": 100 * (o / b - 1), "samples_per_s": batch / o}


def epoch_overhead(model_name: str, params, size: int, batch: int, n: int, rounds: int = 3) -> dict:
    """train() (no validation cost counted: samples/s over the training loop only) vs a bare loop over the same
    DataLoader. Both run ``rounds`` times, alternating, and the best of each counts: a single cold pass of a few
    steps measures the process warming up (allocator, first-call dispatch), not the trainer."""
    raw = _toy(n, size)
    cfg = TrainConfig(model=model_name, model_params=params, batch_size=batch, num_workers=0, precision="fp32",
                      optimizer={"lr": 1e-3}, epochs=1, patience=None)
    spec = build_model(model_name, params).spec
    rc = resolve_config(model_name, params)

    def ours() -> float:
        with tempfile.TemporaryDirectory() as d:
            return train(cfg, None, Path(d) / "run", train_data=raw, val_data=raw[:batch], progress=False).samples_per_s

    def bare() -> float:
        torch.manual_seed(0)
        model, loss_fn = build_model(model_name, rc), model_loss(model_name, rc)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ds = AssembledDataset(raw, spec, train=True, seed=0, augment=cfg.augment)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True)
        t = time.perf_counter()
        for b in loader:
            inp = model_inputs(b)
            out = model(inp)
            loss, _ = loss_fn(out, inp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return n / (time.perf_counter() - t)

    runs = [(ours(), bare()) for _ in range(rounds)]
    best_ours, best_bare = max(r[0] for r in runs), max(r[1] for r in runs)
    return {"model": model_name, "bare_samples_per_s": best_bare, "trainer_samples_per_s": best_ours,
            "epoch_overhead_pct": 100 * (best_bare / best_ours - 1), "rounds": rounds}


# (model, published batch size, toy dates): UnCRtainTS reads three earlier dates, the others one
CUDA_PAPER = (("crgennet", 8, 3), ("uncrtaints", 4, 4), ("cafusion", 8, 3))
PRECISIONS = (("fp32", False), ("bf16", False), ("bf16", True))


def cuda_paper(model: str, batch: int, dates: int, precision: str, channels_last: bool, vgg: str | None,
               size: int = 256, steps: int = 20) -> dict:
    """Training samples/s of a paper config through the trainer's own step, on the device setup_runtime picks."""
    params: dict = {"base": "paper"}
    cfg = TrainConfig(model=model, model_params=params, batch_size=batch, num_workers=0, precision=precision,
                      channels_last=channels_last, deterministic=False, vgg_weights=vgg)
    probe = build_model(model, params)
    n_params = sum(p.numel() for p in probe.parameters())
    batches = _batches(cfg, probe.spec, _toy(batch, size, dates), batch, steps)
    del probe  # the trainer builds its own; this one only gave the spec and the size
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    s = trainer_steps(cfg, batches)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"model": model, "size": size, "batch": batch, "precision": precision, "channels_last": channels_last,
            "s_per_step": s, "samples_per_s": batch / s, "peak_gib": peak, "params_m": n_params / 1e6,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def cuda_sweep(size: int = 256, steps: int = 20, models: tuple[str, ...] | None = None) -> list[dict]:
    """Every paper config in every precision, interleaved per model so clock drift hits all three alike."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        from tests.models.helpers import write_random_vgg

        # random weights: the same arithmetic as ImageNet's (timing only; nothing is downloaded)
        vgg = write_random_vgg(Path(d) / "vgg16-random.pth")
        for model, batch, dates in CUDA_PAPER:
            if models and model not in models:
                continue
            base = None
            for precision, cl in PRECISIONS:
                r = cuda_paper(model, batch, dates, precision, cl, vgg, size, steps)
                base = base or r["samples_per_s"]
                r["speedup_vs_fp32"] = r["samples_per_s"] / base
                rows.append(r)
                print(f"{model:10s} paper ({r['params_m']:.1f} M params) {size}px batch {batch} {precision}"
                      f"{' + channels_last' if cl else ''} on {r['gpu']}: {r['s_per_step'] * 1e3:.1f} ms/step, "
                      f"{r['samples_per_s']:.1f} samples/s (x{r['speedup_vs_fp32']:.2f} vs fp32), "
                      f"peak {r['peak_gib']:.1f} GiB", flush=True)
    return rows


def demo(
    data: Path, runs: Path, minutes: float, val_every: int = 4, extend: float = 0.0, only: str | None = None
) -> None:
    from pipeline.dataset.build import build_dataset
    from pipeline.train.evaluate import evaluate, markdown_table

    if not (data / "cubes" / "test.zarr").exists():
        t = time.perf_counter()
        build_dataset("zhengzhou-demo", "synthetic", data, progress=False)
        print(f"built {data} in {time.perf_counter() - t:.0f} s")
    aug = AugmentConfig(crop=64)
    # the small unet also sees the earlier date (as the composite does); its lr is ours (no published one)
    setups = (("unet", {"base": "small", "optical_dates": 2}, {"lr": 3e-3}, 1.5 * minutes),
              ("crgennet", CRGEN_NO_VGG, None, minutes))
    for name, params, optim, mins in setups:
        if only and name != only:
            continue
        run = runs / name
        done = (run / "model.json").exists()
        if not done or extend:
            # a resumed run's clock includes its earlier epochs: the limit is the total
            total = mins * 60 + (extend * 60 if done else 0)
            cfg = TrainConfig(model=name, model_params=params, epochs=1000, patience=None, num_workers=1, augment=aug,
                              time_limit_s=total, val_every=val_every, optimizer=optim)
            res = train(cfg, data, run, resume=done, progress=True)
            print(f"{name}: {res.epochs_run} epochs in {res.seconds:.0f} s, {res.samples_per_s:.2f} samples/s, best "
                  f"{res.monitor} {res.best_value:.2f} dB at epoch {res.best_epoch}")
        result = evaluate(run, data, "test")
        print(markdown_table(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", action="store_true", help="zhengzhou-demo: train unet + crgennet, evaluate vs composite")
    ap.add_argument("--minutes", type=float, default=4.0, help="crgennet training time; unet gets 1.5x")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "zhengzhou-demo")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--extend", type=float, default=0.0, help="--demo: resume finished runs for this many more minutes")
    ap.add_argument("--only", choices=["unet", "crgennet"], help="--demo: just this model")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--cuda", action="store_true", help="only the paper-config precision sweep (on a CUDA GPU)")
    ap.add_argument("--size", type=int, default=256, help="--cuda: crop size")
    ap.add_argument("--models", nargs="*", help="--cuda: a subset of " + ", ".join(m for m, _, _ in CUDA_PAPER))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.demo:
        demo(args.data, args.runs, args.minutes, extend=args.extend, only=args.only)
        return
    if args.cuda:
        if not torch.cuda.is_available():
            print("note: no CUDA GPU, the sweep runs on CPU (a check of the script, not a figure)", flush=True)
        print(json.dumps(cuda_sweep(args.size, max(args.steps, 4), tuple(args.models or ())), default=float))
        return
    rows = [overhead("unet", "small", 128, 8, args.steps), overhead("crgennet", CRGEN_NO_VGG, 128, 8, args.steps)]
    for r in rows:
        print(
            f"{r['model']:9s} {r['size']}px batch {r['batch']}: bare {r['bare_s_per_step'] * 1e3:.1f} ms/step, trainer "
            f"{r['trainer_s_per_step'] * 1e3:.1f} ms/step -> step overhead {r['step_overhead_pct']:+.1f} %, "
            f"{r['samples_per_s']:.1f} samples/s (CPU, {torch.get_num_threads()} threads)"
        )
    e = epoch_overhead("unet", "small", 64, 8, 128)
    print(
        f"unet 64px epoch incl. data assembly (best of {e['rounds']} alternating): bare {e['bare_samples_per_s']:.1f} "
        "samples/s, train() "
        f"{e['trainer_samples_per_s']:.1f} samples/s -> overhead {e['epoch_overhead_pct']:+.1f} %"
    )
    g = cuda_sweep() if torch.cuda.is_available() else None
    if g is None:
        print("no CUDA GPU: the paper-config precision sweep is skipped (--cuda)")
    print(json.dumps({"cpu": rows, "epoch": e, "cuda": g}, default=float))


if __name__ == "__main__":
    main()
