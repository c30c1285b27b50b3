"""The field's normalization (UnCRtainTS / GLF-CR / SEN12MS-CR-TS), written once for data, training and inference.

Optical: reflectance clipped to [0, 1] (S2 DN / 10000). S1: dB clipped to [-25, 0] (VV) and
[-32.5, 0] (VH), then scaled to [0, 1]. NaN (nodata) stays NaN; callers mask it explicitly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.sensors import S1_DB_RANGE

S2_DN_SCALE = 10000.0


def optical_to_unit(reflectance: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(reflectance, dtype=np.float32), 0.0, 1.0)


def s2_dn_to_unit(dn: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(dn, dtype=np.float32) / np.float32(S2_DN_SCALE), 0.0, 1.0)


def sar_to_unit(db: np.ndarray, bands: Sequence[str] = ("VV", "VH"), axis: int = 0) -> np.ndarray:
    """Scale S1 dB to [0, 1] band by band; ``axis`` is the band axis of ``db``."""
    db = np.asarray(db, dtype=np.float32)
    lo = np.array([S1_DB_RANGE[b][0] for b in bands], dtype=np.float32)
    hi = np.array([S1_DB_RANGE[b][1] for b in bands], dtype=np.float32)
    shape = [1] * db.ndim
    shape[axis] = len(bands)
    lo, hi = lo.reshape(shape), hi.reshape(shape)
    return (np.clip(db, lo, hi) - lo) / (hi - lo)


def unit_to_sar(unit: np.ndarray, bands: Sequence[str] = ("VV", "VH"), axis: int = 0) -> np.ndarray:
    unit = np.asarray(unit, dtype=np.float32)
    lo = np.array([S1_DB_RANGE[b][0] for b in bands], dtype=np.float32)
    hi = np.array([S1_DB_RANGE[b][1] for b in bands], dtype=np.float32)
    shape = [1] * unit.ndim
    shape[axis] = len(bands)
    return unit * (hi - lo).reshape(shape) + lo.reshape(shape)
