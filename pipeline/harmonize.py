"""Training-free gap filling: the most recent clear observation, harmonized to the target date's radiometry.

For every pixel the target date does not see clearly, the history is searched back in time (any number of
dates, up to ``max_age_days``) for the most recent date whose mask calls the pixel clear; that date's
reflectance is mapped onto the target's radiometry with a per-band linear model ``y = a * x + b`` fitted on
the pixels clear in both dates. Copying radiometry as is costs several dB on real Sentinel-2: phenology,
harvest, sun angle and haze change the level of whole fields between acquisitions, and a fit on the clear
surroundings undoes most of that.

The fit is local (a ``window_px`` moving window, the guided-filter construction: window moments from box
sums, then the per-window coefficients averaged over every window covering a pixel) and shrunk towards the
date's global fit with ``prior_pixels`` pseudo-observations, so a window with few common clear pixels falls
back smoothly to the global fit. The windows sit on a lattice every few pixels (the default 15 px window is
3 x 3 cells of 5 px) and the averaged gain and offset are interpolated bilinearly between lattice points, only
where a date gives pixels a value: the whole fill runs ~25x faster than with a window at every pixel (13 bands,
1 Mpx, 10 dates) and scores 0.01-0.02 dB below it on the real series (bench/harmonize_real.py). Fill dates
that share too few clear pixels with the target, or whose common clear pixels show a changed surface (median band
correlation below ``min_correlation``: a flood, a harvest - a fit there would carry the change onto every filled
pixel), are chained through an intermediate date; when nothing can be fitted the identity is used, windows that
share clear pixels with the target still follow their own local fit around it, and the notes say why.

Under a large cloud no window shares clear pixels with the target, and the fill falls back to the date's global
line, although the surface did not change alike everywhere: crops greened up, stubble dried, towns stayed. So the
global line is refined by class (``class_offsets``): the fill date's pixels are grouped into spectral classes
(k-means on its log reflectance), and each class gets the median residual of the target against the global line
over its common clear pixels, shrunk towards 0 with ``class_prior_pixels`` pseudo-pixels. The local fit is then
fitted to the target minus those offsets and adds them back, so near clear pixels the windows still follow their
own fit and inside a cloud the class's change carries the fill (``cloudfree benchmark`` on the real series: +0.22 dB
on the hidden pixels of the standard cases, +0.34 dB under persistent cloud). A median, so a flood that covers a
minority of a class's visible pixels does not pull it.

Cloud masks miss the semi-transparent fringe of a cloud, so the target's not-clear mask is dilated by
``buffer_px`` before deciding what is hidden (a ring pixel with nothing to fill it from keeps its
observation), and each history date's clear mask is eroded by ``history_buffer_px`` before it may be used as
a source (a pixel clear only next to clouds on every date falls back to the unbuffered mask, and the notes
count it). On real Sentinel-2 a cloud's fringe spoils pixels several px beyond the s2cloudless mask (see the
fringe profile of bench/harmonize_real.py). The fill is feathered over ``feather_px`` pixels into the
observed side of the border, so no seam shows; observed pixels farther away are returned exactly.

The scene mask keeps water-like dark pixels out of its shadows (it must never mask a flood), so shadows that look
like water stay "clear". With ``shadow_bands`` given, pixels the mask calls clear within ``shadow_check_px`` of
its clouds are compared with their own history (a first fill with that ring hidden): darker in every visible band
and far darker in NIR and SWIR1, as a shadow that keeps only the skylight is, they are filled as missed shadows.
Optics alone cannot tell such a shadow from a flood that arrived after the history date (the synthetic flood
darkens the visible bands by ~20 % and, under thin haze on its first day, passes the test), but S1 can: a shadow
leaves the backscatter as it was, a flood changes it (open water darkens it by ~10 dB, flooded streets brighten
it by double bounce). So a flagged pixel whose S1 (``GroundChange``: a 5 x 5 mean, VV and VH) changed by more
than ``shadow_sar_change_db`` between its history date and the target date is left as observed; without S1
near the target the check does not run at all (``FillResult.shadow_check``), unless ``shadow_sar_change_db`` is
None. bench/composite_errors.py measures the check with and without the S1 test.

Outputs (``FillResult``): the image (C, H, W) float32 with NaN where nothing could be filled, a uint8
provenance code per pixel (``PROVENANCE_*``), the age in days of the date each pixel came from (int16: 0
observed, -1 none), per-date notes (how each fill date was harmonized) for the output metadata and the missed
shadows the check filled.

An AOI processed block by block (``pipeline.reconstruct.run``) fits each date's global line once for the whole
AOI (``fit_date`` on a decimated sample) and hands it to every block (``fill_gaps(fits=...)``): fits of
neighbouring blocks would otherwise differ and show as a step at the block border inside a large cloud. Each
block also says where it lies in the AOI (``fill_gaps(origin=...)``), so its local-fit lattice is the AOI's and
the block fills exactly as the whole AOI would.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import DataError

PROVENANCE_OBSERVED = 0  # clear on the target date (pixels in the feather ring are blended, see feather_px)
PROVENANCE_FILLED = 1  # taken from an earlier clear date, harmonized to the target
PROVENANCE_NO_CLEAR = 3  # no clear observation within max_age_days: NaN in the image
PROVENANCE_NODATA = 255  # no date within max_age_days has data here (outside every footprint): NaN
AGE_NONE = -1  # source age of pixels with no value

PROVENANCE_CODES = {
    PROVENANCE_OBSERVED: "observed clear",
    PROVENANCE_FILLED: "filled from an earlier clear date",
    PROVENANCE_NO_CLEAR: "no clear observation within max_age_days",
    PROVENANCE_NODATA: "nodata",
}

History = Sequence[tuple[float, np.ndarray, np.ndarray]]


class FillConfig(BaseModel):
    """Settings of ``fill_gaps``; the defaults are the best of the real-series benchmark (bench/harmonize_real.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_age_days: int = Field(
        90, ge=1, le=32767,
        description="Look back at most this many days for a clear observation; older pixels stay NaN (provenance 3). "
        "On the real series 90 scores as 365 does (30 leaves 75 % of the persistent-cloud holes empty), and it bounds "
        "how many dates a pixel that its mask never calls clear (a bright roof) makes the fill read.",
    )
    fit: Literal["local", "global", "none"] = Field(
        "local",
        description="Radiometric harmonization of each fill date: local (moving window shrunk towards the global "
        "fit), global (one gain/offset per band and date) or none (copy reflectance as is).",
    )
    window_px: int = Field(
        15, ge=3,
        description="Side of the moving window of the local fit, in pixels (odd values centre it). The windows sit "
        "on a lattice of cells of up to 5 px; a side that no cell size divides is rounded to whole cells (7 -> 8).",
    )
    prior_pixels: float = Field(
        10.0, ge=0,
        description="Pseudo-pixels of the global fit added to every window: a window with far fewer common clear "
        "pixels than this follows the global fit, one with far more follows its own.",
    )
    window_min_pixels: int = Field(
        6, ge=2, description="A window with fewer common clear pixels than this uses the global fit only.",
    )
    min_common_pixels: int = Field(
        200, ge=2,
        description="Fewest pixels clear in both the target and a fill date for a global fit; with fewer the fit is "
        "chained through an intermediate date, or the identity is used (and noted).",
    )
    gain_min: float = Field(
        0.5, gt=0, description="Smallest gain a fit may use (guards fits on few or changed pixels).",
    )
    gain_max: float = Field(2.0, gt=0, description="Largest gain a fit may use (guards fits on few or changed pixels).")
    min_correlation: float = Field(
        0.25, ge=-1, le=1,
        description="A date's fit is refused (chained through another date, or the identity, and noted) when the "
        "median over bands of the correlation between it and the target on their common clear pixels is below "
        "this: the surface changed there (a flood, a harvest) and a fit would carry the change onto every filled "
        "pixel. Real fits between clear dates measure 0.38 and up (5th percentile); the flooded demo date 0.13.",
    )
    min_variance: float = Field(
        1e-6, ge=0,
        description="Reflectance variance of the fill date below which a band's fit is offset-only (gain from the "
        "global fit, or 1 for the global fit itself).",
    )
    robust_sigma: float | None = Field(
        3.0, gt=0,
        description="Global fits drop common pixels whose residual exceeds this many robust standard deviations "
        "(changed fields, missed cloud) and are fitted again; None fits once.",
    )
    window_outlier_sigma: float | None = Field(
        20.0, gt=0,
        description="The local fit's windows leave out common pixels whose residual from the date's global fit "
        "exceeds this many robust standard deviations in any band: thin cloud or haze the target's mask missed "
        "beside a hole, which a window would otherwise carry onto every pixel it fills. Only gross outliers: "
        "milder changes (phenology, harvest) usually continue under the hole, and following them pays on real "
        "pixels (3 sigma costs 0.2 dB there, 20 nothing; on the synthetic demo's 2021-08-31 3..20 all gain "
        "0.5 dB). None keeps every common pixel.",
    )
    class_offsets: int = Field(
        12, ge=0, le=64,
        description="Spectral classes of each fill date (k-means on log reflectance) that get their own offset from "
        "the date's global line: the median residual of the target over the class's common clear pixels. 0 turns "
        "them off. Real series (cloudfree benchmark, hidden pixels): +0.22 dB in the standard cases, +0.34 dB under "
        "persistent cloud.",
    )
    class_prior_pixels: float = Field(
        200.0, ge=0,
        description="Pseudo-pixels at offset 0 added to every class: a class with few common clear pixels keeps "
        "the global line.",
    )
    buffer_px: int = Field(
        2, ge=0, description="Dilate the target's not-clear mask by this many pixels before deciding what is hidden.",
    )
    history_buffer_px: int = Field(
        3, ge=0, description="Erode every history date's clear mask by this many pixels before using it as a source.",
    )
    history_buffer_fallback: bool = Field(
        True,
        description="Where no date within max_age_days is clear beyond the history buffer, fill from the most recent "
        "date whose unbuffered mask calls the pixel clear (counted in the notes) rather than leave it empty.",
    )
    feather_px: int = Field(
        3, ge=0,
        description="Blend the fill into observed pixels over this many pixels outside the hidden region (weight "
        "falling linearly to 0); observed pixels farther away are returned exactly.",
    )
    shadow_check_px: int = Field(
        40, ge=0,
        description="Pixels the mask calls clear within this distance of its clouds are compared with their own "
        "history (the fill's estimate of them): one darker than it in every visible band (shadow_visible_max) and "
        "far darker in NIR and SWIR1 (shadow_infrared_max) is a cloud shadow the mask missed and is filled, unless "
        "S1 shows the ground changed there (shadow_sar_change_db). The scene mask keeps water-like dark pixels out "
        "of its shadows so as not to mask a flood; on the synthetic demo after the event these misses carry 89 % "
        "(08-21) and 83 % (08-31) of the fill's squared error on the hidden pixels and read as flood water; the "
        "check takes 08-21 from 29.35 to 35.59 dB (35.66 without the S1 test). 0 turns it off; it needs the blue, "
        "green, red, NIR and SWIR1 bands.",
    )
    shadow_sar_change_db: float | None = Field(
        2.0, gt=0,
        description="A pixel the shadow check flags is left as observed when its S1 backscatter (5 x 5 mean, VV or "
        "VH) differs by more than this many dB between the S1 nearest its history date and an S1 within "
        "sar_max_days of the target date: a shadow does not change the backscatter, a flood does (on the synthetic "
        "flood's first day 80 % of the flooded pixels the optical test flags change by more than 2 dB, against "
        "1-3 % of the true shadows after it). Without S1 near the target the check does not run. None: no S1 test, "
        "the check runs on optical alone (on a flood's first day it then fills flooded pixels under thin haze from "
        "the pre-flood history).",
    )
    shadow_visible_max: float = Field(
        0.9, gt=0, le=1,
        description="Missed shadow: blue, green and red all below this fraction of the history's value. A turbid "
        "flood keeps its visible level (about as bright as land there); a shadow keeps only the skylight.",
    )
    shadow_infrared_max: float = Field(
        0.65, gt=0, le=1,
        description="Missed shadow: NIR and SWIR1 both below this fraction of the history's value (the direct beam "
        "that a shadow removes carries most of the infrared).",
    )

    @model_validator(mode="after")
    def _gains(self) -> "FillConfig":
        if self.gain_min > self.gain_max:
            raise ValueError(f"gain_min={self.gain_min} is above gain_max={self.gain_max}; swap them")
        return self

    def differences(self, other: "FillConfig", label: str = "other") -> str:
        """The fields where ``other`` differs, as ``name mine (label: theirs)``, for one-line messages."""
        mine, theirs = self.model_dump(), other.model_dump()
        return ", ".join(f"{k} {mine[k]} ({label}: {theirs[k]})" for k in mine if mine[k] != theirs[k])


@dataclass
class FillResult:
    image: np.ndarray  # (C, H, W) float32, NaN where nothing was filled
    provenance: np.ndarray  # (H, W) uint8 PROVENANCE_* codes
    source_age_days: np.ndarray  # (H, W) int16: 0 observed, age of the fill date, AGE_NONE for none
    notes: list[dict[str, Any]] = field(default_factory=list)  # one per fill date used, oldest last
    missed_shadow: np.ndarray | None = None  # (H, W) bool: clear by the mask, filled as a missed shadow (shadow check)
    # (H, W) bool: flagged by the shadow check's optical test, left as observed because S1 changed there
    shadow_kept_by_sar: np.ndarray | None = None
    # the missed-shadow check: "off" (shadow_check_px 0 or no shadow bands), "optical" (no S1 test), "optical+S1",
    # or "no S1" (the S1 test is required and no S1 was near the target date: the check did not run)
    shadow_check: str = "off"


class GroundChange(Protocol):
    """S1 backscatter in dB (bands VV and/or VH, (S, H, W) on the fill's grid) for the shadow check's S1 test."""

    def near_target(self) -> list[np.ndarray]:
        """S1 within the allowed days of the target date (before and after it); empty when there is none."""
        ...

    def near_history(self, age_days: float) -> np.ndarray | None:
        """S1 nearest the history date ``age_days`` before the target; None when none is near it."""
        ...


@dataclass
class GroundChangeArrays:
    """``GroundChange`` from arrays already read: ``target`` S1 near the target date, ``history`` by age."""

    target: list[np.ndarray]
    history: Mapping[float, np.ndarray]

    def near_target(self) -> list[np.ndarray]:
        return list(self.target)

    def near_history(self, age_days: float) -> np.ndarray | None:
        return self.history.get(float(age_days))


SHADOW_BANDS = ("blue", "green", "red", "nir", "swir1")
# below this the history's reflectance is too dark for a ratio (water in SWIR1): no shadow call there
SHADOW_MIN_REFLECTANCE = 0.005


def shadow_bands(sensor_key: str, bands: Sequence[str]) -> tuple[int, ...] | None:
    """Indices in ``bands`` of the shadow check's blue, green, red, NIR and SWIR1 (``fill_gaps(shadow_bands=...)``);
    None when one is missing."""
    from pipeline.sensors import get_sensor

    sensor = get_sensor(sensor_key)
    names = list(bands)
    out = []
    for common in SHADOW_BANDS:
        name = next((b.name for b in sensor.bands if b.common == common), None)
        if name is None or name not in names:
            return None
        out.append(names.index(name))
    return tuple(out)


_CLASS_SAMPLE = 2048  # common pixels the classes are clustered on (k-means cost grows with it)
_CLASS_PIXELS = 65536  # common pixels the class medians are taken over (evenly spread; counts scale to all of them)
_CLASS_MIN_COMMON = 30  # fewer common pixels in a class than this: no offset (a median of a handful is noise)


def _spread_pick(n: int, m: int) -> np.ndarray:
    """``m`` of ``n`` indices evenly spread: a deterministic sample that covers the whole area in raster order."""
    return np.linspace(0, n - 1, m).astype(np.intp)


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class ClassOffsets:
    """A fill date's spectral classes and each class's offset from the date's global line (``class_offsets``)."""

    centre: np.ndarray  # (K, C) class centres in standardized log reflectance
    mean: np.ndarray  # (C,) the standardization: log reflectance mean ...
    scale: np.ndarray  # (C,) ... and standard deviation over the common clear pixels
    offset: np.ndarray  # (K, C) reflectance added to the global (and local) fit of the class's pixels

    def labels(self, x: np.ndarray) -> np.ndarray:
        """The class (N,) of each of the fill date's pixels ``x`` (C, N): the nearest centre in standardized log
        reflectance, by |z|^2 - 2 z.c + |c|^2 (the |z|^2 term is the same for every class)."""
        z = ((_log_reflectance(x).T - self.mean) / self.scale).astype(np.float32)
        centre = self.centre.astype(np.float32)
        return np.argmin((centre ** 2).sum(axis=1)[None] - 2 * (z @ centre.T), axis=1)

    def at(self, x: np.ndarray) -> np.ndarray:
        """The offsets (C, N) float32 of the fill date's pixels ``x`` (C, N)."""
        out = np.empty(x.shape, dtype=np.float32)
        for p0 in range(0, x.shape[1], _PIXEL_CHUNK):
            sl = slice(p0, p0 + _PIXEL_CHUNK)
            out[:, sl] = self.offset[self.labels(x[:, sl])].T
        return out


def _log_reflectance(x: np.ndarray) -> np.ndarray:
    """Log reflectance as the classes see it (float32; dark pixels clipped so a 0 is no -inf)."""
    return np.log(np.clip(x.astype(np.float32, copy=False), 1e-3, None))


def _class_offsets(xs: np.ndarray, ys: np.ndarray, a: np.ndarray, b: np.ndarray,
                   cfg: FillConfig) -> ClassOffsets | None:
    """Spectral classes of the fill date's common clear pixels ``xs`` (C, N) and each class's median residual of the
    target ``ys`` against the global line ``a x + b``, shrunk towards 0."""
    k = cfg.class_offsets
    n_all = xs.shape[1]
    if k < 2 or n_all < k * _CLASS_MIN_COMMON:
        return None
    from scipy.cluster.vq import kmeans2

    # fixed samples and seed: the same pixels give the same classes, so a resumed run fills identically
    if n_all > _CLASS_PIXELS:
        pick = _spread_pick(n_all, _CLASS_PIXELS)
        xs, ys = xs[:, pick], ys[:, pick]
    n = xs.shape[1]
    z = _log_reflectance(xs).T
    mean, scale = z.mean(axis=0), z.std(axis=0) + 1e-6
    z = (z - mean) / scale
    sample = z[_spread_pick(n, _CLASS_SAMPLE)] if n > _CLASS_SAMPLE else z
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "one of the clusters is empty": it gets no pixels and no offset
        centre, _ = kmeans2(sample.astype(np.float64), k, seed=np.random.default_rng(1), minit="++")
    classes = ClassOffsets(centre.astype(np.float32), mean, scale, np.zeros((k, xs.shape[0]), dtype=np.float32))
    label = classes.labels(xs)
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(k + 1))
    res = (ys - (a[:, None] * xs + b[:, None])).astype(np.float32)[:, order]
    for j in range(k):
        m = int(bounds[j + 1] - bounds[j])
        if m >= _CLASS_MIN_COMMON:
            m_all = m * n_all / n  # the class's share of every common pixel, not of the sample
            shrink = m_all / (m_all + cfg.class_prior_pixels)
            classes.offset[j] = np.median(res[:, bounds[j]:bounds[j + 1]], axis=1) * shrink
    return classes


