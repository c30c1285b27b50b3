"""Decoders of provider masks into MaskClass codes: S2 QA60 and SCL, Landsat QA_PIXEL, Cloud Score+.

Each returns a uint8 array of ``MaskClass`` codes (NaN in the input band -> NODATA). Priority when
several flags are set on one pixel: nodata > cloud > thin cloud > shadow > snow > clear.
"""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np

from pipeline.errors import DataError
from pipeline.masking.codes import MaskClass
from pipeline.sensors import QAPixel

log = logging.getLogger(__name__)

# ESA stopped filling QA60 with the processing baseline 04.00 (2022-01-25) and restored it in 2024-02.
QA60_GAP = (dt.date(2022, 1, 25), dt.date(2024, 2, 29))


def qa60_in_gap(date: dt.date | None) -> bool:
    return date is not None and QA60_GAP[0] <= date <= QA60_GAP[1]


def _compose(shape: tuple[int, ...], layers: list[tuple[np.ndarray, MaskClass]]) -> np.ndarray:
    """Paint layers lowest priority first so the last (highest priority) wins."""
    out = np.full(shape, MaskClass.CLEAR, dtype=np.uint8)
    for where, code in layers:
        out[where] = code
    return out


def _as_int(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    band = np.asarray(band)
    nan = np.isnan(band) if band.dtype.kind == "f" else np.zeros(band.shape, dtype=bool)
    return np.where(nan, 0, band).astype(np.uint16), nan


def decode_qa60(qa60: np.ndarray, date: dt.date | None, *, strict: bool = True) -> np.ndarray:
    """QA60 bit 10 opaque cloud -> CLOUD, bit 11 cirrus -> THIN_CLOUD.

    QA60 is empty between 2022-02 and 2024-02: in that gap an all-clear QA60 means "unknown", so with
    ``strict`` it is refused (DataError) rather than reported as clear.
    """
    if qa60_in_gap(date):
        msg = (
            f"QA60 is not populated for scenes dated {QA60_GAP[0]}..{QA60_GAP[1]} (this scene: {date}); "
            "its empty bits would read as clear. Use method='s2cloudless', 'cloudscore' or 'scl' instead."
        )
        if strict:
            raise DataError(msg)
        log.warning(msg)
    if date is None:
        log.warning("scene date unknown: cannot check that QA60 is populated (it is empty 2022-02..2024-02)")
    q, nan = _as_int(qa60)
    return _compose(
        q.shape,
        [
            (((q >> 11) & 1) == 1, MaskClass.THIN_CLOUD),
            (((q >> 10) & 1) == 1, MaskClass.CLOUD),
            (nan, MaskClass.NODATA),
        ],
    )


def decode_scl(scl: np.ndarray) -> np.ndarray:
    """Sen2Cor SCL: 0 nodata, 1 saturated/defective (nodata), 3 shadow, 8/9 cloud, 10 cirrus, 11 snow."""
    s, nan = _as_int(scl)
    return _compose(
        s.shape,
        [
            (s == 11, MaskClass.SNOW),
            (s == 3, MaskClass.SHADOW),
            (s == 10, MaskClass.THIN_CLOUD),
            ((s == 8) | (s == 9), MaskClass.CLOUD),
            ((s == 0) | (s == 1) | nan, MaskClass.NODATA),
        ],
    )


def decode_qa_pixel(qa: np.ndarray) -> np.ndarray:
    """Landsat C2 QA_PIXEL: fill -> NODATA, cloud or dilated cloud -> CLOUD, cirrus -> THIN_CLOUD,
    shadow -> SHADOW, snow -> SNOW (USGS sets bits 1-5 only at high confidence)."""
    q, nan = _as_int(qa)
    bit = QAPixel.bit
    return _compose(
        q.shape,
        [
            (bit(q, QAPixel.SNOW), MaskClass.SNOW),
            (bit(q, QAPixel.SHADOW), MaskClass.SHADOW),
            (bit(q, QAPixel.CIRRUS), MaskClass.THIN_CLOUD),
            (bit(q, QAPixel.CLOUD) | bit(q, QAPixel.DILATED_CLOUD), MaskClass.CLOUD),
            (bit(q, QAPixel.FILL) | nan, MaskClass.NODATA),
        ],
    )


def decode_cloudscore(cs_cdf: np.ndarray, clear: float, thin: float) -> np.ndarray:
    """Cloud Score+ cs_cdf (1 = clear): >= ``clear`` clear, [thin, clear) thin cloud, < ``thin`` cloud."""
    cs = np.asarray(cs_cdf, dtype=np.float32)
    nan = np.isnan(cs)
    return _compose(
        cs.shape,
        [(cs < clear, MaskClass.THIN_CLOUD), (cs < thin, MaskClass.CLOUD), (nan, MaskClass.NODATA)],
    )
