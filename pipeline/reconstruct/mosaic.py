"""The lazy mosaic: windows of the AOI grid as model inputs.

``MosaicLoader`` holds only scene references and, asked for a window of the AOI grid, reads that window of
every scene (the source's own laziness applies), masks it with ``mask_scene``, mosaics scenes of the same
date (first clear, then first valid) and brings the result into the cube's units (``pipeline.normalize``).
``pipeline.train.samples.model_arrays`` then applies the input rule training applies (invalid optical -> 0 and
flagged, cloudy values kept and flagged, SAR without data refused), so the model sees what it was trained on.

``FillLoader`` does the same for the training-free fill (checkpoint ``composite``): a window's target date and
the history dates a hidden pixel may take its value from, read newest first until every pixel a fill can touch
has a clear source (each date read and masked once per window). ``SampleFits`` fits every history date's global
harmonization once for the whole AOI, on a decimated sample grid, so all blocks share it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping
from typing import Iterator, Sequence

import numpy as np

from models.spec import InputSpec
from pipeline.grid import Grid
from pipeline.harmonize import (
    DateFit,
    FillConfig,
    fill_reach,
    fit_date,
    history_usable,
    target_fit_pixels,
)
from pipeline.masking.codes import MaskClass, to_cube_codes
from pipeline.normalize import optical_to_unit, sar_to_unit
from pipeline.reconstruct.plan import InputPlan
from pipeline.reconstruct.tiling import BlockInputs, FillInputs
from pipeline.sensors import get_sensor
from pipeline.sources.base import Scene, Source
from pipeline.train.samples import model_arrays

log = logging.getLogger(__name__)

FIT_SAMPLE_SIDE = 256  # longest side of the AOI sample the global fits are computed on
# least-cloudy ranking of what a date saw at a pixel with no clear observation (lower is less cloudy)
_NOT_CLEAR_RANK = np.array([0, 3, 2, 255, 1, 0], dtype=np.uint8)  # clear, cloud, shadow, nodata, thin cloud, snow
_NO_RANK = 255


def mosaic_date(source: Source, scenes: Sequence[Scene], sub: Grid, bands: Sequence[str],
                mask_method: str) -> tuple[np.ndarray, np.ndarray]:
    """Mosaic of one date's scenes on ``sub``: (reflectance (C, h, w) NaN nodata, ``MaskClass`` codes (h, w)).

    The first clear observation wins; a not-clear one only fills pixels no scene has data for yet. Pixels
    without every band are NODATA.
    """
    from pipeline.masking.scene import mask_scene

    refl = np.full((len(bands), sub.height, sub.width), np.nan, np.float32)
    codes = np.full((sub.height, sub.width), MaskClass.NODATA, np.uint8)
    for i, sc in enumerate(scenes):
        da = source.read(sc, sub, None)
        m = np.asarray(mask_scene(da, sc, method=mask_method).values, dtype=np.uint8)
        vals = np.asarray(da.sel(band=list(bands)).values, dtype=np.float32)
        m = np.where(np.isfinite(vals).all(axis=0), m, MaskClass.NODATA).astype(np.uint8)
        if i == 0:  # nothing to mosaic with yet (and most dates have one scene)
            refl, codes = np.where(m == MaskClass.NODATA, np.float32(np.nan), vals), m
            continue
        clear, seen_clear = to_cube_codes(m) == MaskClass.CLEAR, to_cube_codes(codes) == MaskClass.CLEAR
        # first clear observation wins; a cloudy one only fills pixels no scene has seen yet
        take = (clear & ~seen_clear) | ((codes == MaskClass.NODATA) & (m != MaskClass.NODATA))
        refl[:, take] = vals[:, take]
        codes[take] = m[take]
    return refl, codes


def mosaic_sar(source: Source, scenes: Sequence[Scene], sub: Grid, bands: Sequence[str]) -> np.ndarray:
    """Mosaic of one SAR slot in dB (S, h, w), nearest scene first; NaN where no scene has data."""
    out = np.full((len(bands), sub.height, sub.width), np.nan, np.float32)
    for sc in scenes:
        missing = ~np.isfinite(out).all(axis=0)
        if not missing.any():
            break
        vals = np.asarray(source.read(sc, sub, list(bands)).values, dtype=np.float32)
        out[:, missing] = vals[:, missing]
    # nodata is NaN: clipping to [0, 1] would turn an infinite dB (the log of a zero) into valid backscatter
    out[~np.isfinite(out)] = np.nan
    return out


class MosaicLoader:
    """Windows of the AOI grid as model inputs (picklable: dask workers call it on their blocks)."""

    def __init__(self, source: Source, grid: Grid, plan: InputPlan, spec: InputSpec, *, mask_method: str,
                 need_observed: bool = False) -> None:
        self.source, self.grid, self.plan, self.spec = source, grid, plan, spec
        self.mask_method = mask_method
        self.need_observed = need_observed

    def _optical(self, scenes: Sequence[Scene], sub: Grid, bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Mosaic of one date: (reflectance (C, h, w) NaN nodata, cube mask codes (h, w))."""
        refl, codes = mosaic_date(self.source, scenes, sub, bands, self.mask_method)
        return refl, to_cube_codes(codes)

    def _sar(self, scenes: Sequence[Scene], sub: Grid) -> np.ndarray:
        return mosaic_sar(self.source, scenes, sub, self.spec.sar_bands)

    def _sar_slots(self, sub: Grid) -> list[np.ndarray]:
        """S1 in [0, 1] per SAR slot; slots sharing their scenes (an optical date that is D) share one array."""
        cache: dict[tuple[str, ...], np.ndarray] = {}
        slots = []
        for scenes in self.plan.sar_scenes:
            key = tuple(sc.id for sc in scenes)
            if key not in cache:
                cache[key] = sar_to_unit(self._sar(scenes, sub), self.spec.sar_bands, axis=0)
            slots.append(cache[key])
        return slots

    @staticmethod
    def _observed(refl: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The target date as observed (out bands, NaN nodata) and where it is clear, for ``keep_clear``."""
        observed = optical_to_unit(refl)
        observed[:, codes == MaskClass.NODATA] = np.nan
        return observed, codes == MaskClass.CLEAR

    def __call__(self, r0: int, r1: int, c0: int, c1: int) -> BlockInputs:
        sub = self.grid.window(r0, c0, r1 - r0, c1 - c0)
        spec, plan = self.spec, self.plan
        bands = tuple(dict.fromkeys(spec.optical_bands + spec.out_bands))
        optical, codes, any_valid = [], [], np.zeros(sub.shape, bool)
        observed = observed_clear = None
        for d, scenes in zip(plan.optical_dates, plan.optical_scenes):
            refl, c = self._optical(scenes, sub, bands)
            optical.append(optical_to_unit(refl[[bands.index(b) for b in spec.optical_bands]]))
            codes.append(c)
            any_valid |= c != MaskClass.NODATA
            if d == plan.target_date:
                observed, observed_clear = self._observed(refl[[bands.index(b) for b in spec.out_bands]], c)
        if observed is None and self.need_observed and plan.target_scenes:
            observed, observed_clear = self._observed(*self._optical(plan.target_scenes, sub, spec.out_bands))
        sar = self._sar_slots(sub) if spec.sar_bands else []
        labels = [f"the S1 for {d} ({', '.join(sc.id for sc in scenes)})"
                  for d, scenes in zip(plan.sar_dates, plan.sar_scenes)]
        arrays = model_arrays(
            optical, codes, sar, where=f"AOI rows {r0}-{r1}, cols {c0}-{c1}", sar_labels=labels,
            sar_fix="the model cannot run without SAR there - raise --sar-max-days or use a smaller AOI inside the "
                    "S1 swath")
        # SAR sees through clouds: with it every pixel has an input
        nodata = np.zeros(sub.shape, bool) if spec.sar_bands else ~any_valid
        return BlockInputs(arrays, nodata, observed, observed_clear)


# --- the training-free fill ---------------------------------------------------------------------------------


class FillLoader:
    """A window's inputs of ``fill_gaps`` (picklable: dask workers call it on their blocks).

    History dates are read newest first and kept only when some pixel a fill can touch (within the target's
    not-clear mask dilated by ``buffer_px + feather_px + 1 + shadow_check_px``, ``fill_reach``) takes its value
    from them: the most recent date clear beyond ``history_buffer_px`` there, or, while none is, the most recent
    date clear at all (the fill's fallback). Reading stops once every such pixel has its date, so ``fill_gaps`` on
    the kept dates gives what it gives on the whole history, with memory for the dates used only. A date is always
    read and masked on the whole window, even when few pixels still wait: a mask computed on a smaller cut loses
    the clouds whose shadows fall inside it (shadow projection reaches kilometres), and the fill would then take
    shadowed pixels as clear.
    """

    def __init__(self, source: Source, grid: Grid, plan: InputPlan, *, mask_method: str, fill: FillConfig,
                 least_cloudy: bool = False, sar_bands: Sequence[str] = (), sar_max_days: int = 6) -> None:
        self.source, self.grid, self.plan = source, grid, plan
        self.sar_max_days = sar_max_days
        self.mask_method, self.fill, self.least_cloudy = mask_method, fill, least_cloudy
        # S1 of the target date (plan.sar_scenes[-1]) for a refine model that reads it, in [0, 1]
        self.sar_bands = tuple(sar_bands)
        self.bands = get_sensor(plan.optical_sensor).reflectance_bands
        # newest first: (age in days, scenes)
        self.history = [((plan.target_date - d).days, scenes)
                        for d, scenes in zip(plan.optical_dates, plan.optical_scenes) if d < plan.target_date][::-1]

    def date(self, scenes: Sequence[Scene], sub: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One date on ``sub``: reflectance in [0, 1] (C, h, w) NaN nodata, ``MaskClass`` codes, clear mask."""
        refl, codes = mosaic_date(self.source, scenes, sub, self.bands, self.mask_method)
        refl = optical_to_unit(refl)
        clear = (to_cube_codes(codes) == MaskClass.CLEAR) & np.isfinite(refl).all(axis=0)
        return refl, codes, clear

    def __call__(self, r0: int, r1: int, c0: int, c1: int) -> FillInputs:
        sub = self.grid.window(r0, c0, r1 - r0, c1 - c0)
        cfg = self.fill
        target, t_codes, t_clear = self.date(self.plan.target_scenes, sub)
        seen = np.isfinite(target).all(axis=0)
        need = fill_reach(t_clear, cfg)
        has_usable = np.zeros(sub.shape, bool)
        has_clear = np.zeros(sub.shape, bool)
        least = _Least(target, t_codes, seen) if self.least_cloudy else None
        history: list[tuple[float, np.ndarray, np.ndarray]] = []
        read = 0
        for age, scenes in self.history:
            waiting = need & ~has_usable
            if age > cfg.max_age_days or not waiting.any():
                break
            log.debug("fill window rows %d-%d cols %d-%d: %d px wait for a clear date; reading %d days before",
                      r0, r1, c0, c1, int(waiting.sum()), age)
            refl, codes, clear = self.date(scenes, sub)
            read += 1
            valid = np.isfinite(refl).all(axis=0)
            seen |= valid
            usable = history_usable(refl, clear, cfg)
            keep = bool((waiting & usable).any())
            if cfg.history_buffer_fallback and not keep:
                keep = bool((waiting & clear & ~has_clear).any())
            has_usable |= usable
            has_clear |= clear
            if least is not None:
                least.update(refl, codes, valid, age)
            if keep:
                history.append((float(age), refl, clear))
        sar = None
        if self.sar_bands:
            sar = sar_to_unit(mosaic_sar(self.source, self.plan.sar_scenes[-1], sub, self.sar_bands), self.sar_bands,
                              axis=0)
        change = None
        if self.plan.change_sar and cfg.shadow_check_px and cfg.shadow_sar_change_db is not None:
            change = SarGroundChange(self.source, sub, self.plan, self.sar_max_days)
        return FillInputs(target, t_clear, history, seen, read,
                          None if least is None else (least.value, least.age), sar=sar, ground_change=change)


class SarGroundChange:
    """``harmonize.GroundChange`` read from the plan's S1 (``plan.change_sar``) on a window, only when the shadow
    check asks: near the target, the nearest S1 date before it and the nearest on or after it (S1 from before the
    target cannot see a flood that arrived since; the run checks one on or after it exists, ``shadow_check_status``);
    near a history date, the nearest S1 date."""

    def __init__(self, source: Source, sub: Grid, plan: InputPlan, max_days: int) -> None:
        self.source, self.sub, self.plan, self.max_days = source, sub, plan, max_days
        self._read: dict[dt.date, np.ndarray] = {}

    def _mosaic(self, day: dt.date) -> np.ndarray:
        if day not in self._read:
            scenes = dict(self.plan.change_sar)[day]
            self._read[day] = mosaic_sar(self.source, scenes, self.sub, self.plan.change_sar_bands)
        return self._read[day]

    def _within(self, day: dt.date) -> list[dt.date]:
        return [d for d, _ in self.plan.change_sar if abs((d - day).days) <= self.max_days]

    def near_target(self) -> list[np.ndarray]:
        t = self.plan.target_date
        near = self._within(t)
        picks = [max((d for d in near if d < t), default=None), min((d for d in near if d >= t), default=None)]
        return [self._mosaic(d) for d in picks if d is not None]

    def near_history(self, age_days: float) -> np.ndarray | None:
        day = self.plan.target_date - dt.timedelta(days=int(round(age_days)))
        near = self._within(day)
        if not near:
            return None
        return self._mosaic(min(near, key=lambda d: (abs((d - day).days), d)))


class _Least:
    """Per pixel, the least cloudy value any date read has (the most recent among equals), for class-3 pixels."""

    def __init__(self, target: np.ndarray, codes: np.ndarray, valid: np.ndarray) -> None:
        self.rank = np.where(valid, _NOT_CLEAR_RANK[codes], _NO_RANK).astype(np.uint8)
        self.value = np.where(valid[None], target, np.nan).astype(np.float32)
        self.age = np.where(valid, 0, -1).astype(np.int16)

    def update(self, refl: np.ndarray, codes: np.ndarray, valid: np.ndarray, age: int) -> None:
        rank = np.where(valid, _NOT_CLEAR_RANK[codes], _NO_RANK)
        better = rank < self.rank
        self.rank[better] = rank[better]
        self.value[:, better] = refl[:, better]
        self.age[better] = age


class _LazyDates(Sequence[np.ndarray]):
    """The sample's history dates (``what``: reflectance or usable mask), read on first access."""

    def __init__(self, owner: "SampleFits", what: str) -> None:
        self.owner, self.what = owner, what

    def __len__(self) -> int:
        return len(self.owner.ages)

    def __getitem__(self, j: int) -> np.ndarray:  # type: ignore[override]  # fit_date never slices
        refl, usable = self.owner.history_date(j)
        return refl if self.what == "refl" else usable


class SampleFits(Mapping[float, DateFit]):
    """Every history date's global fit onto the target for the whole AOI (by age in days), computed on a sample
    grid decimated to at most ``max_side`` px a side when first asked for, and kept.

    Only dates some block fills from are read (plus, for a date sharing too few clear pixels with the target,
    the masks of all dates and the intermediates tried), so the sample costs a small share of the blocks' reads.
    Buffers shrink with the decimation; the fits are deterministic, so dask workers that each compute their own
    copy agree.
    """

    def __init__(self, loader: FillLoader, max_side: int = FIT_SAMPLE_SIDE) -> None:
        grid = loader.grid
        self.factor = max(1, math.ceil(max(grid.width, grid.height) / max_side))
        f = self.factor
        self.grid = Grid(grid.crs, grid.transform @ grid.transform.scale(f), math.ceil(grid.width / f),
                         math.ceil(grid.height / f))
        self.loader = loader
        cfg = loader.fill
        self.fill = cfg.model_copy(update={"buffer_px": math.ceil(cfg.buffer_px / f),
                                           "history_buffer_px": math.ceil(cfg.history_buffer_px / f),
                                           "shadow_check_px": math.ceil(cfg.shadow_check_px / f)})
        dated = sorted(loader.history)  # oldest last after sort by age: ages ascending, as fill_gaps orders them
        self.ages = [float(age) for age, _ in dated]
        self._scenes = [scenes for _, scenes in dated]
        self._target: tuple[np.ndarray, np.ndarray] | None = None
        self._dates: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._fits: dict[float, DateFit] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_target": None, "_dates": {}}  # workers read their own sample, not the client's

    def target(self) -> tuple[np.ndarray, np.ndarray]:
        if self._target is None:
            refl, _, clear = self.loader.date(self.loader.plan.target_scenes, self.grid)
            self._target = (refl, target_fit_pixels(refl, clear, self.fill))
        return self._target

    def history_date(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        if j not in self._dates:
            refl, _, clear = self.loader.date(self._scenes[j], self.grid)
            self._dates[j] = (refl, history_usable(refl, clear, self.fill))
        return self._dates[j]

    def __getitem__(self, age: float) -> DateFit:
        if age not in self._fits:
            if age not in self.ages:
                raise KeyError(age)
            target, fit_pixels = self.target()
            self._fits[age] = fit_date(self.ages.index(age), self.ages, _LazyDates(self, "refl"),
                                       _LazyDates(self, "usable"), target, fit_pixels, self.fill)
        return self._fits[age]

    def __contains__(self, age: object) -> bool:
        return age in self.ages

    def __iter__(self) -> Iterator[float]:
        return iter(self.ages)

    def __len__(self) -> int:
        return len(self.ages)

    def computed(self) -> dict[float, DateFit]:
        """The fits computed so far in this process."""
        return dict(self._fits)
