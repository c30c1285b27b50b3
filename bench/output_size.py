"""Size of the reconstruction COG by sample type, compression, level and interleaving, on real and synthetic pixels.

Images (13 Sentinel-2 bands, reflectance 0..1, NaN nodata none):
- real: the 16 least cloudy dates of ../shared/data/real/sen12mscr-ts (256 x 256 L1C each) tiled 4 x 4 into one
  1024 x 1024 image, as a mosaic of real texture (the 20 m and 60 m bands repeat their pixels 2 x 2 and 6 x 6, as
  every S2 product on a 10 m grid does);
- synthetic: one date of zhengzhou-demo as the synthetic source renders it (1024 x 1024 window).

Every variant is written through ``pipeline.reconstruct.cog.write_cog`` (the product's own writer: tiles, overviews,
the COG driver) where the writer offers it, and with GDAL's GTiff driver (``COPY_SRC_OVERVIEWS``, band interleaving)
for comparison; sizes are printed in MB and as a share of float32 deflate 6 (the product's float32 output before
this measurement) on the same pixels, clipped to [0, 1] as ``reconstruct`` writes them. ``decode error`` is the largest
|uint16 read back - float32| in reflectance (1e-4 where a reflectance of 0 is stored as DN 1, DN 0 being nodata).

    .venv/bin/python bench/output_size.py
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.transform import from_origin

from pipeline.grid import Grid
from pipeline.reconstruct.cog import RasterSpec, write_cog
from pipeline.sensors import S2_BANDS

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "sen12mscr-ts"
SIDE = 1024


def real_image() -> np.ndarray:
    files = sorted(REAL.rglob("s2_*.tif"))
    if len(files) < 16:
        raise SystemExit(f"{REAL}: {len(files)} S2 dates, need 16")
    dates = []
    for f in files:
        with rasterio.open(f) as ds:
            a = ds.read().astype(np.float32) / 10000.0
        # brightness in blue as a cheap cloud score: the clearest 16 dates tile the mosaic
        dates.append((float(np.mean(a[1] > 0.2)), a))
    dates.sort(key=lambda t: t[0])
    tiles = [a[:, :256, :256] for _, a in dates[:16]]
    rows = [np.concatenate(tiles[r * 4:(r + 1) * 4], axis=2) for r in range(4)]
    return np.concatenate(rows, axis=1)


def synthetic_image() -> np.ndarray:
    from pipeline.regions import load_region
    from pipeline.sources.synthetic.source import SyntheticSource

    region = load_region("zhengzhou-demo")
    source = SyntheticSource()
    grid = region.grid()
    window = Grid(crs=grid.crs, transform=grid.transform, width=SIDE, height=SIDE)
    day = dt.date(2021, 7, 22)
    scenes = [s for s in source.search(region, day, day, "s2") if s.sensor == "s2_l1c"]
    raster = source.read(scenes[0], window, list(S2_BANDS))
    return np.asarray(raster.values, dtype=np.float32)


def grid_for(image: np.ndarray) -> Grid:
    return Grid(crs="EPSG:32650", transform=from_origin(700000, 3850000, 10, 10), width=image.shape[2],
                height=image.shape[1])


def write_variants(image: np.ndarray, folder: Path) -> list[dict[str, Any]]:
    grid = grid_for(image)
    out = []
    for dtype in ("float32", "uint16"):
        spec = RasterSpec.reflectance(S2_BANDS, dtype=dtype)
        for compress in ("deflate", "zstd"):
            path = folder / f"{dtype}_{compress}.tif"
            t0 = time.perf_counter()
            write_cog(path, image, grid, spec, compress=compress)
            seconds = time.perf_counter() - t0
            err = float("nan")
            if dtype == "uint16":
                with rasterio.open(path) as ds:
                    back = ds.read().astype(np.float64) * ds.scales[0] + ds.offsets[0]
                err = float(np.abs(back - image).max())
            out.append({"variant": f"{dtype} {compress} level 9 (product)", "bytes": path.stat().st_size,
                        "seconds": seconds, "decode_error": err, "path": path})
    # the same pixels recompressed from the product's files: the level used before, and band interleaving
    for dtype in ("float32", "uint16"):
        src = folder / f"{dtype}_deflate.tif"
        for name, opts in (
            ("deflate level 6 (before)", {"driver": "COG", "COMPRESS": "DEFLATE", "PREDICTOR": "YES", "LEVEL": 6}),
            ("deflate level 9, band-interleaved GTiff",
             {"driver": "GTiff", "COMPRESS": "DEFLATE", "PREDICTOR": 2 if dtype == "uint16" else 3, "ZLEVEL": 9,
              "TILED": "YES", "BLOCKXSIZE": 512, "BLOCKYSIZE": 512, "INTERLEAVE": "BAND",
              "COPY_SRC_OVERVIEWS": "YES"}),
        ):
            path = folder / f"{dtype}_{name.split()[0]}_{len(out)}.tif"
            t0 = time.perf_counter()
            rasterio.shutil.copy(src, path, **opts)
            out.append({"variant": f"{dtype} {name}", "bytes": path.stat().st_size,
                        "seconds": time.perf_counter() - t0, "decode_error": float("nan"), "path": path})
    return out


def report(name: str, image: np.ndarray) -> None:
    image = np.clip(image, 0.0, 1.0)  # as reconstruct writes reflectance (the synthetic L1C has noise below 0)
    with tempfile.TemporaryDirectory(prefix="cloudfree-size-") as tmp:
        rows = write_variants(image, Path(tmp))
        base = next(r["bytes"] for r in rows if r["variant"] == "float32 deflate level 6 (before)")
        raw = image.size * 4
        print(f"\n{name}: {image.shape[0]} bands x {image.shape[1]} x {image.shape[2]}, float32 raw {raw / 1e6:.1f} MB")
        print(f"{'variant':48s} {'MB':>7s} {'vs f32 d6':>9s} {'s':>5s} {'decode err':>10s} layout")
        for r in rows:
            with rasterio.open(r["path"]) as ds:
                layout = ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT", "-")
            err = f"{r['decode_error']:.2e}" if np.isfinite(r["decode_error"]) else ""
            print(f"{r['variant']:48s} {r['bytes'] / 1e6:7.2f} {r['bytes'] / base:9.1%} {r['seconds']:5.1f} "
                  f"{err:>10s} {layout}")
            os.unlink(r["path"])


def main() -> None:
    t0 = time.perf_counter()
    report("real (sen12mscr-ts, 16 dates tiled)", real_image())
    report("synthetic (zhengzhou-demo 2021-07-22)", synthetic_image())
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
