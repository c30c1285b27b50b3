"""Which scenes ``reconstruct`` reads: the plan of optical and S1 scenes per input role, with its checks.

The checkpoint's ``InputSpec`` says what to fetch: ``optical_dates`` optical dates at or before D (D itself only
for ``includes_target_date`` models), and the S1 nearest to each of them and to D. The auxiliary (earlier) dates
are by default the least cloudy of those within ``AUX_MAX_DAYS`` before D (``aux_dates="clearest"``: what an
analyst picks as the prior reference, and the training samples' auxiliary dates lie within the same 30-day gap
of TCSEN12); ``"latest"`` takes the most recent ones. Every impossibility (no scenes, AOI outside the source's
coverage, bands the checkpoint needs and the source lacks) is one ``SourceError``/``CheckpointError`` line
naming the fix.

The training-free fill (checkpoint ``composite``) has its own plan (``plan_fill``): the target date's scenes and
every date of the region's optical family within the fill's maximum age before D, from one search per family
(one query per AOI on Earth Engine and local folders alike); dates after D are never used.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from shapely.geometry import box, shape

from models.spec import InputSpec
from pipeline.errors import CheckpointError, SourceError
from pipeline.grid import Grid
from pipeline.reconstruct.config import AUX_MAX_DAYS, AuxDates, ReconstructConfig
from pipeline.regions import Region
from pipeline.sensors import S1_BANDS, get_sensor
from pipeline.sources.base import Scene, Source

log = logging.getLogger(__name__)

LOOKBACK_DAYS = 120  # how far before D optical input dates are searched
COMPOSITE = "composite"  # the training-free checkpoint
NEAREST_SHOWN = 6


@dataclass
class InputPlan:
    """Scenes per role. Dates are oldest first; each SAR entry lists scenes nearest first."""

    target_date: dt.date
    optical_sensor: str  # sensor key of the optical scenes
    optical_dates: list[dt.date]
    optical_scenes: list[list[Scene]]
    sar_dates: list[dt.date] = field(default_factory=list)  # the date each SAR slot stands for
    sar_scenes: list[list[Scene]] = field(default_factory=list)
    target_scenes: list[Scene] = field(default_factory=list)  # optical scenes on D (observed pixels)
    # S1 by date, oldest first, over the fill's dates: the missed-shadow check's test of a changed ground (flood)
    change_sar: list[tuple[dt.date, list[Scene]]] = field(default_factory=list)
    change_sar_bands: tuple[str, ...] = ()

    def scene_ids(self) -> list[str]:
        groups = self.optical_scenes + self.sar_scenes + [self.target_scenes] + [g for _, g in self.change_sar]
        ids = [s.id for group in groups for s in group]
        return sorted(dict.fromkeys(ids))


def _by_date(scenes: Sequence[Scene]) -> dict[dt.date, list[Scene]]:
    out: dict[dt.date, list[Scene]] = {}
    for s in sorted(scenes, key=lambda s: (s.datetime, s.id)):
        out.setdefault(s.date, []).append(s)
    return out


def _nearest(dates: Sequence[dt.date], day: dt.date, n: int = NEAREST_SHOWN) -> str:
    near = sorted(set(dates), key=lambda d: (abs((d - day).days), d))[:n]
    return ", ".join(d.isoformat() for d in sorted(near)) or "none"


def _aoi_polygon(grid: Grid):
    return box(*grid.bounds_lonlat())


def _check_coverage(scenes: Sequence[Scene], grid: Grid, source_name: str, what: str) -> list[Scene]:
    aoi = _aoi_polygon(grid)
    covering = [s for s in scenes if not s.footprint or shape(s.footprint).intersects(aoi)]
    if scenes and not covering:
        w, s_, e, n = (round(v, 4) for v in grid.bounds_lonlat())
        raise SourceError(
            f"the AOI [{w}, {s_}, {e}, {n}] lies outside the {source_name} source's coverage: none of its "
            f"{len(scenes)} {what} scene footprints intersect it; pick a region the source covers "
            "(or another --source)")
    return covering


def _raise_family_missing(source: Source, family: str, src_name: str, checkpoint: str) -> None:
    """A source that lists its archive and holds no scene of the family cannot satisfy the checkpoint at all."""
    listing = getattr(source, "scenes", None)
    if not callable(listing) or listing(family):
        return
    held = sorted({s.sensor for s in listing(None)})
    raise CheckpointError(
        f"checkpoint {checkpoint or 'requested'} needs {family} optical input, but the {src_name} source holds no "
        f"{family} scenes (it has: {', '.join(held) or 'nothing'}); use a checkpoint trained on "
        f"{', '.join(held) or 'its'} data or another --source")


def _raise_outside_coverage(source: Source, family: str, grid: Grid, src_name: str) -> None:
    """Sources that can list their whole archive (``local``) tell 'outside coverage' from 'no dates'."""
    listing = getattr(source, "scenes", None)
    if not callable(listing):
        return
    everything = [s for s in listing(family) if s.footprint]
    if not everything:
        return
    aoi = _aoi_polygon(grid)
    if any(shape(s.footprint).intersects(aoi) for s in everything):
        return
    from shapely.ops import unary_union

    cover = [round(v, 3) for v in unary_union([shape(s.footprint) for s in everything]).bounds]
    w, s_, e, n = (round(v, 3) for v in grid.bounds_lonlat())
    raise SourceError(
        f"the AOI [{w}, {s_}, {e}, {n}] lies outside the {src_name} source's coverage: its {len(everything)} {family} "
        f"scene(s) cover lon/lat {cover}; pick a region inside it or another --source")


def _check_bands(spec: InputSpec, scenes: Sequence[Scene], source_name: str, checkpoint: str) -> str:
    sensors = sorted({s.sensor for s in scenes})
    for key in sensors:
        have = get_sensor(key).band_names
        missing = [b for b in dict.fromkeys(spec.optical_bands + spec.out_bands) if b not in have]
        if missing:
            raise CheckpointError(
                f"checkpoint {checkpoint} needs {spec.optical_sensor} band(s) {missing}, but the {source_name} "
                f"source's {key} scenes have {list(get_sensor(key).reflectance_bands)}; use a checkpoint trained on "
                f"{key} bands or another --source")
    return sensors[0]


def _aux_dates(earlier: list[dt.date], days: dict[dt.date, list[Scene]], n: int, date: dt.date,
               how: str) -> list[dt.date]:
    """The ``n`` auxiliary dates (oldest first) out of ``earlier`` (sorted), chosen by ``how`` (module docstring)."""
    if n == 0:
        return []
    if how == AuxDates.latest:
        return earlier[-n:]
    pool = [d for d in earlier if (date - d).days <= AUX_MAX_DAYS]
    if len(pool) <= n:  # no choice to make within the gap: the most recent ones
        return earlier[-n:]

    def cover(d: dt.date) -> float:  # the provider's scene cloud cover; unknown ranks as fully cloudy
        return float(np.mean([1.0 if s.cloud_cover is None else s.cloud_cover for s in days[d]]))

    # least cloudy first, the more recent one on ties (less change on the ground)
    return sorted(sorted(pool, key=lambda d: (cover(d), -d.toordinal()))[:n])


def plan_inputs(region: Region, date: dt.date, spec: InputSpec, source: Source, checkpoint: str = "",
                config: ReconstructConfig | None = None) -> InputPlan:
    """Pick the scenes the spec asks for (``config``: ``aux_dates``, ``sar_max_days``); every impossibility is a
    ``SourceError``/``CheckpointError`` naming the fix."""
    config = config or ReconstructConfig()
    src_name = getattr(source, "name", type(source).__name__)
    sensor_key, days = _optical_scenes(region, date, spec, source, checkpoint, src_name)
    earlier = [d for d in sorted(days) if d < date]
    n_earlier = spec.optical_dates - 1 if spec.includes_target_date else spec.optical_dates
    family = spec.optical_sensor
    if spec.includes_target_date and date not in days:
        raise SourceError(
            f"no {family} scene on {date} over region {region.name} (the model {checkpoint or 'requested'} "
            f"reconstructs an acquisition of that day); nearest dates with scenes: {_nearest(list(days), date)}; "
            "pass one of them as --date")
    if len(earlier) < n_earlier:
        raise SourceError(
            f"the model needs {n_earlier} {family} date(s) before {date} but the {src_name} source has {len(earlier)} "
            f"within {LOOKBACK_DAYS} days ({', '.join(d.isoformat() for d in earlier) or 'none'}); pick a later --date")
    opt_dates = _aux_dates(earlier, days, n_earlier, date, config.aux_dates)
    if spec.includes_target_date:
        opt_dates.append(date)
    plan = InputPlan(date, sensor_key, opt_dates, [days[d] for d in opt_dates], target_scenes=days.get(date, []))
    if spec.sar_bands:
        plan.sar_dates = opt_dates + [date]
        plan.sar_scenes = sar_scenes(region, plan.sar_dates, spec, source, checkpoint, src_name, config.sar_max_days)
    return plan


def _optical_scenes(region: Region, date: dt.date, spec: InputSpec, source: Source, checkpoint: str,
                    src_name: str) -> tuple[str, dict[dt.date, list[Scene]]]:
    """The optical sensor the plan uses and its scenes by date, searched from ``LOOKBACK_DAYS`` before D."""
    grid = region.grid()
    family = spec.optical_sensor
    start, end = date - dt.timedelta(days=LOOKBACK_DAYS), date + dt.timedelta(days=60)
    try:
        found = source.search(region, start, end, family)
    except SourceError as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint} needs {family} optical input, which the {src_name} source cannot provide "
            f"({exc})") from None
    if not found:
        _raise_family_missing(source, family, src_name, checkpoint)
        _raise_outside_coverage(source, family, grid, src_name)
        raise SourceError(
            f"the {src_name} source has no {family} scenes over region {region.name} between {start} and {end}; "
            "check --date and the region's location")
    found = _check_coverage(found, grid, src_name, family)
    sensor_key = _check_bands(spec, found, src_name, checkpoint)
    return sensor_key, _by_date([s for s in found if s.sensor == sensor_key])


def sar_scenes(region: Region, dates: Sequence[dt.date], spec: InputSpec, source: Source, checkpoint: str,
                src_name: str, max_days: int) -> list[list[Scene]]:
    """For each of ``dates``, the S1 scenes within ``max_days`` of it, nearest first."""
    grid = region.grid()
    try:
        margin = dt.timedelta(days=max_days)
        s1 = source.search(region, min(dates) - margin, max(dates) + margin, "s1")
    except SourceError as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint} needs S1 {list(spec.sar_bands)}, which the {src_name} source cannot provide "
            f"({exc})") from None
    if not s1:
        listing = getattr(source, "scenes", None)
        if callable(listing) and not listing("s1"):
            held = sorted({s.sensor for s in listing(None)})
            raise CheckpointError(
                f"checkpoint {checkpoint or 'requested'} needs S1 {list(spec.sar_bands)}, but the {src_name} source "
                f"holds no S1 scenes (it has: {', '.join(held) or 'nothing'}); use a checkpoint trained without "
                "sar_bands (an optical-only refine model works on any archive) or a source with S1")
    s1 = _check_coverage(s1, grid, src_name, "s1")
    for key in sorted({s.sensor for s in s1}):
        have = list(get_sensor(key).band_names)
        missing = [b for b in spec.sar_bands if b not in have]
        if missing:
            raise CheckpointError(f"checkpoint {checkpoint} needs SAR band(s) {missing}; the {src_name} source's "
                                  f"{key} scenes have {have}")
    out = []
    for d in dates:
        near = sorted((s for s in s1 if abs((s.date - d).days) <= max_days),
                      key=lambda s: (abs((s.datetime.date() - d).days), s.datetime, s.id))
        if not near:
            raise SourceError(
                f"no S1 scene within {max_days} days of {d} over region {region.name} (the model needs S1 near every "
                f"input date and D); S1 dates nearby: {_nearest([s.date for s in s1], d)}; "
                "pick another --date or raise --sar-max-days")
        out.append(near)
    return out


# --- the training-free fill ---------------------------------------------------------------------------------

OPTICAL_FAMILIES = ("s2", "landsat")  # in order of preference when a region lists both
NEAREST_AFTER_DAYS = 60  # how far after D the "nearest dates" of a refusal look


def optical_family(region: Region) -> str:
    """The optical family the fill reads: Sentinel-2 when the region lists it, else Landsat."""
    for fam in OPTICAL_FAMILIES:
        if fam in region.sensors:
            return fam
    raise SourceError(
        f"region {region.name} lists sensors {list(region.sensors)}, none optical; the composite needs s2 or landsat "
        "dates - add one to the region's 'sensors'")


def _same_bands(key: str) -> set[str]:
    """Sensor keys whose scenes mosaic with ``key``'s: the same reflectance bands (Landsat 8 with 9, not with 7)."""
    from pipeline.sensors import SENSORS

    bands = get_sensor(key).reflectance_bands
    return {k for k, s in SENSORS.items() if s.reflectance_bands == bands}


