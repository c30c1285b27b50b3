"""Export throughput (patches/s) and the build's rerun ratio, on the synthetic zhengzhou-demo region.

Prints, all measured in this run:
1. patch export alone (scenes already in memory: cut + deflate GeoTIFF + sha256 + rename + journal) at
   1, 2 and 4 writer threads, and the verify-only rerun (sha256 of every file, nothing written);
2. the whole ``build_dataset`` first run vs. its no-op rerun (the issue asks for <= 10 %);
3. the mask-method trade-off on one 256 x 256 patch of a clear and a cloudy scene: seconds and agreement
   with the simulator's true mask for Cloud Score+ (what ``cheapest`` picks here) and s2cloudless.

Usage: ``.venv/bin/python bench/export.py [--skip-build] [--skip-masks]``
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.dataset import patches as ex  # noqa: E402
from pipeline.dataset.build import build_dataset  # noqa: E402
from pipeline.dataset.selection import patch_offsets  # noqa: E402
from pipeline.masking.codes import is_contaminated  # noqa: E402
from pipeline.masking.scene import mask_scene  # noqa: E402
from pipeline.regions import load_region  # noqa: E402
from pipeline.sensors import S1_BANDS, get_sensor, to_dn  # noqa: E402
from pipeline.sources.synthetic.source import SyntheticSource  # noqa: E402

REGION = "zhengzhou-demo"


def scene_arrays(src: SyntheticSource, scene, grid) -> ex.SceneArrays:
    raster = src.read(scene, grid).load()
    sensor = get_sensor(scene.sensor)
    if scene.family == "s1":
        data = np.stack([raster.sel(band=b).values for b in S1_BANDS]).astype(np.float32)
        return ex.SceneArrays(data, S1_BANDS, grid, None, {"scene_id": scene.id}, nodata=float("nan"))
    bands = sensor.reflectance_bands
    data = np.stack([to_dn(sensor, b, raster.sel(band=b).values) for b in bands])
    mask = src.truth(scene, grid)["mask"].values.astype(np.uint8)
    return ex.SceneArrays(data, bands, grid, mask, {"scene_id": scene.id})


def bench_export(tmp: Path) -> None:
    region = load_region(REGION)
    grid = region.grid()
    src = SyntheticSource()
    s2 = src.search(region, region.window.start, region.window.end, "s2")[:3]
    s1 = src.search(region, region.window.start, region.window.end, "s1")[:2]
    t = time.perf_counter()
    scenes = {s.id: scene_arrays(src, s, grid) for s in s2 + s1}
    print(f"read {len(scenes)} whole scenes ({grid.width}x{grid.height} px) in {time.perf_counter() - t:.1f} s")
    offs = patch_offsets(region)
    files = [
        ex.PatchFile(f"patches/{o.patch_id}/{sid}.tif", sid, o.row, o.col, o.size, sid)
        for sid in scenes for o in offs
    ]
    print(f"export of {len(files)} patch files ({len(offs)} patches x {len(scenes)} scenes, {offs[0].size} px):")
    base = None
    for workers in (1, 2, 4):
        out = tmp / f"w{workers}"
        t = time.perf_counter()
        r = ex.export_patches(out, files, scenes.__getitem__, workers=workers, progress=False)
        dt = time.perf_counter() - t
        rate = len(files) / dt
        base = base or rate
        size = sum((out / f.rel_path).stat().st_size for f in files) / 1e6
        print(
            f"  workers={workers}: {dt:6.2f} s  {rate:6.1f} patches/s  (x{rate / base:.2f} vs 1 worker; {size:.0f} MB "
            f"written, {r.written} files)"
        )
    t = time.perf_counter()
    r = ex.export_patches(tmp / "w4", files, scenes.__getitem__, workers=4, progress=False)
    dt = time.perf_counter() - t
    print(
        f"  verify-only rerun: {dt:6.2f} s  {len(files) / dt:6.1f} patches/s checked ({r.written} written, {r.skipped} "
        "skipped)"
    )


def bench_build(tmp: Path) -> None:
    out = tmp / "zz"
    t = time.perf_counter()
    r1 = build_dataset(REGION, "synthetic", out, progress=False)
    first = time.perf_counter() - t
    t = time.perf_counter()
    r2 = build_dataset(REGION, "synthetic", out, progress=False)
    second = time.perf_counter() - t
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r1.seconds.items())
    print(f"build_dataset {REGION}: {r1.samples} samples, {r1.files} files, first run {first:.1f} s ({stages})")
    print(
        f"  export stage: {r1.files_written / max(r1.seconds['export'], 1e-9):.1f} patches/s (reads included for "
        "scenes not kept in memory)"
    )
    print(
        f"  no-op rerun: {second:.2f} s = {100 * second / first:.1f} % of the first run ({r2.files_written} files "
        f"written, {r2.masks_computed} masks computed)"
    )


def bench_masks() -> None:
    region = load_region(REGION)
    src = SyntheticSource()
    window = region.grid().window(256, 256, 256, 256)
    scenes = src.search(region, region.window.start, region.window.end, "s2")
    print(
        "mask methods on one 256 x 256 patch (agreement = share of pixels where contaminated/clear matches the truth):"
    )
    for scene in scenes:
        truth = is_contaminated(src.truth(scene, window)["mask"].values)
        if not (truth.mean() < 0.01 or 0.2 < truth.mean() < 0.8):
            continue
        raster = src.read(scene, window).load()
        for method in ("cloudscore", "s2cloudless"):
            t = time.perf_counter()
            m = mask_scene(raster, scene, method=method).values
            dt = time.perf_counter() - t
            agree = (is_contaminated(m) == truth).mean()
            print(
                f"  {scene.id[:8]} true cover {truth.mean():5.1%}  {method:11s} {dt:6.2f} s  cover "
                f"{is_contaminated(m).mean():5.1%}  agreement {agree:5.1%}"
            )
        if truth.mean() >= 0.2:
            break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-masks", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        bench_export(tmp)
        if not args.skip_build:
            bench_build(tmp)
        if not args.skip_masks:
            bench_masks()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
