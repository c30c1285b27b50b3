"""STAC Item: every extension validated offline against the shipped schemas; fields read from the written files."""

from __future__ import annotations

import copy
import datetime as dt
import json

import numpy as np
import pystac
import pytest
from affine import Affine
from PIL import Image

from pipeline.errors import DataError
from pipeline.grid import Grid
from pipeline.reconstruct.cog import PROVENANCE_CODES, RasterSpec, write_cog
from pipeline.reconstruct.quicklook import save_png
from pipeline.reconstruct.stac import (
    EO_COMMON_NAMES,
    SCHEMA_DIR,
    SCHEMA_DIR_ENV,
    StacAssets,
    build_item,
    eo_common_name,
    validate_item,
    write_item,
)
from pipeline.reconstruct.thumbnail import THUMBNAIL_MAX_BYTES, THUMBNAIL_SIDE, write_thumbnail
from pipeline.sensors import S2_BANDS, SENSORS, get_sensor

PROJ = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
EO = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
RASTER = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
CLASSIFICATION = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"
GRID = Grid("EPSG:32650", Affine(10, 0, 200_000, 0, -10, 3_000_000), 300, 200)


def _files(folder, dtype="uint16", grid=GRID):
    """Small real outputs on ``grid``: reflectance (with a nodata corner), provenance, source days, quicklook."""
    rng = np.random.default_rng(0)
    refl = rng.uniform(0.0, 0.4, (len(S2_BANDS), grid.height, grid.width)).astype(np.float32)
    refl[:, :10, :10] = np.nan
    data = write_cog(folder / "r.tif", refl, grid, RasterSpec.reflectance(S2_BANDS, dtype=dtype))
    prov = np.zeros((1, grid.height, grid.width), np.uint8)
    prov[:, :10, :10] = 255
    prov[:, 50:] = 1
    provenance = write_cog(folder / "r_provenance.tif", prov, grid, RasterSpec.provenance())
    days = np.where(prov == 1, 5, 0).astype(np.int16)
    source_days = write_cog(folder / "r_source_days.tif", days, grid, RasterSpec.source_days())
    quicklook = save_png(folder / "r_quicklook.png", np.zeros((20, 44, 3), np.uint8))
    thumbnail = write_thumbnail(data, folder / "r_thumbnail.png")
    return StacAssets(data, provenance, None, quicklook, source_days=source_days, thumbnail=thumbnail)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("stac"))


def _item(assets, grid=GRID, bands=S2_BANDS):
    return build_item("r", grid, dt.date(2021, 7, 20), assets, bands, sensor="s2_l1c",
                      input_dates=[dt.date(2021, 7, 10)], properties={"cloudfree:model": "composite"}, simulated=True)


@pytest.fixture
def no_network(monkeypatch):
    """Any schema fetch fails the test: validation must work from the shipped files alone."""
    def fetch(self, *args, **kwargs):
        raise AssertionError(f"tried to fetch {args[:1]}")

    monkeypatch.setattr(pystac.stac_io.DefaultStacIO, "read_text", fetch)
    monkeypatch.delenv(SCHEMA_DIR_ENV, raising=False)


def test_item_validates_offline_with_every_extension(outputs, no_network):
    item = _item(outputs)
    res = validate_item(item)
    assert res.core and res.extensions == {PROJ: "valid", EO: "valid", RASTER: "valid", CLASSIFICATION: "valid"}
    assert set(item.stac_extensions) == {PROJ, EO, RASTER, CLASSIFICATION} and not res.unchecked
    d = item.to_dict(include_self_link=False)
    p = d["properties"]
    assert p["proj:code"] == GRID.crs and p["proj:shape"] == [GRID.height, GRID.width]
    assert p["proj:transform"] == list(GRID.transform)[:6] and p["proj:bbox"] == list(GRID.bounds)
    assert p["gsd"] == 10.0 and p["simulated"] is True and p["cloudfree:model"] == "composite"
    assert p["start_datetime"].startswith("2021-07-10") and p["end_datetime"].startswith("2021-07-20")
    w, s, e, n = d["bbox"]
    gw, gs, ge, gn = GRID.bounds_lonlat()
    assert w <= gw + 1e-6 and s <= gs + 1e-6 and e >= ge - 1e-6 and n >= gn - 1e-6
    assert w < p["proj:centroid"]["lon"] < e and s < p["proj:centroid"]["lat"] < n
    assert {k: a["href"] for k, a in d["assets"].items()} == {
        "data": "r.tif", "provenance": "r_provenance.tif", "source_days": "r_source_days.tif",
        "thumbnail": "r_thumbnail.png", "overview": "r_quicklook.png"}
    # the written JSON validates the same way
    back = json.loads(write_item(item, outputs.data.parent / "r.json").read_text())
    assert validate_item(back).extensions[RASTER] == "valid"


