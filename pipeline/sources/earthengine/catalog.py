"""Earth Engine collections per sensor, built as server-side expressions (nothing is fetched here).

S2 L1C/L2A are joined with s2cloudless probabilities (``Join.saveFirst`` on ``system:index``, the
official recipe) and linked with Cloud Score+ (``linkCollection``: a missing match gives a masked
``cs_cdf`` band instead of dropping the scene). Landsat C2 L2/TOA keep QA_PIXEL. S1 GRD is filtered to
IW, VV+VH, 10 m, optional orbit pass, border noise removed by incidence angle, optional speckle filter
in linear power, and returned in dB whatever collection it came from.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import SourceError
from pipeline.grid import Grid
from pipeline.sensors import get_sensor

S2_COLLECTIONS = {"s2_l1c": "COPERNICUS/S2_HARMONIZED", "s2_l2a": "COPERNICUS/S2_SR_HARMONIZED"}
S2_CLOUD_PROBABILITY = "COPERNICUS/S2_CLOUD_PROBABILITY"
CLOUD_SCORE_PLUS = "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED"
S1_DB = "COPERNICUS/S1_GRD"
S1_LINEAR = "COPERNICUS/S1_GRD_FLOAT"

Speckle = Literal["boxcar", "refined_lee"]


@dataclass(frozen=True)
class S1Options:
    """Sentinel-1 choices; the defaults keep both passes and apply no speckle filter (as SEN12MS-CR does)."""

    orbit_pass: Literal["ASCENDING", "DESCENDING"] | None = None
    min_angle: float = 30.6  # border noise lives at the swath edges: keep ~30.6-45.2 degrees
    max_angle: float = 45.2
    speckle: Speckle | None = None
    boxcar_radius_px: int = 1  # 3x3 boxcar


def region_geometry(bounds_lonlat: tuple[float, float, float, float]) -> Any:
    import ee

    w, s, e, n = bounds_lonlat
    return ee.Geometry.Rectangle([w, s, e, n], "EPSG:4326", False)


def grid_geometry(grid: Grid) -> Any:
    """The grid's footprint as a planar rectangle in its own CRS, edges on pixel edges."""
    import ee

    left, bottom, right, top = grid.bounds
    return ee.Geometry.Rectangle([left, bottom, right, top], grid.crs, False)


def _dates(start: dt.date, end: dt.date) -> tuple[str, str]:
    # Windows are inclusive; filterDate's end is exclusive.
    return start.isoformat(), (end + dt.timedelta(days=1)).isoformat()


def _base(collection_id: str, geometry: Any | None, start: dt.date, end: dt.date, index: str | None) -> Any:
    import ee

    d0, d1 = _dates(start, end)
    coll = ee.ImageCollection(collection_id)
    if geometry is not None:
        coll = coll.filterBounds(geometry)
    coll = coll.filterDate(d0, d1)
    if index is not None:
        coll = coll.filter(ee.Filter.eq("system:index", index))
    return coll


def s2_collection(sensor: str, geometry: Any | None, start: dt.date, end: dt.date, index: str | None = None) -> Any:
    import ee

    if sensor not in S2_COLLECTIONS:
        raise SourceError(f"no Earth Engine S2 collection for sensor {sensor!r}; use one of {sorted(S2_COLLECTIONS)}")
    s2 = _base(S2_COLLECTIONS[sensor], geometry, start, end, index)
    prob = _base(S2_CLOUD_PROBABILITY, geometry, start, end, index)
    joined = ee.ImageCollection(
        ee.Join.saveFirst("s2cloudless").apply(
            primary=s2, secondary=prob, condition=ee.Filter.equals(leftField="system:index", rightField="system:index")
        )
    )
    with_prob = joined.map(
        lambda img: img.addBands(ee.Image(img.get("s2cloudless")).select(["probability"], ["CLOUD_PROB"]))
    )
    return ee.ImageCollection(with_prob).linkCollection(ee.ImageCollection(CLOUD_SCORE_PLUS), ["cs_cdf"])


def landsat_collection(
    sensor: str,
    geometry: Any | None,
    start: dt.date,
    end: dt.date,
    wrs: tuple[int, int] | None = None,
    index: str | None = None,
) -> Any:
    import ee

    s = get_sensor(sensor)
    if s.family != "landsat" or not s.ee_collection:
        raise SourceError(f"sensor {sensor!r} is not a Landsat sensor with an Earth Engine collection")
    coll = _base(s.ee_collection, geometry, start, end, index)
    if wrs is not None:
        coll = coll.filter(ee.Filter.eq("WRS_PATH", wrs[0])).filter(ee.Filter.eq("WRS_ROW", wrs[1]))
    return coll


def _to_db(img: Any, bands: list[str]) -> Any:
    return img.addBands(img.select(bands).log10().multiply(10), None, True)


def _boxcar(img: Any, bands: list[str], radius: int) -> Any:
    return img.addBands(img.select(bands).focalMean(radius, "square", "pixels"), None, True)


