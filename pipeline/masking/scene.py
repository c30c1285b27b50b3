"""Cloud and shadow masks: one ``mask_scene`` over every evidence source the bands allow.

Methods (``method=``):

- ``qa_pixel``    Landsat C2 QA_PIXEL bits (fill, dilated cloud, cirrus, cloud, shadow, snow);
- ``s2cloudless`` Sentinel Hub's classifier on the 10 L1C bands B1,B2,B4,B5,B8,B8A,B9,B10,B11,B12 with the
                  SEN12MS-CR-TS settings (threshold 0.4, average_over 4, dilation 2), or Earth Engine's
                  precomputed ``CLOUD_PROB`` band when the bands are absent;
- ``cloudscore``  Cloud Score+ ``cs_cdf`` (>= 0.6 clear);
- ``scl``         Sen2Cor scene classification (L2A);
- ``qa60``        S2 QA60 bits 10/11 -- refused for scenes dated 2022-02..2024-02, when it was not filled;
- ``spectral``    rules on blue, green, red, nir, swir1, swir2 reflectance (Fmask basic test + hysteresis);
- ``auto``        the first that the bands allow, in this order: qa_pixel, s2cloudless (bands), cloudscore,
                  s2cloudless (CLOUD_PROB), scl, qa60 (outside its gap), spectral.

Methods without a shadow class of their own (all but qa_pixel and scl) get shadows by projecting each cloud
object away from the sun at the height (within a scanned range) where its footprint is darkest and keeping
dark-NIR, non-water pixels there (``mask_rules.matched_shadow_zone``); snow
(NDSI test) and cirrus (B10/B9 reflectance) are added where those bands exist. NaN pixels are NODATA.

``mask_fractions`` gives the per-patch numbers selection uses: fractions of ALL pixels, cloud counting
thick and thin cloud, valid = not nodata.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

import numpy as np
import xarray as xr

from pipeline.errors import DataError, SourceError
from pipeline.masking import qa as mask_qa
from pipeline.masking import rules as mask_rules
from pipeline.masking.cloud_probability import (
    S2CLOUDLESS_BANDS,
    detector,
    mask_from_probability,
    s2cloudless_probability,
)
from pipeline.masking.codes import MaskClass
from pipeline.masking.config import METHODS, MaskConfig
from pipeline.sensors import SENSORS, get_sensor

log = logging.getLogger(__name__)

SPECTRAL = ("blue", "green", "red", "nir", "swir1", "swir2")

__all__ = ["METHODS", "MaskConfig", "mask_fractions", "mask_scene"]


class _Bands:
    """Finds bands by sensor name, common name (blue, nir, ...) or S2 zero-padded name (B01)."""

    def __init__(self, raster: xr.DataArray, sensor_key: str | None):
        self.raster = raster
        self.names = [str(b) for b in raster["band"].values]
        self.sensor = None
        if sensor_key:
            try:
                self.sensor = get_sensor(sensor_key)
            except SourceError as exc:  # unknown key: band names alone must do
                log.warning("unknown sensor %r (%s); matching bands by name only", sensor_key, exc)
        self.cache: dict[str, np.ndarray] = {}

    def find(self, name: str) -> str | None:
        if name in self.names:
            return name
        if name.startswith("B") and name[1:].isdigit() and f"B{int(name[1:]):02d}" in self.names:
            return f"B{int(name[1:]):02d}"
        tables = [self.sensor] if self.sensor else [SENSORS["s2_l1c"], SENSORS["landsat8_l2"]]
        for table in tables:
            for b in table.bands:
                if b.common == name and b.name in self.names:
                    return b.name
        return None

    def has(self, *names: str) -> bool:
        return all(self.find(n) is not None for n in names)

    def missing(self, *names: str) -> list[str]:
        return [n for n in names if self.find(n) is None]

    def get(self, name: str) -> np.ndarray:
        if name not in self.cache:
            real = self.find(name)
            if real is None:
                raise DataError(f"band {name!r} not in raster (bands: {', '.join(self.names)})")
            self.cache[name] = np.asarray(self.raster.sel(band=real).values, dtype=np.float32)
        return self.cache[name]


def _scene_date(raster: xr.DataArray, scene: Any) -> dt.date | None:
    if scene is not None:
        return scene.datetime.date()
    value = raster.attrs.get("datetime")
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).date()
    except ValueError:
        log.warning("raster attr datetime=%r is not ISO 8601; scene date unknown", value)
        return None


def _sun_angles(raster: xr.DataArray, scene: Any, cfg: MaskConfig) -> tuple[float | None, float | None]:
    """Scene properties first, then raster attrs, then the config (Earth Engine S2 names accepted too)."""
    for props in ((scene.properties if scene is not None else {}), raster.attrs):
        az = props.get("sun_azimuth", props.get("MEAN_SOLAR_AZIMUTH_ANGLE", props.get("SUN_AZIMUTH")))
        el = props.get("sun_elevation", props.get("SUN_ELEVATION"))
        if el is None and props.get("MEAN_SOLAR_ZENITH_ANGLE") is not None:
            el = 90.0 - float(props["MEAN_SOLAR_ZENITH_ANGLE"])
        if az is not None and el is not None:
            return float(az), float(el)
    return cfg.sun_azimuth, cfg.sun_elevation


_M_PER_DEG_LAT = 111_320.0  # metres per degree along a meridian (and along the equator)


def _is_geographic(crs: Any) -> bool:
    if not crs:
        return False
    from pyproj import CRS

    try:
        return bool(CRS.from_user_input(crs).is_geographic)
    except Exception:  # an unparseable CRS string: treat as projected, as before
        return False


def _transform(raster: xr.DataArray, cfg: MaskConfig) -> tuple[float, ...]:
    """The raster's affine transform with pixel sizes in metres (buffers and shadow heights are in metres)."""
    t = raster.attrs.get("transform")
    if t is not None and len(t) >= 6:
        a, b, c, d, e, f = (float(v) for v in list(t)[:6])
        if _is_geographic(raster.attrs.get("crs")):
            # Degrees read as metres would make a 30 m buffer ~300 000 px (SEN12MS-CR-TS ships EPSG:4326).
            lat = math.radians(f + e * raster.sizes.get("y", 1) / 2)
            a, e = a * _M_PER_DEG_LAT * math.cos(lat), e * _M_PER_DEG_LAT
        return (a, b, c, d, e, f)
    if cfg.pixel_size_m:
        p = cfg.pixel_size_m
        return (p, 0.0, 0.0, 0.0, -p, 0.0)
    raise DataError(
        "raster has no 'transform' attribute, so buffers in metres cannot be converted to pixels; "
        "set attrs['transform'] or pass MaskConfig(pixel_size_m=...)"
    )


