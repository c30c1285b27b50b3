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
back smoothly to the global fit. Fill dates that share too few clear pixels with the target are chained
through an intermediate date; when nothing can be fitted the identity is used and said so in the notes.

Cloud masks miss the semi-transparent fringe of a cloud, so the target's not-clear mask is dilated by
``buffer_px`` before deciding what is hidden (a ring pixel with nothing to fill it from keeps its
observation), and each history date's clear mask is eroded by ``history_buffer_px`` before it may be used as
a source (a pixel clear only next to clouds on every date falls back to the unbuffered mask, and the notes
count it). On real Sentinel-2 a cloud's fringe spoils pixels several px beyond the s2cloudless mask (see the
fringe profile of bench/harmonize_real.py). The fill is feathered over ``feather_px`` pixels into the
observed side of the border, so no seam shows; observed pixels farther away are returned exactly.

Outputs (``FillResult``): the image (C, H, W) float32 with NaN where nothing could be filled, a uint8
provenance code per pixel (``PROVENANCE_*``), the age in days of the date each pixel came from (int16: 0
observed, -1 none) and per-date notes (how each fill date was harmonized) for the output metadata.

An AOI processed block by block (``pipeline.reconstruct.run``) fits each date's global line once for the whole
AOI (``fit_date`` on a decimated sample) and hands it to every block (``fill_gaps(fits=...)``): fits of
neighbouring blocks would otherwise differ and show as a step at the block border inside a large cloud.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import DataError

