"""``cloudfree regions list|show|validate`` and ``cloudfree scenes``."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app, main
from pipeline.regions import PROJECT_REGIONS

runner = CliRunner()
FALL = "ROIs1970_fall_139_p839"


def _run(*args: str):
    return runner.invoke(app, list(args))


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the real entry point, where CloudfreeError becomes one line and exit code 2."""
    monkeypatch.setattr(sys, "argv", ["cloudfree", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_regions_list_table():
    r = _run("regions", "list")
    assert r.exit_code == 0, r.output
    for name in ("zhengzhou-demo", "zhengzhou-2021-flood", "wuhan-landsat", "nsw-landsat"):
        assert name in r.output
    assert "EPSG:32649" in r.output and "[113.6, 34.71, 113.71, 34.8]" in r.output
    assert "2021-07-01..2021-08-31" in r.output and "s1, s2, landsat" in r.output and "yes" in r.output


def test_regions_list_survives_a_broken_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDFREE_REGIONS_DIR", str(tmp_path))
    (tmp_path / "zhengzhou-demo.yaml").write_text((PROJECT_REGIONS / "zhengzhou-demo.yaml").read_text())
    (tmp_path / "broken.yaml").write_text("name: broken\nresolution: -1\n")
    r = _run("regions", "list")
    assert r.exit_code == 0 and "zhengzhou-demo" in r.output and "invalid" in r.output


def test_regions_show_yaml_and_grid():
    r = _run("regions", "show", "zhengzhou-demo")
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.output.split("# derived grid")[0])
    assert shown["name"] == "zhengzhou-demo" and shown["patch"] == {"size": 256, "stride": 128}
    assert shown["selection"]["min_valid"] == 0.99  # defaults are filled in: this is the validated model
    assert "crs: EPSG:32649" in r.output and "size: 1035 x 1026 px at 10 m" in r.output
    assert "patches: 49 of 256 px, stride 128" in r.output


def test_regions_show_unknown_region_is_one_line_error(monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, "regions", "show", "atlantis")
    assert code == 2 and "region 'atlantis' not found" in err and "known regions:" in err and "Traceback" not in err


def test_regions_validate_ok_and_error(tmp_path):
    r = _run("regions", "validate", str(PROJECT_REGIONS / "zhengzhou-2021-flood.yaml"))
    assert r.exit_code == 0 and r.output.splitlines()[0] == "ok"
    # the TCSEN12 study area is ~150,000 km²: valid, but the size guard will want --yes
    assert "size: 37,778 x 39,933 px at 10 m = 1,508.6 Mpx" in r.output and "disk: reconstruct writes ~" in r.output
    assert "memory: build-dataset peaks near ~" in r.output and "build-dataset and reconstruct refuse it" in r.output
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load((PROJECT_REGIONS / "zhengzhou-demo.yaml").read_text())
    data["patch"]["size"] = 100
    bad.write_text(yaml.safe_dump(data))
    r = _run("regions", "validate", str(bad))
    assert r.exit_code == 2
    assert str(bad) in r.output and "field 'patch.size'" in r.output and "multiple of 8" in r.output


@pytest.fixture()
def fall_region(tmp_path):
    path = tmp_path / "jiangsu-sample.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "jiangsu-sample",
                "bbox": [119.1, 33.4, 119.4, 33.6],
                "window": {"start": "2021-07-01", "end": "2021-08-31"},
                "sensors": ["s1", "s2"],
            }
        )
    )
    return path


def test_scenes_local_real_sen12mscr(fall_region, real_data):
    r = _run("scenes", str(fall_region), "--source", "local", "--root", str(real_data / "sen12mscr"))
    assert r.exit_code == 0, r.output
    for kind in ("s1", "s2_cloudy", "s2_cloudfree"):
        assert f"{FALL}_{kind}" in r.output
    assert "ROIs2017" not in r.output  # other footprint
    assert "3 scene(s) from local" in r.output and "(pseudo)" in r.output and "s1_grd" in r.output

    r = _run("scenes", str(fall_region), "--source", "local", "--root", str(real_data / "sen12mscr"), "--sensor", "s1")
    assert r.exit_code == 0 and f"{FALL}_s1" in r.output and "s2_cloudy" not in r.output


def test_scenes_local_landsat_dates_and_cloud(tmp_path, real_data):
    path = tmp_path / "colombia.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "colombia",
                "bbox": [-75.5, 1.0, -75.0, 1.5],
                "window": {"start": "2019-01-01", "end": "2019-12-31"},
                "sensors": ["landsat"],
                "resolution": 30,
            }
        )
    )
    root = str(real_data / "landsat-c2-l2")
    r = _run("scenes", str(path), "--source", "local", "--root", root)
    assert r.exit_code == 0, r.output
    assert (
        "LC08_L2SP_008059_20191201_20200825_02_T1" in r.output and "2019-12-01 15:13" in r.output and "81.0" in r.output
    )
    r = _run("scenes", str(path), "--source", "local", "--root", root, "--start", "2019-01-01", "--end", "2019-11-30")
    assert r.exit_code == 0 and "0 scene(s)" in r.output and "LC08" not in r.output


