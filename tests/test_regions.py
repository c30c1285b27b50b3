"""Region files: the shipped ones validate and grid correctly; every bad field gets a message naming
the file, the field, the value and the fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from pipeline.errors import RegionError
from pipeline.regions import (
    PROJECT_REGIONS,
    check_size,
    estimate_size,
    list_regions,
    load_region,
    max_megapixels,
    utm_crs,
)

SHIPPED = sorted(p.stem for p in PROJECT_REGIONS.glob("*.yaml"))
DEMO = yaml.safe_load((PROJECT_REGIONS / "zhengzhou-demo.yaml").read_text())


def test_regions_are_shipped():
    assert {"zhengzhou-demo", "zhengzhou-2021-flood"} <= set(SHIPPED)
    assert list_regions() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_region_validates_and_grids(name):
    r = load_region(name)
    assert r.name == name
    g = r.grid()
    res = r.resolution
    # snapped outward to whole pixels of the resolution: origin and size are exact multiples
    assert g.transform.a == res and g.transform.e == -res
    assert g.transform.c % res == 0 and g.transform.f % res == 0
    assert g.crs.startswith("EPSG:32")


@pytest.mark.parametrize(("name", "crs"), [("zhengzhou-demo", "EPSG:32649"), ("zhengzhou-2021-flood", "EPSG:32650")])
def test_crs_auto_picks_utm_zone_of_centroid(name, crs):
    assert load_region(name).target_crs() == crs


def test_utm_zone_southern_hemisphere_and_edges():
    assert utm_crs(151.0, -33.9) == "EPSG:32756"
    assert utm_crs(-180.0, 10.0) == "EPSG:32601"
    assert utm_crs(180.0, 10.0) == "EPSG:32660"


def test_demo_grid_covers_bbox_and_patches_line_up():
    r = load_region("zhengzhou-demo")
    g = r.grid()
    assert (g.width, g.height) == (1035, 1026)
    w, s, e, n = g.bounds_lonlat()
    bw, bs, be, bn = r.bbox
    assert w <= bw and s <= bs and e >= be and n >= bn  # the grid covers the AOI
    patches = r.patches()
    assert len(patches) == 49
    size, stride = r.patch.size, r.patch.stride
    ids = [pid for pid, _ in patches]
    assert len(set(ids)) == len(ids)
    for pid, p in patches:
        row, col = int(pid[1:6]), int(pid[7:])
        assert (p.width, p.height) == (size, size)
        assert p.crs == g.crs and p.transform.a == g.transform.a
        # the patch origin is exactly the grid origin plus whole pixels: no sub-pixel drift
        assert p.transform.c == g.transform.c + col * r.resolution
        assert p.transform.f == g.transform.f - row * r.resolution
        assert row % stride == 0 and col % stride == 0
        assert row + size <= g.height and col + size <= g.width
    # neighbours along a row overlap by size - stride pixels exactly
    (_, a), (_, b) = patches[0], patches[1]
    assert b.bounds[0] - a.bounds[0] == stride * r.resolution


# -- bad fields ------------------------------------------------------------------------------------


def _write(tmp_path: Path, data, name: str = "bad-region") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _error(tmp_path: Path, edit=None, text: str | None = None) -> str:
    data = copy.deepcopy(DEMO)
    data["name"] = "bad-region"
    if edit:
        edit(data)
    path = _write(tmp_path, text if text is not None else data)
    with pytest.raises(RegionError) as info:
        load_region(path)
    msg = str(info.value)
    assert str(path) in msg, msg  # every message names the file
    return msg


def test_unknown_key(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(colour="red"))
    assert "unknown key 'colour'" in msg and "'red'" in msg and "allowed keys are: name, description" in msg


def test_unknown_nested_key_lists_that_sections_keys_and_suggests(tmp_path):
    msg = _error(tmp_path, lambda d: d["patch"].update(sise=128))
    assert "unknown key 'patch.sise'" in msg and "128" in msg
    assert "did you mean 'size'?" in msg and "under 'patch' are: size, stride" in msg


def test_west_greater_than_east(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(bbox=[113.71, 34.71, 113.6, 34.8]))
    assert "field 'bbox'" in msg and "west 113.71 > east 113.6" in msg and "swap them" in msg


def test_south_greater_than_north(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(bbox=[113.6, 34.8, 113.71, 34.71]))
    assert "field 'bbox'" in msg and "south 34.8 > north 34.71" in msg and "swap them" in msg


def test_latitude_out_of_range_hints_swapped_lon_lat(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(bbox=[34.71, 113.6, 34.8, 113.71]))
    assert "field 'bbox'" in msg and "latitude 113.6 is outside [-90, 90]" in msg and "swapped" in msg


def test_antimeridian_crossing(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(bbox=[179.5, -17.0, -179.5, -16.0]))
    assert "field 'bbox'" in msg and "antimeridian" in msg and "split it into two regions" in msg


def test_bbox_with_three_numbers(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(bbox=[113.6, 34.7, 113.7]))
    assert "field 'bbox' needs 4 numbers [W, S, E, N]" in msg


def test_window_end_before_start(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(window={"start": "2021-08-31", "end": "2021-07-01"}, event_date=None))
    assert "field 'window'" in msg and "end 2021-07-01 is before start 2021-08-31" in msg and "swap them" in msg


def test_event_outside_window(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(event_date="2021-09-20"))
    assert "event_date 2021-09-20 is outside the window 2021-07-01..2021-08-31" in msg and "widen the window" in msg


@pytest.mark.parametrize("value", [0, -10])
def test_resolution_not_positive(tmp_path, value):
    msg = _error(tmp_path, lambda d: d.update(resolution=value))
    assert "field 'resolution'" in msg and "must be > 0" in msg and f"(got {value})" in msg


def test_patch_size_not_multiple_of_8(tmp_path):
    msg = _error(tmp_path, lambda d: d["patch"].update(size=100))
    assert (
        "field 'patch.size'" in msg
        and "not a positive multiple of 8" in msg
        and "use e.g. 96" in msg
        and "(got 100)" in msg
    )


def test_unknown_sensor(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(sensors=["s1", "modis"]))
    assert "field 'sensors'" in msg and "unknown sensor 'modis'" in msg and "'landsat'" in msg


def test_nested_selection_field_path_has_no_union_tag(tmp_path):
    msg = _error(tmp_path, lambda d: d["selection"].update(reference_max_cloud=2))
    assert "field 'selection.reference_max_cloud'" in msg and "(got 2)" in msg
    assert "tcsen12.reference" not in msg


def test_unknown_selection_rule(tmp_path):
    msg = _error(tmp_path, lambda d: d["selection"].update(rule="best"))
    assert "unknown selection rule 'best'" in msg and "tcsen12, cmsn, sen12mscr_ts" in msg


def test_bad_date_says_the_format(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(event_date="July 20"))
    assert "field 'event_date'" in msg and "YYYY-MM-DD" in msg and "'July 20'" in msg


def test_missing_name_field(tmp_path):
    msg = _error(tmp_path, lambda d: d.pop("name"))
    assert "missing required field 'name'" in msg and "name: " in msg


def test_bad_name_slug(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(name="Zheng Zhou"))
    assert "field 'name'" in msg and "lower-case slug" in msg and "'Zheng Zhou'" in msg


def test_name_must_match_file_in_regions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDFREE_REGIONS_DIR", str(tmp_path))
    data = copy.deepcopy(DEMO)
    _write(tmp_path, data, name="other-name")
    with pytest.raises(RegionError, match="field 'name' is 'zhengzhou-demo' but the file is named 'other-name'"):
        load_region("other-name")


def test_malformed_yaml(tmp_path):
    msg = _error(tmp_path, text="name: bad-region\nbbox: [1, 2\nwindow: {start: 2021-01-01}\n")
    assert "not valid YAML" in msg and "line 2" in msg and "fix the file" in msg


def test_yaml_that_is_not_a_mapping(tmp_path):
    msg = _error(tmp_path, text="- just\n- a list\n")
    assert "must be a YAML mapping" in msg


def test_missing_region_lists_known_regions():
    with pytest.raises(RegionError) as info:
        load_region("atlantis")
    msg = str(info.value)
    assert "region 'atlantis' not found" in msg and "atlantis.yaml" in msg
    assert "known regions:" in msg and "zhengzhou-demo" in msg


def _geo_region(tmp_path: Path, geojson) -> Path:
    data = copy.deepcopy(DEMO)
    data["name"] = "geo-region"
    data.pop("bbox")
    data["geometry"] = "aoi.geojson"
    (tmp_path / "aoi.geojson").write_text(geojson if isinstance(geojson, str) else json.dumps(geojson))
    return _write(tmp_path, data, name="geo-region")


def test_geojson_geometry_region_grids_like_bbox(tmp_path):
    ring = [[113.6, 34.71], [113.71, 34.71], [113.71, 34.8], [113.6, 34.8], [113.6, 34.71]]
    fc = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}],
    }
    r = load_region(_geo_region(tmp_path, fc))
    assert r.lonlat_bounds() == (113.6, 34.71, 113.71, 34.8)
    assert r.grid() == load_region("zhengzhou-demo").grid()


@pytest.mark.parametrize(
    ("geojson", "expect"),
    [
        ({"type": "Polygon", "coordinates": [[113.6, 34.71]]}, "malformed GeoJSON geometry"),
        ({"type": "Point", "coordinates": [113.6, 34.71]}, "GeoJSON has Point"),
        ('{"type": ', "not valid JSON"),
        ({"type": "Polygon", "coordinates": [[[34.7, 113.6], [34.8, 113.6], [34.8, 113.7], [34.7, 113.6]]]}, "swapped"),
    ],
    ids=["bad-rings", "point", "bad-json", "lat-lon-swapped"],
)
def test_malformed_geojson_geometry(tmp_path, geojson, expect):
    path = _geo_region(tmp_path, geojson)
    with pytest.raises(RegionError) as info:
        load_region(path)
    msg = str(info.value)
    assert str(path) in msg and "field 'geometry'" in msg and "aoi.geojson" in msg and expect in msg


def test_geojson_file_missing(tmp_path):
    path = _geo_region(tmp_path, "{}")
    (tmp_path / "aoi.geojson").unlink()
    with pytest.raises(RegionError, match="GeoJSON file not found; fix the region's 'geometry' path"):
        load_region(path)


def test_bbox_and_geometry_are_exclusive(tmp_path):
    msg = _error(tmp_path, lambda d: d.update(geometry="aoi.geojson"))
    assert "exactly one of 'bbox'" in msg


# -- hand-written mistakes that used to be tracebacks or unhelpful ----------------------------------------------------


def test_unquoted_impossible_date_names_the_field_and_value(tmp_path):
    # YAML reads an unquoted 2021-13-01 as a date and its own constructor raised a bare ValueError
    text = (PROJECT_REGIONS / "zhengzhou-demo.yaml").read_text().replace("name: zhengzhou-demo", "name: bad-region")
    msg = _error(tmp_path, text=text.replace("event_date: 2021-07-20", "event_date: 2021-13-01"))
    assert "\n" not in msg
    assert "field 'event_date'" in msg and "'2021-13-01'" in msg and "YYYY-MM-DD" in msg and "month" in msg


def test_binary_file_is_not_a_region(tmp_path):
    path = tmp_path / "scene.yaml"
    path.write_bytes(b"II*\x00\x08\x00\x00\x00\xff\xfe\x00\x01" * 20)  # a TIFF header is no UTF-8 text
    with pytest.raises(RegionError) as info:
        load_region(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "not a text file" in msg and "YAML text file" in msg


def test_geometry_given_a_bbox_mapping_says_where_bbox_goes(tmp_path):
    def edit(d):
        d.pop("bbox")
        d["geometry"] = {"bbox": [113.6, 34.71, 113.71, 34.8]}

    msg = _error(tmp_path, edit)
    assert "\n" not in msg and "field 'geometry'" in msg and "[113.6, 34.71, 113.71, 34.8]" in msg
    assert "'bbox: [113.6, 34.71, 113.71, 34.8]' at the top level" in msg and "valid string" not in msg


def test_geometry_given_inline_geojson_says_to_save_a_file(tmp_path):
    def edit(d):
        d.pop("bbox")
        d["geometry"] = {"type": "Polygon", "coordinates": [[[113.6, 34.71], [113.7, 34.71], [113.7, 34.8]]]}

    msg = _error(tmp_path, edit)
    assert "field 'geometry'" in msg and "inline GeoJSON" in msg and "geometry: aoi.geojson" in msg


def test_yaml_error_is_one_line_with_its_position(tmp_path):
    msg = _error(tmp_path, text="name: bad-region\nwindow: {start: 2021-01-01\nbbox: [1, 2, 3, 4]\n")
    assert "\n" not in msg and "not valid YAML" in msg and "line 3" in msg


# -- S1 pairing default follows the constellation ------------------------------------------------------------------


def _rule(tmp_path: Path, start: str, end: str, event: str, **selection) -> object:
    data = copy.deepcopy(DEMO)
    data.update(name="s1-rule", event_date=event, window={"start": start, "end": end})
    data["selection"] = {"rule": "tcsen12", **selection}
    return load_region(_write(tmp_path, data, name="s1-rule")).selection


def test_sar_max_days_default_follows_the_s1_revisit_of_the_window(tmp_path):
    assert _rule(tmp_path, "2021-07-01", "2021-08-31", "2021-07-20").sar_max_days == 3  # S1A + S1B
    assert _rule(tmp_path, "2022-08-13", "2022-09-28", "2022-08-29").sar_max_days == 6  # S1A alone
    assert _rule(tmp_path, "2025-06-01", "2025-07-31", "2025-06-15").sar_max_days == 3  # S1A + S1C
    # a value written in the file is kept whatever the dates
    assert _rule(tmp_path, "2022-08-13", "2022-09-28", "2022-08-29", sar_max_days=2).sar_max_days == 2
    assert _rule(tmp_path, "2022-08-13", "2022-09-28", "2022-08-29", rule="sen12mscr_ts").sar_max_days == 6


# -- size estimate and guard -------------------------------------------------------------------------------------

# about 100 x 100 km around Zhengzhou: the 10,000 km² region that validated "ok" and grew build-dataset to 8.8 GB
HUGE_BBOX = [113.0, 34.3, 114.1, 35.2]


def test_size_estimate_of_the_demo():
    r = load_region("zhengzhou-demo")
    est = estimate_size(r)
    px = 1035 * 1026
    assert (est.width, est.height, est.pixels, est.bands, est.dtype) == (1035, 1026, px, 13, "uint16")
    assert est.area_km2 == pytest.approx(px * 100 / 1e6)
    assert est.intermediate_bytes == px * (13 * 2 + 1 + 2)  # 13 uint16 bands, uint8 provenance, int16 days
    assert estimate_size(r, "float32").intermediate_bytes == px * (13 * 4 + 1 + 2)
    assert 1.0e9 < est.build_peak_bytes < 2.5e9  # ~1.6 GB measured on this size
    assert any("1.1 Mpx" in line for line in est.lines())
    landsat = estimate_size(load_region("nsw-landsat"))
    assert landsat.bands == 7 and landsat.resolution == 30


def test_size_guard_refuses_a_10000_km2_region_unless_yes(tmp_path, monkeypatch):
    monkeypatch.delenv("CLOUDFREE_MAX_MEGAPIXELS", raising=False)
    data = copy.deepcopy(DEMO)
    data.update(name="huge", bbox=HUGE_BBOX)
    r = load_region(_write(tmp_path, data, name="huge"))
    with pytest.raises(RegionError) as info:
        check_size(r)
    msg = str(info.value)
    assert "\n" not in msg and "region huge is 10," in msg and "km²" in msg and "Mpx at 10 m" in msg
    assert "over the 10 Mpx limit (CLOUDFREE_MAX_MEGAPIXELS)" in msg and "--yes" in msg and "smaller bbox" in msg
    est = check_size(r, yes=True)
    assert 9_500 < est.area_km2 < 11_000 and 2.5e9 < est.intermediate_bytes < 3.5e9
    assert 5.5e9 < estimate_size(r, "float32").intermediate_bytes < 6e9  # 5.7 GB measured with float32 output
    monkeypatch.setenv("CLOUDFREE_MAX_MEGAPIXELS", "200")
    assert check_size(r).megapixels > 90  # a machine-wide limit lets it through
    monkeypatch.setenv("CLOUDFREE_MAX_MEGAPIXELS", "0.5")
    with pytest.raises(RegionError, match="over the 0.5 Mpx limit"):
        check_size(load_region("zhengzhou-demo"))
    monkeypatch.setenv("CLOUDFREE_MAX_MEGAPIXELS", "lots")
    with pytest.raises(RegionError, match="CLOUDFREE_MAX_MEGAPIXELS='lots' is not a positive number"):
        max_megapixels()