# scipy.ndimage is imported where it is used: ``FillConfig`` is part of ``ReconstructConfig``, which the CLI builds
# before any work, and ndimage alone costs a third of a second to import.

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
        365, ge=1, le=32767,
        description="Look back at most this many days for a clear observation; older pixels stay NaN (provenance 3).",
    )
    fit: Literal["local", "global", "none"] = Field(
        "local",
        description="Radiometric harmonization of each fill date: local (moving window shrunk towards the global "
        "fit), global (one gain/offset per band and date) or none (copy reflectance as is).",
    )
    window_px: int = Field(
        15, ge=3, description="Side of the moving window of the local fit, in pixels (odd values centre it).",
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

    @model_validator(mode="after")
    def _gains(self) -> "FillConfig":
        if self.gain_min > self.gain_max:
            raise ValueError(f"gain_min={self.gain_min} is above gain_max={self.gain_max}; swap them")
        return self


@dataclass
class FillResult:
    image: np.ndarray  # (C, H, W) float32, NaN where nothing was filled
    provenance: np.ndarray  # (H, W) uint8 PROVENANCE_* codes
    source_age_days: np.ndarray  # (H, W) int16: 0 observed, age of the fill date, AGE_NONE for none
    notes: list[dict[str, Any]] = field(default_factory=list)  # one per fill date used, oldest last


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
    # a direct fit's common pixels: per band the date's mean, the target's mean and the date's variance (the local
    # fit's prior is centred on them, so every block shrinks its windows towards the same pseudo-pixels)
    moments: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None = None


@dataclass
class _Fit:
    kind: str  # local | global | chained | identity | none
    common: int
    gain: np.ndarray  # (C,) global (or composed) gain
    offset: np.ndarray  # (C,)
    via_age: float | None = None
    local: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # a, b maps (C,H,W), x and y centres


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0 or not mask.any():
        return mask.copy()
    from scipy import ndimage

    return ndimage.binary_dilation(mask, structure=_disk(radius))


def _box_sum(x: np.ndarray, size: int) -> np.ndarray:
    from scipy import ndimage

    # uniform_filter accumulates in double; constant mode makes edge windows count only pixels inside the image
    return ndimage.uniform_filter(x, size=size, mode="constant") * float(size * size)


def _check_pair(refl: np.ndarray, clear: np.ndarray, what: str,
                shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    refl = np.asarray(refl, dtype=np.float32)
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
    keep = np.ones(x.shape, dtype=bool)
    for attempt in range(2):
        n = keep.sum(axis=1).clip(min=1)
        mx = np.where(keep, x, 0).sum(axis=1) / n
        my = np.where(keep, y, 0).sum(axis=1) / n
        dx, dy = np.where(keep, x - mx[:, None], 0), np.where(keep, y - my[:, None], 0)
        vx = (dx * dx).sum(axis=1) / n
        cxy = (dx * dy).sum(axis=1) / n
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


def _local_fit(x: np.ndarray, y: np.ndarray, common: np.ndarray, a_g: np.ndarray, b_g: np.ndarray,
               cfg: FillConfig, moments: tuple[Sequence[float], Sequence[float], Sequence[float]] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gain and offset maps (C, H, W) of the window fits, in coordinates centred on the common-pixel means.

    ``moments``: per band, the means of x and y and the variance of x over the common pixels of a larger area
    (the centre and spread of the prior's pseudo-pixels), so the fit does not depend on how the area is cut.
    """
    size = cfg.window_px
    m = common.astype(np.float64)
    # counts rounded: the running sums of a box filter drift by ~1e-13 with where a row starts, which would flip
    # the window_min_pixels test (and so the fit) between a block and the whole image
    n = np.rint(_box_sum(m, size))
    enough = n >= cfg.window_min_pixels
    n = np.where(enough, n, 0.0)
    n_all = np.rint(_box_sum(np.ones_like(m), size))
    c = x.shape[0]
    a_map = np.empty(x.shape, dtype=np.float32)
    b_map = np.empty(x.shape, dtype=np.float32)
    cx = np.empty(c)
    cy = np.empty(c)
    for k in range(c):
        if moments is None:
            xs, ys = x[k][common].astype(np.float64), y[k][common].astype(np.float64)
            cx[k], cy[k] = xs.mean(), ys.mean()
            gvx = float(((xs - cx[k]) ** 2).mean())
        else:
            cx[k], cy[k], gvx = moments[0][k], moments[1][k], float(moments[2][k])
        # centring first keeps var = E[x^2] - E[x]^2 free of cancellation
        xc = np.where(common, x[k] - cx[k], 0.0)
        yc = np.where(common, y[k] - cy[k], 0.0)
        # the prior's moments are the global line's, so an empty window reproduces the global fit exactly
        g_mx = 0.0
        g_my = a_g[k] * cx[k] + b_g[k] - cy[k]
        g_vx, g_cxy = gvx, a_g[k] * gvx
        n0 = cfg.prior_pixels
        tot = n + n0
        sx = np.where(enough, _box_sum(xc, size), 0.0)
        sy = np.where(enough, _box_sum(yc, size), 0.0)
        sxx = np.where(enough, _box_sum(xc * xc, size), 0.0)
        sxy = np.where(enough, _box_sum(xc * yc, size), 0.0)
        if n0 > 0:
            mx = (sx + n0 * g_mx) / tot
            my = (sy + n0 * g_my) / tot
            vx = (sxx + n0 * (g_vx + g_mx * g_mx)) / tot - mx * mx
            cxy = (sxy + n0 * (g_cxy + g_mx * g_my)) / tot - mx * my
        else:
            safe = np.maximum(n, 1.0)
            mx, my = sx / safe, sy / safe
            vx = sxx / safe - mx * mx
            cxy = sxy / safe - mx * my
        a = np.where(vx > cfg.min_variance, cxy / np.maximum(vx, 1e-30), a_g[k]).clip(cfg.gain_min, cfg.gain_max)
        b = my - a * mx
        if n0 <= 0:  # no prior: windows without common pixels take the global line outright
            a = np.where(n > 0, a, a_g[k])
            b = np.where(n > 0, b, g_my)
        # guided-filter step 2: average the coefficients of every window covering a pixel (no block edges)
        a_map[k] = _box_sum(a, size) / n_all
        b_map[k] = _box_sum(b, size) / n_all
    return a_map, b_map, cx.astype(np.float32), cy.astype(np.float32)


def _fit_date(src: np.ndarray, src_ok: np.ndarray, dst: np.ndarray, dst_ok: np.ndarray, cfg: FillConfig,
              local: bool) -> _Fit | None:
    common = src_ok & dst_ok
    n = int(common.sum())
    if n < cfg.min_common_pixels:
        return None
    a, b = _global_fit(src[:, common].astype(np.float64), dst[:, common].astype(np.float64), cfg)
    if not local:
        return _Fit("global", n, a, b)
    return _Fit("local", n, a, b, local=_local_fit(src, dst, common, a, b, cfg))


def _harmonize(ages: Sequence[float], stack: Sequence[np.ndarray], usable: Sequence[np.ndarray], i: int,
               target: np.ndarray, fit_pixels: np.ndarray, cfg: FillConfig) -> _Fit:
    """How fill date ``i`` is mapped onto the target: local/global fit, chained fit, or the identity."""
    c = target.shape[0]
    if cfg.fit == "none":
        return _Fit("none", int((usable[i] & fit_pixels).sum()), np.ones(c), np.zeros(c))
    direct = _fit_date(stack[i], usable[i], target, fit_pixels, cfg, local=cfg.fit == "local")
    if direct is not None:
        return direct
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
            return _Fit("chained", int((usable[i] & fit_pixels).sum()), gain, offset, via_age=ages[j])
    return _Fit("identity", int((usable[i] & fit_pixels).sum()), np.ones(c), np.zeros(c))


def _apply(fit: _Fit, x: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The harmonized fill date at ``where`` pixels: (C, K) float32."""
    xs = x[:, where]
    if fit.local is not None:
        a, b, cx, cy = fit.local
        return a[:, where] * (xs - cx[:, None]) + b[:, where] + cy[:, None]
    return (fit.gain[:, None] * xs + fit.offset[:, None]).astype(np.float32)


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
    if fit.kind == "identity":
        note["warning"] = ("too few pixels clear in both this date and the target (directly or via another date): "
                           "radiometry copied as is")
    elif fit.kind == "local":
        note["gain_offset"] = "the date's global fit; the local (moving-window) fit varies around it"
    return note


def history_usable(refl: np.ndarray, clear: np.ndarray, config: FillConfig) -> np.ndarray:
    """Where a history date may be a source: clear, every band finite, ``history_buffer_px`` away from the rest."""
    ok = np.asarray(clear, dtype=bool) & np.isfinite(refl).all(axis=0)
    return ok & ~_dilate(~ok, config.history_buffer_px) if config.history_buffer_px else ok


def fill_reach(clear: np.ndarray, config: FillConfig) -> np.ndarray:
    """Every pixel ``fill_gaps`` may change for a target with this clear mask (clear and finite): the hidden
    pixels (within ``buffer_px`` of the not-clear ones) and their feather ring."""
    return _dilate(~np.asarray(clear, dtype=bool), config.buffer_px + config.feather_px + 1)


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
    moments = None
    if fit.kind == "global":
        common = usable[index] & fit_pixels
        xs, ys = refl[index][:, common].astype(np.float64), target[:, common].astype(np.float64)
        moments = (tuple(float(v) for v in xs.mean(axis=1)), tuple(float(v) for v in ys.mean(axis=1)),
                   tuple(float(v) for v in xs.var(axis=1)))
    return DateFit(fit.kind, fit.common, tuple(float(v) for v in fit.gain), tuple(float(v) for v in fit.offset),
                   fit.via_age, moments)


def _given_fit(given: DateFit, x: np.ndarray, x_ok: np.ndarray, target: np.ndarray, fit_pixels: np.ndarray,
               cfg: FillConfig) -> _Fit:
    """A precomputed global fit, with this window's local fit around it where the config asks for one."""
    gain, offset = np.asarray(given.gain, dtype=np.float64), np.asarray(given.offset, dtype=np.float64)
    if cfg.fit == "local" and given.kind == "global":
        common = x_ok & fit_pixels
        if common.any():
            return _Fit("local", int(common.sum()), gain, offset,
                        local=_local_fit(x, target, common, gain, offset, cfg, given.moments))
    return _Fit(given.kind, given.common, gain, offset, via_age=given.via_age)


def fill_gaps(target: np.ndarray, clear: np.ndarray, history: History, config: FillConfig | None = None, *,
              fits: Mapping[float, DateFit] | None = None) -> FillResult:
    """Fill the pixels the target date does not see clearly from earlier clear dates, harmonized to the target.

    ``target`` is the target date's reflectance (C, H, W) with NaN nodata, ``clear`` its clear mask (H, W);
    ``history`` holds ``(age_days, reflectance (C, H, W), clear (H, W))`` of earlier dates on the same grid, in any
    order (age = days before the target, > 0). A pixel is never filled from a date whose mask does not call it
    clear; dates clear beyond ``history_buffer_px`` from their mask's clouds are preferred.

    ``fits`` (by age): global fits computed beforehand for a larger area (``fit_date``), used instead of fitting
    each date's global line on these pixels; the local fit, where configured, is still fitted here around it.
    """
    cfg = config or FillConfig()
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

    h, w = t_clear.shape
    # the most recent usable date of every pixel (not only hidden ones: the feather ring needs it too)
    source = np.full((h, w), -1, dtype=np.int32)
    for i in range(len(stack) - 1, -1, -1):
        source[usable[i]] = i
    near_fringe = np.zeros((h, w), dtype=bool)
    if cfg.history_buffer_fallback and cfg.history_buffer_px:
        # a pixel clear only next to a cloud on every date: its mask still calls it clear, better than no value
        for i in range(len(stack) - 1, -1, -1):
            take = (source < 0) & entries[i][2]
            near_fringe |= take
            source[take] = i
        near_fringe &= source >= 0
    hidden = _dilate(~t_clear, cfg.buffer_px)
    # the buffer ring is clear by the target's mask: with nothing to fill it from, the observation is kept
    hidden &= ~(t_clear & (source < 0))
    observed = ~hidden
    if cfg.feather_px > 0 and hidden.any():
        from scipy import ndimage

        dist = ndimage.distance_transform_edt(observed)
        weight = np.where(hidden, 1.0, np.clip(1.0 - dist / (cfg.feather_px + 1), 0.0, 1.0)).astype(np.float32)
    else:
        weight = hidden.astype(np.float32)
    weight[source < 0] = 0.0
    touched = weight > 0

    image = np.where(observed[None], target, np.nan).astype(np.float32)
    provenance = np.where(observed, PROVENANCE_OBSERVED, PROVENANCE_NO_CLEAR).astype(np.uint8)
    age_map = np.where(observed, 0, AGE_NONE).astype(np.int16)
    notes: list[dict[str, Any]] = []
    for i in range(len(stack)):
        where = touched & (source == i)
        if not where.any():
            continue
        if fits is not None and ages[i] in fits and cfg.fit != "none":
            fit = _given_fit(fits[ages[i]], stack[i], usable[i], target, observed & t_clear, cfg)
        else:
            fit = _harmonize(ages, stack, usable, i, target, observed & t_clear, cfg)
        fill = _apply(fit, stack[i], where)
        wk = weight[where]
        obs = image[:, where]
        image[:, where] = np.where(hidden[where], fill, wk * fill + (1 - wk) * obs)
        filled_here = where & hidden
        provenance[filled_here] = PROVENANCE_FILLED
        age_map[filled_here] = int(round(ages[i]))
        note = _note(ages[i], fit, int(filled_here.sum()))
        fallback = int((filled_here & near_fringe).sum())
        if fallback:
            note["pixels_within_history_buffer"] = fallback
        notes.append(note)

    seen = np.isfinite(target).all(axis=0)
    for refl in stack:
        seen |= np.isfinite(refl).all(axis=0)
    provenance[(provenance == PROVENANCE_NO_CLEAR) & ~seen] = PROVENANCE_NODATA
    return FillResult(image, provenance, age_map, notes)
