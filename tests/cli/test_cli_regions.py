"""``cloudfree regions list|show|validate`` and ``cloudfree scenes``."""

from __future__ import annotations

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
    assert r.exit_code == 0 and r.output.strip() == "ok"
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