def test_scenes_argument_errors(fall_region, monkeypatch, capsys, tmp_path):
    code, _, err = _main(monkeypatch, capsys, "scenes", str(fall_region), "--source", "local")
    assert code == 2 and "--source local needs --root DIR" in err
    code, _, err = _main(monkeypatch, capsys, "scenes", str(fall_region), "--source", "local", "--root", str(tmp_path))
    assert code == 2 and "no scenes indexed" in err and "Layouts tried" in err
    code, _, err = _main(
        monkeypatch, capsys, "scenes", str(fall_region), "--start", "2021-08-31", "--end", "2021-07-01"
    )
    assert code == 2 and "before --start" in err
    r = _run("scenes", str(fall_region), "--source", "dropbox")
    assert r.exit_code != 0 and "dropbox" in r.output


def test_scenes_synthetic_demo_lists_all_sensors_over_window():
    pytest.importorskip("pipeline.sources.synthetic.source")
    r = _run("scenes", "zhengzhou-demo", "--source", "synthetic")
    assert r.exit_code == 0, r.output
    assert "2021-07-01..2021-08-31" in r.output
    rows = [line for line in r.output.splitlines() if "│" in line and "2021-" in line]
    sensors = {cell.strip() for line in rows for cell in line.split("│")[3:4]}
    assert {"s1_grd", "s2_l1c"} <= sensors and sensors & {"landsat8_l2", "landsat9_l2"}
    dates = sorted(line.split("│")[2].strip()[:10] for line in rows)
    assert dates[0] >= "2021-07-01" and dates[-1] <= "2021-08-31"
    assert len(rows) >= 20

    r = _run(
        "scenes",
        "zhengzhou-demo",
        "--source",
        "synthetic",
        "--sensor",
        "landsat",
        "--start",
        "2021-08-01",
        "--end",
        "2021-08-31",
    )
    rows = [line for line in r.output.splitlines() if "│" in line and "2021-" in line]
    assert rows and all("landsat" in line and "2021-08-" in line for line in rows)


# -- regions new, and the mistakes of hand-written region files ---------------------------------------------------

SINDH_BBOX = ("67.9", "26.4", "68.0", "26.5")  # ~10 x 11 km near Dadu / Sehwan, Sindh


def test_regions_show_prints_the_sensors():
    r = _run("regions", "show", "zhengzhou-demo")
    assert r.exit_code == 0 and "sensors: [s1, s2, landsat]" in r.output  # rich ate "[s1, s2, landsat]" as markup