BROKEN = {
    RASTER: lambda d: d["assets"]["data"]["raster:bands"][0].update(data_type="float99"),
    EO: lambda d: d["assets"]["data"]["eo:bands"][4].update(common_name="rededge1"),
    PROJ: lambda d: d["properties"].update({"proj:shape": [200.5, 300]}),
    CLASSIFICATION: lambda d: d["assets"]["provenance"]["classification:classes"][0].update(name="observed clear"),
}


@pytest.mark.parametrize("uri", list(BROKEN), ids=lambda u: u.split("/")[3])
def test_a_broken_field_fails_its_extension_schema(outputs, no_network, uri):
    d = _item(outputs).to_dict(include_self_link=False)
    validate_item(copy.deepcopy(d))  # valid before the change
    BROKEN[uri](d)
    with pytest.raises(pystac.STACValidationError, match=f"against schema at {uri}"):
        validate_item(d)


def test_invalid_item_fails_core_schema(outputs, no_network):
    d = _item(outputs).to_dict(include_self_link=False)
    d["geometry"] = {"type": "Polygon", "coordinates": "nope"}
    with pytest.raises(pystac.STACValidationError):
        validate_item(d)


def test_extension_without_a_shipped_schema_is_reported_not_checked(outputs, no_network):
    d = _item(outputs).to_dict(include_self_link=False)
    sat = "https://stac-extensions.github.io/sat/v1.0.0/schema.json"
    d["stac_extensions"].append(sat)
    res = validate_item(d)
    assert res.unchecked == [sat] and res.extensions[sat].startswith("not checked")


def test_extension_schemas_from_env_folder_override(outputs, no_network, tmp_path, monkeypatch):
    """The CLOUDFREE_STAC_SCHEMAS folder is really used: a projection schema refusing any proj:shape."""
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "$id": PROJ, "type": "object",
              "properties": {"properties": {"type": "object", "properties": {"proj:shape": False}}}}
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "projection.json").write_text(json.dumps(schema))
    item = _item(outputs)
    assert validate_item(item).extensions[PROJ] == "valid"
    monkeypatch.setenv(SCHEMA_DIR_ENV, str(tmp_path / "schemas"))
    with pytest.raises(pystac.STACValidationError):
        validate_item(item)


def test_shipped_schemas_are_the_ones_pystac_writes():
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.eo import EOExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import RasterExtension

    ids = {json.loads(p.read_text())["$id"].rstrip("#") for p in SCHEMA_DIR.glob("*.json")}
    writes = {e.get_schema_uri() for e in (ProjectionExtension, EOExtension, RasterExtension, ClassificationExtension)}
    assert writes == {PROJ, EO, RASTER, CLASSIFICATION} and writes <= ids


def test_eo_common_names_complete_for_all_s2_bands(outputs):
    bands = {b["name"]: b for b in _item(outputs).to_dict()["assets"]["data"]["eo:bands"]}
    assert list(bands) == list(S2_BANDS) and len(bands) == 13
    assert {n: b["common_name"] for n, b in bands.items()} == {
        "B1": "coastal", "B2": "blue", "B3": "green", "B4": "red", "B5": "rededge", "B6": "rededge",
        "B7": "rededge", "B8": "nir", "B8A": "nir08", "B9": "nir09", "B10": "cirrus", "B11": "swir16",
        "B12": "swir22"}
    assert bands["B11"]["center_wavelength"] == pytest.approx(get_sensor("s2_l1c").band("B11").wavelength_nm / 1000)
    # every common name pipeline.sensors uses has an eo name, so no band of any sensor loses it silently
    for sensor in SENSORS.values():
        for b in sensor.bands:
            if b.common:
                assert eo_common_name(b.common) in EO_COMMON_NAMES, (sensor.key, b.name, b.common)