def _choose(method: str, bands: _Bands, date: dt.date | None) -> str:
    if method not in METHODS:
        raise DataError(f"unknown mask method {method!r}; use one of: {', '.join(METHODS)}")
    if method != "auto":
        return method
    if bands.has("QA_PIXEL"):
        return "qa_pixel"
    if bands.has(*S2CLOUDLESS_BANDS):
        return "s2cloudless"
    if bands.has("cs_cdf"):
        return "cloudscore"
    if bands.has("CLOUD_PROB"):
        return "s2cloudless"
    if bands.has("SCL"):
        return "scl"
    if bands.has("QA60"):
        if date is not None and not mask_qa.qa60_in_gap(date):
            return "qa60"
        log.warning("auto mask: ignoring QA60 (scene date %s is unknown or in its unfilled gap 2022-02..2024-02)", date)
    if bands.has(*SPECTRAL):
        return "spectral"
    raise DataError(
        f"no cloud mask can be computed from bands {', '.join(bands.names)}: need QA_PIXEL, the s2cloudless bands "
        f"{', '.join(S2CLOUDLESS_BANDS)}, cs_cdf, CLOUD_PROB, SCL, QA60 or the spectral bands {', '.join(SPECTRAL)}"
    )


_NEEDS = {
    "qa_pixel": ("QA_PIXEL",),
    "cloudscore": ("cs_cdf",),
    "scl": ("SCL",),
    "qa60": ("QA60",),
    "spectral": SPECTRAL,
}
_INSTEAD = "use method='auto' (picks what the bands allow) or read the scene with the missing bands"