def test_regions_new_from_bbox_writes_a_region_that_validates(tmp_path):
    out = tmp_path / "sindh-2022.yaml"
    r = _run("regions", "new", "sindh-2022", "--bbox", *SINDH_BBOX, "--event-date", "2022-08-29",
             "--days-before", "20", "--days-after", "10", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output and "size: 1,007 x 1,117 px at 10 m" in r.output
    data = yaml.safe_load(out.read_text())
    assert data["bbox"] == [67.9, 26.4, 68.0, 26.5] and data["sensors"] == ["s1", "s2"] and data["resolution"] == 10
    assert str(data["event_date"]) == "2022-08-29"
    assert {k: str(v) for k, v in data["window"].items()} == {"start": "2022-08-09", "end": "2022-09-08"}
    assert "selection" not in data  # the defaults, so the S1 tolerance follows the window's constellation
    r = _run("regions", "validate", str(out))
    assert r.exit_code == 0 and r.output.splitlines()[0] == "ok", r.output
    r = _run("regions", "show", str(out))
    assert "sar_max_days: 6" in r.output and "crs: EPSG:32642" in r.output


def test_regions_new_from_geojson_writes_a_region_that_validates(tmp_path):
    ring = [[-122.5, 37.7], [-122.3, 37.7], [-122.3, 37.9], [-122.5, 37.9], [-122.5, 37.7]]
    geo = tmp_path / "shapes" / "aoi.geojson"
    geo.parent.mkdir()
    geo.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon",
                                                                              "coordinates": [ring]}}))
    out = tmp_path / "regions" / "bay-landsat.yaml"
    r = _run("regions", "new", "bay-landsat", "--geojson", str(geo), "--event-date", "2021-03-15",
             "--sensors", "landsat", "--out", str(out))
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(out.read_text())
    assert data["geometry"] == "../shapes/aoi.geojson" and "bbox" not in data  # relative to the region file
    assert data["resolution"] == 30 and data["sensors"] == ["landsat"]
    r = _run("regions", "validate", str(out))
    assert r.exit_code == 0 and r.output.splitlines()[0] == "ok" and "at 30 m" in r.output, r.output


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--event-date", "2022-08-29"], "give exactly one of --bbox W S E N or --geojson FILE"),
        (["--bbox", *SINDH_BBOX, "--event-date", "2022-02-30"],
         "--event-date '2022-02-30' is not a date; use YYYY-MM-DD"),
        (["--bbox", *SINDH_BBOX, "--event-date", "2022-08-29", "--sensors", "s1,sentinel3"],
         "unknown sensor(s) ['sentinel3']; use some of s1, s2, landsat"),
        (["--bbox", "68.0", "26.4", "67.9", "26.5", "--event-date", "2022-08-29"], "west 68.0 > east 67.9"),
        (["--bbox", *SINDH_BBOX, "--event-date", "2022-08-29", "--days-before", "-5"], "--days-before -5: "),
    ],
    ids=["no-aoi", "bad-date", "bad-sensor", "bad-bbox", "negative-days"],
)
def test_regions_new_errors_are_one_line(monkeypatch, capsys, tmp_path, args, expect):
    out = tmp_path / "x.yaml"
    code, _, err = _main(monkeypatch, capsys, "regions", "new", "x", *args, "--out", str(out))
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_regions_new_does_not_overwrite_without_force(monkeypatch, capsys, tmp_path):
    out = tmp_path / "x.yaml"
    out.write_text("keep me")
    code, _, err = _main(monkeypatch, capsys, "regions", "new", "x", "--bbox", *SINDH_BBOX, "--event-date",
                         "2022-08-29", "--out", str(out))
    assert code == 2 and "exists; pass --force" in err and out.read_text() == "keep me"
    code, _, _ = _main(monkeypatch, capsys, "regions", "new", "x", "--bbox", *SINDH_BBOX, "--event-date",
                       "2022-08-29", "--out", str(out), "--force")
    assert code in (0, None) and "name: x" in out.read_text()


_WINDOW = "window: {start: 2021-07-01, end: 2021-08-31}\n"
REGION_FILE_MISTAKES = {
    "unquoted-bad-date": ("name: bad\nbbox: [67.9, 26.4, 68.0, 26.5]\nevent_date: 2021-13-01\n" + _WINDOW,
                          ["field 'event_date'", "'2021-13-01'", "YYYY-MM-DD"]),
    "binary-file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",
                    ["not a text file", "a region is a YAML text file"]),
    "geometry-bbox": ("name: bad\ngeometry: {bbox: [67.9, 26.4, 68.0, 26.5]}\n" + _WINDOW,
                      ["field 'geometry'", "[67.9, 26.4, 68.0, 26.5]",
                       "'bbox: [67.9, 26.4, 68.0, 26.5]' at the top level"]),
}


@pytest.mark.parametrize("case", sorted(REGION_FILE_MISTAKES))
@pytest.mark.parametrize("command", ["validate", "show"])
def test_region_file_mistakes_are_one_line_naming_the_field_and_fix(monkeypatch, capsys, tmp_path, case, command):
    content, expected = REGION_FILE_MISTAKES[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = _main(monkeypatch, capsys, "regions", command, str(path))
    assert code == 2 and out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), err
    assert all(e in lines[0] for e in expected), err
    assert "Traceback" not in err and "valid string" not in err


def test_sindh_2022_made_with_regions_new_builds_with_the_default_rule(tmp_path):
    """Since S1B's failure the S1 revisit is 12 days: the old fixed ±3-day pairing rejected every patch of this AOI.

    16 days before the event keep the test short: S2 on 08-13, 08-18, 08-23, 08-28, S1 on 08-14 and 08-26 only, so the
    08-18 input needs S1 four days away, which ±3 refused.
    """
    region = tmp_path / "sindh-2022.yaml"
    r = _run("regions", "new", "sindh-2022", "--bbox", *SINDH_BBOX, "--event-date", "2022-08-29",
             "--days-before", "16", "--days-after", "0", "--out", str(region))
    assert r.exit_code == 0, r.output
    out = tmp_path / "ds"
    r = _run("build-dataset", str(region), "--source", "synthetic", "--max-patches", "2", "--out", str(out),
             "--no-progress")
    assert r.exit_code == 0, r.output
    report = (out / "report.md").read_text()
    assert "kept: 2;" in report and "| s1_grd | 2 | 2 |" in report
    import pandas as pd

    manifest = pd.read_parquet(out / "manifest.parquet")
    assert {"sar_input_1", "sar_target"} <= set(manifest["role"])  # every sample carries its S1
