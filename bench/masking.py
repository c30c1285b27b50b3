"""Throughput of mask_scene(method="s2cloudless") against the bare s2cloudless calls on the same array.

Prints pixels/second for both and the overhead of mask_scene (band stacking, NaN handling, snow and the
shadow projection). Input: a 1024 x 1024 x 13-band Sentinel-2 L1C raster from the synthetic archive, or
the real SEN12MS-CR cloudy image tiled 4 x 4 if the synthetic source is unavailable.

    .venv/bin/python bench/masking.py [--size 1024] [--repeat 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.masking.cloud_probability import S2CLOUDLESS_BANDS, detector
from pipeline.masking.config import MaskConfig
from pipeline.masking.scene import mask_fractions, mask_scene
from pipeline.sensors import S2_BANDS

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def _input(size: int) -> tuple[xr.DataArray, object, str]:
    try:
        import datetime as dt

        from affine import Affine

        from pipeline.grid import Grid
        from pipeline.regions import load_region
        from pipeline.sources.synthetic.source import SyntheticSource

        region = load_region("zhengzhou-demo")
        g = region.grid()
        grid = Grid(g.crs, g.transform * Affine.translation(0, 0), size, size)
        src = SyntheticSource()
        scene = [s for s in src.search(region, dt.date(2021, 10, 20), dt.date(2021, 10, 30), "s2") if "211025" in s.id][
            0
        ]
        return src.read(scene, grid, list(S2_BANDS)).load(), scene, f"synthetic {scene.id}"
    except ImportError:
        import rasterio

        with rasterio.open(REAL / "sen12mscr" / "s2_cloudy" / "ROIs1970_fall_139_p839.tif") as ds:
            tile = np.clip(ds.read(), 0, 10000).astype(np.float32) / 10000
            t = list(ds.transform)[:6]
        reps = -(-size // tile.shape[1])
        arr = np.tile(tile, (1, reps, reps))[:, :size, :size]
        return (
            xr.DataArray(
                arr,
                dims=("band", "y", "x"),
                coords={"band": list(S2_BANDS)},
                attrs={"sensor": "s2_l1c", "transform": t},
            ),
            None,
            "SEN12MS-CR tiled",
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    raster, scene, what = _input(args.size)
    cfg = MaskConfig()
    det = detector(cfg.s2cloudless_threshold, cfg.s2cloudless_average_over, cfg.s2cloudless_dilation)
    bare_in = np.ascontiguousarray(np.moveaxis(raster.sel(band=list(S2CLOUDLESS_BANDS)).values, 0, -1))[np.newaxis]
    np.clip(bare_in, 0, 1, out=bare_in)
    det.get_mask_from_prob(det.get_cloud_probability_maps(bare_in[:, :64, :64]))  # load the model outside timing
    n = args.size * args.size
    bare, full = [], []
    for _ in range(args.repeat):  # interleaved so machine load hits both alike
        t0, c0 = time.perf_counter(), time.process_time()
        det.get_mask_from_prob(det.get_cloud_probability_maps(bare_in))
        bare.append((time.perf_counter() - t0, time.process_time() - c0))
        t0, c0 = time.perf_counter(), time.process_time()
        m = mask_scene(raster, scene, cfg, method="s2cloudless")
        full.append((time.perf_counter() - t0, time.process_time() - c0))
    (b, bc), (f, fc) = min(bare), min(full)
    print(f"input: {what}, {args.size}x{args.size} px, 13 bands, best of {args.repeat}")
    print(f"bare s2cloudless   : {b:7.2f} s  {n / b:12,.0f} px/s")
    print(f"mask_scene         : {f:7.2f} s  {n / f:12,.0f} px/s  (with snow + shadow projection)")
    print(
        f"overhead           : {100 * (f / b - 1):+.1f} % wall, {100 * (fc / bc - 1):+.1f} % CPU time (CPU is steadier "
        "on a shared machine)"
    )
    print(f"mask fractions     : {mask_fractions(m)}")


if __name__ == "__main__":
    main()