def plan_fill(region: Region, date: dt.date, source: Source, config: ReconstructConfig | None = None) -> InputPlan:
    """Scenes of the training-free fill: D's scenes and every earlier date within ``config.fill.max_age_days``.

    ``optical_dates`` lists the history dates oldest first and D last; ``target_scenes`` are D's scenes. Refuses
    (one ``SourceError`` line) a date without a scene and an archive with no earlier date to fill from.
    """
    config = config or ReconstructConfig()
    src_name = getattr(source, "name", type(source).__name__)
    family = optical_family(region)
    grid = region.grid()
    max_age = config.fill.max_age_days
    start = date - dt.timedelta(days=max_age)
    try:
        found = source.search(region, start, date, family)
    except SourceError as exc:
        raise SourceError(f"the composite needs {family} scenes, which the {src_name} source cannot provide "
                          f"({exc})") from None
    if not found:
        _raise_family_missing(source, family, src_name, COMPOSITE)
        _raise_outside_coverage(source, family, grid, src_name)
    found = [s for s in _check_coverage(found, grid, src_name, family) if s.date <= date]
    on_date = sorted((s for s in found if s.date == date), key=lambda s: (s.sensor, s.datetime, s.id))
    if not on_date:
        later = source.search(region, date, date + dt.timedelta(days=NEAREST_AFTER_DAYS), family)
        near = _nearest([s.date for s in found + later], date)
        raise SourceError(
            f"no {family} scene on {date} over region {region.name} (the composite fills that day's acquisition); "
            f"nearest dates with scenes: {near}; pass one of them as --date")
    sensor_key = on_date[0].sensor
    compatible = _same_bands(sensor_key)
    days = _by_date([s for s in found if s.sensor in compatible])
    earlier = [d for d in sorted(days) if d < date]
    if not earlier:
        raise SourceError(
            f"the composite fills {date} from earlier {family} dates, but the {src_name} source has none within "
            f"{max_age} days before it over region {region.name} (it needs at least 2 dates: the target and one "
            "before); pick a later --date or raise --max-age-days")
    dates = earlier + [date]
    return InputPlan(date, sensor_key, dates, [days[d] for d in dates], target_scenes=days[date])


def plan_change_sar(region: Region, plan: InputPlan, source: Source, max_days: int) -> InputPlan:
    """Adds to a fill plan the S1 dates within ``max_days`` of its optical dates (``change_sar``), for the missed-
    shadow check's S1 test; none when the source has no S1 there (the check then does not run, and the run's
    metadata says so). A region that does not list s1 in its sensors, or a source that cannot search S1, is the
    same as one without S1 here: the fill does not need it, and the check only runs when it is there."""
    if "s1" not in region.sensors:
        return plan
    margin = dt.timedelta(days=max_days)
    try:
        found = source.search(region, plan.optical_dates[0] - margin, plan.target_date + margin, "s1")
    except SourceError as exc:
        log.info("no S1 for the missed-shadow check over %s: %s", region.name, exc)
        return plan
    # the bands every scene has, so each date is tested on the same ones (a VV-only archive tests VV)
    bands = tuple(b for b in S1_BANDS if found and all(b in get_sensor(s.sensor).band_names for s in found))
    if bands:
        plan.change_sar = sorted(_by_date(found).items())
        plan.change_sar_bands = bands
    return plan
