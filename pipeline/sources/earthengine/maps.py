"""Put an AOI, its patch grid, masked Earth Engine collections and a finished COG on a ``geemap.Map``.

geemap is the optional ``cloudfree[notebook]`` extra (it pulls ~30 notebook packages), so it is imported
lazily. Maps are created with ``ee_initialize=False``: they never start an authentication prompt; the
caller initializes Earth Engine (``pipeline.sources.earthengine.auth.initialize``) only for EE layers. The COG
layer is an in-memory PNG overlay rendered from the file's overview, so it works without a tile server.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.errors import CloudfreeError
from pipeline.grid import Grid
from pipeline.masking.config import MaskConfig
from pipeline.regions import Region

log = logging.getLogger(__name__)

MASK_PALETTE = ["#1a9850", "#ffffff", "#404040", "#000000", "#9ecae1", "#f781bf"]  # MaskClass 0..5


def _geemap() -> Any:
    try:
        import geemap
    except ImportError:
        raise CloudfreeError("geemap is not installed; run `pip install 'cloudfree[notebook]'`") from None
    return geemap


def make_map(region: Region | None = None, **kwargs: Any) -> Any:
    """A ``geemap.Map`` that never initializes or authenticates Earth Engine by itself."""
    geemap = _geemap()
    kwargs.setdefault("ee_initialize", False)
    m = geemap.Map(**kwargs)
    if region is not None:
        # ipyleaflet's fit_bounds waits for a browser; a headless kernel never answers, so set the view.
        w, s, e, n = region.lonlat_bounds()
        m.center = ((s + n) / 2, (w + e) / 2)
        m.zoom = int(min(18, max(2, math.floor(math.log2(360 / max(e - w, n - s, 1e-6))))))
    return m


def _ring_lonlat(grid: Grid) -> list[list[float]]:
    from rasterio.crs import CRS
    from rasterio.warp import transform

    left, bottom, right, top = grid.bounds
    xs = [left, right, right, left, left]
    ys = [top, top, bottom, bottom, top]
    lon, lat = transform(CRS.from_user_input(grid.crs), CRS.from_epsg(4326), xs, ys)
    return [[float(x), float(y)] for x, y in zip(lon, lat)]


def aoi_geojson(region: Region) -> dict:
    w, s, e, n = region.lonlat_bounds()
    ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"name": region.name},
                "geometry": {"type": "Polygon", "coordinates": [ring]},
            }
        ],
    }


def patch_grid_geojson(region: Region, patches: Sequence[tuple[str, Grid]] | None = None) -> dict:
    """The region's patches as lon/lat polygons (their UTM squares reprojected corner by corner)."""
    patches = patches if patches is not None else region.patches()
    feats = [
        {
            "type": "Feature",
            "properties": {"patch_id": pid},
            "geometry": {"type": "Polygon", "coordinates": [_ring_lonlat(g)]},
        }
        for pid, g in patches
    ]
    return {"type": "FeatureCollection", "features": feats}


def add_aoi(m: Any, region: Region, patches: bool = True) -> Any:
    m.add_geojson(
        aoi_geojson(region),
        layer_name=f"AOI {region.name}",
        style={"color": "#ff7f00", "fillOpacity": 0.0, "weight": 3},
    )
    if patches:
        m.add_geojson(
            patch_grid_geojson(region),
            layer_name="patch grid",
            style={"color": "#377eb8", "fillOpacity": 0.0, "weight": 1},
        )
    return m


def add_masked_collection(
    m: Any,
    region: Region,
    start: Any,
    end: Any,
    sensor: str = "s2_l1c",
    config: MaskConfig | None = None,
    source: Any | None = None,
) -> Any:
    """A median of the cloud-masked collection (true colour) and the first scene's MaskClass layer.

    Needs Earth Engine initialized; only expressions are sent (as map tiles), nothing is downloaded.
    """
    import ee

    from pipeline.sensors import get_sensor
    from pipeline.sources.earthengine import masks as ee_masks
    from pipeline.sources.earthengine.source import EarthEngineSource

    src = source or EarthEngineSource()
    s = get_sensor(sensor)
    grid = region.grid()
    coll = src.collection(region, start, end, s.key)
    masked = coll.map(lambda img: img.updateMask(ee_masks.mask_image(img, s.key, grid, config).eq(0)))
    rgb = list(s.rgb or s.reflectance_bands[:3])
    scale = s.band(rgb[0]).scale
    vis = {"bands": rgb, "min": 0, "max": 0.3 / scale if scale != 1 else 0.3}
    m.add_ee_layer(ee.ImageCollection(masked).median(), vis, f"{s.key} clear median")
    first_mask = ee_masks.mask_image(ee.Image(coll.first()), s.key, grid, config)
    m.add_ee_layer(
        first_mask, {"min": 0, "max": 5, "palette": MASK_PALETTE}, f"{s.key} mask (first scene)", shown=False
    )
    return m


def cog_overlay_png(
    path: str | Path, bands: Sequence[int] = (4, 3, 2), max_size: int = 1024, stretch: tuple[float, float] = (2, 98)
) -> tuple[str, tuple[tuple[float, float], tuple[float, float]]]:
    """(PNG data URL, ((south, west), (north, east))) of a GeoTIFF/COG, read from its overviews."""
    import rasterio
    from PIL import Image
    from rasterio.warp import transform_bounds

    with rasterio.open(path) as src:
        b = [i for i in bands if i <= src.count] or [1]
        factor = max(1, int(np.ceil(max(src.width, src.height) / max_size)))
        shape = (len(b), max(1, src.height // factor), max(1, src.width // factor))
        data = src.read(b, out_shape=shape, masked=True).astype(np.float32).filled(np.nan)
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
    lo, hi = np.nanpercentile(data, stretch) if np.isfinite(data).any() else (0.0, 1.0)
    scaled = np.clip((data - lo) / max(hi - lo, 1e-12), 0, 1)
    alpha = np.isfinite(data).all(axis=0)
    rgb = np.nan_to_num(scaled, nan=0.0)
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    rgba = np.concatenate([rgb, alpha[None].astype(np.float32)]) * 255
    buf = io.BytesIO()
    Image.fromarray(rgba.astype(np.uint8).transpose(1, 2, 0), "RGBA").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return url, ((s, w), (n, e))


def add_cog(m: Any, path: str | Path, bands: Sequence[int] = (4, 3, 2), name: str | None = None) -> Any:
    """Show a finished COG on the map (no tile server needed); returns the ipyleaflet layer."""
    from ipyleaflet import ImageOverlay

    url, bounds = cog_overlay_png(path, bands)
    layer = ImageOverlay(url=url, bounds=bounds, name=name or Path(path).name)
    m.add_layer(layer)
    return layer