@dataclass(frozen=True)
class DateFit:
    """A fill date's global harmonization to the target, fitted once for a whole AOI (``fit_date``) and handed to
    every block's ``fill_gaps`` (``fits``), so neighbouring blocks map a date identically and no step shows at a
    block border. A block still fits its local (moving-window) model around it on its own pixels."""

    kind: str  # global | chained | identity | none
    common: int  # pixels clear in both the date and the target that the fit used
    gain: tuple[float, ...]
    offset: tuple[float, ...]
    via_age: float | None = None  # the intermediate date of a chained fit
    reason: str | None = None  # why a date was not fitted directly (chained or identity)
    # a direct fit's common pixels: per band the date's mean, the target's mean and the date's variance (the local
    # fit's prior is centred on them, so every block shrinks its windows towards the same pseudo-pixels)
    moments: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None = None
    # a direct fit's robust residual standard deviation per band (``window_outlier_sigma``), the same in every block
    spread: tuple[float, ...] | None = None
    classes: ClassOffsets | None = None  # a direct fit's class offsets (``class_offsets``), the same in every block


@dataclass
class _Fit:
    kind: str  # local | global | chained | identity | none
    common: int
    gain: np.ndarray  # (C,) global (or composed) gain
    offset: np.ndarray  # (C,)
    via_age: float | None = None
    reason: str | None = None  # why a date was not fitted directly (chained or identity)
    values: np.ndarray | None = None  # the local fit's harmonized values (C, K) at the pixels it was fitted for
    classes: ClassOffsets | None = None  # offsets from the line by spectral class (in ``values`` already, if local)


