"""STAC Item for a reconstruction: where (projection), which bands (eo), how pixels are stored (raster), what the
provenance codes mean (classification), and which files.

Every extension the item uses is validated offline: its JSON schema ships with the package
(``pipeline/reconstruct/schemas``, sources in the README there) beside the core schemas pystac ships, so a
STAC Item is never reported valid without being checked, and validation never waits on a network. A schema that
is not shipped is reported "not checked" unless ``CLOUDFREE_STAC_SCHEMAS`` names a folder holding it or
``validate_item(..., remote=True)`` may fetch it.

The raster and eo fields are read from the written files (data type, nodata, scale/offset, band names), so the
item describes what is on disk, not what was meant to be written.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pystac
import rasterio
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, NoDataStrings, RasterBand, RasterExtension, Sampling
from pystac.validation import JsonSchemaSTACValidator
from pystac.validation.stac_validator import GetSchemaError
from rasterio.crs import CRS
from rasterio.warp import transform as transform_points
from rasterio.warp import transform_geom

from pipeline.errors import DataError
from pipeline.files import write_text_atomic
from pipeline.grid import Grid
from pipeline.reconstruct.cog import (
    PROVENANCE_CODES,
    PROVENANCE_FILLED,
    PROVENANCE_NO_CLEAR,
    PROVENANCE_NODATA,
    PROVENANCE_OBSERVED,
    PROVENANCE_PREDICTED,
    SOURCE_DAYS_NODATA,
)

log = logging.getLogger(__name__)

COG_MEDIA_TYPE = pystac.MediaType.COG
SCHEMA_DIR_ENV = "CLOUDFREE_STAC_SCHEMAS"
SCHEMA_DIR = Path(__file__).with_name("schemas")  # shipped extension schemas, one file per schema version
REFLECTANCE_UNIT = "1"  # dimensionless (UDUNITS / CF), the usual unit of surface reflectance
DAYS_UNIT = "days"

# Common names the eo extension v1.1.0 allows (its schema's enum); anything else would fail validation.
EO_COMMON_NAMES = frozenset({"coastal", "blue", "green", "red", "rededge", "yellow", "pan", "nir", "nir08", "nir09",
                             "cirrus", "swir16", "swir22", "lwir", "lwir11", "lwir12"})
# pipeline.sensors names some bands by what masking rules call them; the eo extension has one name per range.
_SENSOR_TO_EO_COMMON = {"rededge1": "rededge", "rededge2": "rededge", "rededge3": "rededge",
                        "swir1": "swir16", "swir2": "swir22"}

# Provenance codes as classification classes: machine names (the extension allows [0-9A-Za-z_-]) and legend colours.
_PROVENANCE_CLASSES: dict[int, tuple[str, str | None]] = {
    PROVENANCE_OBSERVED: ("observed", "1A9850"),
    PROVENANCE_FILLED: ("filled", "4575B4"),
    PROVENANCE_PREDICTED: ("predicted", "F46D43"),
    PROVENANCE_NO_CLEAR: ("no_clear_observation", "D73027"),
    PROVENANCE_NODATA: ("nodata", None),
}


@dataclass
class StacAssets:
    """Paths of the files the item points at (relative hrefs are written from the item's folder).

    ``quicklook`` (the input | output side-by-side) becomes the ``overview`` asset, ``thumbnail`` (the product
    alone, ``pipeline.reconstruct.thumbnail.write_thumbnail``) the ``thumbnail`` asset."""

    data: Path
    provenance: Path | None = None
    uncertainty: Path | None = None
    quicklook: Path | None = None
    extra: dict[str, Path] = field(default_factory=dict)
    source_days: Path | None = None
    thumbnail: Path | None = None


def eo_common_name(common: str | None) -> str | None:
    """The eo extension's common name for a ``pipeline.sensors`` band's ``common`` name, or None if it has none."""
    if common is None:
        return None
    name = _SENSOR_TO_EO_COMMON.get(common, common)
    return name if name in EO_COMMON_NAMES else None


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


def _centroid(grid: Grid) -> dict[str, float]:
    left, bottom, right, top = grid.bounds
    lon, lat = transform_points(CRS.from_user_input(grid.crs), "EPSG:4326", [(left + right) / 2], [(bottom + top) / 2])
    return {"lat": round(float(lat[0]), 7), "lon": round(float(lon[0]), 7)}


def _eo_bands(band_names: Sequence[str], sensor_key: str | None) -> list[Band]:
    from pipeline.sensors import get_sensor

    sensor = get_sensor(sensor_key) if sensor_key else None
    out = []
    for name in band_names:
        b = sensor.band(name) if sensor is not None and name in sensor.band_names else None
        out.append(
            Band.create(
                name=name,
                common_name=eo_common_name(b.common) if b else None,
                description=b.description if b and b.description else None,
                center_wavelength=(b.wavelength_nm / 1000.0) if b and b.wavelength_nm else None,
            )
        )
    return out


@dataclass(frozen=True)
class _FileBands:
    names: tuple[str, ...]
    bands: list[RasterBand]


def _raster_bands(path: Path, grid: Grid, unit: str | None) -> _FileBands:
    """raster:bands of a written GeoTIFF, from the file itself; it must be on ``grid``."""
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise DataError(f"{path}: not a readable GeoTIFF for the STAC item ({exc}); write the rasters first") from None
    with ds:
        if (ds.width, ds.height) != (grid.width, grid.height) or ds.transform != grid.transform:
            raise DataError(f"{path}: {ds.width}x{ds.height} at {tuple(ds.transform)[:6]} is not the item's grid "
                            f"{grid.width}x{grid.height} at {tuple(grid.transform)[:6]}; rewrite it on the grid")
        bands = []
        for i in range(ds.count):
            nodata = ds.nodatavals[i]
            scale, offset = float(ds.scales[i]), float(ds.offsets[i])
            band = RasterBand.create(
                nodata=NoDataStrings.NAN if nodata is not None and math.isnan(nodata) else nodata,
                sampling=Sampling.AREA,
                data_type=DataType(ds.dtypes[i]),
                spatial_resolution=float(grid.resolution[0]),
                unit=unit,
                # written only when the file stores anything but physical values, as the raster extension advises
                scale=scale if (scale, offset) != (1.0, 0.0) else None,
                offset=offset if (scale, offset) != (1.0, 0.0) else None,
            )
            if band.nodata is not None and not isinstance(band.nodata, str):
                band.nodata = int(band.nodata) if float(band.nodata).is_integer() else float(band.nodata)
            bands.append(band)
        names = tuple(d or str(i + 1) for i, d in enumerate(ds.descriptions))
    return _FileBands(names, bands)


def _provenance_classes() -> list[Classification]:
    missing = set(PROVENANCE_CODES) - set(_PROVENANCE_CLASSES)
    if missing:  # a new code in cog.py needs a class name here, or the item would describe it wrongly
        raise ValueError(f"provenance code(s) {sorted(missing)} have no STAC class name in stac._PROVENANCE_CLASSES")
    return [
        Classification.create(value=code, name=name, description=PROVENANCE_CODES[code], color_hint=colour,
                              nodata=True if code == PROVENANCE_NODATA else None)
        for code, (name, colour) in sorted(_PROVENANCE_CLASSES.items())
    ]


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
    """A STAC Item for one reconstructed image on ``grid``; hrefs relative to the data file's folder.

    The raster files named in ``assets`` must exist: their storage (raster extension) is read from them."""
    geometry = _densified(grid)
    lon = [p[0] for p in geometry["coordinates"][0]]
    lat = [p[1] for p in geometry["coordinates"][0]]
    bbox = [min(lon), min(lat), max(lon), max(lat)]
    when = dt.datetime.combine(target_date, dt.time(), tzinfo=dt.timezone.utc)
    props: dict[str, Any] = dict(properties or {})
    props["simulated"] = bool(simulated)
    props.setdefault("gsd", float(grid.resolution[0]))
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
        centroid=_centroid(grid),
    )
    base = assets.data.parent

    def href(p: Path) -> str:
        return os.path.relpath(p.resolve(), base.resolve())

    def raster_asset(key: str, path: Path, title: str, roles: list[str], unit: str | None) -> pystac.Asset:
        asset = pystac.Asset(href(path), title=title, media_type=COG_MEDIA_TYPE, roles=roles)
        item.add_asset(key, asset)
        info = _raster_bands(path, grid, unit)
        if key == "data" and info.names != tuple(bands):
            raise DataError(f"{path}: its bands {', '.join(info.names)} are not the item's bands {', '.join(bands)}; "
                            "describe the file as written")
        RasterExtension.ext(asset, add_if_missing=True).apply(bands=info.bands)
        return asset

    data = raster_asset("data", assets.data, "Cloud-free reconstruction", ["data", "reflectance"], REFLECTANCE_UNIT)
    EOExtension.ext(data, add_if_missing=True).apply(bands=_eo_bands(bands, sensor))
    if assets.provenance:
        codes = ", ".join(f"{k} {v}" for k, v in PROVENANCE_CODES.items())
        prov = raster_asset("provenance", assets.provenance, f"Provenance: {codes}", ["metadata"], None)
        ClassificationExtension.ext(prov, add_if_missing=True).apply(classes=_provenance_classes())
    if assets.source_days:
        raster_asset("source_days", assets.source_days,
                     "Source date: days between the target date and the acquisition each pixel's value came from "
                     f"(0 observed on the date, {SOURCE_DAYS_NODATA} none)", ["metadata"], DAYS_UNIT)
    if assets.uncertainty:
        raster_asset("uncertainty", assets.uncertainty, "Predictive standard deviation per band", ["metadata"],
                     REFLECTANCE_UNIT)
    if assets.thumbnail:
        item.add_asset("thumbnail", pystac.Asset(href(assets.thumbnail), title="Thumbnail: true colour",
                                                 media_type=pystac.MediaType.PNG, roles=["thumbnail"]))
    if assets.quicklook:
        item.add_asset("overview", pystac.Asset(href(assets.quicklook), title="Quicklook: input | output",
                                                media_type=pystac.MediaType.PNG, roles=["overview"]))
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


def _schema_key(schema: dict[str, Any]) -> str | None:
    sid = schema.get("$id") or schema.get("id")
    # extension schemas declare "$id" with a trailing "#"; items name them without it
    return sid.rstrip("#") if isinstance(sid, str) else None


def _load_schemas(folder: Path, into: dict[str, dict[str, Any]]) -> None:
    for p in sorted(folder.glob("**/*.json")):
        try:
            schema = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{p}: not a readable JSON schema ({exc}); fix or remove it") from None
        key = _schema_key(schema) if isinstance(schema, dict) else None
        if key:
            into[key] = schema


class _Validator(JsonSchemaSTACValidator):
    """pystac's validator over the shipped schemas; fetches nothing unless ``remote``."""

    def __init__(self, remote: bool = False) -> None:
        super().__init__()
        self.remote = remote
        _load_schemas(SCHEMA_DIR, self.schema_cache)
        projjson = Path(rasterio.__file__).parent / "proj_data" / "projjson.schema.json"
        if projjson.is_file():  # what proj:projjson refers to; rasterio ships it with PROJ's data
            schema = json.loads(projjson.read_text())
            if key := _schema_key(schema):
                self.schema_cache.setdefault(key, schema)
        folder = os.environ.get(SCHEMA_DIR_ENV)
        if folder:
            _load_schemas(Path(folder), self.schema_cache)

    def _get_schema(self, schema_uri: str) -> dict[str, Any]:
        key = schema_uri.rstrip("#")
        if key in self.schema_cache:
            return self.schema_cache[key]
        if not self.remote:
            raise GetSchemaError(schema_uri, LookupError("not shipped and remote fetching is off"))
        return super()._get_schema(schema_uri)


def validate_item(item: pystac.Item | dict, *, remote: bool = False) -> ValidationResult:
    """Validate with pystac's JSON-schema validator: the core schema and every extension schema the package ships
    (or ``CLOUDFREE_STAC_SCHEMAS`` holds), offline. An extension without a local schema is "not checked", or
    fetched with ``remote=True`` (off by default: a blocked network can stall a fetch). Raises
    ``pystac.STACValidationError`` when the item breaks a schema."""
    d = item.to_dict(include_self_link=False) if isinstance(item, pystac.Item) else item
    v = _Validator(remote=remote)
    version = d.get("stac_version", pystac.get_stac_version())
    v.validate_core(d, pystac.STACObjectType.ITEM, version)
    exts: dict[str, str] = {}
    pystac_log = logging.getLogger("pystac.validation.stac_validator")
    for uri in d.get("stac_extensions", []):
        if not remote and uri.rstrip("#") not in v.schema_cache:
            exts[uri] = f"not checked: schema not shipped; add it to {SCHEMA_DIR} or {SCHEMA_DIR_ENV}, or validate " \
                        "with remote=True"
            continue
        level = pystac_log.level
        # pystac logs a full traceback before re-raising a failed schema fetch; the warning below says it once.
        pystac_log.setLevel(logging.CRITICAL)
        try:
            v.validate_extension(d, pystac.STACObjectType.ITEM, version, uri)
            exts[uri] = "valid"
        except GetSchemaError as exc:
            cause = type(exc.__cause__).__name__
            exts[uri] = f"not checked: schema not available ({cause}); add it to {SCHEMA_DIR_ENV}"
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