def _require(method: str, bands: _Bands) -> None:
    if method == "s2cloudless":
        if bands.has(*S2CLOUDLESS_BANDS) or bands.has("CLOUD_PROB"):
            return
        missing = bands.missing(*S2CLOUDLESS_BANDS)
        raise DataError(
            f"mask method 's2cloudless' needs bands {', '.join(S2CLOUDLESS_BANDS)} (L1C; missing: "
            f"{', '.join(missing)}) "
            f"or a CLOUD_PROB band; {_INSTEAD}"
        )
    missing = bands.missing(*_NEEDS[method])
    if missing:
        raise DataError(
            f"mask method {method!r} needs band(s) {', '.join(missing)} missing from the raster; {_INSTEAD}"
        )


def _nodata(bands: _Bands, used: list[str]) -> np.ndarray:
    shape = bands.raster.shape[-2:]
    out = np.zeros(shape, dtype=bool)
    for name in used:
        if bands.find(name) is not None:
            out |= np.isnan(bands.get(name))
    return out


def _evidence(
    method: str, bands: _Bands, date: dt.date | None, cfg: MaskConfig, pixel_m: float
) -> tuple[np.ndarray, list[str]]:
    """The method's own codes and the bands it read."""
    shape = bands.raster.shape[-2:]
    if method == "qa_pixel":
        return mask_qa.decode_qa_pixel(bands.get("QA_PIXEL")), ["QA_PIXEL"]
    if method == "scl":
        return mask_qa.decode_scl(bands.get("SCL")), ["SCL"]
    if method == "qa60":
        return mask_qa.decode_qa60(bands.get("QA60"), date, strict=True), ["QA60"]
    if method == "cloudscore":
        return mask_qa.decode_cloudscore(bands.get("cs_cdf"), cfg.cs_cdf_clear, cfg.cs_cdf_thin), ["cs_cdf"]
    codes = np.full(shape, MaskClass.CLEAR, dtype=np.uint8)
    if method == "s2cloudless":
        det = detector(cfg.s2cloudless_threshold, cfg.s2cloudless_average_over, cfg.s2cloudless_dilation)
        if bands.has(*S2CLOUDLESS_BANDS):
            stack = np.stack([bands.get(b) for b in S2CLOUDLESS_BANDS], axis=-1)
            cloud = mask_from_probability(s2cloudless_probability(stack, det), det)
            used = list(S2CLOUDLESS_BANDS)
        else:
            log.info("s2cloudless: spectral bands absent, using the precomputed CLOUD_PROB band")
            prob = np.nan_to_num(bands.get("CLOUD_PROB"), nan=0.0) / 100.0
            cloud = mask_from_probability(prob, det, threshold=cfg.cloud_prob_threshold)
            used = ["CLOUD_PROB"]
        codes[cloud] = MaskClass.CLOUD
        return codes, used
    if method == "spectral":
        blue, green, red, nir, swir1, swir2 = (np.nan_to_num(bands.get(b), nan=0.0) for b in SPECTRAL)
        codes[mask_rules.spectral_cloud(blue, green, red, nir, swir1, swir2, pixel_m, cfg)] = MaskClass.CLOUD
        return codes, list(SPECTRAL)
    raise AssertionError(method)


def _add_cirrus_snow_shadow(
    codes: np.ndarray, method: str, bands: _Bands, cfg: MaskConfig, transform: tuple[float, ...],
    sun: tuple[float | None, float | None], nodata: np.ndarray,
) -> None:
    """Refine CLEAR pixels in place: cirrus -> THIN_CLOUD, NDSI snow -> SNOW, projected dark -> SHADOW."""
    if cfg.cirrus_threshold is not None and method in ("s2cloudless", "spectral") and bands.has("cirrus"):
        cirrus = np.nan_to_num(bands.get("cirrus"), nan=0.0) > cfg.cirrus_threshold
        codes[cirrus & (codes == MaskClass.CLEAR)] = MaskClass.THIN_CLOUD
    if method in ("qa_pixel", "scl"):
        return  # their own snow and shadow classes are better informed than ours
    if bands.has("green", "nir", "swir1"):
        sn = mask_rules.snow(bands.get("green"), bands.get("nir"), bands.get("swir1"), cfg)
        codes[sn & (codes == MaskClass.CLEAR)] = MaskClass.SNOW
    if not cfg.shadow:
        return
    if not bands.has("red", "nir"):
        log.info("mask %s: no red/nir bands, shadows not detected", method)
        return
    red, nir = bands.get("red"), bands.get("nir")
    flagged = (codes == MaskClass.CLOUD) | (codes == MaskClass.THIN_CLOUD)
    swir1 = bands.get("swir1") if bands.has("swir1") else None
    az, el = sun
    reach = cfg.shadow_search_m if az is None or el is None else cfg.cloud_height_max_m / math.tan(math.radians(el))
    shadeable = mask_rules.buffer(flagged, reach, min(abs(transform[0]), abs(transform[4])))
    dark = mask_rules.dark_pixels(red, nir, (codes == MaskClass.CLEAR) & ~nodata, cfg, swir1, shadeable)
    # Cloud Score+ scores shadows low as well; a dark low-score pixel is a shadow, not a cloud.
    cloud = flagged & ~dark if method == "cloudscore" else codes == MaskClass.CLOUD
    if az is None or el is None:
        log.info(
            "mask %s: sun angles unknown, shadows = dark pixels within %.0f m of clouds", method, cfg.shadow_search_m
        )
    shadow = mask_rules.cloud_shadow(cloud, dark, transform, az, el, cfg)
    target = (codes == MaskClass.CLEAR) | (flagged & dark & ~cloud)
    codes[shadow & target] = MaskClass.SHADOW


