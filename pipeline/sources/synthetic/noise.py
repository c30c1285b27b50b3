"""World-anchored deterministic noise for the synthetic source.

Every random value is a hash of (key, integer world lattice index), never a draw from a stateful RNG,
so the value at a ground point does not depend on which grid (patch, tile, full mosaic) asks for it.
Smooth noise is cubic B-spline value noise on a lattice of ``cell`` metres; the grid's pixel centres
enter as separable 1-D coordinate vectors, so one octave on an H x W grid costs two sparse products
(O(4 (H + W) * m)) instead of a per-pixel gather.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
from scipy import sparse

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_PX = np.uint64(0x9E3779B97F4A7C15)
_PY = np.uint64(0xC2B2AE3D27D4EB4F)
# std of B-spline value noise with U(-1, 1) lattice values: sqrt(1/3) * (151/315) (separable in x and y)
_VALUE_NOISE_STD = float(np.sqrt(1.0 / 3.0) * 151.0 / 315.0)


def key_of(*parts: object) -> int:
    """A stable 63-bit key from any printable parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _mix(h: np.ndarray) -> np.ndarray:
    # splitmix64 finalizer: full avalanche, so neighbouring lattice indices look independent
    h = h ^ (h >> np.uint64(30))
    h = h * _M1
    h = h ^ (h >> np.uint64(27))
    h = h * _M2
    return h ^ (h >> np.uint64(31))


def hash_uniform(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """U[0, 1) float32 from integer lattice indices (broadcast) and a key."""
    # int64 -> uint64 reinterpretation is free and wraps like the hash wants
    ix = np.ascontiguousarray(ix, dtype=np.int64).view(np.uint64)
    iy = np.ascontiguousarray(iy, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix((ix * _PX) ^ (iy * _PY ^ np.uint64(key)))
    return ((h >> np.uint64(40)).astype(np.float32)) * np.float32(1.0 / (1 << 24))


def _bspline(u: np.ndarray, deriv: bool = False) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Sparse (n, m) matrix of cubic B-spline weights of positions ``u`` (lattice units) and the m lattice
    indices its columns stand for (only those some position touches: sparse samples over a wide extent,
    e.g. search's coarse cloud-cover grid, must not hash the whole lattice in between)."""
    u = np.asarray(u, dtype=np.float64)
    k = np.floor(u).astype(np.int64)
    t = (u - k).astype(np.float32)
    t2, t3 = t * t, t * t * t
    if deriv:
        w = np.stack([-0.5 * (1 - t) ** 2, 1.5 * t2 - 2 * t, -1.5 * t2 + t + 0.5, 0.5 * t2], axis=1)
    else:
        w = np.stack([(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6], axis=1)
    taps = k[:, None] + np.arange(-1, 3)
    lo, hi = int(taps.min()), int(taps.max())
    if hi - lo + 1 <= 2 * taps.size:
        index = np.arange(lo, hi + 1)
        cols = taps - lo
    else:
        index, cols = np.unique(taps, return_inverse=True)
        cols = cols.reshape(taps.shape)
    n = len(u)
    mat = sparse.csr_matrix(
        (w.astype(np.float32).ravel(), cols.ravel(), np.arange(0, 4 * n + 1, 4)), shape=(n, len(index))
    )
    return mat, index


def value_noise(
    xs: np.ndarray, ys: np.ndarray, cell: float | tuple[float, float], key: int, d: str | None = None
) -> np.ndarray:
    """Smooth noise (H, W) at world coordinates ``ys`` (H,) x ``xs`` (W,), unit std, lattice ``cell`` m.

    ``cell`` may be (cx, cy) for anisotropic (streaky) noise; ``d`` = "x" or "y" gives the derivative
    per metre instead, for distance-to-contour estimates.
    """
    cx, cy = cell if isinstance(cell, tuple) else (cell, cell)
    wx, ix = _bspline(np.asarray(xs) / cx, deriv=d == "x")
    wy, iy = _bspline(np.asarray(ys) / cy, deriv=d == "y")
    lattice = hash_uniform(ix[None, :], iy[:, None], key) * 2 - 1
    # contract x on the small lattice first, then expand along y: the result comes out row-major
    b = np.ascontiguousarray((wx @ lattice.T).T)  # (my, W)
    out = np.asarray(wy @ b, dtype=np.float32)
    scale = 1.0 / _VALUE_NOISE_STD
    if d == "x":
        scale /= cx
    elif d == "y":
        scale /= cy
    out *= np.float32(scale)
    return out


def fbm(
    xs: np.ndarray,
    ys: np.ndarray,
    cells: Sequence[float | tuple[float, float]],
    key: int,
    persistence: float = 0.5,
    d: str | None = None,
) -> np.ndarray:
    """Fractal sum of octaves (largest cell first), normalized to unit std."""
    total = np.zeros((len(ys), len(xs)), dtype=np.float32)
    norm = 0.0
    amp = 1.0
    for i, c in enumerate(cells):
        total += np.float32(amp) * value_noise(xs, ys, c, key + 7919 * (i + 1), d=d)
        norm += amp * amp
        amp *= persistence
    total *= np.float32(1.0 / np.sqrt(norm))
    return total


def pixel_uniform(xs: np.ndarray, ys: np.ndarray, res: float, key: int) -> np.ndarray:
    """Independent U[0, 1) per world pixel of size ``res`` (the pixel containing each centre)."""
    ix = np.floor(np.asarray(xs) / res).astype(np.int64)
    iy = np.floor(np.asarray(ys) / res).astype(np.int64)
    return hash_uniform(ix[None, :], iy[:, None], key)


def pixel_normal(xs: np.ndarray, ys: np.ndarray, res: float, key: int) -> np.ndarray:
    """Independent N(0, 1) per world pixel (Box-Muller on two hashed uniforms)."""
    u1 = pixel_uniform(xs, ys, res, key)
    u2 = pixel_uniform(xs, ys, res, key ^ 0x5DEECE66D)
    return (np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(np.float32(2 * np.pi) * u2)).astype(np.float32)


def pixel_gamma(xs: np.ndarray, ys: np.ndarray, res: float, key: int, shape: float) -> np.ndarray:
    """Gamma(shape, scale=1/shape) per world pixel (mean 1): multiplicative speckle of ENL ``shape``.

    Wilson-Hilferty's cube-of-normal transform is accurate to well under 1 % in mean and variance for
    shape > 1 and, unlike an RNG draw, stays a pure function of the pixel's world index.
    """
    z = pixel_normal(xs, ys, res, key)
    c = np.float32(1.0 / (9.0 * shape))
    g = np.maximum(1.0 - c + z * np.sqrt(c), 0.0) ** 3
    return g.astype(np.float32)
