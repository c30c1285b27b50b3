"""STAC Item: validated with pystac's JSON schemas; projection fields equal the grid."""

from __future__ import annotations

import datetime as dt
import json

import pystac
import pytest
from affine import Affine

from pipeline.grid import Grid
from pipeline.reconstruct.stac import SCHEMA_DIR_ENV, StacAssets, build_item, validate_item, write_item
from pipeline.regions import load_region

PROJ = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"


def _item(tmp_path, grid=None):
    grid = grid or load_region("zhengzhou-demo").grid()
    assets = StacAssets(tmp_path / "r.tif", tmp_path / "r_provenance.tif", tmp_path / "r_uncertainty.tif",
                        tmp_path / "r.png")
    return grid, build_item("r", grid, dt.date(2021, 7, 20), assets, ["B2", "B3", "B4", "B8A", "QA"], sensor="s2_l1c",
                            input_dates=[dt.date(2021, 7, 10)], properties={"cloudfree:model": "composite"},
                            simulated=True)


def test_item_validates_and_matches_grid(tmp_path):
    grid, item = _item(tmp_path)
    res = validate_item(item)
    assert res.core
    d = item.to_dict(include_self_link=False)
    p = d["properties"]
    assert p["proj:code"] == grid.crs
    assert p["proj:shape"] == [grid.height, grid.width]
    assert p["proj:transform"] == list(grid.transform)[:6]
    assert p["simulated"] is True and p["cloudfree:model"] == "composite"
    assert p["start_datetime"].startswith("2021-07-10") and p["end_datetime"].startswith("2021-07-20")
    w, s, e, n = d["bbox"]
    rw, rs, re, rn = load_region("zhengzhou-demo").bbox
    # the grid is snapped outward, so its lon/lat box contains the region's box
    assert w <= rw and s <= rs and e >= re and n >= rn and e - w < 0.2
    assert d["assets"]["data"]["href"] == "r.tif" and d["assets"]["data"]["type"] == pystac.MediaType.COG
    assert [b["name"] for b in d["assets"]["data"]["eo:bands"]][:2] == ["B2", "B3"]
    assert d["assets"]["data"]["eo:bands"][0]["common_name"] == "blue"
    assert set(d["assets"]) == {"data", "provenance", "uncertainty", "overview"}
    # extension schemas need the network; they are reported as unchecked, never as valid
    for state in res.extensions.values():
        assert state == "valid" or state.startswith("not checked")


def test_invalid_item_fails_core_schema(tmp_path):
    _, item = _item(tmp_path)
    d = item.to_dict(include_self_link=False)
    d["geometry"] = {"type": "Polygon", "coordinates": "nope"}
    with pytest.raises(pystac.STACValidationError):
        validate_item(d)


def test_extension_schemas_from_local_folder(tmp_path, monkeypatch):
    """The offline schema folder is really used: a projection schema demanding an integer shape pair."""
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": PROJ,
        "type": "object",
        "required": ["properties"],
        "properties": {"properties": {
            "type": "object", "required": ["proj:shape"],
            "properties": {"proj:shape": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
        }},
    }
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "projection.json").write_text(json.dumps(schema))
    monkeypatch.setenv(SCHEMA_DIR_ENV, str(tmp_path / "schemas"))
    _, item = _item(tmp_path, Grid("EPSG:32650", Affine(10, 0, 200_000, 0, -10, 3_000_000), 300, 200))
    assert validate_item(item).extensions[PROJ] == "valid"
    d = item.to_dict(include_self_link=False)
    d["properties"]["proj:shape"] = [200.5, 300]
    with pytest.raises(pystac.STACValidationError):
        validate_item(d)


def test_write_item_is_atomic_json(tmp_path):
    _, item = _item(tmp_path)
    path = write_item(item, tmp_path / "r.json")
    back = pystac.Item.from_file(str(path))
    assert back.id == "r" and back.properties["simulated"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
