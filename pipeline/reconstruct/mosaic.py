"""The lazy mosaic: windows of the AOI grid as model inputs.

``MosaicLoader`` holds only scene references and, asked for a window of the AOI grid, reads that window of
every scene (the source's own laziness applies), masks it with ``mask_scene``, mosaics scenes of the same
date (first clear, then first valid) and brings the result into the cube's units (``pipeline.normalize``).
``pipeline.train.samples.model_arrays`` then applies the input rule training applies (invalid optical -> 0 and
flagged, cloudy values kept and flagged, SAR without data refused), so the model sees what it was trained on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from models.spec import InputSpec
from pipeline.grid import Grid
from pipeline.masking.codes import MaskClass, to_cube_codes
from pipeline.normalize import optical_to_unit, sar_to_unit
from pipeline.reconstruct.plan import InputPlan
from pipeline.reconstruct.tiling import BlockInputs
from pipeline.sources.base import Scene, Source
from pipeline.train.samples import model_arrays


class MosaicLoader:
    """Windows of the AOI grid as model inputs (picklable: dask workers call it on their blocks)."""

    def __init__(self, source: Source, grid: Grid, plan: InputPlan, spec: InputSpec, *, mask_method: str,
                 need_observed: bool = False) -> None:
        self.source, self.grid, self.plan, self.spec = source, grid, plan, spec
        self.mask_method = mask_method
        self.need_observed = need_observed

    def _optical(self, scenes: Sequence[Scene], sub: Grid, bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Mosaic of one date: (reflectance (C, h, w) NaN nodata, cube mask codes (h, w))."""
        from pipeline.masking.scene import mask_scene

        refl = np.full((len(bands), sub.height, sub.width), np.nan, np.float32)
        codes = np.full((sub.height, sub.width), MaskClass.NODATA, np.uint8)
        for sc in scenes:
            da = self.source.read(sc, sub, None)
            m = to_cube_codes(np.asarray(mask_scene(da, sc, method=self.mask_method).values))
            vals = np.asarray(da.sel(band=list(bands)).values, dtype=np.float32)
            m = np.where(np.isfinite(vals).all(axis=0), m, MaskClass.NODATA).astype(np.uint8)
            # first clear observation wins; a cloudy one only fills pixels no scene has seen yet
            take = ((m == MaskClass.CLEAR) & (codes != MaskClass.CLEAR)) | (
                (codes == MaskClass.NODATA) & (m != MaskClass.NODATA))
            refl[:, take] = vals[:, take]
            codes[take] = m[take]
        return refl, codes

    def _sar(self, scenes: Sequence[Scene], sub: Grid) -> np.ndarray:
        """Mosaic of one SAR slot in dB (S, h, w), nearest scene first; NaN where no scene has data."""
        out = np.full((len(self.spec.sar_bands), sub.height, sub.width), np.nan, np.float32)
        for sc in scenes:
            missing = ~np.isfinite(out).all(axis=0)
            if not missing.any():
                break
            vals = np.asarray(self.source.read(sc, sub, list(self.spec.sar_bands)).values, dtype=np.float32)
            out[:, missing] = vals[:, missing]
        # nodata is NaN: clipping to [0, 1] would turn an infinite dB (the log of a zero) into valid backscatter
        out[~np.isfinite(out)] = np.nan
        return out

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
