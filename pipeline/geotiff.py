"""GeoTIFF files with band names: written atomically (returning their sha256), read back whole.

Patch files (``pipeline.dataset.patches``) and Earth Engine batch exports converted into patch files
(``pipeline.sources.earthengine.batch``) share this format, so it sits below both stages.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import rasterio
from rasterio.errors import RasterioError

from pipeline.errors import DataError
from pipeline.files import atomic_output, disk_full_error, sha256_file
from pipeline.grid import Grid

MASK_BAND = "cloud_mask"  # last band of optical patch files: pipeline.masking.codes.MaskClass codes


def write_geotiff(
    path: str | Path,
    data: np.ndarray,
    grid: Grid,
    bands: Sequence[str],
    *,
    nodata: float | None = None,
    tags: Mapping[str, str] | None = None,
    scales: Sequence[float] | None = None,
    offsets: Sequence[float] | None = None,
) -> str:
    """Write (band, y, x) ``data`` as a deflate GeoTIFF on ``grid`` atomically; returns its sha256."""
    data = np.asarray(data)
    if data.ndim != 3 or data.shape[0] != len(bands) or data.shape[1:] != grid.shape:
        raise ValueError(f"data of shape {data.shape} does not fit {len(bands)} bands on a {grid.shape} grid")
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": len(bands),
        "dtype": data.dtype.name,
        "crs": grid.crs,
        "transform": grid.transform,
        "compress": "deflate",
        # Level 1 writes ~1.5x faster than GDAL's default 6 for ~2 % larger patches (measured on S2 patches).
        "zlevel": 1,
        "predictor": 3 if data.dtype.kind == "f" else 2,
        "interleave": "band",
    }
    if grid.width % 16 == 0 and grid.height % 16 == 0:
        profile.update(tiled=True, blockxsize=min(256, grid.width), blockysize=min(256, grid.height))
    if nodata is not None:
        profile["nodata"] = nodata
    with atomic_output(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            for i, name in enumerate(bands, start=1):
                dst.set_band_description(i, name)
            if scales is not None:
                dst.scales = tuple(float(s) for s in scales)
            if offsets is not None:
                dst.offsets = tuple(float(o) for o in offsets)
            if tags:
                dst.update_tags(**{k: str(v) for k, v in tags.items()})
        _check_reads_back(tmp, path, data)
        digest = sha256_file(tmp)
    return digest


def _check_reads_back(tmp: Path, path: str | Path, data: np.ndarray) -> None:
    # libtiff reports a full disk on stderr and rasterio may still close "successfully": a truncated file
    # must never get its final name (the journal would trust its checksum on a rerun).
    try:
        with rasterio.open(tmp) as src:
            back = src.read()
        ok = back.shape == data.shape and np.array_equal(back, data, equal_nan=data.dtype.kind == "f")
    except RasterioError:
        ok = False
    if ok:
        return
    free = shutil.disk_usage(tmp.parent).free
    if free < data.nbytes:
        raise disk_full_error(path, data.nbytes, free)
    raise DataError(f"{path}: the GeoTIFF just written does not read back the same pixels; check the disk under "
                    f"{tmp.parent} and rerun (finished files are kept)")


@dataclass
class GeoTiff:
    data: np.ndarray  # (band, y, x)
    bands: tuple[str, ...]
    grid: Grid
    tags: dict[str, str]


def read_geotiff(path: str | Path) -> GeoTiff:
    """Read a whole GeoTIFF; an unreadable or truncated file is a ``DataError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; rerun 'cloudfree build-dataset' to repair the dataset")
    try:
        with rasterio.open(path) as src:
            data = src.read()
            bands = tuple(d or f"band{i + 1}" for i, d in enumerate(src.descriptions))
            grid = Grid(src.crs.to_string() if src.crs else "", src.transform, src.width, src.height)
            tags = dict(src.tags())
    except RasterioError as exc:
        raise DataError(
            f"{path}: unreadable or truncated GeoTIFF ({exc}); delete it and rerun 'cloudfree build-dataset', "
            "which rewrites it"
        ) from None
    return GeoTiff(data, bands, grid, tags)
