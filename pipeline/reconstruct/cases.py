"""Truth-known reconstruction cases cut from a real archive: a clear date hidden under another date's real cloud.

``load_series`` reads every optical date of a region once onto the region's grid and masks it once with the
product's own mask (``mask_scene``, the method ``reconstruct`` uses), keeping pixels and masks in memory.
``build_cases`` picks the clear target dates (at most ``TARGET_MAX_NOT_CLEAR`` not clear, with at least
``MIN_EARLIER`` earlier dates) and the cloudy donor dates (``DONOR_NOT_CLEAR`` not clear); every case pastes a
donor's not-clear pixels (its real cloud: pixels, spectra and QA bands, hence its mask) onto a target, whose
original pixels are the truth. The persistent-cloud variant also pastes real clouds onto the K dates before
the target (weeks of cloud: the disaster case). ``CaseSource`` then serves one case through the ``Source``
protocol: the pasted dates instead of the archive's, every date after the target (and before the region's
window) hidden, the rest delegated, so the method under test runs exactly the code path a user runs.
``remask`` masks the pasted dates as the product will (a pasted cloud is not masked exactly as on its own
date), so a method's use of each pixel can be checked against the mask it should have respected.

A source that knows its truth (the synthetic archive's ``truth(scene, grid)``) adds the ``simulator`` variant:
each cloudy date as it is, nothing pasted, scored against the simulator's cloud-free truth of that overpass on
the pixels its true mask calls cloud, thin cloud or shadow (``simulated_case``) - the demo date, say. Its truth
also gives every case, pasted or not, the target date's flood and land cover water (``Truth``,
``with_truth_layers``) for the benchmark's flood-aware scores.

``archive_region`` turns a local archive without a region into one (the first scene's footprint, the archive's
date range and sensor families).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np

from pipeline.errors import CloudfreeError, SourceError
from pipeline.grid import Grid
from pipeline.masking.codes import MaskClass, is_contaminated
from pipeline.regions import SENSOR_FAMILIES, Region, parse_region
from pipeline.sensors import get_sensor
from pipeline.sources.base import Scene, Source, raster_attrs

if TYPE_CHECKING:
    import xarray as xr

TARGET_MAX_NOT_CLEAR = 0.02  # a target's own residual cloud would be scored as "observed" truth: keep it tiny
MIN_EARLIER = 2  # a target needs a history to be filled from
DONOR_NOT_CLEAR = (0.20, 0.90)  # a donor cloud hides enough to score, and leaves enough clear to harmonize on
PERSISTENT_MIN_NOT_CLEAR = 0.20  # clouds pasted onto the history; overcast dates too (they blot a date out)
PERSISTENT_K = 3
SIMULATED_MIN_HIDDEN = 0.05  # a simulator case scores a date whose true mask hides at least this share
MAX_SERIES_BYTES = 2 << 30  # the series is held in memory: a benchmark AOI is a few km, not a scene
_QA_UNITS = ("bitmask", "class")


class BenchmarkError(CloudfreeError):
    """The archive cannot give truth-known cases (too few dates, no clear target, no cloud to paste, too large)."""


# --- the archive as a series ------------------------------------------------------------------------------


@dataclass
class Series:
    """Every optical date of the region on its grid: pixels (all bands as read) and the product's mask."""

    region: Region
    grid: Grid
    source_name: str
    sensor: str  # the sensor key the dates are of (the one reconstruct's plan picks too)
    bands: tuple[str, ...]  # bands of ``refl``, as the source reads them
    dates: list[dt.date]
    scenes: list[list[Scene]]  # per date, the scenes mosaicked into it (first clear wins)
    refl: np.ndarray  # (T, C, H, W) float32, NaN nodata
    codes: np.ndarray  # (T, H, W) uint8 MaskClass
    mask_method: str

    @property
    def not_clear(self) -> list[float]:
        """Share of all pixels each date's mask does not call clear (cloud, thin cloud, shadow, nodata)."""
        return [float(is_contaminated(c).mean()) for c in self.codes]

    @property
    def reflectance_bands(self) -> tuple[str, ...]:
        spectral = get_sensor(self.sensor).reflectance_bands
        return tuple(b for b in self.bands if b in spectral)

    def index(self, day: dt.date) -> int | None:
        try:
            return self.dates.index(day)
        except ValueError:
            return None


