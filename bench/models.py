"""Model zoo figures at 256 × 256: parameters, GFLOPs, CPU ms per patch, peak memory; GPU bf16 patches/s.

Each model runs in its own subprocess so ``ru_maxrss`` (peak resident memory) belongs to that model alone.
FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (1 multiply-add = 2 FLOPs; papers
using thop/ptflops report multiply-adds, i.e. half, so "GMACs" is printed too). The extra
``crgennet fusion@H/2`` row runs FusionAttention on 16 384 tokens: a materialised attention matrix there
would be 1 GiB, at full 256² resolution 16 GiB (17.2 GB) — the memory column shows it is never built.

Run: ``.venv/bin/python bench/models.py [--config paper|small] [--runs 3] [--models crgennet unet ...]``
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this file is bench/models.py: drop bench/ from the path so ``import models`` finds the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
PAPER_PARAMS = {"crgennet": 41.25e6}
PAPER_GFLOPS = {"crgennet": 122.28}


def _batch(spec, b: int, size: int, device: str = "cpu"):
    import torch

    t, c = spec.optical_dates, len(spec.optical_bands)
    g = torch.Generator().manual_seed(0)
    out = {"optical": torch.rand(b, t, c, size, size, generator=g),
           "optical_mask": (torch.rand(b, t, 1, size, size, generator=g) > 0.7).float()}
    if spec.sar_bands:
        out["sar"] = torch.rand(b, t + 1, len(spec.sar_bands), size, size, generator=g)
    if spec.needs_composite:
        out["composite"] = torch.rand(b, len(spec.out_bands), size, size, generator=g)
        filled = out["optical_mask"][:, -1]
        out["composite_info"] = torch.cat([filled, torch.zeros_like(filled), 0.2 * filled], 1)
    return {k: v.to(device) for k, v in out.items()}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for CPU flash attention: QKᵀ plus A·V, 2 FLOPs per multiply-add."""
    *batch, length, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    n = 1
    for d in batch:
        n *= d
    return 2 * n * length * s * e + 2 * n * length * s * ev


def measure_one(name: str, config: str | dict, size: int, runs: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.registry import build_model

    torch.manual_seed(0)
    model = build_model(name, config).eval()
    batch = _batch(model.spec, 1, size)
    params = sum(p.numel() for p in model.parameters())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
        with FlopCounterMode(display=False, custom_mapping=custom) as fc:
            model(batch)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"params": params, "gflops": fc.get_total_flops() / 1e9, "cpu_ms": 1000 * statistics.median(times),
           "peak_mib": peak / 1024, "forward_mib": (peak - rss_before) / 1024, "threads": torch.get_num_threads()}
    if torch.cuda.is_available() and params:
        out["gpu_patches_s"] = _gpu_throughput(model, size)
    return out


def _gpu_throughput(model, size: int, batch_size: int = 8, iters: int = 20) -> float:
    import torch

    model = model.cuda()
    batch = _batch(model.spec, batch_size, size, "cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(batch)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(batch)
        torch.cuda.synchronize()
    return batch_size * iters / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paper", choices=["paper", "small"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", nargs="*")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads per model process (0: torch default)"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--cfg-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        cfg = json.loads(args.cfg_json) if args.cfg_json else args.config
        print(json.dumps(measure_one(args.one, cfg, args.size, args.runs)))
        return

    from models.registry import list_models

    rows: list[tuple[str, str | dict]] = [(n, args.config) for n in (args.models or list_models())]
    if not args.models or "crgennet" in args.models:
        rows.append(("crgennet", {"base": args.config, "fusion_stride": 2}))
    print(
        f"config={args.config}  input {args.size}x{args.size}, batch 1, median of {args.runs} CPU runs (after one "
        "FLOP-counting run)"
    )
    head = (
        f"{'model':<24}{'params':>12}{'GFLOPs':>10}{'GMACs':>9}{'CPU ms':>10}"
        f"{'peak MiB':>10}{'fwd MiB':>9}{'GPU bf16 p/s':>14}"
    )
    print(head)
    print("-" * len(head))
    threads = "?"
    for name, cfg in rows:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--size",
            str(args.size),
            "--runs",
            str(args.runs),
            "--config",
            args.config,
            "--threads",
            str(args.threads),
        ]
        label = name
        if isinstance(cfg, dict):
            cmd += ["--cfg-json", json.dumps(cfg)]
            label = f"{name} fusion@H/{cfg['fusion_stride']}"
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(
                f"{label:<24} FAILED: "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
            )
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        threads = r["threads"]
        gpu = f"{r['gpu_patches_s']:.1f}" if "gpu_patches_s" in r else "no GPU"
        print(f"{label:<24}{r['params'] / 1e6:>11.2f}M{r['gflops']:>10.1f}{r['gflops'] / 2:>9.1f}{r['cpu_ms']:>10.0f}"
              f"{r['peak_mib']:>10.0f}{r['forward_mib']:>9.0f}{gpu:>14}")
        if name in PAPER_PARAMS and args.config == "paper" and not isinstance(cfg, dict):
            print(
                f"{'':<24}paper: {PAPER_PARAMS[name] / 1e6:.2f}M params "
                f"({100 * (r['params'] / PAPER_PARAMS[name] - 1):+.1f} %), "
                f"{PAPER_GFLOPS[name]:.2f} G(MAC)s ({100 * (r['gflops'] / 2 / PAPER_GFLOPS[name] - 1):+.1f} % "
                f"vs our GMACs), 89 FPS on an A40; peak {r['peak_mib'] / 1024:.2f} GiB (limit 4 GiB)"
            )
    print(f"CPU threads per process: {threads}")


if __name__ == "__main__":
    main()