def refined_lee(band: Any) -> Any:
    """Refined Lee filter (Lee 1981 as ported to Earth Engine by Lemoine / Mullissa et al. 2021) on one linear band."""
    import ee

    name = band.bandNames().get(0)
    k3 = ee.Kernel.fixed(3, 3, ee.List.repeat(ee.List.repeat(1, 3), 3), 1, 1, False)
    mean3 = band.reduceNeighborhood(ee.Reducer.mean(), k3)
    var3 = band.reduceNeighborhood(ee.Reducer.variance(), k3)
    sample = [[0] * 7, [0, 1, 0, 1, 0, 1, 0]] * 3 + [[0] * 7]
    sk = ee.Kernel.fixed(7, 7, sample, 3, 3, False)
    smean = mean3.neighborhoodToBands(sk)
    svar = var3.neighborhoodToBands(sk)
    # Gradients across the 3x3 grid of 3x3 means (8 directions in 4 pairs), pick the strongest edge.
    pairs = [(1, 7), (6, 2), (3, 5), (0, 8)]
    grads = ee.Image.cat([smean.select(a).subtract(smean.select(b)).abs() for a, b in pairs])
    gradmask = grads.eq(grads.reduce(ee.Reducer.max()))
    gradmask = gradmask.addBands(gradmask)
    c = smean.select(4)
    dirs = ee.Image.cat(
        [smean.select(a).subtract(c).gt(c.subtract(smean.select(b))).multiply(i + 1) for i, (a, b) in enumerate(pairs)]
    )
    dirs = dirs.addBands(ee.Image.cat([dirs.select(i).Not().multiply(i + 5) for i in range(4)]))
    dirs = dirs.updateMask(gradmask).reduce(ee.Reducer.sum())
    stats = svar.divide(smean.multiply(smean))
    sigma_v = stats.toArray().arraySort().arraySlice(0, 0, 5).arrayReduce(ee.Reducer.mean(), [0])
    rect = [[0] * 7] * 3 + [[1] * 7] * 4
    diag = [[1] * (i + 1) + [0] * (6 - i) for i in range(7)]
    rk = ee.Kernel.fixed(7, 7, rect, 3, 3, False)
    dk = ee.Kernel.fixed(7, 7, diag, 3, 3, False)
    means, variances = [], []
    for i in range(4):
        for j, kernel in enumerate((rk, dk)):
            k = kernel if i == 0 else kernel.rotate(i)
            sel = dirs.eq(2 * i + j + 1)
            means.append(band.reduceNeighborhood(ee.Reducer.mean(), k).updateMask(sel))
            variances.append(band.reduceNeighborhood(ee.Reducer.variance(), k).updateMask(sel))
    dmean = ee.Image.cat(means).reduce(ee.Reducer.sum())
    dvar = ee.Image.cat(variances).reduce(ee.Reducer.sum())
    var_x = dvar.subtract(dmean.multiply(dmean).multiply(sigma_v)).divide(sigma_v.add(1.0))
    b = var_x.divide(dvar)
    out = dmean.add(b.multiply(band.subtract(dmean)))
    return out.arrayProject([0]).arrayFlatten([["sum"]]).float().rename([name])


def s1_collection(
    geometry: Any | None, start: dt.date, end: dt.date, options: S1Options | None = None, index: str | None = None
) -> Any:
    import ee

    o = options or S1Options()
    # Speckle filters average power, so a filtered request starts from the linear collection.
    coll_id = S1_LINEAR if o.speckle else S1_DB
    coll = (
        _base(coll_id, geometry, start, end, index)
        .filter(ee.Filter.eq("instrumentMode", "IW"))
        .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VV"))
        .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VH"))
        .filter(ee.Filter.eq("resolution_meters", 10))
    )
    if o.orbit_pass:
        coll = coll.filter(ee.Filter.eq("orbitProperties_pass", o.orbit_pass))
    lo, hi = o.min_angle, o.max_angle

    def prepare(img: Any) -> Any:
        angle = img.select("angle")
        keep = angle.gt(lo).And(angle.lt(hi))
        out = img.select(["VV", "VH", "angle"]).updateMask(keep)
        if o.speckle == "boxcar":
            out = _boxcar(out, ["VV", "VH"], o.boxcar_radius_px)
        elif o.speckle == "refined_lee":
            out = out.addBands(ee.Image.cat([refined_lee(out.select("VV")), refined_lee(out.select("VH"))]), None, True)
        if o.speckle:
            out = _to_db(out, ["VV", "VH"])
        return out.copyProperties(img, img.propertyNames())

    return coll.map(prepare)


def collection(
    sensor: str,
    geometry: Any | None,
    start: dt.date,
    end: dt.date,
    *,
    wrs: tuple[int, int] | None = None,
    s1: S1Options | None = None,
    index: str | None = None,
) -> Any:
    """The server-side collection of ``sensor`` (a sensors key) over ``geometry`` and the inclusive date window.

    ``index`` keeps the one scene with that ``system:index`` (what ``read`` uses, so a scene read goes
    through exactly the joins, filters and conversions that ``search`` listed it with).
    """
    s = get_sensor(sensor)
    if s.family == "s2":
        return s2_collection(s.key, geometry, start, end, index)
    if s.family == "landsat":
        return landsat_collection(s.key, geometry, start, end, wrs, index)
    if s.family == "s1":
        return s1_collection(geometry, start, end, s1, index)
    raise SourceError(f"no Earth Engine collection for sensor {sensor!r}")


def scene_image(sensor: str, index: str, day: dt.date, *, s1: S1Options | None = None) -> Any:
    """One scene by ``system:index``; the date window (day +- 1) keeps the server-side filter cheap."""
    import ee

    coll = collection(sensor, None, day - dt.timedelta(days=1), day + dt.timedelta(days=1), s1=s1, index=index)
    return ee.Image(coll.first())
