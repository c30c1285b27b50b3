"""STAC Item for a reconstruction: where (projection extension), which bands (eo), which files.

pystac validates the core Item schema offline (it ships those JSON schemas); extension schemas are
fetched from stac-extensions.github.io. Without network they are reported as not checked, never
silently counted as valid; ``CLOUDFREE_STAC_SCHEMAS`` may point at a folder of extension schema JSON
files (each with its ``$id``) to validate them offline as well.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pystac
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.validation import JsonSchemaSTACValidator
from pystac.validation.stac_validator import GetSchemaError
from rasterio.crs import CRS
from rasterio.warp import transform_geom

from pipeline.errors import DataError
from pipeline.files import write_text_atomic
from pipeline.grid import Grid
from pipeline.reconstruct.cog import PROVENANCE_CODES, SOURCE_DAYS_NODATA

log = logging.getLogger(__name__)

COG_MEDIA_TYPE = pystac.MediaType.COG
SCHEMA_DIR_ENV = "CLOUDFREE_STAC_SCHEMAS"


@dataclass
class StacAssets:
    """Paths of the files the item points at (relative hrefs are written from the item's folder)."""

    data: Path
    provenance: Path | None = None
    uncertainty: Path | None = None
    quicklook: Path | None = None
    extra: dict[str, Path] = field(default_factory=dict)
    source_days: Path | None = None


def _densified(grid: Grid, n: int = 8) -> dict[str, Any]:
    left, bottom, right, top = grid.bounds
    pts: list[tuple[float, float]] = []
    for i in range(n):
        pts.append((left + (right - left) * i / n, bottom))
    for i in range(n):
        pts.append((right, bottom + (top - bottom) * i / n))
    for i in range(n):
        pts.append((right - (right - left) * i / n, top))
    for i in range(n):
        pts.append((left, top - (top - bottom) * i / n))
    pts.append(pts[0])
    geom = transform_geom(CRS.from_user_input(grid.crs), "EPSG:4326", {"type": "Polygon", "coordinates": [pts]},
                          precision=7)
    return {"type": "Polygon", "coordinates": [[list(p) for p in geom["coordinates"][0]]]}


def _eo_bands(band_names: Sequence[str], sensor_key: str | None) -> list[Band]:
    from pipeline.sensors import get_sensor

    sensor = get_sensor(sensor_key) if sensor_key else None
    out = []
    for name in band_names:
        b = None
        if sensor is not None and name in sensor.band_names:
            b = sensor.band(name)
        out.append(
            Band.create(
                name=name,
                common_name=b.common if b and b.common in _EO_COMMON else None,
                description=b.description if b and b.description else None,
                center_wavelength=(b.wavelength_nm / 1000.0) if b and b.wavelength_nm else None,
            )
        )
    return out


# Common names the eo extension's schema allows (others would fail its enum).
_EO_COMMON = {"coastal", "blue", "green", "red", "rededge", "yellow", "pan", "nir", "nir08", "nir09", "cirrus",
              "swir16", "swir22", "lwir", "lwir11", "lwir12"}


def build_item(
    item_id: str,
    grid: Grid,
    target_date: dt.date,
    assets: StacAssets,
    bands: Sequence[str],
    *,
    sensor: str | None = None,
    input_dates: Sequence[dt.date] = (),
    properties: dict[str, Any] | None = None,
    simulated: bool = False,
) -> pystac.Item:
    """A STAC Item for one reconstructed image on ``grid``; hrefs relative to the data file's folder."""
    geometry = _densified(grid)
    lon = [p[0] for p in geometry["coordinates"][0]]
    lat = [p[1] for p in geometry["coordinates"][0]]
    bbox = [min(lon), min(lat), max(lon), max(lat)]
    when = dt.datetime.combine(target_date, dt.time(), tzinfo=dt.timezone.utc)
    props: dict[str, Any] = dict(properties or {})
    props["simulated"] = bool(simulated)
    if input_dates:
        dates = sorted(set(input_dates) | {target_date})
        start = dt.datetime.combine(dates[0], dt.time(), tzinfo=dt.timezone.utc)
        end = dt.datetime.combine(dates[-1], dt.time(23, 59, 59), tzinfo=dt.timezone.utc)
        props["start_datetime"] = start.isoformat().replace("+00:00", "Z")
        props["end_datetime"] = end.isoformat().replace("+00:00", "Z")
    item = pystac.Item(item_id, geometry, bbox, when, props)
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    crs = CRS.from_user_input(grid.crs)
    epsg = crs.to_epsg()
    proj.apply(
        code=f"EPSG:{epsg}" if epsg else None,
        wkt2=None if epsg else crs.to_wkt(),
        shape=[grid.height, grid.width],
        transform=[float(v) for v in list(grid.transform)[:6]],
        bbox=[float(v) for v in grid.bounds],
    )
    base = assets.data.parent

    def href(p: Path) -> str:
        return os.path.relpath(p.resolve(), base.resolve())

    data = pystac.Asset(href(assets.data), title="Cloud-free reconstruction", media_type=COG_MEDIA_TYPE, roles=["data"])
    item.add_asset("data", data)
    EOExtension.ext(data, add_if_missing=True).apply(bands=_eo_bands(bands, sensor))
    if assets.provenance:
        codes = ", ".join(f"{k} {v}" for k, v in PROVENANCE_CODES.items())
        item.add_asset(
            "provenance",
            pystac.Asset(href(assets.provenance), title=f"Provenance: {codes}", media_type=COG_MEDIA_TYPE,
                         roles=["metadata"]),
        )
    if assets.source_days:
        item.add_asset(
            "source_days",
            pystac.Asset(href(assets.source_days),
                         title="Source date: days between the target date and the acquisition each pixel's value "
                         f"came from (0 observed on the date, {SOURCE_DAYS_NODATA} none)",
                         media_type=COG_MEDIA_TYPE, roles=["metadata"]),
        )
    if assets.uncertainty:
        item.add_asset(
            "uncertainty",
            pystac.Asset(href(assets.uncertainty), title="Predictive standard deviation per band",
                         media_type=COG_MEDIA_TYPE, roles=["metadata"]),
        )
    if assets.quicklook:
        item.add_asset("overview", pystac.Asset(href(assets.quicklook), title="Quicklook: input | output",
                                                media_type=pystac.MediaType.PNG, roles=["overview", "visual"]))
    for key, p in assets.extra.items():
        item.add_asset(key, pystac.Asset(href(p), roles=["metadata"]))
    return item


@dataclass
class ValidationResult:
    core: bool
    extensions: dict[str, str]  # schema uri -> "valid" | "not checked: ..." (invalid raises)

    @property
    def unchecked(self) -> list[str]:
        return [k for k, v in self.extensions.items() if v != "valid"]


def _validator() -> JsonSchemaSTACValidator:
    v = JsonSchemaSTACValidator()
    folder = os.environ.get(SCHEMA_DIR_ENV)
    if folder:
        for p in Path(folder).glob("**/*.json"):
            schema = json.loads(p.read_text())
            if "$id" in schema:
                v.schema_cache[schema["$id"]] = schema
    return v


def validate_item(item: pystac.Item | dict, *, remote: bool = False) -> ValidationResult:
    """Validate with pystac's JSON-schema validator: core always (offline), extensions whose schema is in
    ``CLOUDFREE_STAC_SCHEMAS`` or, with ``remote=True``, fetchable (a blocked network can stall a fetch,
    so inference never tries by default). Raises ``pystac.STACValidationError`` when the item breaks a schema."""
    d = item.to_dict() if isinstance(item, pystac.Item) else item
    v = _validator()
    version = d.get("stac_version", pystac.get_stac_version())
    v.validate_core(d, pystac.STACObjectType.ITEM, version)
    exts: dict[str, str] = {}
    pystac_log = logging.getLogger("pystac.validation.stac_validator")
    for uri in d.get("stac_extensions", []):
        if not remote and uri not in v.schema_cache:
            exts[uri] = f"not checked: schema not available offline; set {SCHEMA_DIR_ENV} or validate with remote=True"
            continue
        level = pystac_log.level
        # pystac logs a full traceback before re-raising a failed schema fetch; the warning below says it once.
        pystac_log.setLevel(logging.CRITICAL)
        try:
            v.validate_extension(d, pystac.STACObjectType.ITEM, version, uri)
            exts[uri] = "valid"
        except GetSchemaError as exc:
            cause = type(exc.__cause__).__name__
            exts[uri] = f"not checked: schema not available offline ({cause}); set {SCHEMA_DIR_ENV}"
            log.warning("STAC extension schema %s not validated: %s", uri, exc)
        finally:
            pystac_log.setLevel(level)
    return ValidationResult(core=True, extensions=exts)


def write_item(item: pystac.Item, path: str | Path) -> Path:
    """Write the item JSON atomically (temp + rename), without absolute self links."""
    path = Path(path)
    try:
        write_text_atomic(path, json.dumps(item.to_dict(include_self_link=False), indent=2))
    except OSError as exc:
        raise DataError(f"{path}: cannot write the STAC item ({exc.strerror}); check the output folder") from None
    return path
