"""Server-side cloud/shadow masks with the same classes and ``MaskConfig`` thresholds as local masking.

One uint8 band ``mask`` of ``MaskClass`` codes per scene, built as an expression, plus per-patch
cloud/shadow/valid fractions by ``reduceRegions`` on the region grid, so patch selection runs on the
server and only a small table comes back. Fractions follow ``pipeline.dataset.selection``: over the whole patch
area, thin cloud counts as cloud, valid = not nodata.

Methods (``auto``: s2cloudless probabilities for Sentinel-2, QA_PIXEL for Landsat):
- ``s2cloudless``: Earth Engine's ``CLOUD_PROB`` (0-100) read as 0-1, averaged over a disk of
  ``s2cloudless_average_over`` px, > ``cloud_prob_threshold``, dilated by ``s2cloudless_dilation`` px
  (what ``s2cloudless``'s own ``get_mask_from_prob`` does locally);
- ``cloudscore``: Cloud Score+ ``cs_cdf`` >= ``cs_cdf_clear`` clear, >= ``cs_cdf_thin`` thin cloud, else cloud;
- ``qa60``: bit 10 cloud, bit 11 cirrus (thin); ``scl``: 3 shadow, 8/9 cloud, 10 cirrus, 11 snow;
- ``qa_pixel``: Landsat C2 bits (fill, dilated cloud, cirrus, cloud, shadow, snow).
Methods without a shadow class add projected shadows: dark NIR (not water) reached from a cloud along
the sun direction over the cloud-height range (``directionalDistanceTransform``), then buffered.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from pipeline.errors import SourceError
from pipeline.grid import Grid
from pipeline.masking.codes import MaskClass
from pipeline.masking.config import MaskConfig
from pipeline.masking.qa import QA60_GAP, qa60_in_gap
from pipeline.sensors import QAPixel, get_sensor

METHODS = ("auto", "s2cloudless", "cloudscore", "qa60", "scl", "qa_pixel")


def _bit(img: Any, bit: int) -> Any:
    return img.rightShift(bit).bitwiseAnd(1).eq(1)


def _transform_list(grid: Grid) -> list[float]:
    return list(grid.transform)[:6]


def water(red: Any, nir: Any) -> Any:
    """Fmask water test, as ``mask_rules.water``."""
    ndvi = nir.subtract(red).divide(nir.add(red))
    return ndvi.lt(0.01).And(nir.lt(0.11)).Or(ndvi.lt(0.1).And(ndvi.gt(0)).And(nir.lt(0.05)))


def dark_pixels(red: Any, nir: Any, clear: Any, grid: Grid, cfg: MaskConfig) -> Any:
    """Shadow candidates as ``mask_rules.dark_pixels``: dark NIR, absolutely and relative to clear land; no water."""
    import ee

    wat = water(red, nir)
    land = clear.And(wat.Not())
    # The relative threshold uses the median NIR of clear land over the grid read, like the local rule.
    stats = nir.updateMask(land).rename("nir").reduceRegion(
        reducer=ee.Reducer.median().combine(ee.Reducer.count(), None, True),
        geometry=ee.Geometry.Rectangle(list(grid.bounds), grid.crs, False),
        crs=grid.crs,
        crsTransform=_transform_list(grid),
        maxPixels=1e9,
        bestEffort=True,
    )
    relative = ee.Number(stats.get("nir_median")).multiply(cfg.shadow_nir_relative).min(cfg.shadow_nir_max)
    threshold = ee.Number(ee.Algorithms.If(ee.Number(stats.get("nir_count")).gt(100), relative, cfg.shadow_nir_max))
    return nir.lt(threshold).And(wat.Not())


def projected_shadow(cloud: Any, dark: Any, sun_azimuth: Any, sun_elevation: Any, grid: Grid, cfg: MaskConfig) -> Any:
    """``mask_rules.cloud_shadow``: dark pixels that see a cloud toward the sun between the min and max
    cloud heights (``directionalDistanceTransform`` on the grid's pixels), buffered, never on cloud."""
    import ee

    px = min(grid.resolution)
    tan_el = ee.Number(sun_elevation).multiply(math.pi / 180).tan()
    d_min = ee.Number(cfg.cloud_height_min_m).divide(tan_el).divide(px)
    d_max = ee.Number(cfg.cloud_height_max_m).divide(tan_el).divide(px)
    max_px = int(math.ceil(cfg.cloud_height_max_m / math.tan(math.radians(5)) / px))  # bound for the transform
    # Toward the sun: azimuth is clockwise from north, the transform's angle counter-clockwise from east.
    angle = ee.Number(90).subtract(sun_azimuth)
    dist = (
        cloud.directionalDistanceTransform(angle, max_px)
        .reproject(crs=grid.crs, crsTransform=_transform_list(grid))
        .select("distance")
    )
    zone = dist.gte(d_min).And(dist.lte(d_max)).unmask(0, False)
    shadow = zone.And(dark).And(cloud.Not())
    if cfg.shadow_buffer_m > 0:
        shadow = shadow.focalMax(cfg.shadow_buffer_m, "circle", "meters")
    return shadow.And(cloud.Not())


def _sun(image: Any, family: str, cfg: MaskConfig) -> tuple[Any, Any]:
    import ee

    if family == "s2":
        az = ee.Number(image.get("MEAN_SOLAR_AZIMUTH_ANGLE"))
        el = ee.Number(90).subtract(image.get("MEAN_SOLAR_ZENITH_ANGLE"))
    else:
        az = ee.Number(image.get("SUN_AZIMUTH"))
        el = ee.Number(image.get("SUN_ELEVATION"))
    if cfg.sun_azimuth is not None and cfg.sun_elevation is not None:
        return ee.Number(cfg.sun_azimuth), ee.Number(cfg.sun_elevation)
    return az, el


def resolve_method(sensor: str, method: str) -> str:
    if method not in METHODS:
        raise SourceError(f"unknown mask method {method!r}; use one of {', '.join(METHODS)}")
    s = get_sensor(sensor)
    if method == "auto":
        if s.family == "s2":
            return "s2cloudless"
        if s.family == "landsat":
            return "qa_pixel"
        raise SourceError(f"sensor {sensor} is SAR: it has no cloud mask (use only optical sensors for masks)")
    allowed = {"s2": {"s2cloudless", "cloudscore", "qa60", "scl"}, "landsat": {"qa_pixel"}}.get(s.family, set())
    if method == "scl" and s.key != "s2_l2a":
        allowed = allowed - {"scl"}
    if method not in allowed:
        raise SourceError(
            f"mask method {method!r} needs bands sensor {sensor} does not have; use one of "
            f"{sorted(allowed) or ['none']}"
        )
    return method


def _present(image: Any, bands: list[str]) -> Any:
    """1 where every band in ``bands`` has data (the local rule: NaN in a used band -> nodata)."""
    import ee

    return image.select(bands).mask().reduce(ee.Reducer.min()).gt(0).unmask(0, False)


def _codes(valid: Any, layers: list[tuple[Any | None, MaskClass]]) -> Any:
    """Paint layers lowest priority first (``mask_qa._compose``), then nodata over everything."""
    import ee

    out = ee.Image.constant(int(MaskClass.CLEAR)).toUint8()
    for layer, code in layers:
        if layer is not None:
            out = out.where(layer.unmask(0, False), int(code))
    return out.where(valid.Not(), int(MaskClass.NODATA)).rename("mask")


def mask_image(
    image: Any,
    sensor: str,
    grid: Grid,
    config: MaskConfig | None = None,
    method: str = "auto",
    date: dt.date | None = None,
) -> Any:
    """uint8 ``mask`` band of MaskClass codes for one scene image of ``sensor``, on ``grid``'s pixels.

    Mirrors ``pipeline.masking.scene.mask_scene`` step by step: the method's evidence, nodata from the bands it
    used (plus green/red/nir/swir1 for methods that add snow and shadow), cirrus -> thin cloud (s2cloudless),
    NDSI snow, and projected shadows on clear pixels (and, for Cloud Score+, on low-score dark pixels).
    """
    import ee

    cfg = config or MaskConfig()
    method = resolve_method(sensor, method)
    s = get_sensor(sensor)
    image = ee.Image(image)
    if method == "qa_pixel":
        qa = image.select("QA_PIXEL")
        valid = _present(image, ["QA_PIXEL"]).And(_bit(qa, QAPixel.FILL).Not())
        return _codes(valid, [
            (_bit(qa, QAPixel.SNOW), MaskClass.SNOW),
            (_bit(qa, QAPixel.SHADOW), MaskClass.SHADOW),
            (_bit(qa, QAPixel.CIRRUS), MaskClass.THIN_CLOUD),
            (_bit(qa, QAPixel.CLOUD).Or(_bit(qa, QAPixel.DILATED_CLOUD)), MaskClass.CLOUD),
        ])
    if method == "scl":
        scl = image.select("SCL")
        valid = _present(image, ["SCL"]).And(scl.gt(1))  # 0 nodata, 1 saturated/defective
        return _codes(
            valid,
            [
                (scl.eq(11), MaskClass.SNOW),
                (scl.eq(3), MaskClass.SHADOW),
                (scl.eq(10), MaskClass.THIN_CLOUD),
                (scl.eq(8).Or(scl.eq(9)), MaskClass.CLOUD),
            ],
        )

    def refl(common: str) -> Any:
        name = s.by_common(common)
        return image.select(name).multiply(s.band(name).scale).add(s.band(name).offset)

    px = min(grid.resolution)
    thin = None
    if method == "s2cloudless":
        used = ["CLOUD_PROB"]
        prob = image.select("CLOUD_PROB").divide(100).unmask(0, False)
        if cfg.s2cloudless_average_over:
            prob = prob.focalMean(cfg.s2cloudless_average_over * px, "circle", "meters")
        cloud = prob.gt(cfg.cloud_prob_threshold)
        if cfg.s2cloudless_dilation:
            cloud = cloud.focalMax(cfg.s2cloudless_dilation * px, "circle", "meters")
    elif method == "cloudscore":
        used = ["cs_cdf"]
        cs = image.select("cs_cdf")
        cloud = cs.lt(cfg.cs_cdf_thin)
        thin = cs.lt(cfg.cs_cdf_clear).And(cloud.Not())
    else:  # qa60
        if qa60_in_gap(date):
            raise SourceError(
                f"QA60 is not populated for scenes dated {QA60_GAP[0]}..{QA60_GAP[1]} (this scene: {date}); use method "
                "'s2cloudless', 'cloudscore' or 'scl'"
            )
        used = ["QA60"]
        qa = image.select("QA60")
        cloud, thin = _bit(qa, 10), _bit(qa, 11).And(_bit(qa, 10).Not())
    extra = [s.by_common(c) for c in ("green", "red", "nir", "swir1")]
    valid = _present(image, used + extra)
    cloud = cloud.unmask(0, False)
    thin = thin.unmask(0, False) if thin is not None else ee.Image.constant(0)
    if cfg.cirrus_threshold is not None and method == "s2cloudless" and "B10" in s.band_names:
        thin = thin.Or(refl("cirrus").gt(cfg.cirrus_threshold).And(cloud.Not()))
    green, red, nir, swir1 = refl("green"), refl("red"), refl("nir"), refl("swir1")
    ndsi = green.subtract(swir1).divide(green.add(swir1))
    flagged = cloud.Or(thin)
    snow = ndsi.gt(cfg.ndsi_snow).And(nir.gt(cfg.snow_nir_min)).And(green.gt(cfg.snow_green_min)).And(flagged.Not())
    shadow = None
    if cfg.shadow:
        clear = valid.And(flagged.Not()).And(snow.Not())
        dark = dark_pixels(red, nir, clear, grid, cfg)
        # Cloud Score+ scores shadows low too: a dark low-score pixel is a shadow candidate, not a cloud.
        source = flagged.And(dark.Not()) if method == "cloudscore" else cloud
        az, el = _sun(image, "s2", cfg)
        target = clear.Or(flagged.And(dark).And(source.Not()))
        shadow = projected_shadow(source, dark, az, el, grid, cfg).And(target)
    return _codes(
        valid,
        [(snow, MaskClass.SNOW), (thin, MaskClass.THIN_CLOUD), (cloud, MaskClass.CLOUD), (shadow, MaskClass.SHADOW)],
    )


def fraction_image(mask: Any) -> Any:
    """0/1 bands ``cloud`` (incl. thin), ``shadow``, ``valid`` whose patch means are the fractions."""
    import ee

    cloud = mask.eq(int(MaskClass.CLOUD)).Or(mask.eq(int(MaskClass.THIN_CLOUD)))
    return ee.Image.cat(
        [
            cloud.rename("cloud"),
            mask.eq(int(MaskClass.SHADOW)).rename("shadow"),
            mask.neq(int(MaskClass.NODATA)).rename("valid"),
        ]
    )


def patch_features(patches: list[tuple[str, Grid]]) -> Any:
    """Patch rectangles in the grid CRS (edges on pixel edges) as a FeatureCollection keyed by ``patch_id``."""
    import ee

    feats = []
    for pid, g in patches:
        feats.append(ee.Feature(ee.Geometry.Rectangle(list(g.bounds), g.crs, False), {"patch_id": pid}))
    return ee.FeatureCollection(feats)


def patch_fraction_collection(mask: Any, grid: Grid, patches: list[tuple[str, Grid]]) -> Any:
    """reduceRegions of the fraction bands over the patches, pinned to ``grid``'s CRS and transform."""
    import ee

    return fraction_image(mask).reduceRegions(
        collection=patch_features(patches), reducer=ee.Reducer.mean(), crs=grid.crs, crsTransform=_transform_list(grid)
    )
