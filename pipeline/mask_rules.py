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

from pipeline.mask_config import MaskConfig


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


def dark_pixels(red: np.ndarray, nir: np.ndarray, clear: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """Shadow candidates: dark in NIR, absolutely and relative to the scene's clear land; water excluded."""
    wat = water(red, nir)
    land = clear & ~wat & np.isfinite(nir)
    threshold = cfg.shadow_nir_max
    if land.sum() > 100:
        threshold = min(threshold, cfg.shadow_nir_relative * float(np.median(nir[land])))
    return (nir < threshold) & ~wat


def shadow_offsets(
    sun_azimuth: float, sun_elevation: float, transform: tuple[float, ...], cfg: MaskConfig
) -> list[tuple[int, int]]:
    """Pixel (row, col) offsets from a cloud to its shadow for every scanned cloud height.

    The shadow lies opposite the sun (azimuth clockwise from north) at a ground distance of
    height / tan(elevation). Offsets are spaced one pixel apart so the union has no gaps.
    """
    a, e = transform[0], transform[4]
    az = math.radians(sun_azimuth)
    tan_el = math.tan(math.radians(sun_elevation))
    east, north = -math.sin(az), -math.cos(az)  # unit vector away from the sun
    d_min = cfg.cloud_height_min_m / tan_el
    d_max = cfg.cloud_height_max_m / tan_el
    step = min(abs(a), abs(e))
    offsets: list[tuple[int, int]] = []
    for d in np.arange(d_min, d_max + step, step):
        off = (int(round(north * d / e)), int(round(east * d / a)))  # e < 0 for north-up rasters
        if not offsets or offsets[-1] != off:
            offsets.append(off)
    return offsets


def shift_union(mask: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dr, dc in offsets:
        if abs(dr) >= h or abs(dc) >= w:
            continue
        src = mask[max(0, -dr) : h - max(0, dr), max(0, -dc) : w - max(0, dc)]
        out[max(0, dr) : h - max(0, -dr), max(0, dc) : w - max(0, -dc)] |= src
    return out


def cloud_shadow(
    cloud: np.ndarray,
    dark: np.ndarray,
    transform: tuple[float, ...],
    sun_azimuth: float | None,
    sun_elevation: float | None,
    cfg: MaskConfig,
) -> np.ndarray:
    """Dark pixels inside the cloud mask projected along the sun direction over the cloud heights.

    Without sun angles, the direction is unknown: dark pixels within ``shadow_search_m`` of a cloud are
    taken instead (more false positives near clouds; callers log it).
    """
    pixel = min(abs(transform[0]), abs(transform[4]))
    if not cloud.any():
        return np.zeros_like(cloud)
    if sun_azimuth is None or sun_elevation is None:
        zone = buffer(cloud, cfg.shadow_search_m, pixel)
    else:
        zone = shift_union(cloud, shadow_offsets(sun_azimuth, sun_elevation, transform, cfg))
    shadow = zone & dark & ~cloud
    return buffer(shadow, cfg.shadow_buffer_m, pixel) & ~cloud