def test_raster_fields_are_read_from_the_files(outputs, tmp_path):
    d = _item(outputs).to_dict()["assets"]
    data = d["data"]["raster:bands"]
    assert len(data) == 13 and all(b == data[0] for b in data)
    assert data[0] == {"nodata": 0, "sampling": "area", "data_type": "uint16", "spatial_resolution": 10.0, "unit": "1",
                       "scale": 0.0001, "offset": 0.0}
    assert d["data"]["roles"] == ["data", "reflectance"]
    prov = d["provenance"]
    assert prov["raster:bands"] == [{"nodata": 255, "sampling": "area", "data_type": "uint8",
                                     "spatial_resolution": 10.0}]
    classes = {c["value"]: c for c in prov["classification:classes"]}
    assert set(classes) == set(PROVENANCE_CODES) == {0, 1, 2, 3, 255}
    assert classes[3]["name"] == "no_clear_observation" and classes[255].get("nodata") is True
    assert not any(c.get("nodata") for v, c in classes.items() if v != 255)
    assert d["source_days"]["raster:bands"][0] == {"nodata": -1, "sampling": "area", "data_type": "int16",
                                                   "spatial_resolution": 10.0, "unit": "days"}
    f32 = _item(_files(tmp_path, dtype="float32")).to_dict()["assets"]["data"]["raster:bands"][0]
    assert f32 == {"nodata": "nan", "sampling": "area", "data_type": "float32", "spatial_resolution": 10.0,
                   "unit": "1"}


def test_missing_off_grid_or_other_bands_raster_is_one_line_error(outputs, tmp_path):
    gone = StacAssets(tmp_path / "missing.tif")
    with pytest.raises(DataError, match="missing.tif: not a readable GeoTIFF") as exc:
        _item(gone)
    assert "\n" not in str(exc.value)
    other = Grid(GRID.crs, GRID.transform, GRID.width + 1, GRID.height)
    with pytest.raises(DataError, match="is not the item's grid 301x200"):
        _item(outputs, grid=other)
    with pytest.raises(DataError, match="r.tif: its bands B1, B2, .* are not the item's bands B2, B3, B4"):
        _item(outputs, bands=["B2", "B3", "B4"])


def test_thumbnail_is_the_product_alone_small_png(outputs):
    d = _item(outputs).to_dict()["assets"]
    assert d["thumbnail"]["roles"] == ["thumbnail"] and d["thumbnail"]["type"] == pystac.MediaType.PNG
    assert d["overview"]["roles"] == ["overview"] and d["overview"]["title"].startswith("Quicklook: input | output")
    path = outputs.thumbnail
    img = Image.open(path)
    assert img.format == "PNG" and path.stat().st_size <= THUMBNAIL_MAX_BYTES
    # the grid's aspect (300 x 200), the long side at most THUMBNAIL_SIDE; the nodata corner transparent
    assert max(img.size) <= THUMBNAIL_SIDE and abs(img.width / img.height - 1.5) < 0.02
    assert img.mode == "RGBA"
    a = np.asarray(img)
    assert a[0, 0, 3] == 0 and (a[-1, -1, 3] == 255) and a[..., 3].mean() > 250


def test_thumbnail_colours_and_size_cap(tmp_path):
    grid = Grid("EPSG:32650", Affine(10, 0, 200_000, 0, -10, 3_000_000), 600, 600)
    refl = np.full((len(S2_BANDS), 600, 600), 0.05, np.float32)
    refl[S2_BANDS.index("B4")] = 0.2  # red scene
    noisy = refl + np.random.default_rng(1).uniform(0, 0.05, refl.shape).astype(np.float32)
    cog = write_cog(tmp_path / "red.tif", noisy, grid, RasterSpec.reflectance(S2_BANDS, dtype="uint16"))
    big = write_thumbnail(cog, tmp_path / "big.png")
    img = np.asarray(Image.open(big))
    assert img.shape[2] == 3  # no nodata, no alpha
    assert img[..., 0].mean() > 2 * img[..., 1].mean() and img[..., 0].mean() > 2 * img[..., 2].mean()
    small = write_thumbnail(cog, tmp_path / "small.png", max_bytes=5_000)
    assert small.stat().st_size <= 5_000 and Image.open(small).width < Image.open(big).width
    with pytest.raises(DataError, match="no band\\(s\\) \\['R'\\] for the thumbnail"):
        write_thumbnail(cog, tmp_path / "x.png", rgb=("R", "B3", "B2"))
    assert not (tmp_path / "x.png").exists()
