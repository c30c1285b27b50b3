"""Thumbnail of a reconstruction: a small true-colour PNG of the product alone, for the STAC ``thumbnail`` asset.

Read through the COG's overviews (a decimated read, so the cost does not grow with the AOI), decoded with the
file's own scale/offset, drawn with the same fixed gain as the quicklook so a thumbnail and its overview agree.
Nodata is transparent (an alpha channel is added only when the product has holes). The PNG is shrunk until it
fits ``max_bytes``: catalogue browsers load many thumbnails at once.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling

from pipeline.errors import DataError
from pipeline.files import atomic_output
from pipeline.reconstruct.quicklook import rgb_quicklook

THUMBNAIL_SIDE = 256  # longest side in pixels
THUMBNAIL_MAX_BYTES = 100_000
THUMBNAIL_GAIN = 3.5  # reflectance x 3.5 -> display, as the quicklook (run.QUICKLOOK_GAIN)
_MIN_SIDE = 16


def _rgb_indexes(descriptions: Sequence[str | None], rgb: Sequence[str], path: Path) -> list[int]:
    names = [d or "" for d in descriptions]
    missing = [b for b in rgb if b not in names]
    if missing:
        raise DataError(f"{path}: no band(s) {missing} for the thumbnail; its bands are {', '.join(names)}; "
                        "pass rgb=(red, green, blue) band names it has")
    return [names.index(b) + 1 for b in rgb]


def read_rgb(cog: str | Path, rgb: Sequence[str] = ("B4", "B3", "B2"), max_side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """(3, h, w) float32 reflectance of the ``rgb`` bands at most ``max_side`` pixels on the long side; NaN nodata."""
    path = Path(cog)
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise DataError(f"{path}: not a readable GeoTIFF for the thumbnail ({exc})") from None
    with ds:
        idx = _rgb_indexes(ds.descriptions, rgb, path)
        factor = max(ds.width, ds.height) / max_side
        w = max(1, int(round(ds.width / factor))) if factor > 1 else ds.width
        h = max(1, int(round(ds.height / factor))) if factor > 1 else ds.height
        data = ds.read(idx, out_shape=(3, h, w), resampling=Resampling.average, masked=True)
        scales = np.array([ds.scales[i - 1] for i in idx], np.float32)[:, None, None]
        offsets = np.array([ds.offsets[i - 1] for i in idx], np.float32)[:, None, None]
    values = data.astype(np.float32).filled(np.nan) * scales + offsets
    return values


def render_thumbnail(values: np.ndarray, gain: float = THUMBNAIL_GAIN) -> np.ndarray:
    """uint8 (h, w, 3) true colour, or (h, w, 4) with nodata transparent when any pixel is nodata."""
    rgb = rgb_quicklook(np.moveaxis(values, 0, -1), gain=gain)  # (h, w, 3): unambiguous even when w is 3
    valid = np.isfinite(values).all(axis=0)
    if valid.all():
        return rgb
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_thumbnail(cog: str | Path, path: str | Path, *, rgb: Sequence[str] = ("B4", "B3", "B2"),
                    max_side: int = THUMBNAIL_SIDE, max_bytes: int = THUMBNAIL_MAX_BYTES,
                    gain: float = THUMBNAIL_GAIN) -> Path:
    """Write the thumbnail PNG of ``cog`` to ``path`` atomically; at most ``max_side`` px and ``max_bytes``."""
    path = Path(path)
    side = max_side
    while True:
        data = _png(render_thumbnail(read_rgb(cog, rgb, side), gain))
        if len(data) <= max_bytes or side <= _MIN_SIDE:
            break
        # PNG size scales with the pixel count, so shrink the side by the square root of the excess (and a margin)
        side = max(_MIN_SIDE, int(side * min(0.9, (max_bytes / len(data)) ** 0.5 * 0.95)))
    if len(data) > max_bytes:
        raise DataError(f"{path}: thumbnail is {len(data)} bytes even at {side} px, over {max_bytes}; "
                        "raise max_bytes")
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)
    return path
