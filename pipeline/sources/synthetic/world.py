"""The simulated ground: land cover, DEM, rivers, roads, fields, towns, crop phenology and a flood.

Everything is a pure function of world map coordinates (metres in the grid's projected CRS) and the
world seed, so a 256 x 256 patch and the full region grid see the same ground at the same point. The
static part (land cover geometry, DEM, parcels) is cached per grid because every date of a patch
reuses it; the dated part (crop growth, soil wetness, flood) is cheap arithmetic on top.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pipeline.sources.synthetic.noise import fbm, hash_uniform, key_of, pixel_normal, value_noise

# Land-cover codes exposed in ``truth().landcover``.
LANDCOVER = {0: "water", 1: "urban", 2: "road", 3: "cropland", 4: "forest", 5: "grassland", 6: "bare", 7: "flooded"}
WATER, URBAN, ROAD, CROP, FOREST, GRASS, BARE, FLOODED = range(8)

# Endmembers mixed per pixel; rows of the spectral tables in synth_render.py follow this order.
ENDMEMBERS = (
    "water_clear", "water_turbid", "crop", "forest", "grass", "soil_dry", "soil_wet",
    "concrete", "roof_grey", "roof_blue", "bright", "asphalt", "flooded_urban",
)
E = {name: i for i, name in enumerate(ENDMEMBERS)}


@dataclass
class Static:
    """Date-independent ground of one grid."""

    water: np.ndarray  # permanent water fraction (rivers, streams, ponds)
    urban: np.ndarray  # built-up fraction (0..1) incl. villages
    roof: np.ndarray  # (4, H, W) fractions of concrete / grey / blue / bright roofs within urban
    road: np.ndarray  # road (asphalt) fraction
    forest: np.ndarray
    grass: np.ndarray
    field: np.ndarray  # cropland parcel fraction
    crop_type: np.ndarray  # uint8 per pixel: 0 maize, 1 soybean, 2 orchard, 3 fallow, 4 rice, 5 greenhouse
    plant_doy: np.ndarray  # planting day of year of the parcel
    vigour: np.ndarray  # per-parcel max canopy cover
    hand: np.ndarray  # height above nearest drainage (m): what floods first
    dem: np.ndarray  # elevation (m)
    texture: np.ndarray  # multiplicative brightness texture (~1)


def _coverage(dist: np.ndarray, half_width: np.ndarray | float, res: float) -> np.ndarray:
    """Area fraction of a pixel covered by a band of ``half_width`` around a line at ``dist``."""
    return np.clip((half_width - dist) / res + 0.5, 0.0, 1.0).astype(np.float32)


def _contour_distance(xs: np.ndarray, ys: np.ndarray, cells: list[float], key: int) -> np.ndarray:
    """Approximate distance (m) to the zero contour of a smooth field: |f| / |grad f| (meandering lines)."""
    f = fbm(xs, ys, cells, key)
    gx = fbm(xs, ys, cells, key, d="x")
    gy = fbm(xs, ys, cells, key, d="y")
    return np.abs(f) / np.maximum(np.hypot(gx, gy), np.float32(1e-6))


def _grid_lines(u: np.ndarray, spacing: float) -> np.ndarray:
    """Distance (m) from coordinate ``u`` to the nearest multiple of ``spacing``."""
    return np.abs(u - np.round(u / spacing) * spacing).astype(np.float32)


def build_static(xs: np.ndarray, ys: np.ndarray, res: float, seed: int) -> Static:
    k = lambda name: key_of("world", seed, name)  # noqa: E731
    h, w = len(ys), len(xs)
    X = np.broadcast_to(xs[None, :].astype(np.float32), (h, w))
    Y = np.broadcast_to(ys[:, None].astype(np.float32), (h, w))
    # Warped coordinates bend the road grid and parcel lines like a real (surveyed but not perfect) plain.
    wx = X + np.float32(90.0) * value_noise(xs, ys, 5000.0, k("warpx"))
    wy = Y + np.float32(90.0) * value_noise(xs, ys, 5000.0, k("warpy"))

    # -- water: a meandering river, canals/streams, fish ponds
    d_river = _contour_distance(xs, ys, [9000.0, 4500.0], k("river"))
    river_hw = 30.0 + 12.0 * value_noise(xs, ys, 3000.0, k("riverw"))
    river = _coverage(d_river, river_hw, res)
    d_stream = _contour_distance(xs, ys, [4000.0, 2000.0], k("stream"))
    stream_zone = value_noise(xs, ys, 6000.0, k("streamzone")) > 0.2
    stream = _coverage(d_stream, 6.0, res) * stream_zone
    ponds = (fbm(xs, ys, [300.0, 150.0], k("ponds")) > 2.4).astype(np.float32) * (
        value_noise(xs, ys, 4000.0, k("pondzone")) > 0.5
    )
    water = np.maximum(np.maximum(river, stream), ponds)

    # -- DEM and height above drainage: valleys along rivers, gentle plain relief elsewhere
    # local hollows (a few km) flood first wherever the region is; the broad relief only shapes the DEM
    hollows = fbm(xs, ys, [3000.0, 1500.0, 750.0], k("hollows"))
    relief = value_noise(xs, ys, 20000.0, k("dem"))
    valley = np.exp(-d_river / np.float32(600.0)) * 5.0 + np.exp(-d_stream / np.float32(250.0)) * 2.0
    hand = (3.0 * (hollows + 1.95) - valley).astype(np.float32)
    hand = np.where(water > 0.5, np.float32(-1.0), hand)
    dem = (100.0 + 15.0 * relief + hand).astype(np.float32)

    # -- built-up: a city plus compact villages; street grid and building-sized roof cells inside
    city = fbm(xs, ys, [9000.0, 4500.0, 2200.0, 1100.0, 550.0], k("city"), persistence=0.55)
    village = fbm(xs, ys, [900.0, 450.0, 225.0], k("village"))
    urban = np.clip((city - 0.75) * 4.0, 0.0, 1.0) + np.clip((village - 1.9) * 3.0, 0.0, 1.0)
    urban = np.clip(urban, 0.0, 1.0) * (1.0 - water)
    park = (fbm(xs, ys, [700.0, 350.0, 175.0], k("park")) > 1.5) & (urban > 0.5)

    # 200 m city blocks have a character: housing estates (grey / concrete towers), industry (big blue or
    # white metal roofs), or old low-rise; buildings are 45 m cells inside
    blk = hash_uniform(
        np.floor((wx + 100.0) / 200.0).astype(np.int64), np.floor((wy + 100.0) / 200.0).astype(np.int64), k("blocks")
    )
    bx, by = np.floor(wx / 45.0), np.floor(wy / 45.0)
    ub = hash_uniform(bx.astype(np.int64), by.astype(np.int64), k("roofs"))
    industrial = blk > 0.85
    p_conc = np.where(industrial, 0.25, np.where(blk < 0.35, 0.55, 0.25))
    p_blue = np.where(industrial, 0.35, 0.05)
    p_bright = np.where(industrial, 0.12, 0.005)
    roof = np.zeros((4, h, w), dtype=np.float32)
    roof[0] = ub < p_conc
    roof[2] = (ub >= p_conc) & (ub < p_conc + p_blue)
    roof[3] = (ub >= p_conc + p_blue) & (ub < p_conc + p_blue + p_bright)
    roof[1] = (ub >= p_conc + p_blue + p_bright) & (ub < 0.9)
    lx, ly = wx - bx * 45.0, wy - by * 45.0
    built = ((lx > 6.0) & (lx < 38.0) & (ly > 6.0) & (ly < 36.0) | industrial) & ~park & (ub < 0.9)
    roof *= built[None]

    # roads: urban avenues every 800 m and streets every 200 m; rural roads every 1.6 km; farm tracks
    d_av = np.minimum(_grid_lines(wx, 800.0), _grid_lines(wy, 800.0))
    d_st = np.minimum(_grid_lines(wx + 100.0, 200.0), _grid_lines(wy + 100.0, 200.0))
    d_rural = np.minimum(_grid_lines(wx + 400.0, 1600.0), _grid_lines(wy + 400.0, 1600.0))
    d_track = np.minimum(_grid_lines(wx, 400.0), _grid_lines(wy, 300.0))
    road_urban = np.maximum(_coverage(d_av, 14.0, res), _coverage(d_st, 5.0, res))
    road_rural = np.maximum(_coverage(d_rural, 6.0, res), 0.45 * _coverage(d_track, 2.5, res))
    road = np.maximum(road_urban * np.minimum(urban * 1.5, 1.0), road_rural) * (1.0 - water)

    # -- vegetation: woods, grass verges / parks
    wood = fbm(xs, ys, [2500.0, 1250.0, 600.0, 300.0], k("forest"))
    forest = np.clip((wood - 1.2) * 4.0, 0.0, 1.0) * (1.0 - urban) * (1.0 - water) * (1.0 - road)
    # riparian trees and parks make rivers and towns look lived-in
    riparian = _coverage(np.abs(d_river - river_hw - 25.0), 18.0, res) * (1.0 - urban)
    forest = np.maximum(forest, 0.7 * riparian * (1.0 - water))
    grass = park * (1.0 - road) * 0.5
    forest = np.maximum(forest, park * (1.0 - road) * 0.5)

    # -- parcels: 400 x 300 m blocks split into strips (north-China field strips), one crop per strip
    fbx, fby = np.floor(wx / 400.0).astype(np.int64), np.floor(wy / 300.0).astype(np.int64)
    along_x = hash_uniform(fbx, fby, k("orient")) < 0.5
    strip_w = 30.0 + 40.0 * hash_uniform(fbx, fby, k("stripw"))
    local = np.where(along_x, wy - fby * 300.0, wx - fbx * 400.0)
    strip = np.floor(local / strip_w).astype(np.int64)
    pid_x = fbx * 64 + strip * along_x
    pid_y = fby * 64 + strip * ~along_x
    u1 = hash_uniform(pid_x, pid_y, k("crop"))
    crop_type = np.select([u1 < 0.6, u1 < 0.75, u1 < 0.82, u1 < 0.92, u1 < 0.99], [0, 1, 2, 3, 4], 5).astype(np.uint8)
    plant_doy = (140.0 + 25.0 * hash_uniform(pid_x, pid_y, k("plant"))).astype(np.float32)
    vigour = (0.8 + 0.18 * hash_uniform(pid_x, pid_y, k("vigour"))).astype(np.float32)
    field = np.clip(1.0 - urban - water - road - forest - grass, 0.0, 1.0)

    texture = 1.0 + 0.06 * value_noise(xs, ys, 90.0, k("tex")) + 0.03 * pixel_normal(xs, ys, res, k("ptex"))
    return Static(
        water,
        urban.astype(np.float32),
        roof,
        road.astype(np.float32),
        forest.astype(np.float32),
        grass.astype(np.float32),
        field.astype(np.float32),
        crop_type,
        plant_doy,
        vigour,
        hand,
        dem,
        texture.astype(np.float32),
    )


_CACHE: "OrderedDict[tuple, Static]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_PIXELS = 4_000_000  # ~60 bytes per pixel: ~250 MB, e.g. 60 patches of 256 x 256 or 4 full demo grids


def static_for(xs: np.ndarray, ys: np.ndarray, res: float, seed: int, cache: bool = True) -> Static:
    """The static ground of a grid, from a small LRU (bounded in pixels; dask threads may share it)."""
    xs = np.ascontiguousarray(xs, dtype=np.float64)
    ys = np.ascontiguousarray(ys, dtype=np.float64)
    if not cache:
        return build_static(xs, ys, res, seed)
    key = (hashlib.sha1(xs.tobytes() + b"|" + ys.tobytes()).hexdigest(), float(res), int(seed))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    st = build_static(xs, ys, res, seed)
    with _CACHE_LOCK:
        _CACHE[key] = st
        while sum(v.hand.size for v in _CACHE.values()) > CACHE_PIXELS and len(_CACHE) > 1:
            _CACHE.popitem(last=False)
    return st


def flood_level(when: dt.date, event: dt.date | None) -> float | None:
    """Flood stage (m above drainage) on ``when``: rises within 2 days of the event, recedes over ~3 weeks."""
    if event is None:
        return None
    days = (when - event).days
    if days < 0 or days > 24:
        return None
    peak = 2.4
    return peak if days <= 2 else peak * (1.0 - (days - 2) / 22.0)


@dataclass
class Ground:
    """The ground on one date: endmember abundances (K, H, W) plus classes for truth and SAR."""

    abundance: np.ndarray
    landcover: np.ndarray  # uint8 LANDCOVER codes
    flooded: np.ndarray  # bool
    canopy: np.ndarray  # crop canopy cover (0..1) for SAR biomass
    dem: np.ndarray
    texture: np.ndarray


def ground_on(st: Static, when: dt.date, event: dt.date | None) -> Ground:
    doy = when.timetuple().tm_yday
    # canopy cover of each parcel from its planting date (summer maize/soy after the wheat harvest)
    growth = 1.0 / (1.0 + np.exp(-(doy - st.plant_doy - 32.0) / 7.0))
    ct = st.crop_type
    canopy = np.select(
        [ct == 0, ct == 1, ct == 2, ct == 3, ct == 4],
        [
            st.vigour * growth,
            0.85 * st.vigour * growth,
            np.full_like(growth, 0.65),
            np.full_like(growth, 0.08),
            st.vigour * growth,
        ],
        0.0,
    ).astype(np.float32)
    paddy_water = np.where(ct == 4, np.clip(0.7 - canopy, 0.0, 0.7), 0.0).astype(np.float32)
    greenhouse = (ct == 5).astype(np.float32)

    wet = 0.15
    if event is not None and 0 <= (when - event).days:
        wet = 0.15 + 0.7 * float(np.exp(-(when - event).days / 10.0))
    level = flood_level(when, event)
    flooded = (st.hand < level) & (st.water < 0.5) if level is not None else np.zeros(st.hand.shape, dtype=bool)
    fl = flooded.astype(np.float32)

    K = len(ENDMEMBERS)
    ab = np.zeros((K, *st.hand.shape), dtype=np.float32)
    f = st.field * (1.0 - greenhouse)
    soil = f * (1.0 - canopy - paddy_water)
    ab[E["crop"]] = f * canopy
    ab[E["water_clear"]] = f * paddy_water + st.water * 0.4
    ab[E["water_turbid"]] = st.water * 0.6
    ab[E["soil_dry"]] = soil * (1.0 - wet)
    ab[E["soil_wet"]] = soil * wet
    ab[E["bright"]] = st.field * greenhouse + st.urban * st.roof[3]
    ab[E["forest"]] = st.forest
    ab[E["grass"]] = st.grass
    ab[E["asphalt"]] = st.road
    urb = st.urban * (1.0 - st.road) * (1.0 - st.grass)
    ab[E["concrete"]] = urb * st.roof[0]
    ab[E["roof_grey"]] = urb * st.roof[1]
    ab[E["roof_blue"]] = urb * st.roof[2]
    # urban ground between buildings: a mix of pavement, trees and bare ground
    gap = np.clip(urb * (1.0 - st.roof.sum(axis=0)), 0.0, None)
    ab[E["asphalt"]] += 0.45 * gap
    ab[E["forest"]] += 0.35 * gap
    ab[E["soil_dry"]] += 0.2 * gap
    # flood: low ground under turbid water; buildings stick out (double bounce in SAR)
    if flooded.any():
        built = st.urban * np.minimum(st.roof.sum(axis=0), 1.0)  # building footprints stand in the water
        ab *= (1.0 - fl)[None]
        ab[E["water_turbid"]] += fl * (1.0 - built)
        ab[E["flooded_urban"]] += fl * built
    total = ab.sum(axis=0)
    ab /= np.maximum(total, 1e-6)[None]

    lc = np.full(st.hand.shape, BARE, dtype=np.uint8)
    lc[(st.field > 0.5) & (canopy >= 0.3)] = CROP
    lc[(st.field > 0.5) & (canopy < 0.3)] = BARE
    lc[st.grass > 0.5] = GRASS
    lc[st.forest > 0.5] = FOREST
    lc[st.urban > 0.5] = URBAN
    lc[st.road > 0.5] = ROAD
    lc[(st.water > 0.5) | (paddy_water * st.field > 0.5)] = WATER
    lc[flooded] = FLOODED
    return Ground(ab, lc, flooded, canopy, st.dem, st.texture)
