"""The Earth Engine source: ``search`` and ``read`` of the ``Source`` protocol on earthengine-api.

Collections and masks are built server-side (``ee_collections``, ``ee_masks``); ``search`` lists scenes
from one ``getInfo`` of per-image metadata; ``read`` returns a lazy dask array whose chunks are
``computePixels`` requests on the exact target grid (``ee_pixels``); ``patch_fractions`` computes the
selection table on the server. Authentication happens on first use (``ee_auth``).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.grid import Grid
from pipeline.masking.config import MaskConfig
from pipeline.regions import Region
from pipeline.sensors import DEFAULT_SENSOR, get_sensor
from pipeline.sources.base import Scene, raster_attrs
from pipeline.sources.earthengine import auth as ee_auth
from pipeline.sources.earthengine import batch as ee_export
from pipeline.sources.earthengine import catalog as ee_collections
from pipeline.sources.earthengine import masks as ee_masks
from pipeline.sources.earthengine import pixels as ee_pixels

log = logging.getLogger(__name__)

# Per-family metadata read in the one search request; missing properties are simply absent.
_PROPS = {
    "s2": [
        "CLOUDY_PIXEL_PERCENTAGE",
        "MEAN_SOLAR_AZIMUTH_ANGLE",
        "MEAN_SOLAR_ZENITH_ANGLE",
        "SPACECRAFT_NAME",
        "MGRS_TILE",
        "SENSING_ORBIT_NUMBER",
    ],
    "landsat": ["CLOUD_COVER", "SUN_AZIMUTH", "SUN_ELEVATION", "SPACECRAFT_ID", "WRS_PATH", "WRS_ROW"],
    "s1": ["orbitProperties_pass", "relativeOrbitNumber_start", "platform_number", "instrumentMode"],
}


# Operating periods of the Landsat C2 L2 archives; L7 is only used before L8 (SLC-off stripes from 2003).
_LANDSAT_PERIODS = {
    "landsat5_l2": (dt.date(1984, 3, 16), dt.date(2012, 5, 5)),
    "landsat7_l2": (dt.date(1999, 5, 28), dt.date(2013, 4, 10)),
    "landsat8_l2": (dt.date(2013, 3, 18), None),
    "landsat9_l2": (dt.date(2021, 10, 31), None),
}


def sensor_keys(sensor: str, start: dt.date, end: dt.date) -> list[str]:
    """Sensor keys a family (or a key) means over a window: s2 -> L1C, s1 -> GRD, landsat -> missions flying."""
    if sensor == "landsat":
        return [k for k, (a, b) in _LANDSAT_PERIODS.items() if a <= end and (b is None or b >= start)]
    key = DEFAULT_SENSOR.get(sensor, sensor)
    get_sensor(key)
    return [key]


def _sensor_keys(sensor: str) -> str:
    # One collection per call: a family means its default sensor here (search expands families itself).
    return DEFAULT_SENSOR.get(sensor, sensor)


def scene_from_feature(sensor: str, feature: dict[str, Any]) -> Scene:
    """A ``Scene`` from one feature of the search listing (properties + footprint geometry)."""
    s = get_sensor(sensor)
    p = dict(feature.get("properties") or {})
    index = p.pop("index")
    when = dt.datetime.fromtimestamp(int(p.pop("time_start")) / 1000, tz=dt.timezone.utc)
    props: dict[str, Any] = {"ee_index": index, "ee_collection": s.ee_collection, "simulated": False}
    cloud = None
    if s.family == "s2":
        if "CLOUDY_PIXEL_PERCENTAGE" in p:
            cloud = float(p["CLOUDY_PIXEL_PERCENTAGE"]) / 100
        if "MEAN_SOLAR_AZIMUTH_ANGLE" in p:
            props["sun_azimuth"] = float(p["MEAN_SOLAR_AZIMUTH_ANGLE"])
        if "MEAN_SOLAR_ZENITH_ANGLE" in p:
            props["sun_elevation"] = 90.0 - float(p["MEAN_SOLAR_ZENITH_ANGLE"])
        props["platform"] = p.get("SPACECRAFT_NAME")
        props["mgrs_tile"] = p.get("MGRS_TILE")
    elif s.family == "landsat":
        if p.get("CLOUD_COVER") is not None and float(p["CLOUD_COVER"]) >= 0:  # -1 = not computed
            cloud = float(p["CLOUD_COVER"]) / 100
        if "SUN_AZIMUTH" in p:
            props["sun_azimuth"] = float(p["SUN_AZIMUTH"])
        if "SUN_ELEVATION" in p:
            props["sun_elevation"] = float(p["SUN_ELEVATION"])
        props["platform"] = p.get("SPACECRAFT_ID")
        props["wrs"] = (p.get("WRS_PATH"), p.get("WRS_ROW"))
    else:
        props["orbit_pass"] = p.get("orbitProperties_pass")
        props["relative_orbit"] = p.get("relativeOrbitNumber_start")
        props["platform"] = f"Sentinel-1{p['platform_number']}" if p.get("platform_number") else None
    return Scene(
        id=index,
        sensor=s.key,
        datetime=when,
        footprint=feature.get("geometry") or {},
        cloud_cover=cloud,
        properties=props,
    )


class EarthEngineSource:
    """``Source`` backed by Google Earth Engine.

    Options: ``s1`` (``S1Options``: orbit pass, angle range, speckle filter), ``max_concurrent`` requests
    (default 8), ``max_request_bytes`` (default 48 MiB), ``retry`` (``RetryPolicy``), ``high_volume``
    endpoint, ``max_scenes`` per search.
    """

    name = "earthengine"

    def __init__(
        self,
        *,
        s1: ee_collections.S1Options | None = None,
        max_concurrent: int = 8,
        max_request_bytes: int = ee_pixels.MAX_REQUEST_BYTES,
        retry: ee_pixels.RetryPolicy | None = None,
        high_volume: bool | None = None,
        max_scenes: int = 2000,
    ) -> None:
        self.s1 = s1 or ee_collections.S1Options()
        self.max_concurrent = max_concurrent
        self.max_request_bytes = max_request_bytes
        self.retry = retry or ee_pixels.RetryPolicy()
        self.high_volume = high_volume
        self.max_scenes = max_scenes

    def _init(self) -> None:
        import ee

        ee_auth.initialize(high_volume=self.high_volume)
        # This source retries with its own backoff; the library's retries would stack under it.
        ee.data.setMaxRetries(0)

    # -- expressions (no network) -------------------------------------------------------------------
    def collection(self, region: Region, start: dt.date, end: dt.date, sensor: str) -> Any:
        s = get_sensor(_sensor_keys(sensor))
        geom = ee_collections.region_geometry(region.lonlat_bounds())
        wrs = (region.wrs.path, region.wrs.row) if region.wrs is not None and s.family == "landsat" else None
        return ee_collections.collection(s.key, geom, start, end, wrs=wrs, s1=self.s1)

    def listing(self, collection: Any, sensor: str) -> Any:
        """FeatureCollection of (footprint, index, time, metadata) per image, sorted by time, capped."""
        import ee

        props = _PROPS[get_sensor(sensor).family]

        def row(img: Any) -> Any:
            info = (
                img.toDictionary(props)
                .set("index", img.get("system:index"))
                .set("time_start", img.get("system:time_start"))
            )
            return ee.Feature(img.geometry(), info)

        return ee.FeatureCollection(collection.sort("system:time_start").limit(self.max_scenes).map(row))

    def image(self, scene: Scene) -> Any:
        index = scene.properties.get("ee_index", scene.id)
        return ee_collections.scene_image(scene.sensor, index, scene.date, s1=self.s1)

    def mask(self, scene: Scene, grid: Grid, config: MaskConfig | None = None, method: str = "auto") -> Any:
        return ee_masks.mask_image(self.image(scene), scene.sensor, grid, config, method, scene.date)

    def export_job(
        self,
        scene: Scene,
        patch_id: str,
        patch_grid: Grid,
        region_grid: Grid | None = None,
        config: MaskConfig | None = None,
        method: str = "auto",
    ) -> ee_export.ExportJob:
        """A batch-export job writing one patch file (mask computed on the region grid, as for selection)."""
        img = self.image(scene)
        mask = None
        if get_sensor(scene.sensor).family != "s1":
            mask = ee_masks.mask_image(img, scene.sensor, region_grid or patch_grid, config, method, scene.date)
        return ee_export.ExportJob(
            patch_id,
            scene.sensor,
            scene.id,
            scene.datetime,
            patch_grid,
            ee_export.export_image(img, scene.sensor, mask),
        )

    # -- Source protocol ----------------------------------------------------------------------------
    def search(self, region: Region, start: dt.date, end: dt.date, sensor: str) -> list[Scene]:
        keys = sensor_keys(sensor, start, end)
        self._init()
        scenes: list[Scene] = []
        for key in keys:
            listing = self.listing(self.collection(region, start, end, key), key)
            info = ee_pixels.with_retries(
                listing.getInfo, f"scene search {key} {start}..{end} over {region.name}", self.retry
            )
            found = [scene_from_feature(key, f) for f in info.get("features", [])]
            if len(found) >= self.max_scenes:
                log.warning(
                    "Earth Engine search hit max_scenes=%d for %s %s; narrow the window or raise max_scenes",
                    self.max_scenes,
                    key,
                    region.name,
                )
            scenes += found
        return sorted(scenes, key=lambda s: (s.datetime, s.id))

    def read(self, scene: Scene, grid: Grid, bands: Sequence[str] | None = None) -> xr.DataArray:
        s = get_sensor(scene.sensor)
        names = list(s.check_bands(bands) if bands is not None else s.band_names)
        self._init()
        data = ee_pixels.lazy_pixels(
            self.image(scene),
            names,
            grid,
            label=f"{scene.sensor}:{scene.id}",
            max_bytes=self.max_request_bytes,
            policy=self.retry,
            max_concurrent=self.max_concurrent,
        )
        # Stored DN -> physical units with the same table as every other source.
        scale = np.array([s.band(b).scale for b in names], dtype=np.float32)[:, None, None]
        offset = np.array([s.band(b).offset for b in names], dtype=np.float32)[:, None, None]
        if np.any(scale != 1) or np.any(offset != 0):
            data = data * scale + offset
        return xr.DataArray(
            data.astype(np.float32),
            dims=("band", "y", "x"),
            coords={"band": names, **grid.coords()},
            attrs=raster_attrs(scene, grid, simulated=False),
            name=scene.sensor,
        )

    def patch_fractions(
        self,
        region: Region,
        scene: Scene,
        patches: list[tuple[str, Grid]] | None = None,
        config: MaskConfig | None = None,
        method: str = "auto",
    ) -> pd.DataFrame:
        """Per-patch cloud/shadow/valid fractions computed on the server (rows as ``selection.FRACTION_COLUMNS``)."""
        grid = region.grid()
        patches = patches if patches is not None else region.patches()
        s = get_sensor(scene.sensor)
        self._init()
        if s.family == "s1":
            import ee

            valid = self.image(scene).select(["VV", "VH"]).mask().reduce(ee.Reducer.min()).gt(0).unmask(0, False)
            mask = ee.Image.constant(3).toUint8().where(valid, 0)
        else:
            mask = ee_masks.mask_image(self.image(scene), scene.sensor, grid, config, method, scene.date)
        fc = ee_masks.patch_fraction_collection(mask, grid, patches)
        info = ee_pixels.with_retries(fc.getInfo, f"patch fractions of {scene.sensor}:{scene.id}", self.retry)
        rows = []
        for f in info.get("features", []):
            p = f["properties"]
            rows.append(
                {
                    "patch_id": p["patch_id"],
                    "cloud_fraction": p.get("cloud"),
                    "shadow_fraction": p.get("shadow"),
                    "valid_fraction": p.get("valid"),
                }
            )
        df = pd.DataFrame(rows, columns=["patch_id", "cloud_fraction", "shadow_fraction", "valid_fraction"])
        df.insert(1, "family", s.family)
        df.insert(2, "sensor", s.key)
        df.insert(3, "scene_id", scene.id)
        df.insert(4, "datetime", pd.Timestamp(scene.datetime).tz_convert("UTC"))
        if s.family == "s1":
            df["cloud_fraction"] = np.nan
            df["shadow_fraction"] = np.nan
        return df
