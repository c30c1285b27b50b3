"""Spectral rules on reflectance: cloud (visible/NIR/SWIR only), snow, water and cloud shadows.

All functions take 2-D float arrays of reflectance (0..1) and return boolean arrays; NaN pixels come out
False (the caller marks them nodata). Distances are in metres, converted with ``pixel_size_m``.

The cloud rule follows Fmask's basic test (Zhu & Woodcock 2012: SWIR2 > 0.03, NDVI cap, whiteness, an
NDSI test for snow) but replaces its thermal-based probability layer, which needs a band we may not have,
by hysteresis: strict "core" cloud pixels seed connected looser "grow" pixels, then speckle is removed,
small holes (saturated cores) are filled and the result is buffered. One threshold set is tuned on the
DLR ukis-csmask reference scenes (Sentinel-2, Landsat 5, Landsat 7).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from pipeline.masking.config import MaskConfig


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / b, 0.0)


def normalized_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _ratio(a - b, a + b)


def disk(radius_px: int) -> np.ndarray:
    r = int(radius_px)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r + r  # "+ r" rounds the disk like cv2/skimage disks


def buffer(mask: np.ndarray, metres: float, pixel_size_m: float) -> np.ndarray:
    """Dilate by a disk of ``metres``; a distance transform keeps km-sized buffers O(pixels)."""
    r = int(round(metres / pixel_size_m))
    if r <= 0 or not mask.any():
        return mask
    if r <= 3:
        return ndi.binary_dilation(mask, structure=disk(r))
    return ndi.distance_transform_edt(~mask) <= r + 0.5


def remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    if min_px <= 1 or not mask.any():
        return mask
    lab, n = ndi.label(mask)
    keep = np.bincount(lab.ravel(), minlength=n + 1) >= min_px
    keep[0] = False
    return keep[lab]


def fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    if max_px <= 0 or not mask.any():
        return mask
    holes = ndi.binary_fill_holes(mask) & ~mask
    lab, n = ndi.label(holes)
    small = np.bincount(lab.ravel(), minlength=n + 1) <= max_px
    small[0] = False
    return mask | small[lab]


def snow(green: np.ndarray, nir: np.ndarray, swir1: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """Fmask-style snow test: high NDSI with bright green and NIR (water has high NDSI but dark NIR)."""
    ndsi = normalized_difference(green, swir1)
    return (ndsi > cfg.ndsi_snow) & (nir > cfg.snow_nir_min) & (green > cfg.snow_green_min)


def water(red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """Fmask water test: low NDVI and dark NIR."""
    ndvi = normalized_difference(nir, red)
    return ((ndvi < 0.01) & (nir < 0.11)) | ((ndvi < 0.1) & (ndvi > 0) & (nir < 0.05))


def spectral_cloud(
    blue: np.ndarray,
    green: np.ndarray,
    red: np.ndarray,
    nir: np.ndarray,
    swir1: np.ndarray,
    swir2: np.ndarray,
    pixel_size_m: float,
    cfg: MaskConfig,
) -> np.ndarray:
    """Cloud from visible/NIR/SWIR reflectance (no thermal, no cirrus band needed); snow is excluded."""
    mean_vis = (blue + green + red) / 3.0
    whiteness = _ratio(np.abs(blue - mean_vis) + np.abs(green - mean_vis) + np.abs(red - mean_vis), mean_vis)
    ndvi = normalized_difference(nir, red)
    basic = (swir2 > cfg.swir2_min) & ~snow(green, nir, swir1, cfg)
    core = basic & (whiteness < cfg.whiteness_core) & (mean_vis > cfg.brightness_core) & (ndvi < cfg.ndvi_core)
    grow = basic & (whiteness < cfg.whiteness_grow) & (mean_vis > cfg.brightness_grow) & (ndvi < cfg.ndvi_grow)
    lab, n = ndi.label(grow | core)
    seeded = np.zeros(n + 1, dtype=bool)
    seeded[np.unique(lab[core])] = True
    seeded[0] = False
    cloud = seeded[lab]
    px_area = pixel_size_m * pixel_size_m
    cloud = remove_small(cloud, int(math.ceil(cfg.min_cloud_area_m2 / px_area)))
    cloud = fill_small_holes(cloud, int(cfg.max_hole_area_m2 / px_area))
    return buffer(cloud, cfg.cloud_buffer_m, pixel_size_m)


def dark_pixels(
    red: np.ndarray, nir: np.ndarray, clear: np.ndarray, cfg: MaskConfig, swir1: np.ndarray | None = None,
    shadeable: np.ndarray | None = None,
) -> np.ndarray:
    """Shadow candidates: dark in NIR, absolutely and relative to the scene's clear land; water excluded.

    ``shadeable`` (pixels some cloud could shade) is left out of the clear-land reference: in a broken
    sky half the cloud-free land is shadow, and its median would drag the relative threshold down.

    With a SWIR1 band, water must also be dark there: skylight-lit shadowed soil has the low NDVI and NIR
    of Fmask's water test (diffuse light is bluer), but keeps several % of SWIR1, which water absorbs.
    """
    wat = water(red, nir)
    if swir1 is not None:
        wat &= ~(np.nan_to_num(swir1, nan=0.0) >= cfg.water_swir1_max)
    land = clear & ~wat & np.isfinite(nir)
    if shadeable is not None:
        land &= ~shadeable
    threshold = cfg.shadow_nir_max
    if land.sum() > 100:
        threshold = min(threshold, cfg.shadow_nir_relative * float(np.median(nir[land])))
    return (nir < threshold) & ~wat


def _block_reduce(a: np.ndarray, f: int, how: str) -> np.ndarray:
    """Block max/mean of a 2-D array by factor ``f`` (edges padded: max with False, mean over real pixels)."""
    if f == 1:
        return a.astype(np.float32) if how == "mean" else a.copy()
    h, w = a.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    pad = np.zeros((hp, wp), dtype=np.float32)
    pad[:h, :w] = a
    blocks = pad.reshape(hp // f, f, wp // f, f)
    if how == "max":
        return blocks.max(axis=(1, 3)) > 0
    ones = np.zeros((hp, wp), dtype=np.float32)
    ones[:h, :w] = 1.0
    n = ones.reshape(hp // f, f, wp // f, f).sum(axis=(1, 3))
    return blocks.sum(axis=(1, 3)) / np.maximum(n, 1.0)


def _shift(a: np.ndarray, dr: int, dc: int, fill: int | bool = 0) -> np.ndarray:
    out = np.full_like(a, fill)
    h, w = a.shape
    if abs(dr) >= h or abs(dc) >= w:
        return out
    out[max(0, dr) : h - max(0, -dr), max(0, dc) : w - max(0, -dc)] = a[
        max(0, -dr) : h - max(0, dr), max(0, -dc) : w - max(0, dc)
    ]
    return out


def _offset(d: float, east: float, north: float, a: float, e: float) -> tuple[int, int]:
    return int(round(north * d / e)), int(round(east * d / a))  # e < 0 for north-up rasters


def matched_shadow_zone(
    cloud: np.ndarray,
    dark: np.ndarray,
    transform: tuple[float, ...],
    sun_azimuth: float,
    sun_elevation: float,
    cfg: MaskConfig,
) -> np.ndarray:
    """Each cloud object projected at the one height (of the scanned range) where its shadow is darkest.

    Fmask's object matching (Zhu & Woodcock 2012) without thermal heights: for every cloud object and
    every height between ``cloud_height_min_m`` and ``cloud_height_max_m`` the object is moved away from
    the sun and the fraction of dark pixels in its footprint (cloud pixels excluded) is scored; the best
    height wins if that fraction reaches ``shadow_match_min``. Scoring runs on ~40 m blocks so a 1 Mpx
    scene costs a few hundred small bincounts; the winning footprint is then placed at full resolution,
    widened by one height step either side (the match is only that precise). The union over all heights
    would instead sweep kilometres of ground behind every cloud and call every dark field there shadow.
    """
    a, e = transform[0], transform[4]
    pixel = min(abs(a), abs(e))
    az = math.radians(sun_azimuth)
    tan_el = math.tan(math.radians(sun_elevation))
    east, north = -math.sin(az), -math.cos(az)  # unit vector away from the sun
    f = max(1, int(round(cfg.shadow_match_block_m / pixel)))
    cloud_c = _block_reduce(cloud, f, "max")
    dark_c = _block_reduce(dark & ~cloud, f, "mean")
    lab_c, n = ndi.label(cloud_c, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(cloud)
    step = pixel * f
    dists = np.arange(cfg.cloud_height_min_m / tan_el, cfg.cloud_height_max_m / tan_el + step, step)
    best = np.zeros(n + 1)
    best_k = np.full(n + 1, -1)
    free = ~cloud_c
    for k, d in enumerate(dists):
        dr, dc = _offset(d / f, east, north, a, e)
        moved = _shift(lab_c, dr, dc)
        sel = (moved > 0) & free
        lab = moved[sel]
        count = np.bincount(lab, minlength=n + 1)
        # four pseudo-blocks of lit ground: a footprint mostly hidden under clouds or off the image is
        # a few blocks, and a few dark blocks must not outvote a large, mostly dark footprint
        score = np.bincount(lab, weights=dark_c[sel], minlength=n + 1) / (count + 4.0)
        better = score > best
        best[better], best_k[better] = score[better], k
    best_k[best < cfg.shadow_match_min] = -1
    best_k[0] = -1
    if (best_k < 0).all():
        return np.zeros_like(cloud)
    # full-resolution cloud pixels take the height of the block object they lie in
    lab_full = np.repeat(np.repeat(lab_c, f, axis=0), f, axis=1)[: cloud.shape[0], : cloud.shape[1]]
    k_full = np.where(cloud, best_k[lab_full], -1)
    zone = np.zeros_like(cloud)
    for k in np.unique(best_k[best_k >= 0]):
        src = k_full == k
        for d in np.arange(dists[k] - step, dists[k] + step + pixel / 2, pixel):
            zone |= _shift(src, *_offset(max(d, 0.0), east, north, a, e), fill=False)
    return zone


def cloud_shadow(
    cloud: np.ndarray,
    dark: np.ndarray,
    transform: tuple[float, ...],
    sun_azimuth: float | None,
    sun_elevation: float | None,
    cfg: MaskConfig,
) -> np.ndarray:
    """Dark pixels where the cloud mask, projected along the sun direction, lands (``matched_shadow_zone``).

    Without sun angles, the direction is unknown: dark pixels within ``shadow_search_m`` of a cloud are
    taken instead (more false positives near clouds; callers log it).
    """
    pixel = min(abs(transform[0]), abs(transform[4]))
    if not cloud.any():
        return np.zeros_like(cloud)
    if sun_azimuth is None or sun_elevation is None:
        zone = buffer(cloud, cfg.shadow_search_m, pixel)
    else:
        zone = matched_shadow_zone(cloud, dark, transform, sun_azimuth, sun_elevation, cfg)
    shadow = zone & dark & ~cloud
    return buffer(shadow, cfg.shadow_buffer_m, pixel) & ~cloud
