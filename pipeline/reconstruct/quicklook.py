"""RGB quicklooks: a percentile (or fixed-gain) stretch to uint8, PNG writing, and side-by-side panels.

Used by ``cloudfree preview`` and by inference to show input | output comparisons.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr
from PIL import Image, ImageDraw

from pipeline.errors import DataError
from pipeline.files import atomic_output


def _rgb_stack(da: xr.DataArray | np.ndarray, bands: Sequence[str]) -> np.ndarray:
    if isinstance(da, xr.DataArray):
        if "band" not in da.dims:
            raise DataError(f"quicklook needs a raster with a 'band' dimension; got dims {da.dims}")
        names = [str(b) for b in da.band.values]
        missing = [b for b in bands if b not in names]
        if missing:
            raise DataError(
                f"quicklook bands {missing} are not in the raster (it has {', '.join(names)}); pass bands=...")
        arr = np.stack([np.asarray(da.sel(band=b).values, dtype=np.float32) for b in bands], axis=-1)
    else:
        arr = np.asarray(da, dtype=np.float32)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        elif arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
            raise DataError(f"quicklook needs an (H, W, 3), (3, H, W) or (H, W) array; got shape {arr.shape}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
    return arr


def rgb_quicklook(
    da: xr.DataArray | np.ndarray,
    bands: Sequence[str] = ("B4", "B3", "B2"),
    stretch: tuple[float, float] | None = (2.0, 98.0),
    gain: float | None = None,
) -> np.ndarray:
    """uint8 (H, W, 3) true-colour image.

    ``stretch`` = (low, high) percentiles computed over all three channels together (so colours keep
    their balance), ignoring NaN; or ``gain``: reflectance x gain -> 0..1 (fixed, comparable across
    images, e.g. 3.5 for Sentinel-2 reflectance). NaN (nodata) is drawn black.
    """
    arr = _rgb_stack(da, bands)
    valid = np.isfinite(arr).all(axis=-1)
    if gain is not None:
        scaled = arr * np.float32(gain)
    else:
        lo_p, hi_p = stretch if stretch is not None else (0.0, 100.0)
        vals = arr[valid]
        if vals.size == 0:
            return np.zeros((*arr.shape[:2], 3), dtype=np.uint8)
        lo, hi = np.percentile(vals, [lo_p, hi_p])
        scaled = (arr - lo) / max(float(hi - lo), 1e-6)
    out = np.clip(np.nan_to_num(scaled, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out[~valid] = 0
    return out


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 (H, W, 3) or (H, W) array as PNG atomically (temp file + rename)."""
    path = Path(path)
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise DataError(f"save_png expects uint8 pixels (use rgb_quicklook first); got {arr.dtype}")
    with atomic_output(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def side_by_side(images: Sequence[np.ndarray], labels: Sequence[str] | None = None, gap: int = 4) -> np.ndarray:
    """Concatenate uint8 RGB images horizontally (padded to the tallest) with optional labels on top."""
    if not images:
        raise DataError("side_by_side needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"side_by_side got {len(images)} images but {len(labels)} labels")
    imgs = [np.asarray(i) if np.asarray(i).ndim == 3 else np.repeat(np.asarray(i)[..., None], 3, -1) for i in images]
    band = 16 if labels else 0
    height = max(i.shape[0] for i in imgs) + band
    width = sum(i.shape[1] for i in imgs) + gap * (len(imgs) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    offsets = []
    for img in imgs:
        canvas[band : band + img.shape[0], x : x + img.shape[1]] = img.astype(np.uint8)
        offsets.append(x)
        x += img.shape[1] + gap
    if labels:
        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        for off, text in zip(offsets, labels):
            draw.text((off + 2, 2), str(text), fill=(0, 0, 0))
        canvas = np.asarray(pil)
    return canvas
