"""The embedded default source: a deterministic simulator of Sentinel-2, Landsat 8/9 and Sentinel-1.

It makes every command runnable offline and gives ground truth (the cloud-free scene and the true
cloud / shadow mask) for tests and benchmarks. Every raster it returns says ``simulated: True``.

The ground is generated in a fixed world frame (map coordinates of the grid's projected CRS, noise keyed
by world lattice indices, see ``synth_noise``), so a patch read equals the same window of a full-grid
read. Clouds are keyed by (seed, scene id): same seed -> identical arrays; another scene -> other
clouds. Per-scene weather is drawn at search time from a July monsoon climatology and carried in
``Scene.properties`` (``synth_*`` keys), so ``read`` needs nothing but the scene and the grid.

``search`` flies only the platforms that were operating on each date (``MISSIONS``): the revisit follows
(Sentinel-2 10 days with S2A alone, 5 with A + B; Landsat 16 days with L8 alone, 8 with L8 + L9;
Sentinel-1 12 days with one satellite, 6 with two: S1A + S1B 2016-09-26..2021-12-23, S1A alone after S1B's failure,
S1A + S1C from 2025-05, as ``pipeline.sensors.S1_SATELLITES``), and a window before a mission returns no scenes.
``read`` and ``truth`` of one scene on one grid share the landscape, sky and surface through a small
bounded LRU (``RENDER_CACHE_PIXELS``), because masking and evaluation ask for both.

Sentinel-2's 20 m and 60 m bands are rendered at their own pixel on the world lattice and repeated onto a finer
grid, as a real product delivered on a 10 m grid repeats them (``_Render._by_native``): their texture, noise and
cloud edges are a coarser pixel's, and a 13-band reconstruction compresses as real imagery does (uint16 deflate
44.5 % of float32 here, 43.9 % on the real series; 10 m rendering of every band had made it compress worse).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import xarray as xr
from affine import Affine
from rasterio.crs import CRS

from pipeline.errors import SourceError
from pipeline.grid import Grid
from pipeline.regions import Region, utm_crs
from pipeline.sensors import S1_SATELLITES, S2_BANDS, get_sensor
from pipeline.sources.base import Scene, raster_attrs
from pipeline.sources.synthetic import render as R
from pipeline.sources.synthetic import world as synth_world
from pipeline.sources.synthetic.noise import hash_uniform, key_of
from pipeline.sources.synthetic.sky import Sky, cloud_threshold, draw_weather, sky_on, sun_position
from pipeline.sources.synthetic.world import LANDCOVER, Ground, ground_on, static_for

log = logging.getLogger(__name__)

SERVED = ("s2_l1c", "s2_l2a", "landsat8_l2", "landsat9_l2", "s1_grd")
FAMILIES = {"s2": ("s2_l1c",), "landsat": ("landsat8_l2", "landsat9_l2"), "s1": ("s1_grd",)}
_S2_EPOCH = dt.date(2015, 6, 27)

# Operating periods (first, last day of archived data; None = still flying) of the simulated platforms.
# Landsat 7 / 5 are not simulated (their TM/ETM+ bands and SLC-off stripes are not modelled), so Landsat
# searches before Landsat 8 return nothing.
MISSIONS: dict[str, tuple[dt.date, dt.date | None]] = {
    "SENTINEL-2A": (dt.date(2015, 6, 23), dt.date(2025, 1, 20)),
    "SENTINEL-2B": (dt.date(2017, 3, 7), None),
    # S2C (launched 2024-09-05) took over S2A's orbit slot on 2025-01-21; S2A's extended campaign is not simulated
    "SENTINEL-2C": (dt.date(2025, 1, 21), None),
    "LANDSAT_8": (dt.date(2013, 4, 11), None),
    "LANDSAT_9": (dt.date(2021, 10, 31), None),
    # S1A, S1B (failed 2021-12-23) and S1C (in S1B's slot opposite S1A): the periods the S1 pairing defaults
    # (pipeline.sensors.s1_max_days) assume, so a default-rule build of any date finds S1 near every optical date
    **S1_SATELLITES,
}
# Absolute orbit numbers count from launch, not from the first archived day.
_S1_LAUNCH = {"SENTINEL-1A": dt.date(2014, 4, 3), "SENTINEL-1B": dt.date(2016, 4, 25),
              "SENTINEL-1C": dt.date(2024, 12, 5)}
# The two orbit slots of each Sentinel constellation (even / odd acquisition index) and who filled them.
_S2_SLOTS = (("SENTINEL-2A", "SENTINEL-2C"), ("SENTINEL-2B",))
_S1_SLOTS = (("SENTINEL-1A",), ("SENTINEL-1B", "SENTINEL-1C"))
_LANDSAT_PLATFORM = {"landsat8_l2": "LANDSAT_8", "landsat9_l2": "LANDSAT_9"}


def operating(platform: str, day: dt.date) -> bool:
    """Whether ``platform`` (a ``MISSIONS`` key) delivered data on ``day``."""
    first, last = MISSIONS[platform]
    return first <= day and (last is None or day <= last)


def _slot_platform(slots: tuple[tuple[str, ...], ...], index: int, day: dt.date) -> str | None:
    return next((p for p in slots[index % len(slots)] if operating(p, day)), None)


_LATITUDE_BANDS = "CDEFGHJKLMNPQRSTUVWX"


# -- scene geometry and ids -----------------------------------------------------------------------
def mgrs_tile(lon: float, lat: float) -> str:
    """MGRS 100 km tile id (e.g. 49SGU) of a point, as Sentinel-2 names its granules."""
    from pyproj import Transformer

    zone = min(int((lon + 180) // 6) + 1, 60)
    band = _LATITUDE_BANDS[max(0, min(19, int((lat + 80) // 8)))]
    e, n = Transformer.from_crs("EPSG:4326", utm_crs(lon, lat), always_xy=True).transform(lon, lat)
    zset = zone % 6 or 6
    col = ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")[(zset - 1) % 3][max(0, min(7, int(e // 100000) - 1))]
    rows = "ABCDEFGHJKLMNPQRSTUV"
    row = rows[(int(n // 100000) + (5 if zset % 2 == 0 else 0)) % 20]
    return f"{zone:02d}{band}{col}{row}"


def wrs2_path_row(lon: float, lat: float) -> tuple[int, int]:
    """Approximate WRS-2 path/row of a point (within about one path/row of the real one)."""
    row = int(round(60 - lat / 1.457))
    path = int(round((-64.6 - lon) / 1.545 + 0.156 * lat)) % 233 + 1
    return path, max(1, min(248, row))


def _box(lon: float, lat: float, half_km_x: float, half_km_y: float, region: Region | None = None) -> dict:
    """Scene footprint: the sensor's swath/tile box around the region centre, grown to cover the region.

    A large region would need several real tiles per date; the simulator stands in one scene per date
    that covers it all, so every patch of the region reads valid pixels.
    """
    dlat = half_km_y / 111.0
    dlon = half_km_x / (111.0 * max(math.cos(math.radians(lat)), 0.05))
    w, e, s, n = lon - dlon, lon + dlon, lat - dlat, lat + dlat
    if region is not None:
        rw, rs, re_, rn = region.lonlat_bounds()
        w, s, e, n = min(w, rw - 0.05), min(s, rs - 0.05), max(e, re_ + 0.05), max(n, rn + 0.05)
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def _u(seed: int, *parts: object) -> float:
    return float(hash_uniform(np.array([0]), np.array([0]), key_of(seed, *parts))[0])


def _at(day: dt.date, hours: float) -> dt.datetime:
    base = dt.datetime.combine(day, dt.time(0), tzinfo=dt.timezone.utc)
    return base + dt.timedelta(seconds=round(hours * 3600))


class SyntheticSource:
    """Deterministic simulated archive over any region (the offline default source)."""

    name = "synthetic"

    def __init__(self, seed: int = 0, cache: bool = True) -> None:
        self.seed = int(seed)
        self.cache = cache

    # -- search -----------------------------------------------------------------------------------
    def search(self, region: Region, start: dt.date, end: dt.date, sensor: str) -> list[Scene]:
        keys = self._sensor_keys(sensor)
        w, s, e, n = region.lonlat_bounds()
        lon, lat = (w + e) / 2, (s + n) / 2
        scenes: list[Scene] = []
        for key in keys:
            if key.startswith("s2"):
                scenes += self._search_s2(region, lon, lat, start, end, key)
            elif key.startswith("landsat"):
                scenes += self._search_landsat(region, lon, lat, start, end, key)
            else:
                scenes += self._search_s1(region, lon, lat, start, end)
        scenes.sort(key=lambda sc: (sc.datetime, sc.id))
        self._set_cloud_cover(region, scenes)
        log.debug("synthetic search %s %s %s..%s: %d scenes", region.name, sensor, start, end, len(scenes))
        return scenes

    def _sensor_keys(self, sensor: str) -> tuple[str, ...]:
        if sensor in FAMILIES:
            return FAMILIES[sensor]
        if sensor in SERVED:
            return (sensor,)
        raise SourceError(
            f"the synthetic source does not simulate sensor {sensor!r}; use a family ({', '.join(FAMILIES)}) or one of "
            f"{', '.join(SERVED)}"
        )

    def _days(self, start: dt.date, end: dt.date, phase: int, every: int) -> list[tuple[int, dt.date]]:
        first = (start - _S2_EPOCH).days
        out = []
        for d in range(first, (end - _S2_EPOCH).days + 1):
            if (d - phase) % every == 0:
                out.append(((d - phase) // every, _S2_EPOCH + dt.timedelta(days=d)))
        return out

    def _common(self, region: Region, when: dt.datetime, lon: float, lat: float) -> dict[str, Any]:
        az, el = sun_position(when, lat, lon)
        props: dict[str, Any] = {
            "sun_azimuth": round(az, 3),
            "sun_elevation": round(el, 3),
            "simulated": True,
            "world_seed": self.seed,
        }
        if region.event_date is not None:
            props["event_date"] = region.event_date.isoformat()
        return props

    def _search_s2(self, region: Region, lon: float, lat: float, start: dt.date, end: dt.date, key: str) -> list[Scene]:
        tile = mgrs_tile(lon, lat)
        phase = int(_u(self.seed, "s2phase", tile) * 5)
        out = []
        for index, day in self._days(start, end, phase, 5):
            platform = _slot_platform(_S2_SLOTS, index, day)
            if platform is None:
                continue
            t0 = _at(day, 10.85 - lon / 15.0 + 0.01 * _u(self.seed, "s2t", tile, index))
            t1 = t0 + dt.timedelta(minutes=9, seconds=21)
            sid = f"{t0:%Y%m%dT%H%M%S}_{t1:%Y%m%dT%H%M%S}_T{tile}"
            props = self._common(region, t0, lon, lat)
            props.update({"platform": platform, "mgrs_tile": tile})
            props.update(draw_weather(self.seed, f"s2:{tile}", index, day, region.event_date))
            out.append(Scene(sid, key, t0, _box(lon, lat, 54.9, 54.9, region), None, props))
        return out

    def _search_landsat(
        self, region: Region, lon: float, lat: float, start: dt.date, end: dt.date, key: str
    ) -> list[Scene]:
        path, row = (region.wrs.path, region.wrs.row) if region.wrs else wrs2_path_row(lon, lat)
        l8_phase = int(_u(self.seed, "l8phase", path) * 16)
        phase = l8_phase if key == "landsat8_l2" else (l8_phase + 8) % 16
        platform = _LANDSAT_PLATFORM[key]
        prefix = "LC08" if key == "landsat8_l2" else "LC09"
        out = []
        for _index, day in self._days(start, end, phase, 16):
            if not operating(platform, day):
                continue
            when = _at(day, 10.4 - lon / 15.0)
            sid = f"{prefix}_{path:03d}{row:03d}_{day:%Y%m%d}"
            props = self._common(region, when, lon, lat)
            props.update({"platform": platform, "wrs_path": path, "wrs_row": row})
            # Landsat 8 and 9 interleave: one weather sequence on the combined 8-day cadence
            combined = ((day - _S2_EPOCH).days - l8_phase) // 8
            props.update(draw_weather(self.seed, f"landsat:{path}:{row}", combined, day, region.event_date))
            out.append(Scene(sid, key, when, _box(lon, lat, 92.5, 90.0, region), None, props))
        return out

    def _search_s1(self, region: Region, lon: float, lat: float, start: dt.date, end: dt.date) -> list[Scene]:
        cell = f"{math.floor(lon)}:{math.floor(lat)}"
        phase = int(_u(self.seed, "s1phase", cell) * 6)
        orbit_pass = "ASCENDING" if _u(self.seed, "s1pass", cell) < 0.65 else "DESCENDING"
        out = []
        orbit0 = int(_u(self.seed, "s1orb", cell) * 175)
        for index, day in self._days(start, end, phase, 6):
            platform = _slot_platform(_S1_SLOTS, index, day)
            if platform is None:
                continue
            mission = "S1" + platform[-1]
            local = 18.2 if orbit_pass == "ASCENDING" else 6.2
            t0 = _at(day, local - lon / 15.0 + 0.005 * _u(self.seed, "s1t", cell, index))
            t1 = t0 + dt.timedelta(seconds=25)
            # absolute orbits count from launch (S1A 2014-04-03); the relative orbit is the ground track,
            # so S1C, in S1B's slot, flies S1B's relative orbits
            absolute = max(1, int((day - _S1_LAUNCH[platform]).days * 175 / 12) + orbit0)
            if mission == "S1A":
                relative = (absolute - 73) % 175 + 1
            else:
                track = max(1, int((day - _S1_LAUNCH["SENTINEL-1B"]).days * 175 / 12) + orbit0)
                relative = (track - 27) % 175 + 1
            datatake = int(_u(self.seed, "s1dt", cell, index) * 0xFFFFFF)
            uid = int(_u(self.seed, "s1uid", cell, index) * 0xFFFF)
            sid = (
                f"{mission}_IW_GRDH_1SDV_{t0:%Y%m%dT%H%M%S}_{t1:%Y%m%dT%H%M%S}_{absolute:06d}_{datatake:06X}_{uid:04X}"
            )
            props = self._common(region, t0, lon, lat)
            props.update({
                "platform": platform,
                "orbit_pass": orbit_pass,
                "instrument_mode": "IW",
                "relative_orbit": relative,
                "polarisations": ["VV", "VH"],
                "synth_swath_origin_m": round(_u(self.seed, "s1swath", cell, relative) * 250000.0, 1),
            })
            out.append(Scene(sid, "s1_grd", t0, _box(lon, lat, 125.0, 85.0, region), None, props))
        return out

    def _set_cloud_cover(self, region: Region, scenes: list[Scene]) -> None:
        """Scene cloud cover = true cloud (thick + thin) fraction over the region, on a coarse sample grid."""
        g = region.grid()
        step_x, step_y = max(1, g.width // 48), max(1, g.height // 48)
        coords = g.coords()
        xs, ys = coords["x"][::step_x], coords["y"][::step_y]
        for i, sc in enumerate(scenes):
            if sc.family == "s1":
                continue
            props = dict(sc.properties)
            t = cloud_threshold(xs, ys, props, self.seed, sc.id)
            if np.isfinite(t):
                props["synth_cloud_threshold"] = round(t, 5)
            sky = sky_on(xs, ys, props, self.seed, sc.id, with_shadow=False)
            m = sky.mask()
            cover = float(np.mean((m == 1) | (m == 4)))
            # Scene is frozen: rebuild with the measured cover
            scenes[i] = Scene(sc.id, sc.sensor, sc.datetime, sc.footprint, round(cover, 4), props)

    # -- read -------------------------------------------------------------------------------------
    def read(self, scene: Scene, grid: Grid, bands: Sequence[str] | None = None) -> xr.DataArray:
        sensor = get_sensor(scene.sensor)
        names = sensor.check_bands(bands) if bands is not None else sensor.band_names
        self._check_scene(scene)
        if not self._native_frame(grid):
            return self._via_utm(scene, grid, lambda g: self.read(scene, g, names))
        data = self._render(scene, grid).bands(names)
        da = xr.DataArray(data, dims=("band", "y", "x"), coords={"band": list(names), **grid.coords()},
                          attrs=raster_attrs(scene, grid, simulated=True))
        return da

    def truth(self, scene: Scene, grid: Grid) -> xr.Dataset:
        """The true cloud-free scene of that date and its true cloud / thin cloud / shadow mask.

        Variables: ``clear`` (band, y, x) reflectance bands of the sensor without clouds, cirrus, their
        shadows or sensor noise (the overpass's atmosphere and aerosol haze kept; speckle-free dB for S1),
        ``mask`` (y, x) ``MaskClass`` codes, ``landcover`` (y, x) codes of ``synth_world.LANDCOVER``,
        ``flooded`` (y, x), ``dem`` (y, x) metres and, for S2, ``cloud_optical_thickness``.
        """
        self._check_scene(scene)
        if not self._native_frame(grid):
            return self._via_utm(scene, grid, lambda g: self.truth(scene, g))
        return self._render(scene, grid).truth()

    # -- helpers ----------------------------------------------------------------------------------
    def _render(self, scene: Scene, grid: Grid) -> "_Render":
        """The scene on the grid, shared by ``read`` and ``truth`` (and repeated reads) via a bounded LRU."""
        if not self.cache:
            return _Render(self.seed, self.cache, scene, grid)
        props = json.dumps(scene.properties, sort_keys=True, default=str)
        key = (
            self.seed,
            scene.id,
            scene.sensor,
            scene.datetime.isoformat(),
            props,
            str(grid.crs),
            tuple(grid.transform)[:6],
            grid.width,
            grid.height,
        )
        with _RENDERS_LOCK:
            r = _RENDERS.get(key)
            if r is not None:
                _RENDERS.move_to_end(key)
                return r
            r = _RENDERS[key] = _Render(self.seed, self.cache, scene, grid)
            # the newest render always stays, whatever its size
            while sum(v.pixels for v in _RENDERS.values()) > RENDER_CACHE_PIXELS and len(_RENDERS) > 1:
                _RENDERS.popitem(last=False)
        return r

    def _check_scene(self, scene: Scene) -> None:
        if not scene.properties.get("simulated") or "sun_azimuth" not in scene.properties:
            raise SourceError(
                f"scene {scene.id!r} did not come from the synthetic source's search(); search it with SyntheticSource "
                "first"
            )
        if scene.sensor not in SERVED:
            raise SourceError(
                f"the synthetic source does not simulate sensor {scene.sensor!r}; it serves {', '.join(SERVED)}"
            )

    @staticmethod
    def _native_frame(grid: Grid) -> bool:
        t = grid.transform
        return t.b == 0 and t.d == 0 and not CRS.from_user_input(grid.crs).is_geographic

    def _via_utm(self, scene: Scene, grid: Grid, fn: Any) -> Any:
        """Geographic or rotated grids: simulate on a UTM grid covering it, then warp with GDAL."""
        from rasterio.warp import Resampling, reproject, transform_bounds

        w, s, e, n = grid.bounds_lonlat()
        crs = utm_crs((w + e) / 2, (s + n) / 2)
        left, bottom, right, top = transform_bounds(
            CRS.from_epsg(4326), CRS.from_user_input(crs), w, s, e, n, densify_pts=21
        )
        res = max(1.0, min(right - left, top - bottom) / max(grid.width, grid.height))
        res = min(res, 60.0) if res > 0 else 10.0
        src = Grid(crs, Affine(res, 0, math.floor(left / res) * res, 0, -res, math.ceil(top / res) * res),
                   int(math.ceil((right - left) / res)) + 2, int(math.ceil((top - bottom) / res)) + 2)
        obj = fn(src)

        def warp(a: np.ndarray, categorical: bool) -> np.ndarray:
            if a.dtype == bool:
                return warp(a.astype(np.uint8), True).astype(bool)
            out = np.full(grid.shape, np.nan if a.dtype.kind == "f" else 0, dtype=a.dtype)
            reproject(
                a,
                out,
                src_transform=src.transform,
                src_crs=src.crs,
                dst_transform=grid.transform,
                dst_crs=grid.crs,
                resampling=Resampling.nearest if categorical else Resampling.bilinear,
            )
            return out

        coords = grid.coords()
        if isinstance(obj, xr.DataArray):
            sensor = get_sensor(scene.sensor)
            data = np.stack(
                [
                    warp(
                        obj.sel(band=b).values,
                        sensor.band(str(b)).units not in ("reflectance", "dB", "degrees", "kelvin"),
                    )
                    for b in obj.band.values
                ]
            )
            return xr.DataArray(
                data, dims=obj.dims, coords={"band": obj.band.values, **coords}, attrs=raster_attrs(scene, grid, True)
            )
        ds = xr.Dataset(attrs={**obj.attrs, **raster_attrs(scene, grid, True)})
        for name, var in obj.data_vars.items():
            if "band" in var.dims:
                ds[name] = (var.dims, np.stack([warp(var.values[i], False) for i in range(var.shape[0])]))
                ds = ds.assign_coords(band=var.band.values)
            else:
                ds[name] = (var.dims, warp(var.values, var.dtype.kind != "f"))
            ds[name].attrs = var.attrs
        return ds.assign_coords(coords)


_RENDERS: "OrderedDict[tuple, _Render]" = OrderedDict()
_RENDERS_LOCK = threading.Lock()
# ~130 bytes per simulated pixel once ground, sky and surface are built: one full 1024 x 1024 grid
# (~150 MB) or a few dozen 256 x 256 patches
RENDER_CACHE_PIXELS = 1_100_000


def clear_caches(landscape: bool = True) -> None:
    """Forget every cached render and, unless ``landscape`` is False, every landscape (cold-read benchmarks)."""
    with _RENDERS_LOCK:
        _RENDERS.clear()
    if landscape:
        with synth_world._CACHE_LOCK:
            synth_world._CACHE.clear()


class _Render:
    """One scene on one grid: the ground, sky and clear surface every band and the truth derive from.

    Built lazily and kept while cached, so callers must not get these arrays themselves: ``bands`` and
    ``truth`` hand out copies.
    """

    def __init__(self, seed: int, cache: bool, scene: Scene, grid: Grid, native: float | None = None) -> None:
        self.seed, self.cache, self.scene, self.grid = seed, cache, scene, grid
        self.family = scene.family
        coords = grid.coords()
        xs, ys = coords["x"], coords["y"]
        res = min(grid.resolution)
        if native is None:
            native = 30.0 if self.family == "landsat" else 10.0
        self.res = max(res, native)
        self.ix: np.ndarray | None
        self.iy: np.ndarray | None
        if res < native:
            # simulate at the sensor's native pixel on the world lattice, then repeat onto the finer grid
            xs, self.ix = np.unique((np.floor(xs / native) + 0.5) * native, return_inverse=True)
            ys_u, self.iy = np.unique((np.floor(ys / native) + 0.5) * native, return_inverse=True)
            ys = ys_u
        else:
            self.ix = self.iy = None
        self.xs, self.ys = xs, ys
        self.pixels = len(xs) * len(ys)
        props = scene.properties
        event = props.get("event_date")
        self.event = dt.date.fromisoformat(event) if event else None
        self.key = key_of("scene", seed, scene.id)
        self._lock = threading.RLock()  # dask threads reading the same scene build each piece once
        self._ground: Ground | None = None
        self._sky: Sky | None = None
        self._surface: np.ndarray | None = None
        self._coarser: dict[float, tuple[_Render, np.ndarray, np.ndarray]] = {}

    # lazily shared pieces
    @property
    def ground(self) -> Ground:
        with self._lock:
            if self._ground is None:
                st = static_for(self.xs, self.ys, self.res, self.seed, cache=self.cache)
                self._ground = ground_on(st, self.scene.date, self.event)
            return self._ground

    @property
    def sky(self) -> Sky:
        with self._lock:
            if self._sky is None:
                self._sky = sky_on(self.xs, self.ys, self.scene.properties, self.seed, self.scene.id)
            return self._sky

    @property
    def atmosphere(self) -> R.Atmosphere:
        return R.atmosphere(self.key ^ 0xA7)

    def _noise(self, idx: list[int]) -> list[np.ndarray]:
        return R.sensor_noise(self.xs, self.ys, self.res, self.key ^ 0xA8, idx)

    def surface(self, idx: list[int]) -> np.ndarray:
        """Clear surface reflectance of S2 bands ``idx`` (read-only: the full cube itself when all 13)."""
        with self._lock:
            if self._surface is None:
                self._surface = R.surface(self.ground, None)
        return self._surface if idx == list(range(13)) else self._surface[idx]

    def _expand(self, a: np.ndarray) -> np.ndarray:
        if self.ix is None:
            return a
        return a[..., self.iy, :][..., self.ix]

    def _s2_idx(self, names: Sequence[str]) -> list[int]:
        return [S2_BANDS.index(n) for n in names]

    def bands(self, names: Sequence[str]) -> np.ndarray:
        out = np.empty((len(names), *self.grid.shape), dtype=np.float32)
        if self.family == "s1":
            layers = self._s1(names)
        elif self.family == "s2":
            layers = self._s2(names)
        else:
            layers = self._landsat(names)
        for i, n in enumerate(names):
            out[i] = self._expand(layers[n])
        self._nodata_outside_footprint(out, names)
        return out

    def _coarser_render(self, native: float) -> tuple["_Render", np.ndarray, np.ndarray]:
        """The scene rendered at a band's native pixel (20 or 60 m) on the world lattice, and the rows and
        columns of it each of this render's pixels falls in."""
        with self._lock:
            if native not in self._coarser:
                child = _Render(self.seed, self.cache, self.scene, self.grid, native=native)
                iy = np.searchsorted(child.ys, (np.floor(self.ys / native) + 0.5) * native)
                ix = np.searchsorted(child.xs, (np.floor(self.xs / native) + 0.5) * native)
                self._coarser[native] = (child, iy, ix)
            return self._coarser[native]

    def _by_native(self, names: Sequence[str], fn: Any) -> dict[str, np.ndarray]:
        """``fn(render, names)`` per group of S2 bands sharing a native pixel, each group rendered at its own
        pixel and repeated onto this render's: real L1C/L2A delivered on a 10 m grid (SEN12MS-CR, Earth Engine's
        default nearest resampling) repeats the 20 m and 60 m bands' pixels, 2 x 2 and 6 x 6, and their noise,
        texture and cloud edges are those of the coarser pixel (measured on the real series: 62 % and 87-92 %
        of horizontal neighbours equal). Rendering them at 10 m gave them 4-36x too much independent detail."""
        bands = get_sensor(self.scene.sensor)
        groups: dict[float, list[str]] = {}
        for n in names:
            groups.setdefault(max(float(bands.band(n).resolution_m), self.res), []).append(n)
        layers: dict[str, np.ndarray] = {}
        for native, group in groups.items():
            if native <= self.res:
                layers.update(fn(self, group))
                continue
            child, iy, ix = self._coarser_render(native)
            layers.update({n: a[iy][:, ix] for n, a in fn(child, group).items()})
        return layers

    def _toa(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        idx = self._s2_idx(names)
        atm = self.atmosphere
        toa = R.apply_sky(self.surface(idx), self.sky, idx, atm, self._noise(idx))
        if self.scene.sensor == "s2_l2a":
            toa = R.to_surface(toa, idx, atm)
        return {n: toa[i] for i, n in enumerate(names)}

    def _clear_toa(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """What the sensor would have seen on this overpass without clouds, cirrus and their shadows, and
        without its noise (see ``truth``)."""
        idx = self._s2_idx(names)
        atm = self.atmosphere
        clear = R.toa_clear(self.surface(idx), idx, atm)
        haze = self.sky.haze
        for i, b in enumerate(idx):
            if R.HAZE[b]:
                clear[i] += haze * R.HAZE[b]
        if self.scene.sensor != "s2_l1c":  # surface reflectance products, as the observed bands are made
            clear = R.to_surface(clear, idx, atm)
        return {n: clear[i] for i, n in enumerate(names)}

    def _s2(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        spectral = [n for n in names if n in S2_BANDS]
        layers: dict[str, np.ndarray] = {}
        if spectral:
            layers.update(self._by_native(spectral, _Render._toa))
        prob = None
        if {"CLOUD_PROB", "SCL"} & set(names):
            prob = R.cloud_probability(self.sky, self.xs, self.ys, self.res, self.key ^ 0xA1)
            layers["CLOUD_PROB"] = prob
        if "cs_cdf" in names:
            layers["cs_cdf"] = R.cs_cdf(self.sky, self.xs, self.ys, self.res, self.key ^ 0xA2)
        if "QA60" in names:
            layers["QA60"] = R.qa60(self.sky)
        if "SCL" in names:
            assert prob is not None  # computed above whenever SCL is asked for
            layers["SCL"] = R.scl(self.sky.mask(), self.ground, prob, self.sky)
        return layers

    def _landsat(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        layers: dict[str, np.ndarray] = {}
        sr = [n for n in names if n in R.LANDSAT_FROM_S2]
        if sr:
            idx = self._s2_idx([R.LANDSAT_FROM_S2[n] for n in sr])
            atm = self.atmosphere
            toa = R.apply_sky(self.surface(idx), self.sky, idx, atm, self._noise(idx))
            sr_vals = R.to_surface(toa, idx, atm)
            layers.update({n: sr_vals[i] for i, n in enumerate(sr)})
        if "ST_B10" in names:
            layers["ST_B10"] = R.surface_temperature(self.ground, self.sky)
        if "QA_PIXEL" in names:
            layers["QA_PIXEL"] = R.landsat_qa(self.sky.mask(), self.ground, self.sky)
        return layers

    def _angle(self) -> np.ndarray:
        p = self.scene.properties
        frac = ((self.xs - float(p.get("synth_swath_origin_m", 0.0))) / 250000.0) % 1.0
        if p.get("orbit_pass") == "DESCENDING":
            frac = 1.0 - frac
        ang = (30.6 + 14.6 * frac).astype(np.float32)
        return np.broadcast_to(ang[None, :], (len(self.ys), len(self.xs)))

    def _s1(self, names: Sequence[str], speckle: bool = True) -> dict[str, np.ndarray]:
        angle = self._angle()
        layers: dict[str, np.ndarray] = {"angle": np.ascontiguousarray(angle)}
        if {"VV", "VH"} & set(names):
            vv, vh = R.sar(self.ground, angle, self.xs, self.ys, self.res, self.key, speckle=speckle)
            layers.update({"VV": vv, "VH": vh})
        return layers

    def _nodata_outside_footprint(self, out: np.ndarray, names: Sequence[str]) -> None:
        from shapely.geometry import box, shape

        fp = shape(self.scene.footprint)
        if fp.contains(box(*self.grid.bounds_lonlat())):
            return
        from rasterio.features import geometry_mask
        from rasterio.warp import transform_geom

        geom = transform_geom("EPSG:4326", self.grid.crs, self.scene.footprint)
        outside = geometry_mask([geom], out_shape=self.grid.shape, transform=self.grid.transform)
        sensor = get_sensor(self.scene.sensor)
        for i, n in enumerate(names):
            b = sensor.band(n)
            out[i][outside] = (
                np.nan if b.units in ("reflectance", "dB", "degrees", "kelvin", "score") else (b.nodata or 0)
            )

    def truth(self) -> xr.Dataset:
        sensor = get_sensor(self.scene.sensor)
        g = self.ground
        coords = self.grid.coords()
        if self.family == "s1":
            names = ["VV", "VH"]
            layers = self._s1(names, speckle=False)
            clear = np.stack([self._expand(layers[n]) for n in names])
            mask = np.zeros(self.grid.shape, dtype=np.uint8)
        else:
            names = list(sensor.reflectance_bands)
            s2names = names if self.family == "s2" else [R.LANDSAT_FROM_S2[n] for n in names]
            # what the sensor would have seen on this overpass without clouds, cirrus and their shadows, and without
            # its noise: the overpass's atmosphere, illumination and aerosol haze stay. Haze is not cloud (the
            # masks call it clear, a real clear date carries its own), so a reconstruction of the date must match
            # it; a truth without it scored observed clear pixels at 30 dB and rewarded fills that keep another
            # day's atmosphere. New arrays either way, so the cached surface stays private. Each band at its native
            # pixel, as the observed bands are rendered.
            if self.family == "s2":
                by_name = self._by_native(s2names, _Render._clear_toa)
            else:
                by_name = self._clear_toa(s2names)
            clear = self._expand(np.stack([by_name[n] for n in s2names]))
            mask = self._expand(self.sky.mask())

        def own(a: np.ndarray) -> np.ndarray:  # cached arrays go out as copies
            return self._expand(a).copy() if self.ix is None else self._expand(a)

        ds = xr.Dataset(
            {
                "clear": (("band", "y", "x"), clear.astype(np.float32, copy=False)),
                "mask": (("y", "x"), mask.astype(np.uint8, copy=False)),
                "landcover": (("y", "x"), own(g.landcover)),
                "flooded": (("y", "x"), own(g.flooded)),
                "dem": (("y", "x"), own(g.dem)),
            },
            coords={"band": names, **coords},
            attrs={**raster_attrs(self.scene, self.grid, simulated=True),
                   "landcover_classes": ", ".join(f"{k} {v}" for k, v in LANDCOVER.items()),
                   "mask_classes": "0 clear, 1 cloud, 2 shadow, 3 nodata, 4 thin cloud, 5 snow"},
        )
        if self.family == "s2":
            ds["cloud_optical_thickness"] = (("y", "x"), own(self.sky.tau))
        for v in ds.data_vars.values():
            v.attrs["simulated"] = True
        return ds