def optical_family(region: Region) -> str:
    """The optical family a region's benchmark reads: Sentinel-2 when the region lists it, else Landsat."""
    for fam in ("s2", "landsat"):
        if fam in region.sensors:
            return fam
    raise BenchmarkError(
        f"region {region.name} lists sensors {list(region.sensors)}, none optical; the benchmark needs s2 or landsat "
        "dates - add one to the region's 'sensors'")


def _mosaic_date(source: Source, scenes: Sequence[Scene], grid: Grid, bands: Sequence[str] | None,
                 mask: Callable[[Any, Scene], np.ndarray]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One date's scenes on the grid, first clear observation winning (as ``MosaicLoader`` mosaics a date)."""
    refl: np.ndarray | None = None
    codes = np.full(grid.shape, MaskClass.NODATA, np.uint8)
    names: tuple[str, ...] = tuple(bands or ())
    for sc in scenes:
        raster = source.read(sc, grid, list(names) if names else None).load()
        names = tuple(str(b) for b in raster["band"].values)
        vals = np.asarray(raster.values, dtype=np.float32)
        m = mask(raster, sc)
        if refl is None:
            refl = np.full(vals.shape, np.nan, np.float32)
        first_clear = ~is_contaminated(m) & is_contaminated(codes)
        take = first_clear | ((codes == MaskClass.NODATA) & (m != MaskClass.NODATA))
        refl[:, take] = vals[:, take]
        codes[take] = m[take]
    assert refl is not None  # a date exists only with at least one scene
    return refl, codes, names


def load_series(region: Region, source: Source, *, mask_method: str = "auto",
                progress: Callable[[str], None] | None = None) -> Series:
    """Read and mask every optical date of ``region`` within its window, once; see the module docstring."""
    from pipeline.masking.scene import mask_scene

    family = optical_family(region)
    src_name = getattr(source, "name", type(source).__name__)
    found = source.search(region, region.window.start, region.window.end, family)
    grid = region.grid()
    if not found:
        raise BenchmarkError(
            f"the {src_name} source has no {family} scenes over region {region.name} between {region.window.start} "
            f"and {region.window.end}; the benchmark needs at least 2 dates - widen the window or pick another region")
    sensor = sorted({s.sensor for s in found})[0]  # reconstruct's plan keeps the first sensor key too
    by_date: dict[dt.date, list[Scene]] = {}
    for s in sorted((s for s in found if s.sensor == sensor), key=lambda s: (s.datetime, s.id)):
        by_date.setdefault(s.date, []).append(s)
    dates = sorted(by_date)
    if len(dates) < 2:
        raise BenchmarkError(
            f"the {src_name} archive has {len(dates)} {sensor} date(s) over region {region.name} "
            f"({', '.join(d.isoformat() for d in dates)}); the benchmark needs at least 2 (a clear target with earlier "
            "dates, and a cloudy date to paste) - widen the window or add dates to the archive")
    n_bands = len(get_sensor(sensor).band_names)
    size = len(dates) * n_bands * grid.width * grid.height * 4
    if size > MAX_SERIES_BYTES:
        raise BenchmarkError(
            f"region {region.name}: {len(dates)} dates x {n_bands} bands of {grid.width} x {grid.height} px would take "
            f"{size / 2**30:.1f} GiB in memory; the benchmark holds its series in memory - use a smaller bbox (a few "
            "km) or a shorter window")

    def mask(raster: xr.DataArray, scene: Scene) -> np.ndarray:
        return np.asarray(mask_scene(raster, scene, method=mask_method).values, dtype=np.uint8)

    refl, codes = [], []
    names: tuple[str, ...] | None = None
    for i, day in enumerate(dates):
        if progress is not None:
            progress(f"reading and masking {day} ({i + 1}/{len(dates)})")
        r, c, names = _mosaic_date(source, by_date[day], grid, names, mask)
        spectral = [names.index(b) for b in names if b in get_sensor(sensor).reflectance_bands]
        c[~np.isfinite(r[spectral]).all(axis=0)] = MaskClass.NODATA  # a pixel without every band is never clear
        refl.append(r)
        codes.append(c)
    assert names is not None
    return Series(region, grid, src_name, sensor, names, dates, [by_date[d] for d in dates], np.stack(refl),
                  np.stack(codes), mask_method)


# --- cases ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    """One case: the target date hidden under the donor's cloud; ``history`` pastes (date, donor) pairs too.
    A ``simulator`` case is the target under its own cloud (``donor == target``), scored on the simulator's truth."""

    variant: str  # "standard" | "persistent" | "simulator"
    target: int  # date indices into the series
    donor: int
    history: tuple[tuple[int, int], ...] = ()

    def name(self, series: Series) -> str:
        d = series.dates
        if self.variant == "simulator":
            return f"{d[self.target]} under its own cloud (simulator truth)"
        text = f"{d[self.target]} <- cloud {d[self.donor]}"
        if self.history:
            text += " + " + ", ".join(f"{d[j]:%m-%d}<-{d[p]:%m-%d}" for j, p in self.history)
        return text


def _shares(series: Series) -> str:
    return ", ".join(f"{d} {100 * s:.0f} %" for d, s in zip(series.dates, series.not_clear))


def case_dates(series: Series) -> tuple[list[int], list[int]]:
    """Clear target dates and cloudy donor dates, by the product's mask; one clear error line when either is empty."""
    share = series.not_clear
    targets = [t for t, s in enumerate(share) if s <= TARGET_MAX_NOT_CLEAR and t >= MIN_EARLIER]
    lo, hi = DONOR_NOT_CLEAR
    donors = [t for t, s in enumerate(share) if lo <= s <= hi]
    what = f"the {series.source_name} archive over region {series.region.name} ({len(share)} {series.sensor} dates)"
    if not targets:
        raise BenchmarkError(
            f"{what} has no clear target date: none is <= {100 * TARGET_MAX_NOT_CLEAR:.0f} % not clear by the "
            f"product's mask ({series.mask_method}) with >= {MIN_EARLIER} earlier dates (not clear: "
            f"{_shares(series)}); widen the window or pick a less cloudy season")
    if not [d for d in donors if any(d != t for t in targets)]:
        raise BenchmarkError(
            f"{what} has no cloudy date to paste: none is {100 * lo:.0f}..{100 * hi:.0f} % not clear by the product's "
            f"mask ({series.mask_method}) (not clear: {_shares(series)}); widen the window to take in a cloudy date")
    return targets, donors


def _subset(items: list[Any], n: int | None) -> list[Any]:
    """``n`` items spread evenly over the list (first and last included): deterministic and representative."""
    if n is None or n >= len(items):
        return items
    if n <= 0:
        return []
    idx = sorted(set(np.linspace(0, len(items) - 1, n).round().astype(int).tolist()))
    return [items[i] for i in idx]


def simulated_targets(series: Series, truth: Callable[[int], Truth] | None) -> list[int]:
    """Dates a ``simulator`` case can score: at least ``SIMULATED_MIN_HIDDEN`` hidden by the true mask, with at
    least ``MIN_EARLIER`` earlier dates (none without a truth)."""
    if truth is None:
        return []
    return [t for t in range(MIN_EARLIER, len(series.dates))
            if series.not_clear[t] >= SIMULATED_MIN_HIDDEN and truth(t).hidden.mean() >= SIMULATED_MIN_HIDDEN]


def build_cases(series: Series, persistent: int = PERSISTENT_K, max_cases: int | None = None,
                targets: Sequence[dt.date] | None = None, simulated: Sequence[int] = ()) -> list[CaseSpec]:
    """Every (clear target, cloudy donor) pair, standard and (``persistent`` > 0) persistent; see the module.

    ``targets`` limits the cases to those target dates (each must be a clear target date); ``max_cases`` keeps
    that many pairs, spread over the list, each run in every variant. Persistent donors for the
    ``persistent`` dates before the target are the dates >= ``PERSISTENT_MIN_NOT_CLEAR`` not clear other than the
    target, the pasted date and (where another exists) the target's donor, taken in turn from an offset given by
    the target's index, so neighbouring cases get different clouds. ``simulated`` (``simulated_targets``) adds a
    ``simulator`` case per date (``max_cases`` of them at most), for the dates in ``targets`` if given.
    """
    clear, donors = case_dates(series)
    if targets is not None:
        wrong = [day for day in targets if series.index(day) not in clear and series.index(day) not in simulated]
        if wrong:
            by_day = dict(zip(series.dates, series.not_clear))
            why = ", ".join(f"{day} ({100 * by_day[day]:.0f} % not clear)" if day in by_day else f"{day} (no date)"
                            for day in wrong)
            raise BenchmarkError(
                f"--target {why}: not a clear target date of the archive; use one of "
                f"{', '.join(series.dates[t].isoformat() for t in clear)} (<= {100 * TARGET_MAX_NOT_CLEAR:.0f} % "
                f"not clear with >= {MIN_EARLIER} earlier dates)"
                + (f", or a cloudy date the simulator's truth scores: "
                   f"{', '.join(series.dates[t].isoformat() for t in simulated)}" if simulated else ""))
        clear = [t for t in clear if series.dates[t] in set(targets)]
        simulated = [t for t in simulated if series.dates[t] in set(targets)]
    pairs = _subset([(t, d) for t in clear for d in donors if d != t], max_cases)
    share = series.not_clear
    overcast = [i for i, s in enumerate(share) if s >= PERSISTENT_MIN_NOT_CLEAR]
    out = [CaseSpec("standard", t, d) for t, d in pairs]
    if persistent > 0:
        for t, d in pairs:
            history = []
            for k, j in enumerate(range(t - 1, max(t - 1 - persistent, -1), -1)):
                pool = [p for p in overcast if p not in (t, j, d)] or [p for p in overcast if p not in (t, j)]
                if pool:
                    history.append((j, pool[(t + k) % len(pool)]))
            out.append(CaseSpec("persistent", t, d, tuple(history)))
    out += [CaseSpec("simulator", t, t) for t in _subset(list(simulated), max_cases)]
    return out


def paste(series: Series, onto: int, donor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``onto`` under ``donor``'s cloud: (pixels (C, H, W), mask codes (H, W), pasted (H, W) bool)."""
    pasted = is_contaminated(series.codes[donor])
    refl = np.where(pasted[None], series.refl[donor], series.refl[onto])
    codes = np.where(pasted, series.codes[donor], series.codes[onto]).astype(np.uint8)
    return refl, codes, pasted


@dataclass
class Case:
    """A case made concrete: the pasted dates, the truth and the pixels scored."""

    spec: CaseSpec
    series: Series
    truth: np.ndarray  # (C, H, W) the target as observed (all bands of the series)
    image: np.ndarray  # (C, H, W) the target under the donor's cloud
    hidden: np.ndarray  # (H, W) pixels scored as hidden: donor not clear, target clear
    pasted: dict[int, np.ndarray] = field(default_factory=dict)  # date index -> pasted pixels
    pasted_codes: dict[int, np.ndarray] = field(default_factory=dict)  # date index -> the donor's mask pasted in
    product_codes: dict[int, np.ndarray] = field(default_factory=dict)  # date index -> the product's mask of it
    flooded: np.ndarray | None = None  # (H, W) bool: the target date's flood, where the source knows its truth
    water: np.ndarray | None = None  # (H, W) bool: the target date's land cover water (standing or flooded), idem

    @property
    def target_date(self) -> dt.date:
        return self.series.dates[self.spec.target]

    def codes_on(self, i: int) -> np.ndarray:
        """Date ``i``'s mask as the case presents it: the donor's mask pasted in on the pasted dates (where the real
        cloud is), the series' mask elsewhere."""
        return self.pasted_codes.get(i, self.series.codes[i])

    def product_codes_on(self, i: int) -> np.ndarray:
        """Date ``i``'s mask as the product computes it: on a pasted date the mask of the pasted pixels (``remask``;
        a pasted cloud is not masked exactly as on its own date), the series' mask elsewhere."""
        return self.product_codes.get(i, self.series.codes[i])

    def raster(self, i: int, grid: Grid, bands: Sequence[str] | None = None) -> xr.DataArray:
        """Pasted date ``i`` on ``grid`` (a window of the series' grid, or warped onto another) as a source reads it."""
        import xarray as xr

        series = self.series
        names = tuple(series.bands) if bands is None else tuple(bands)
        scene = series.scenes[i][0]
        missing = [b for b in names if b not in series.bands]
        if missing:
            raise SourceError(f"scene {scene.id} has no band(s) {missing} in the benchmark's series; it has: "
                              f"{', '.join(series.bands)}")
        idx = [series.bands.index(b) for b in names]
        qa = [get_sensor(series.sensor).band(series.bands[k]).units in _QA_UNITS for k in idx]
        values = on_grid(self.pasted[i][idx], series.grid, grid, qa)
        attrs = raster_attrs(scene, grid, simulated=bool(scene.properties.get("simulated", False)))
        return xr.DataArray(values, dims=("band", "y", "x"), coords={"band": list(names), **grid.coords()},
                            attrs=attrs, name=scene.id)


def remask(case: Case) -> None:
    """The product's mask of every pasted date (``mask_scene`` on the pasted pixels, the series' method)."""
    from pipeline.masking.scene import mask_scene

    series = case.series
    for i in case.pasted:
        raster = case.raster(i, series.grid)
        codes = np.asarray(mask_scene(raster, series.scenes[i][0], method=series.mask_method).values, np.uint8)
        spectral = [series.bands.index(b) for b in series.reflectance_bands]
        codes[~np.isfinite(case.pasted[i][spectral]).all(axis=0)] = MaskClass.NODATA
        case.product_codes[i] = codes


# the true mask's classes a reconstruction is scored on: what the sensor did not see clearly
TRUE_HIDDEN = (MaskClass.CLOUD, MaskClass.THIN_CLOUD, MaskClass.SHADOW)


class Truth(NamedTuple):
    """What a source that knows its truth says of one date, laid out for the series."""

    values: np.ndarray  # (C, H, W) the cloud-free truth like ``series.refl``, NaN in bands it has no truth for
    hidden: np.ndarray  # (H, W) bool: its true mask calls cloud, thin cloud or shadow
    flooded: np.ndarray | None  # (H, W) bool: under the event's flood on that date (None: not known)
    water: np.ndarray | None  # (H, W) bool: land cover water, standing or flooded (None: not known)


def _water_classes(ds: xr.Dataset) -> list[int]:
    """Land cover codes named water or flooded in the truth's ``landcover_classes`` ("0 water, 1 urban, ...")."""
    codes = []
    for item in str(ds.attrs.get("landcover_classes", "")).split(","):
        code, _, name = item.strip().partition(" ")
        if code.isdigit() and name.strip() in ("water", "flooded"):
            codes.append(int(code))
    return codes


def _layer(ds: xr.Dataset, name: str) -> np.ndarray | None:
    return np.asarray(ds[name].values).astype(bool) if name in ds else None


def truth_reader(source: Source, series: Series) -> Callable[[int], Truth] | None:
    """For a source that knows its truth (``truth(scene, grid)``, the synthetic archive): date index -> its ``Truth``,
    computed once per date. None for any other source."""
    inner = getattr(source, "inner", source)  # SearchCache wraps the archive
    truth = getattr(inner, "truth", None)
    if not callable(truth):
        return None
    cache: dict[int, Truth] = {}

    def read(t: int) -> Truth:
        if t not in cache:
            ds = truth(series.scenes[t][0], series.grid)
            names = [str(b) for b in ds["clear"]["band"].values]
            values = np.full(series.refl[t].shape, np.nan, np.float32)
            for k, band in enumerate(series.bands):
                if band in names:
                    values[k] = ds["clear"].values[names.index(band)]
            mask = np.asarray(ds["mask"].values)
            hidden = np.isin(mask, TRUE_HIDDEN)
            classes = _water_classes(ds)
            water = np.isin(np.asarray(ds["landcover"].values), classes) if classes and "landcover" in ds else None
            cache[t] = Truth(values, hidden, _layer(ds, "flooded"), water)
        return cache[t]

    return read


def with_truth_layers(case: Case, truth: Callable[[int], Truth] | None) -> Case:
    """The case with its target date's flood and land cover water from the source's truth, where it has one."""
    if truth is not None:
        t = truth(case.spec.target)
        case.flooded, case.water = t.flooded, t.water
    return case


def make_simulated_case(series: Series, spec: CaseSpec, truth: Callable[[int], Truth]) -> Case:
    """A ``simulator`` case: the date as the archive has it, its truth from the simulator; nothing pasted."""
    t = truth(spec.target)
    values, hidden = t.values, t.hidden
    image = series.refl[spec.target]
    spectral = [series.bands.index(b) for b in series.reflectance_bands]
    hidden = hidden & np.isfinite(values[spectral]).all(axis=0) & np.isfinite(image[spectral]).all(axis=0)
    return with_truth_layers(Case(spec, series, values, image, hidden), truth)


def make_case(series: Series, spec: CaseSpec) -> Case:
    image, codes, pasted = paste(series, spec.target, spec.donor)
    hidden = pasted & ~is_contaminated(series.codes[spec.target])
    case = Case(spec, series, series.refl[spec.target], image, hidden, {spec.target: image},
                {spec.target: codes})
    for j, p in spec.history:
        refl_j, codes_j, _ = paste(series, j, p)
        case.pasted[j], case.pasted_codes[j] = refl_j, codes_j
    return case


# --- the case as a source ------------------------------------------------------------------------------------


def on_grid(values: np.ndarray, src: Grid, dst: Grid, qa: Sequence[bool]) -> np.ndarray:
    """(C, H, W) on ``src`` -> (C, h, w) on ``dst``: sliced (NaN beyond the edge) for a window of ``src``, else
    warped (nearest for QA bands, bilinear otherwise)."""
    a, e = src.transform.a, src.transform.e
    t = dst.transform
    col, row = (t.c - src.transform.c) / a, (t.f - src.transform.f) / e
    aligned = (dst.crs == src.crs and math.isclose(t.a, a) and math.isclose(t.e, e) and t.b == 0 and t.d == 0
               and abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6)
    out = np.full((values.shape[0], dst.height, dst.width), np.nan, np.float32)
    if aligned:
        r0, c0 = int(round(row)), int(round(col))
        rs, re_ = max(r0, 0), min(r0 + dst.height, src.height)
        cs, ce = max(c0, 0), min(c0 + dst.width, src.width)
        if rs < re_ and cs < ce:
            out[:, rs - r0:re_ - r0, cs - c0:ce - c0] = values[:, rs:re_, cs:ce]
        return out
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    for i in range(values.shape[0]):
        reproject(values[i], out[i], src_transform=src.transform, src_crs=src.crs, src_nodata=np.nan,
                  dst_transform=dst.transform, dst_crs=dst.crs, dst_nodata=np.nan,
                  resampling=Resampling.nearest if qa[i] else Resampling.bilinear)
    return out


class SearchCache:
    """The archive's ``search`` answered once per query: every case and method asks the same questions."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self._found: dict[tuple[Any, ...], list[Scene]] = {}
        listing = getattr(inner, "scenes", None)
        self.scenes: Callable[..., list[Scene]] | None = listing if callable(listing) else None

    def search(self, region: Region, start: dt.date, end: dt.date, sensor: str) -> list[Scene]:
        key = (region.name, region.bbox, region.geometry, start, end, sensor)
        if key not in self._found:
            self._found[key] = list(self.inner.search(region, start, end, sensor))
        return list(self._found[key])

    def read(self, scene: Scene, grid: Grid, bands: Sequence[str] | None = None) -> xr.DataArray:
        return self.inner.read(scene, grid, bands)


class CaseSource:
    """One case through the ``Source`` protocol: pasted dates served from memory, later optical dates hidden.

    Each pasted date is served as its first scene (the others of that date are hidden, since the series holds
    the date's mosaic); every other scene is the archive's own, read through the wrapped source. The archive is
    the region's window: optical dates before it are hidden too, so every date a method may use is one whose
    mask the benchmark knows (and a source without end, synthetic or Earth Engine, is not read back a year).
    """

    def __init__(self, inner: Source, case: Case) -> None:
        self.inner = inner
        self.case = case
        self.name = getattr(inner, "name", type(inner).__name__)
        series = case.series
        self._first, self._last = series.region.window.start, case.target_date
        self._served = {series.scenes[i][0].id: i for i in case.pasted}
        self._hidden = {s.id for i in case.pasted for s in series.scenes[i][1:]}
        self._pasted_dates = {series.dates[i] for i in case.pasted}
        self._family = get_sensor(series.sensor).family
        listing = getattr(inner, "scenes", None)
        # plan_inputs asks sources that can list their archive for better error messages; so may we
        self.scenes: Callable[..., list[Scene]] | None = self._scenes if callable(listing) else None

    def _keep(self, s: Scene) -> bool:
        # later optical dates would show the hidden ground; S1 after the target cannot, and the product reads it
        # (the fill's S1 test of a flood, a model's S1 nearest the target)
        if (s.date > self._last and s.family != "s1") or s.id in self._hidden:
            return False
        if s.family == self._family and s.date < self._first:
            return False
        if s.date in self._pasted_dates and s.family == self._family and s.id not in self._served:
            return False  # another sensor's scene on a pasted date would show the sky the case replaced
        return True

    def search(self, region: Region, start: dt.date, end: dt.date, sensor: str) -> list[Scene]:
        return [s for s in self.inner.search(region, start, end, sensor) if self._keep(s)]

    def _scenes(self, sensor: str | None = None) -> list[Scene]:
        listing = getattr(self.inner, "scenes", None)
        assert callable(listing)  # set only for sources that list their archive
        return [s for s in listing(sensor) if self._keep(s)]

    def read(self, scene: Scene, grid: Grid, bands: Sequence[str] | None = None) -> xr.DataArray:
        i = self._served.get(scene.id)
        if i is None:
            return self.inner.read(scene, grid, bands)
        return self.case.raster(i, grid, bands)


# --- a region from an archive ------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    import re

    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "archive"


def archive_region(source: Source, name: str | None = None) -> Region:
    """A region covering a local archive: inside the first optical scene's footprint, its whole date range and
    its sensor families (for ``cloudfree benchmark --root DIR`` without a region).

    The footprint's lon/lat box is shrunk a pixel at a time until the region's grid (UTM, outward-snapped) lies
    inside the footprint, so no edge of the grid is nodata.
    """
    from rasterio.warp import transform_geom
    from shapely.geometry import box, mapping, shape

    listing = getattr(source, "scenes", None)
    src_name = getattr(source, "name", type(source).__name__)
    if not callable(listing):
        raise BenchmarkError(f"the {src_name} source cannot list its archive; pass a REGION (name or YAML file)")
    scenes: list[Scene] = listing(None)
    optical = [s for s in scenes if s.family != "s1"]
    if not optical:
        raise BenchmarkError(
            f"the {src_name} archive holds no optical scenes ({len(scenes)} scene(s), sensors "
            f"{sorted({s.sensor for s in scenes}) or 'none'}); the benchmark needs s2 or landsat dates")
    first = optical[0]
    families = tuple(f for f in SENSOR_FAMILIES if any(s.family == f for s in scenes))
    days = [s.date for s in scenes]
    resolution = min(b.resolution_m for b in get_sensor(first.sensor).bands if b.units == "reflectance")
    footprint = shape(first.footprint)
    w, s, e, n = footprint.bounds
    dy = resolution / 111_320.0
    dx = dy / max(math.cos(math.radians((s + n) / 2)), 1e-6)
    where = f"archive region of {src_name} scene {first.id}"
    root = getattr(source, "root", None)
    name = name or (Path(root).name if root is not None else src_name)
    for i in range(64):
        bbox = [w + i * dx, s + i * dy, e - i * dx, n - i * dy]
        if bbox[0] >= bbox[2] or bbox[1] >= bbox[3]:
            break
        region = parse_region({
            "name": _slug(name), "description": f"derived from the {src_name} archive for the benchmark",
            "bbox": bbox, "resolution": resolution, "sensors": list(families),
            "window": {"start": min(days), "end": max(days)},
        }, where)
        grid = region.grid()
        inside = shape(transform_geom(grid.crs, "EPSG:4326", mapping(box(*grid.bounds))))
        if footprint.buffer(1e-9).contains(inside):
            return region
    raise BenchmarkError(
        f"{where}: its footprint {[round(v, 5) for v in footprint.bounds]} holds no {resolution:g} m grid; pass a "
        "REGION inside the archive instead")