def _disk_rects(radius: int) -> list[tuple[int, int]]:
    """The disk of ``radius`` as a union of centred rectangles (half-height, half-width), widest first."""
    rects: list[tuple[int, int]] = []
    for dy in range(radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if rects and rects[-1][1] == half:
            rects[-1] = (dy, half)
        else:
            rects.append((dy, half))
    return rects


def _spread(mask: np.ndarray, lo: int, hi: int, axis: int) -> np.ndarray:
    """OR of ``mask`` shifted by every offset in [lo, hi] along ``axis`` (out[i] = any mask[i + o]); False beyond."""
    out = mask.copy() if lo <= 0 <= hi else np.zeros_like(mask)
    n = mask.shape[axis]
    for o in range(lo, hi + 1):
        if o == 0 or abs(o) >= n:
            continue
        dst = [slice(None)] * mask.ndim
        src = [slice(None)] * mask.ndim
        dst[axis], src[axis] = slice(max(0, -o), n - max(0, o)), slice(max(0, o), n - max(0, -o))
        out[tuple(dst)] |= mask[tuple(src)]
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk (pixels beyond the array count as False), as ndimage's with the disk structure
    but ~8x faster: the disk is a union of rectangles, a rectangle a row pass then a column pass of shifted ORs."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    out = np.zeros_like(mask, dtype=bool)
    for dy, dx in _disk_rects(radius):
        out |= _spread(_spread(mask, -dx, dx, 1), -dy, dy, 0)
    return out


def _feather(hidden: np.ndarray, feather_px: int) -> np.ndarray:
    """Feather weight (H, W) float32: 1 on hidden pixels, 1 - d / (feather_px + 1) at Euclidean distance d from
    the nearest hidden pixel, 0 from feather_px + 1 on.

    The squared distance is exact wherever it matters (d <= feather_px): a column pass gives each pixel the row
    distance to the nearest hidden pixel of its column (capped), a row pass the minimum of dx^2 + that^2 over
    |dx| <= feather_px. ndimage's whole-image Euclidean distance transform costs ~5x more."""
    f = feather_px
    cap = f + 1
    dtype = np.int16 if 2 * cap * cap < 2**15 else np.int32
    g = np.full(hidden.shape, cap, dtype=dtype)
    for d in range(f, 0, -1):  # nearest last
        np.copyto(g[d:], d, where=hidden[:-d])
        np.copyto(g[:-d], d, where=hidden[d:])
    g[hidden] = 0
    g *= g
    d2 = g.copy()
    for d in range(1, f + 1):
        np.minimum(d2[:, d:], g[:, :-d] + d * d, out=d2[:, d:])
        np.minimum(d2[:, :-d], g[:, d:] + d * d, out=d2[:, :-d])
    # d2 <= cap^2: the weight of every squared distance from a table
    lut = np.clip(1.0 - np.sqrt(np.arange(cap * cap + 1, dtype=np.float64)) / cap, 0.0, 1.0).astype(np.float32)
    return np.take(lut, d2)


def _check_pair(refl: np.ndarray, clear: np.ndarray, what: str,
                shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    refl = np.ascontiguousarray(refl, dtype=np.float32)  # the fill works on flat (C, H * W) views of it
    clear = np.asarray(clear)
    if refl.ndim != 3:
        raise DataError(f"fill_gaps: {what} reflectance has shape {refl.shape}; pass (bands, height, width)")
    if clear.shape != refl.shape[1:]:
        raise DataError(f"fill_gaps: {what} clear mask has shape {clear.shape}, its reflectance {refl.shape}; "
                        "pass a (height, width) mask")
    if shape is not None and refl.shape != shape:
        raise DataError(f"fill_gaps: {what} reflectance has shape {refl.shape}, the target {shape}; "
                        "read every date on the target's grid")
    # a pixel with a NaN band cannot be a source or a fit point, whatever the mask says
    return refl, clear.astype(bool) & np.isfinite(refl).all(axis=0)


def _global_fit(x: np.ndarray, y: np.ndarray, cfg: FillConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-band gain and offset of y on x, (C, N) float64 each, guarded and optionally refitted without outliers."""
    keep: np.ndarray | None = None  # every pixel on the first pass
    for attempt in range(2):
        if keep is None:
            n = np.full(x.shape[0], max(x.shape[1], 1))
            mx, my = x.sum(axis=1) / n, y.sum(axis=1) / n
            dx, dy = x - mx[:, None], y - my[:, None]
        else:
            n = keep.sum(axis=1).clip(min=1)
            mx = np.where(keep, x, 0).sum(axis=1) / n
            my = np.where(keep, y, 0).sum(axis=1) / n
            dx, dy = np.where(keep, x - mx[:, None], 0), np.where(keep, y - my[:, None], 0)
        vx = np.einsum("ij,ij->i", dx, dx) / n
        cxy = np.einsum("ij,ij->i", dx, dy) / n
        a = np.where(vx > cfg.min_variance, cxy / np.maximum(vx, 1e-30), 1.0).clip(cfg.gain_min, cfg.gain_max)
        b = my - a * mx
        if cfg.robust_sigma is None or attempt == 1:
            break
        res = y - (a[:, None] * x + b[:, None])
        mad = np.median(np.abs(res - np.median(res, axis=1, keepdims=True)), axis=1, keepdims=True)
        # a floor on the spread keeps a near-perfect fit from discarding pixels over rounding noise
        keep = np.abs(res) <= cfg.robust_sigma * np.maximum(1.4826 * mad, 1e-4)
        if keep.sum(axis=1).min() < cfg.min_common_pixels // 2:
            break
    return a, b


def _residual_spread(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per band, the robust standard deviation (1.4826 MAD) of y - (a x + b) over (C, N) x and y, floored as
    ``_global_fit`` floors it."""
    res = y - (a[:, None] * x + b[:, None])
    mad = np.median(np.abs(res - np.median(res, axis=1, keepdims=True)), axis=1)
    return np.maximum(1.4826 * mad, 1e-4)


def _window_points(x2: np.ndarray, y2: np.ndarray, common: np.ndarray, a: np.ndarray, b: np.ndarray,
                   spread: Sequence[float] | np.ndarray | None, cfg: FillConfig) -> np.ndarray:
    """The flat common pixels the local fit's windows may use: those whose residual from the global line is within
    ``window_outlier_sigma`` robust standard deviations in every band. A window's fit should follow the radiometry
    around a hole, not a haze or cloud edge the mask missed there: those pixels fit no line, and
    would bend the window's line for every pixel it fills (on the synthetic demo's 2021-08-31, thin cloud its mask
    misses beside the holes put the local fit 0.5 dB under the global one)."""
    if cfg.window_outlier_sigma is None or spread is None:
        return common
    at = np.flatnonzero(common)
    limit = cfg.window_outlier_sigma * np.asarray(spread, dtype=np.float64)
    ok = np.ones(at.size, dtype=bool)
    for band in range(x2.shape[0]):  # band by band: a (C, N) residual would double the memory of a large block
        res = y2[band, at].astype(np.float64) - (a[band] * x2[band, at].astype(np.float64) + b[band])
        ok &= np.abs(res) <= limit[band]
    out = np.zeros_like(common)
    out[at[ok]] = True
    return out


# -- the local fit ---------------------------------------------------------------------------------------------
#
# The guided-filter construction at every pixel (window moments from box sums, then the window coefficients
# averaged over every window covering a pixel) costs ~30 full-resolution passes per band and date. It is fitted
# instead on a lattice every ``s`` pixels (He & Sun's "fast guided filter"): the moments of a window of k x k
# lattice cells (s x s pixels each, k * s ~ window_px) come exactly from per-cell sums of every common pixel, the
# coefficients are averaged over the k x k windows around each lattice point as before, and the averaged gain
# and offset are interpolated bilinearly between lattice points, at the pixels a date fills only. The lattice is
# anchored to the AOI (``fill_gaps(origin=...)``), so a block and the whole image fit the very same windows.

# the largest lattice step: the default 15 px window is 3 x 3 cells of 5 px, 0.01-0.02 dB below a window at every
# pixel on the real series (bench/harmonize_real.py); cells of 3 px lose half that and run at half the speed
_LATTICE_MAX_STEP = 5
_CELL_CHUNK = 4096  # lattice cells summed per vectorized step: the temporaries stay in cache
_PIXEL_CHUNK = 8192  # pixels interpolated per vectorized step
_TILE = 16  # lattice points per side of the tiles the local fit is computed on (twice that for wide windows)
_TILE_CHUNK = 8  # tiles per vectorized step
_COARSE_BUDGET = 1 << 26  # bytes of cell sums per band group (bounds memory when the lattice is the pixel grid)


def _lattice_step(window_px: int) -> tuple[int, int]:
    """(s, k): the lattice step in pixels and the window side in lattice cells.

    A step dividing ``window_px`` keeps the window exact (15 -> 3 x 5 px); otherwise the window is rounded to
    whole cells (7 -> 4 x 2 px, 31 -> 6 x 5 px). Windows under 6 px are fitted at every pixel."""
    top = max(1, min(_LATTICE_MAX_STEP, window_px // 3))
    for s in range(top, 1, -1):
        if window_px % s == 0:
            return s, window_px // s
    return top, max(1, round(window_px / top))


@dataclass(frozen=True)
class _Lattice:
    """The local fit's lattice over an array: cell (i, j) holds the array's pixels of absolute rows
    [(i + i0) s, (i + i0 + 1) s) (cols likewise); its lattice point (window centre) is the cell's centre."""

    s: int
    k: int
    h: int
    w: int
    oy: int
    ox: int
    i0: int
    j0: int
    hc: int
    wc: int
    rb: np.ndarray  # (h,) lattice row below each pixel row for the bilinear interpolation, and its weight
    rf: np.ndarray
    cb: np.ndarray  # (w,) the same along columns
    cf: np.ndarray
    rn: np.ndarray  # (hc,) lattice rows in each lattice row's averaging box (fewer at the array's edge)
    cn: np.ndarray


def _axis_lattice(n: int, o: int, s: int, k: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    i0 = o // s
    nc = (o + n - 1) // s - i0 + 1
    # centre of absolute cell I: I s + (s - 1) / 2; in half pixels to stay in integers
    num = 2 * (np.arange(n) + o) - (s - 1)
    base = num // (2 * s)
    frac = (num - base * 2 * s) / (2.0 * s)
    base -= i0
    edge = (base < 0) | (base >= nc - 1)  # beyond the outermost lattice points: their value, no slope
    base = np.clip(base, 0, nc - 1)
    frac[edge] = 0.0
    lo, hi = -(k // 2), (k - 1) // 2
    i = np.arange(nc)
    count = np.minimum(i + hi, nc - 1) - np.maximum(i + lo, 0) + 1
    return i0, nc, base.astype(np.intp), frac.astype(np.float32), count.astype(np.float64)


def _make_lattice(shape: tuple[int, int], origin: tuple[int, int], window_px: int) -> _Lattice:
    s, k = _lattice_step(window_px)
    h, w = shape
    i0, hc, rb, rf, rn = _axis_lattice(h, origin[0], s, k)
    j0, wc, cb, cf, cn = _axis_lattice(w, origin[1], s, k)
    return _Lattice(s, k, h, w, origin[0], origin[1], i0, j0, hc, wc, rb, rf, cb, cf, rn, cn)


def _box_valid(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Sums of ``k`` consecutive entries along ``axis`` where all k lie in the array (n - k + 1 of them), added in
    a fixed order: the same sums wherever the array was cut."""
    n = a.shape[axis] - k + 1
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(0, n)
    out = a[tuple(idx)].copy()
    for o in range(1, k):
        idx[axis] = slice(o, o + n)
        out += a[tuple(idx)]
    return out


def _cell_sums(lat: _Lattice, cells: np.ndarray, common: np.ndarray, x2: np.ndarray, y2: np.ndarray,
               cx: np.ndarray, cy: np.ndarray, out: np.ndarray, pad: int, width: int) -> None:
    """Per lattice cell, the count of common pixels and their sums of x, y, x^2 and xy (centred on cx, cy), into
    the rows of ``out`` (cells, 1 + 4 G): cell (i, j) at row (i + pad) * width + j + pad."""
    s, h, w = lat.s, lat.h, lat.w
    g = x2.shape[0]
    u = np.arange(s)
    common_ext = np.append(common, False)  # the sentinel h * w stands for the pixels of a cell beyond the array
    cx32, cy32 = cx.astype(np.float32)[:, None], cy.astype(np.float32)[:, None]
    for a0 in range(0, cells.size, _CELL_CHUNK):
        chunk = cells[a0:a0 + _CELL_CHUNK]
        ci, cj = np.divmod(chunk, lat.wc)
        rows = (ci + lat.i0)[:, None] * s - lat.oy + u  # (n, s) pixel rows of each cell
        cols = (cj + lat.j0)[:, None] * s - lat.ox + u
        slots = rows[:, :, None] * w + cols[:, None, :]
        slots[((rows < 0) | (rows >= h))[:, :, None] | ((cols < 0) | (cols >= w))[:, None, :]] = h * w
        slots = slots.reshape(-1)
        sel = np.flatnonzero(np.take(common_ext, slots))
        if not sel.size:
            continue
        pix = slots[sel]
        cid = sel // (s * s)
        starts = np.flatnonzero(np.diff(cid, prepend=-1))
        place = (ci[cid[starts]] + pad) * width + cj[cid[starts]] + pad
        xc = np.take(x2, pix, axis=1)
        xc -= cx32
        yc = np.take(y2, pix, axis=1)
        yc -= cy32
        q = np.empty((4, g, pix.size), dtype=np.float32)
        q[0], q[1] = xc, yc
        np.multiply(xc, xc, out=q[2])
        np.multiply(xc, yc, out=q[3])
        out[place, 0] = np.diff(np.append(starts, pix.size))
        # in a fixed order within a cell: a block and the whole image sum a cell identically
        out[place, 1:] = np.add.reduceat(q.reshape(4 * g, -1), starts, axis=1, dtype=np.float64).T


def _local_fill(x2: np.ndarray, y2: np.ndarray, common: np.ndarray, a_g: np.ndarray, b_g: np.ndarray,
                cfg: FillConfig, moments: tuple[Sequence[float], Sequence[float], Sequence[float]] | None,
                idx: np.ndarray, lat: _Lattice) -> np.ndarray:
    """The fill date ``x2`` (C, N) harmonized by the local fit onto ``y2`` at the flat pixels ``idx``: (C, K) float32.

    ``common`` (N,) marks the pixels clear in both. ``moments``: per band, the means of x and y and the variance of
    x over the common pixels of a larger area (the centre and spread of the prior's pseudo-pixels), so the fit
    does not depend on how the area is cut; None: this array's common pixels.

    Only the lattice tiles (``_TILE`` x ``_TILE`` lattice points) that hold a point the interpolation reads are
    fitted, and only the cells their windows cover are summed: an old date filling a few scattered holes costs
    little.
    """
    c = x2.shape[0]
    if moments is None:
        ci = np.flatnonzero(common)
        cx, cy, gvx = np.empty(c), np.empty(c), np.empty(c)
        for b in range(c):
            xs = x2[b, ci].astype(np.float64)
            cx[b], cy[b] = xs.mean(), y2[b, ci].astype(np.float64).mean()
            gvx[b] = ((xs - cx[b]) ** 2).mean()
    else:
        cx, cy, gvx = (np.asarray(m, dtype=np.float64) for m in moments)
    # pixels are centred in float32 (keeps var = E[x^2] - E[x]^2 free of cancellation); the centres as used
    xc0, yc0 = cx.astype(np.float32).astype(np.float64), cy.astype(np.float32).astype(np.float64)
    k = lat.k
    lo, hi = -(k // 2), (k - 1) // 2
    t = _TILE if k <= 4 else 2 * _TILE
    rr, cc = np.divmod(idx, lat.w)
    bi, bj = lat.rb[rr], lat.cb[cc]
    fx, fy = lat.cf[cc], lat.rf[rr]
    # the lattice points the interpolation reads: each pixel's base point and the next ones down and right
    need = np.zeros((lat.hc, lat.wc), dtype=bool)
    need.reshape(-1)[bi * lat.wc + bj] = True
    need[1:] |= need[:-1].copy()
    need[:, 1:] |= need[:, :-1].copy()
    nty, ntx = -(-lat.hc // t), -(-lat.wc // t)
    tiled = np.zeros((nty * t, ntx * t), dtype=bool)
    tiled[:lat.hc, :lat.wc] = need
    tiles = np.flatnonzero(tiled.reshape(nty, t, ntx, t).any(axis=(1, 3)))
    tile_no = np.full(nty * ntx, -1, dtype=np.intp)
    tile_no[tiles] = np.arange(tiles.size)
    # every tile averages the coefficients of points [t0 + lo, t0 + t + 1 + hi) (one more for the patches), whose
    # windows sum the cells of [t0 + 2 lo, t0 + t + 1 + 2 hi): the cells of need dilated so far are summed
    pad = -2 * lo
    span = t + 1 + 2 * (hi - lo)
    hp, wp = nty * t + span - t, ntx * t + span - t
    cells = np.flatnonzero(_spread(_spread(need, -2 * hi, -2 * lo, 0), -2 * hi, -2 * lo, 1))
    ty, tx = np.divmod(tiles, ntx)
    rows = ty[:, None] * t + np.arange(span)  # padded rows of each tile's cells
    cols = tx[:, None] * t + np.arange(span)
    # rows[:, j] = t0 + j is the padded place of a tile's j-th cell row; its j-th window is centred on lattice row
    # t0 + j + lo, its j-th averaged point is lattice row t0 + j
    win_r, win_c = rows[:, :span - k + 1] + lo, cols[:, :span - k + 1] + lo
    exists = (((win_r >= 0) & (win_r < lat.hc))[:, :, None, None] & ((win_c >= 0) & (win_c < lat.wc))[:, None, :, None])
    avg_r, avg_c = rows[:, :t + 1], cols[:, :t + 1]
    n_all = (np.where(avg_r < lat.hc, lat.rn[np.minimum(avg_r, lat.hc - 1)], 1.0)[:, :, None]
             * np.where(avg_c < lat.wc, lat.cn[np.minimum(avg_c, lat.wc - 1)], 1.0)[:, None, :])
    pos = tile_no[(bi // t) * ntx + bj // t] * (t * t) + (bi % t) * t + bj % t

    out = np.empty((c, idx.size), dtype=np.float32)
    group = max(1, min(c, _COARSE_BUDGET // (hp * wp * 4 * 8)))
    n0 = cfg.prior_pixels
    for g0 in range(0, c, group):
        bands = slice(g0, min(c, g0 + group))
        g = bands.stop - bands.start
        sums = np.zeros((hp * wp, 1 + 4 * g))
        _cell_sums(lat, cells, common, x2[bands], y2[bands], cx[bands], cy[bands], sums, pad, wp)
        sums = sums.reshape(hp, wp, 1 + 4 * g)
        ag, gv = a_g[bands], gvx[bands]
        # the prior's moments are the global line's, so an empty window reproduces the global fit exactly
        g_mx = cx[bands] - xc0[bands]
        g_my = a_g[bands] * cx[bands] + b_g[bands] - yc0[bands]
        g_vx, g_cxy = gv, ag * gv
        patch = np.empty((tiles.size, t, t, 4, 2 * g), dtype=np.float32)
        for a0 in range(0, tiles.size, _TILE_CHUNK):
            part = slice(a0, a0 + _TILE_CHUNK)
            win = sums[rows[part, :, None], cols[part, None, :]]  # (n, span, span, 1 + 4g)
            win = _box_valid(_box_valid(win, k, 1), k, 2)
            n = win[..., :1]  # whole numbers: sums of counts
            enough = n >= cfg.window_min_pixels
            n = np.where(enough, n, 0.0)
            sx, sy, sxx, sxy = (win[..., 1 + j * g:1 + (j + 1) * g] * enough for j in range(4))
            if n0 > 0:
                tot = n + n0
                mx = (sx + n0 * g_mx) / tot
                my = (sy + n0 * g_my) / tot
                vx = (sxx + n0 * (g_vx + g_mx * g_mx)) / tot - mx * mx
                cxy = (sxy + n0 * (g_cxy + g_mx * g_my)) / tot - mx * my
            else:
                safe = np.maximum(n, 1.0)
                mx, my = sx / safe, sy / safe
                vx = sxx / safe - mx * mx
                cxy = sxy / safe - mx * my
            a = np.where(vx > cfg.min_variance, cxy / np.maximum(vx, 1e-30), ag).clip(cfg.gain_min, cfg.gain_max)
            b = my - a * mx
            if n0 <= 0:  # no prior: windows without common pixels take the global line outright
                a = np.where(n > 0, a, ag)
                b = np.where(n > 0, b, g_my)
            # guided-filter step 2: the coefficients of every window around a lattice point, averaged; windows
            # centred beyond the array count for nothing (no block edges)
            ab = np.concatenate([a, b], axis=-1) * exists[part]
            ab = _box_valid(_box_valid(ab, k, 1), k, 2) / n_all[part, :, :, None]
            ab[..., g:] += yc0[bands] - ab[..., :g] * xc0[bands]  # y = a x + b' in uncentred units
            v = ab.astype(np.float32)
            # bilinear patches between lattice points: value = c0 + fx c1 + fy (c2 + fx c3)
            p = patch[part]
            p[..., 0, :] = v[:, :t, :t]
            np.subtract(v[:, :t, 1:], v[:, :t, :t], out=p[..., 1, :])
            np.subtract(v[:, 1:, :t], v[:, :t, :t], out=p[..., 2, :])
            np.subtract(v[:, 1:, 1:], v[:, 1:, :t], out=p[..., 3, :])
            p[..., 3, :] -= p[..., 1, :]
        patch = patch.reshape(-1, 4, 2 * g)
        xg = x2[bands]
        for p0 in range(0, idx.size, _PIXEL_CHUNK):
            sl = slice(p0, p0 + _PIXEL_CHUNK)
            wx, wy = fx[sl], fy[sl]
            wts = np.stack([np.ones_like(wx), wx, wy, wx * wy], axis=1)
            coef = np.einsum("kq,kqc->ck", wts, np.take(patch, pos[sl], axis=0))
            out[bands, sl] = coef[:g] * np.take(xg, idx[sl], axis=1) + coef[g:]
    return out


def _fit_date(src: np.ndarray, src_ok: np.ndarray, dst: np.ndarray, dst_ok: np.ndarray, cfg: FillConfig,
              local: bool, idx: np.ndarray | None = None, lat: _Lattice | None = None,
              classes: bool = False) -> _Fit | None:
    common = (src_ok & dst_ok).reshape(-1)
    n = int(common.sum())
    if n < cfg.min_common_pixels:
        return None
    c = src.shape[0]
    at = np.flatnonzero(common)
    xs = np.take(src.reshape(c, -1), at, axis=1).astype(np.float64)
    ys = np.take(dst.reshape(c, -1), at, axis=1).astype(np.float64)
    if _correlation(xs, ys) < cfg.min_correlation:
        return None
    a, b = _global_fit(xs, ys, cfg)
    by_class = _class_offsets(xs, ys, a, b, cfg) if classes else None
    if not local or idx is None or lat is None:
        return _Fit("global", n, a, b, classes=by_class)
    moments = (xs.mean(axis=1), ys.mean(axis=1), xs.var(axis=1))
    x2, y2 = src.reshape(c, -1), dst.reshape(c, -1)
    values = _local_fill_by_class(x2, y2, common, a, b, _residual_spread(xs, ys, a, b), cfg, moments, idx, lat,
                                  by_class)
    return _Fit("local", n, a, b, values=values, classes=by_class)


def _local_fill_by_class(x2: np.ndarray, y2: np.ndarray, common: np.ndarray, a: np.ndarray, b: np.ndarray,
                         spread: Sequence[float] | np.ndarray | None, cfg: FillConfig,
                         moments: tuple[Sequence[float], Sequence[float], Sequence[float]] | None, idx: np.ndarray,
                         lat: _Lattice, classes: ClassOffsets | None) -> np.ndarray:
    """The local fit at ``idx`` (C, K), fitted to the target minus the class offsets, which are then added back:
    windows near clear pixels follow their own fit, and where none reaches the class's change remains."""
    if classes is not None:
        at = np.flatnonzero(common)
        y2 = y2.astype(np.float32, copy=True)
        y2[:, at] -= classes.at(np.take(x2, at, axis=1))
    points = _window_points(x2, y2, common, a, b, spread, cfg)
    values = _local_fill(x2, y2, points, a, b, cfg, moments, idx, lat)
    if classes is not None:
        values += classes.at(np.take(x2, idx, axis=1))
    return values


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Median over bands of the Pearson correlation of (C, N) x and y; bands without spread count as correlated
    (a flat band says nothing about change)."""
    dx, dy = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
    vx, vy = np.einsum("ij,ij->i", dx, dx), np.einsum("ij,ij->i", dy, dy)
    flat = (vx <= 1e-12) | (vy <= 1e-12)
    r = np.where(flat, 1.0, np.einsum("ij,ij->i", dx, dy) / np.sqrt(np.maximum(vx * vy, 1e-30)))
    return float(np.median(r))


def _why_not_direct(src: np.ndarray, src_ok: np.ndarray, dst: np.ndarray, dst_ok: np.ndarray,
                    cfg: FillConfig) -> str:
    common = src_ok & dst_ok
    n = int(common.sum())
    if n < cfg.min_common_pixels:
        return (f"{n} pixels clear in both this date and the target, fewer than "
                f"min_common_pixels={cfg.min_common_pixels}")
    r = _correlation(src[:, common].astype(np.float64), dst[:, common].astype(np.float64))
    return (f"the surface changed between this date and the target (median band correlation {r:.2f} on their {n} "
            f"common clear pixels, below min_correlation={cfg.min_correlation})")


def _harmonize(ages: Sequence[float], stack: Sequence[np.ndarray], usable: Sequence[np.ndarray], i: int,
               target: np.ndarray, fit_pixels: np.ndarray, cfg: FillConfig, idx: np.ndarray | None = None,
               lat: _Lattice | None = None) -> _Fit:
    """How fill date ``i`` is mapped onto the target: local/global fit, chained fit, or the identity. The local
    fit is evaluated at the flat pixels ``idx`` only."""
    c = target.shape[0]
    if cfg.fit == "none":
        return _Fit("none", int((usable[i] & fit_pixels).sum()), np.ones(c), np.zeros(c))
    direct = _fit_date(stack[i], usable[i], target, fit_pixels, cfg, cfg.fit == "local", idx, lat, classes=True)
    if direct is not None:
        return direct
    reason = _why_not_direct(stack[i], usable[i], target, fit_pixels, cfg)
    # chain through the intermediate that shares the most clear pixels with the target
    order = sorted((j for j in range(len(stack)) if j != i), key=lambda j: -int((usable[j] & fit_pixels).sum()))
    for j in order:
        second = _fit_date(stack[j], usable[j], target, fit_pixels, cfg, local=False)
        if second is None:
            break  # sorted by overlap with the target: no later intermediate fits either
        first = _fit_date(stack[i], usable[i], stack[j], usable[j], cfg, local=False)
        if first is not None:
            gain = second.gain * first.gain
            offset = second.gain * first.offset + second.offset
            return _Fit("chained", int((usable[i] & fit_pixels).sum()), gain, offset, via_age=ages[j], reason=reason)
    common = usable[i] & fit_pixels
    fit = _Fit("identity", int(common.sum()), np.ones(c), np.zeros(c), reason=reason)
    if cfg.fit == "local" and idx is not None and lat is not None and fit.common >= 2:
        # no line fits the whole date (changed surface, or few common pixels), but windows that share clear pixels
        # still follow their own fit, shrunk towards the identity: on the flooded demo date +0.12 dB over the bare
        # identity on the hidden pixels, the fill taking up water next to observed water
        xs, ys = stack[i][:, common].astype(np.float64), target[:, common].astype(np.float64)
        moments = (xs.mean(axis=1), ys.mean(axis=1), xs.var(axis=1))
        fit.values = _local_fill(stack[i].reshape(c, -1), target.reshape(c, -1), common.reshape(-1), fit.gain,
                                 fit.offset, cfg, moments, idx, lat)
    return fit


def _apply(fit: _Fit, x2: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The harmonized fill date at the flat pixels ``idx``: (C, K) float32."""
    if fit.values is not None:
        return fit.values
    xs = np.take(x2, idx, axis=1)
    out = fit.gain.astype(np.float32)[:, None] * xs + fit.offset.astype(np.float32)[:, None]
    if fit.classes is not None:
        out += fit.classes.at(xs)
    return out


def _note(age: float, fit: _Fit, pixels: int) -> dict[str, Any]:
    note: dict[str, Any] = {
        "age_days": float(age),
        "harmonization": fit.kind,
        "filled_pixels": pixels,
        "common_clear_pixels": fit.common,
        "gain": [round(float(v), 4) for v in fit.gain],
        "offset": [round(float(v), 5) for v in fit.offset],
    }
    if fit.via_age is not None:
        note["via_age_days"] = float(fit.via_age)
    if fit.reason is not None:
        note["not_fitted_directly"] = fit.reason
    if fit.kind == "identity":
        note["warning"] = "no fit possible, directly or via another date: radiometry copied as is"

        if fit.values is not None:
            note["local_fit"] = "windows sharing clear pixels with the target follow their own fit around the identity"
    elif fit.kind == "local":
        note["gain_offset"] = "the date's global fit; the local (moving-window) fit varies around it"
    if fit.classes is not None:
        note["class_offsets"] = {"classes": int(fit.classes.offset.shape[0]),
                                 "largest": round(float(np.abs(fit.classes.offset).max()), 5)}
    return note


def history_usable(refl: np.ndarray, clear: np.ndarray, config: FillConfig) -> np.ndarray:
    """Where a history date may be a source: clear, every band finite, ``history_buffer_px`` away from the rest."""
    ok = np.asarray(clear, dtype=bool) & np.isfinite(refl).all(axis=0)
    return ok & ~_dilate(~ok, config.history_buffer_px) if config.history_buffer_px else ok


def fill_reach(clear: np.ndarray, config: FillConfig) -> np.ndarray:
    """Every pixel ``fill_gaps`` may change for a target with this clear mask (clear and finite): the hidden
    pixels (within ``buffer_px`` of the not-clear ones), their feather ring and the ring of the missed-shadow check."""
    return _dilate(~np.asarray(clear, dtype=bool), config.buffer_px + config.feather_px + 1 + config.shadow_check_px)


def target_fit_pixels(target: np.ndarray, clear: np.ndarray, config: FillConfig) -> np.ndarray:
    """The target pixels a fit may use: clear, every band finite, ``buffer_px`` away from the rest."""
    ok = np.asarray(clear, dtype=bool) & np.isfinite(target).all(axis=0)
    return ok & ~_dilate(~ok, config.buffer_px)


def fit_date(index: int, ages: Sequence[float], refl: Sequence[np.ndarray], usable: Sequence[np.ndarray],
             target: np.ndarray, fit_pixels: np.ndarray, config: FillConfig | None = None) -> DateFit:
    """The global fit of history date ``index`` onto the target (direct, chained through another date, or the
    identity), as ``fill_gaps`` fits it, for ``fill_gaps(fits=...)``.

    ``refl``/``usable`` (``history_usable``) and ``fit_pixels`` (``target_fit_pixels``) describe the history on one
    grid, typically a decimated sample of a whole AOI; they may be lazy sequences: only the date itself is read,
    plus every date's ``usable`` mask and the intermediates tried when it shares too few clear pixels with the
    target.
    """
    cfg = config or FillConfig()
    if cfg.fit == "local":  # the local part is fitted by each block around this global line
        cfg = cfg.model_copy(update={"fit": "global"})
    target = np.asarray(target, dtype=np.float32)
    fit = _harmonize(list(ages), refl, usable, index, target, fit_pixels, cfg)
    moments = spread = None
    if fit.kind == "global" or (fit.kind == "identity" and fit.common >= 2):
        common = usable[index] & fit_pixels
        xs, ys = refl[index][:, common].astype(np.float64), target[:, common].astype(np.float64)
        moments = (tuple(float(v) for v in xs.mean(axis=1)), tuple(float(v) for v in ys.mean(axis=1)),
                   tuple(float(v) for v in xs.var(axis=1)))
        if fit.kind == "global":  # an identity is no line: its windows keep every common pixel
            spread = tuple(float(v) for v in _residual_spread(xs, ys, fit.gain, fit.offset))
    return DateFit(fit.kind, fit.common, tuple(float(v) for v in fit.gain), tuple(float(v) for v in fit.offset),
                   fit.via_age, fit.reason, moments, spread, fit.classes)


def _given_fit(given: DateFit, x: np.ndarray, x_ok: np.ndarray, target: np.ndarray, fit_pixels: np.ndarray,
               cfg: FillConfig, idx: np.ndarray, lat: _Lattice | None) -> _Fit:
    """A precomputed global fit, with this window's local fit around it where the config asks for one."""
    gain, offset = np.asarray(given.gain, dtype=np.float64), np.asarray(given.offset, dtype=np.float64)
    if cfg.fit == "local" and given.kind in ("global", "identity") and given.moments is not None and lat is not None:
        common = x_ok & fit_pixels
        if common.any():
            c = x.shape[0]
            x2, y2 = x.reshape(c, -1), target.reshape(c, -1)
            values = _local_fill_by_class(x2, y2, common.reshape(-1), gain, offset, given.spread, cfg, given.moments,
                                          idx, lat, given.classes)
            kind = "local" if given.kind == "global" else given.kind
            return _Fit(kind, int(common.sum()), gain, offset, reason=given.reason, values=values,
                        classes=given.classes)
    return _Fit(given.kind, given.common, gain, offset, via_age=given.via_age, reason=given.reason,
                classes=given.classes)


def fill_gaps(target: np.ndarray, clear: np.ndarray, history: History, config: FillConfig | None = None, *,
              fits: Mapping[float, DateFit] | None = None, origin: tuple[int, int] = (0, 0),
              shadow_bands: Sequence[int] | None = None, ground_change: GroundChange | None = None) -> FillResult:
    """Fill the pixels the target date does not see clearly from earlier clear dates, harmonized to the target.

    ``target`` is the target date's reflectance (C, H, W) with NaN nodata, ``clear`` its clear mask (H, W);
    ``history`` holds ``(age_days, reflectance (C, H, W), clear (H, W))`` of earlier dates on the same grid, in any
    order (age = days before the target, > 0). A pixel is never filled from a date whose mask does not call it
    clear; dates clear beyond ``history_buffer_px`` from their mask's clouds are preferred.

    ``fits`` (by age): global fits computed beforehand for a larger area (``fit_date``), used instead of fitting
    each date's global line on these pixels; the local fit, where configured, is still fitted here around it.
    ``origin``: (row, col) of this array's first pixel in the AOI it is cut from. The local fit's lattice is
    anchored there, so blocks of an AOI fill as the whole AOI would (pass it with ``fits``).
    ``shadow_bands``: indices of blue, green, red, NIR and SWIR1 in the bands (``shadow_bands()``); with them and
    ``shadow_check_px`` > 0, clear pixels near the mask's clouds that are darker than their own history as a shadow
    is are filled too (``FillResult.missed_shadow``): the fill runs once to estimate them from the history, with
    that ring hidden, and once more with the missed shadows hidden. ``ground_change``: S1 near the target and the
    history dates; a flagged pixel whose S1 changed by more than ``shadow_sar_change_db`` stays observed
    (``FillResult.shadow_kept_by_sar``). With ``shadow_sar_change_db`` set and no S1 near the target the check
    does not run (``FillResult.shadow_check`` "no S1").
    """
    cfg = config or FillConfig()
    if not cfg.shadow_check_px or shadow_bands is None:
        return _fill(target, clear, history, cfg, fits, origin)
    if len(shadow_bands) != len(SHADOW_BANDS):
        raise DataError(f"fill_gaps: shadow_bands {list(shadow_bands)} must give the indices of "
                        f"{', '.join(SHADOW_BANDS)}; see pipeline.harmonize.shadow_bands")
    status = "optical"
    if cfg.shadow_sar_change_db is not None:
        status = "optical+S1" if ground_change is not None else "no S1"
    values, t_clear = _check_pair(target, clear, "target", None)
    near = t_clear & _dilate(~t_clear, cfg.shadow_check_px)
    if not near.any() or status == "no S1":
        res = _fill(target, clear, history, cfg, fits, origin)
        res.shadow_check = status
        return res
    probe = _fill(target, t_clear & ~near, history, cfg, fits, origin)
    missed = near & (probe.provenance == PROVENANCE_FILLED)
    missed &= _darker_than_history(values, probe.image, shadow_bands, cfg)
    kept = None
    if status == "optical+S1" and missed.any():
        assert ground_change is not None and cfg.shadow_sar_change_db is not None
        now = ground_change.near_target()
        if not now:
            res = _fill(target, clear, history, cfg, fits, origin)
            res.shadow_check = "no S1"
            return res
        kept = missed & _ground_changed(now, ground_change, probe.source_age_days, missed, cfg.shadow_sar_change_db)
        missed &= ~kept
    res = _fill(target, t_clear & ~missed, history, cfg, fits, origin)
    res.missed_shadow = missed
    res.shadow_kept_by_sar = kept
    res.shadow_check = status
    return res


# S1's change test averages this many pixels a side (in linear power): ~100 looks on GRD, so speckle moves the
# difference of two dates by ~0.6 dB (1 sigma) against the 2 dB threshold
SAR_CHANGE_WINDOW_PX = 5


def _smoothed_db(db: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    lin = np.power(10.0, np.asarray(db, dtype=np.float64) / 10.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.stack([10.0 * np.log10(ndimage.uniform_filter(b, SAR_CHANGE_WINDOW_PX, mode="nearest"))
                        for b in lin])
    return out


def _ground_changed(now: Sequence[np.ndarray], change: GroundChange, ages: np.ndarray, where: np.ndarray,
                    threshold_db: float) -> np.ndarray:
    """Where S1 changed by more than ``threshold_db`` (any band, any S1 near the target) between each pixel's
    history date (``ages``) and the target; a pixel without S1 on either side counts as changed, so it stays as
    observed (the check's default before it existed)."""
    changed = np.zeros(where.shape, bool)
    now_db = [_smoothed_db(x) for x in now]
    # history dates whose nearest S1 is the same array smooth it once (the array is kept, so its id stays its own)
    smoothed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for age in np.unique(ages[where]):
        sel = where & (ages == age)
        before = change.near_history(float(age))
        if before is None:
            changed |= sel
            continue
        if id(before) not in smoothed:
            smoothed[id(before)] = (before, _smoothed_db(before))
        then = smoothed[id(before)][1]
        for n in now_db:
            if n.shape != then.shape:
                raise DataError(f"fill_gaps: S1 near the target has shape {n.shape} but S1 near the date "
                                f"{age:g} days before it has {then.shape}; both must be on the fill's grid")
            with np.errstate(invalid="ignore"):
                moved = ~(np.abs(n - then) <= threshold_db).all(axis=0)  # NaN (no S1 there) counts as changed
            # the mean blurs a change's edge over half its window: the pixels there count as changed too (else
            # speckle lets single edge pixels of a flood through, and their fill's buffer and feather spread)
            changed |= sel & _dilate(moved, SAR_CHANGE_WINDOW_PX // 2)
    return changed


def _darker_than_history(observed: np.ndarray, history: np.ndarray, bands: Sequence[int],
                         cfg: FillConfig) -> np.ndarray:
    """Observed / history estimate below ``shadow_visible_max`` in blue, green and red and below
    ``shadow_infrared_max`` in NIR and SWIR1 (NaN, or a history too dark to divide by, is never a shadow)."""
    b = list(bands)
    est = history[b]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(est > SHADOW_MIN_REFLECTANCE, observed[b] / est, np.nan)
    with np.errstate(invalid="ignore"):
        return (ratio[:3].max(axis=0) < cfg.shadow_visible_max) & (ratio[3:].max(axis=0) < cfg.shadow_infrared_max)


def _fill(target: np.ndarray, clear: np.ndarray, history: History, cfg: FillConfig,
          fits: Mapping[float, DateFit] | None, origin: tuple[int, int]) -> FillResult:
    """``fill_gaps`` without the shadow check."""
    target, t_clear = _check_pair(target, clear, "target", None)
    entries = []
    for k, (age, refl, ok) in enumerate(history):
        if not np.isfinite(age) or age <= 0:
            raise DataError(f"fill_gaps: history entry {k} has age_days={age}; ages are days before the target, > 0")
        refl, ok = _check_pair(refl, ok, f"history entry {k} (age {age} d)", target.shape)
        if age <= cfg.max_age_days:
            entries.append((float(age), refl, ok))
    entries.sort(key=lambda e: e[0])
    ages = [e[0] for e in entries]
    stack = [e[1] for e in entries]
    usable = [ok & ~_dilate(~ok, cfg.history_buffer_px) if cfg.history_buffer_px else ok for _, _, ok in entries]

    c, h, w = target.shape
    # the most recent usable date of every pixel (not only hidden ones: the feather ring needs it too); int16 while
    # it can be, so that the stable sort of the dates' pixels below is a radix sort
    source = np.full((h, w), -1, dtype=np.int16 if len(stack) < 2**15 else np.int32)
    for i in range(len(stack) - 1, -1, -1):
        np.copyto(source, i, where=usable[i])
    near_fringe = None
    if cfg.history_buffer_fallback and cfg.history_buffer_px:
        # a pixel clear only next to a cloud on every date: its mask still calls it clear, better than no value
        near_fringe = np.zeros((h, w), dtype=bool)
        for i in range(len(stack) - 1, -1, -1):
            take = (source < 0) & entries[i][2]
            near_fringe |= take
            np.copyto(source, i, where=take)
    hidden = _dilate(~t_clear, cfg.buffer_px)
    # the buffer ring is clear by the target's mask: with nothing to fill it from, the observation is kept
    hidden &= ~(t_clear & (source < 0))
    observed = ~hidden
    if cfg.feather_px > 0 and hidden.any():
        weight = _feather(hidden, cfg.feather_px)
    else:
        weight = hidden.astype(np.float32)
    weight[source < 0] = 0.0
    touched = np.flatnonzero(weight > 0)

    flat_hidden = hidden.reshape(-1)
    image = target.copy()
    image2 = image.reshape(c, -1)
    image2[:, np.flatnonzero(flat_hidden & (source.reshape(-1) < 0))] = np.nan
    provenance = np.where(observed, PROVENANCE_OBSERVED, PROVENANCE_NO_CLEAR).astype(np.uint8)
    age_map = np.where(observed, 0, AGE_NONE).astype(np.int16)
    notes: list[dict[str, Any]] = []
    by_date = np.argsort(source.reshape(-1)[touched], kind="stable")  # pixels of each date, in raster order
    bounds = np.searchsorted(source.reshape(-1)[touched[by_date]], np.arange(len(stack) + 1))
    lat = _make_lattice((h, w), origin, cfg.window_px) if cfg.fit == "local" else None
    for i in range(len(stack)):
        idx = touched[by_date[bounds[i]:bounds[i + 1]]]
        if not idx.size:
            continue
        if fits is not None and ages[i] in fits and cfg.fit != "none":
            fit = _given_fit(fits[ages[i]], stack[i], usable[i], target, observed & t_clear, cfg, idx, lat)
        else:
            fit = _harmonize(ages, stack, usable, i, target, observed & t_clear, cfg, idx, lat)
        fill = _apply(fit, stack[i].reshape(c, -1), idx)
        inside = flat_hidden[idx]
        if not inside.all():  # the feather ring: blended with the observation
            ring = np.flatnonzero(~inside)
            wk = weight.reshape(-1)[idx[ring]]
            fill[:, ring] = wk * fill[:, ring] + (1 - wk) * np.take(image2, idx[ring], axis=1)
        image2[:, idx] = fill
        filled_here = idx[inside]
        provenance.reshape(-1)[filled_here] = PROVENANCE_FILLED
        age_map.reshape(-1)[filled_here] = int(round(ages[i]))
        note = _note(ages[i], fit, int(filled_here.size))
        fallback = int(near_fringe.reshape(-1)[filled_here].sum()) if near_fringe is not None else 0
        if fallback:
            note["pixels_within_history_buffer"] = fallback
        notes.append(note)

    unfilled = np.flatnonzero(provenance == PROVENANCE_NO_CLEAR)
    if unfilled.size:
        seen = np.isfinite(np.take(target.reshape(c, -1), unfilled, axis=1)).all(axis=0)
        for refl in stack:
            seen |= np.isfinite(np.take(refl.reshape(c, -1), unfilled, axis=1)).all(axis=0)
        provenance.reshape(-1)[unfilled[~seen]] = PROVENANCE_NODATA
    return FillResult(image, provenance, age_map, notes)