def mask_scene(
    raster: xr.DataArray,
    scene: Any = None,
    config: MaskConfig | None = None,
    method: str = "auto",
) -> xr.DataArray:
    """Cloud/shadow mask of one scene: uint8 ``MaskClass`` codes, dims (y, x), on the raster's grid.

    ``raster`` follows the ``Source.read`` contract (dims band, y, x; reflectance; NaN nodata; attrs
    ``sensor``, ``datetime``, ``crs``, ``transform``). ``scene`` (a ``pipeline.sources.base.Scene``) gives
    the sensor, date and sun angles when present. A forced ``method`` whose bands are missing raises
    ``DataError`` naming them.
    """
    cfg = config or MaskConfig()
    if tuple(raster.dims) != ("band", "y", "x"):
        raise DataError(
            f"mask_scene needs a raster with dims (band, y, x), got {tuple(raster.dims)}; use raster.transpose('band', "
            "'y', 'x')"
        )
    sensor_key = scene.sensor if scene is not None else raster.attrs.get("sensor")
    bands = _Bands(raster, sensor_key)
    date = _scene_date(raster, scene)
    chosen = _choose(method, bands, date)
    _require(chosen, bands)
    transform = _transform(raster, cfg)
    pixel_m = min(abs(transform[0]), abs(transform[4]))
    codes, used = _evidence(chosen, bands, date, cfg, pixel_m)
    extra = [b for b in ("green", "red", "nir", "swir1") if chosen not in ("qa_pixel", "scl") and bands.has(b)]
    nodata = _nodata(bands, used + extra) | (codes == MaskClass.NODATA)
    codes[nodata] = MaskClass.NODATA
    _add_cirrus_snow_shadow(codes, chosen, bands, cfg, transform, _sun_angles(raster, scene, cfg), nodata)
    codes[nodata] = MaskClass.NODATA
    log.debug("mask %s via %s: %s", raster.attrs.get("scene_id", "?"), chosen, mask_fractions(codes))

    coords = {k: raster.coords[k] for k in ("y", "x") if k in raster.coords}
    attrs = {
        k: raster.attrs[k]
        for k in ("crs", "transform", "scene_id", "sensor", "datetime", "simulated")
        if k in raster.attrs
    }
    attrs["mask_method"] = chosen
    attrs["mask_codes"] = ", ".join(f"{c.value} {c.name.lower()}" for c in MaskClass)
    return xr.DataArray(codes, dims=("y", "x"), coords=coords, attrs=attrs, name="mask")


def mask_fractions(mask: xr.DataArray | np.ndarray) -> dict[str, float]:
    """``cloud_fraction`` (thick + thin cloud), ``shadow_fraction`` and ``valid_fraction`` (not nodata),
    each relative to ALL pixels of the mask, so the three are comparable across patches."""
    m = np.asarray(mask)
    n = max(m.size, 1)
    cloud = np.count_nonzero((m == MaskClass.CLOUD) | (m == MaskClass.THIN_CLOUD))
    return {
        "cloud_fraction": cloud / n,
        "shadow_fraction": np.count_nonzero(m == MaskClass.SHADOW) / n,
        "valid_fraction": np.count_nonzero(m != MaskClass.NODATA) / n,
    }
