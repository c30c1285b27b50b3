"""Earth Engine pixel path figures, offline: request plan of a real AOI and client-side decode speed.

The decode figure is what the client adds per block (NPY parse + per-band validity unpack + NaN fill);
network time is not measured here. Run: ``.venv/bin/python bench/bench_ee_pixels.py``.
"""

from __future__ import annotations

import io
import time

import numpy as np

from pipeline.regions import load_region
from pipeline.sensors import get_sensor
from pipeline.sources.earthengine import pixels as ee_pixels


def main() -> None:
    import ee

    region = load_region("zhengzhou-2021-flood")
    grid = region.grid()
    bands = list(get_sensor("s2_l1c").band_names)
    bpp = 4 * (len(bands) + 1)
    blocks = ee_pixels.request_grids(grid, bpp)
    h, w = blocks[0][2].height, blocks[0][2].width
    per_req = h * w * (bpp + 1) / 2**20
    print(
        f"{region.name}: grid {grid.width} x {grid.height} px, {len(bands)} bands -> {len(blocks)} requests of <= {w} "
        f"x {h} px ({per_req:.2f} MiB incl. mask byte; limit 48 MiB)"
    )

    side = 1024
    rng = np.random.default_rng(0)
    arr = np.zeros((side, side), dtype=[(b, np.float32) for b in bands] + [(ee_pixels.VALID_BAND, np.float32)])
    for b in bands:
        arr[b] = rng.uniform(0, 10000, (side, side))
    arr[ee_pixels.VALID_BAND] = 2 ** len(bands) - 1
    buf = io.BytesIO()
    np.save(buf, arr)
    raw = buf.getvalue()
    ee.data.computePixels = lambda params: raw  # the server's answer, already in memory
    sub = grid.window(0, 0, side, side)
    n = 5
    t = time.perf_counter()
    for _ in range(n):
        ee_pixels.fetch_block(None, bands, sub, "bench")
    dt_s = (time.perf_counter() - t) / n
    mib = len(raw) / 2**20
    print(
        f"decode one {side} x {side} x {len(bands) + 1} block ({mib:.1f} MiB): {dt_s * 1000:.0f} ms = {mib / dt_s:.0f} "
        "MiB/s"
    )
    total = sum(g.width * g.height * (bpp + 1) for _, _, g in blocks) / 2**20
    print(
        f"whole AOI: {total / 1024:.1f} GiB transferred; client decode alone ~{total / (mib / dt_s) / 60:.1f} min on "
        "this machine"
    )


if __name__ == "__main__":
    main()
