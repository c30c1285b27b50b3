"""Benchmark the synthetic source: seconds per 1024 x 1024 Sentinel-2 L1C scene (13 bands + QA + masks).

Single-threaded on purpose (the budget is <= 1.5 s per scene on one core): BLAS/OpenMP threads are
pinned to 1 before numpy loads. CPU time (process_time) is reported next to wall time because the
machine is shared and wall time then measures the neighbours too.

    .venv/bin/python bench/synthetic.py [--size 1024] [--repeat 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402,F401  (import cost kept out of the timings)

from pipeline.regions import load_region  # noqa: E402
from pipeline.sensors import S2_BANDS  # noqa: E402
from pipeline.sources.synthetic import render as R  # noqa: E402
from pipeline.sources.synthetic.sky import sky_on  # noqa: E402
from pipeline.sources.synthetic.source import SyntheticSource, clear_caches  # noqa: E402
from pipeline.sources.synthetic.world import build_static, ground_on  # noqa: E402


@contextmanager
def timed(store: dict[str, list[float]], name: str):
    c0, w0 = time.process_time(), time.perf_counter()
    yield
    store.setdefault(name, []).append(time.process_time() - c0)
    store.setdefault(name + " (wall)", []).append(time.perf_counter() - w0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    region = load_region("zhengzhou-demo")
    grid = region.grid().window(0, 0, args.size, args.size)
    src = SyntheticSource(seed=0)
    scenes = [
        s
        for s in src.search(region, region.window.start, region.window.end, "s2")
        if s.properties["synth_regime"] == "scattered"
    ]
    src.read(scenes[0], grid.window(0, 0, 32, 32))  # warm imports and BLAS

    all_bands = list(S2_BANDS) + ["QA60", "CLOUD_PROB", "cs_cdf"]
    t: dict[str, list[float]] = {}
    # "cold" = nothing of that grid computed before: landscape and render caches emptied first
    for i in range(args.repeat):
        sc = scenes[i % len(scenes)]
        clear_caches()
        with timed(t, "read 16 bands + truth (cold)"):
            src.read(sc, grid, all_bands)
            src.truth(sc, grid)
        clear_caches()
        with timed(t, "read 16 bands (cold)"):
            src.read(sc, grid, all_bands)
        with timed(t, "truth after read (shared render)"):
            src.truth(sc, grid)
        clear_caches()
        with timed(t, "truth alone (cold)"):
            src.truth(sc, grid)

    # per stage, on the same grid
    coords = grid.coords()
    xs, ys = coords["x"], coords["y"]
    sc = scenes[0]
    stages: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        with timed(stages, "landscape (static, cached per grid)"):
            st = build_static(xs, ys, 10.0, 0)
        with timed(stages, "ground on date (phenology, flood)"):
            g = ground_on(st, sc.date, region.event_date)
        with timed(stages, "sky (clouds, cirrus, haze, shadow)"):
            sky = sky_on(xs, ys, sc.properties, 0, sc.id)
        with timed(stages, "13-band TOA render"):
            idx = list(range(13))
            R.apply_sky(R.surface(g, idx), sky, idx)
        with timed(stages, "QA60 + CLOUD_PROB + cs_cdf + mask"):
            R.qa60(sky)
            R.cloud_probability(sky, xs, ys, 10.0, 1)
            R.cs_cdf(sky, xs, ys, 10.0, 2)
            sky.mask()

    # another date of the same grid: the landscape is reused, ground/sky/render are new
    warm = SyntheticSource(seed=0)
    clear_caches()
    warm.read(scenes[-1], grid, ["B2"])
    for i in range(args.repeat):
        with timed(t, "read 16 bands (landscape cached)"):
            warm.read(scenes[i % (len(scenes) - 1)], grid, all_bands)
        clear_caches(landscape=False)

    mpx = args.size * args.size / 1e6
    print(f"synthetic S2 L1C scene {args.size}x{args.size} ({mpx:.2f} Mpx), 1 thread, median of {args.repeat}")
    for name, vals in t.items():
        if name.endswith("(wall)"):
            continue
        cpu, wall = float(np.median(vals)), float(np.median(t[name + " (wall)"]))
        print(f"  {name:40s} {cpu:6.3f} s CPU  {wall:6.3f} s wall  {mpx / cpu:6.2f} Mpx/s")
    budget = float(np.median(t["read 16 bands + truth (cold)"])) * (1024 * 1024) / (args.size * args.size)
    print(
        f"  read + truth per 1024x1024 scene: {budget:.3f} s CPU (budget 1.5 s on one core: "
        f"{'OK' if budget <= 1.5 else 'OVER'})"
    )
    print("  stages:")
    for name, vals in stages.items():
        if not name.endswith("(wall)"):
            print(f"    {name:38s} {float(np.median(vals)):6.3f} s CPU")


if __name__ == "__main__":
    main()
