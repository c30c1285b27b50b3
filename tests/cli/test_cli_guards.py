"""Guards of build-dataset and reconstruct that act before any scene is read: the region size limit, dates outside
the region's window and impossible option values."""

from __future__ import annotations

import copy
import sys

import pytest
import yaml

from pipeline.cli import main
from pipeline.regions import PROJECT_REGIONS

DEMO = yaml.safe_load((PROJECT_REGIONS / "zhengzhou-demo.yaml").read_text())
HUGE_BBOX = [113.0, 34.3, 114.1, 35.2]  # ~100 x 100 km: the 10,000 km² region that validated "ok"


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["cloudfree", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def huge(tmp_path, monkeypatch):
    monkeypatch.delenv("CLOUDFREE_MAX_MEGAPIXELS", raising=False)
    data = copy.deepcopy(DEMO)
    data.update(name="huge", bbox=HUGE_BBOX, active=False)
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def no_build(monkeypatch):
    """build-dataset's work replaced by a record of the call: these tests are about what happens before it."""
    import pipeline.cli.dataset as cli_dataset
    import pipeline.dataset.build as build

    calls = []
    monkeypatch.setattr(build, "run_build", lambda region, out, config: calls.append((region, out)) or "report")
    monkeypatch.setattr(cli_dataset, "print_summary", lambda report: None)
    return calls


@pytest.fixture()
def no_reconstruct(monkeypatch):
    import pipeline.reconstruct.run as run

    calls = []
    monkeypatch.setattr(run, "reconstruct_dates",
                        lambda region, dates, checkpoint, out, config: calls.append((region, dates)) or ([], None))
    return calls


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_build_dataset_refuses_a_10000_km2_region_and_runs_it_with_yes(monkeypatch, capsys, tmp_path, huge, no_build):
    out = str(tmp_path / "ds")
    code, _, err = _main(monkeypatch, capsys, "build-dataset", str(huge), "--out", out)
    line = _one_line(err)
    assert code == 2 and not no_build
    assert "region huge is 10," in line and "km²" in line and "Mpx at 10 m" in line and "GB build memory" in line
    assert "over the 10 Mpx limit (CLOUDFREE_MAX_MEGAPIXELS)" in line and "pass --yes" in line
    assert "smaller bbox" in line
    code, _, err = _main(monkeypatch, capsys, "build-dataset", str(huge), "--out", out, "--yes")
    assert code == 0 and no_build == [(str(huge), tmp_path / "ds")], err


def test_regions_validate_accepts_the_large_region_and_warns(monkeypatch, capsys, huge):
    code, out, err = _main(monkeypatch, capsys, "regions", "validate", str(huge))
    assert code == 0 and out.splitlines()[0] == "ok" and "Mpx" in out and "GB of hidden" in out
    assert "over the 10 Mpx limit" in _one_line(err) and "without --yes" in err


def test_size_limit_comes_from_the_environment(monkeypatch, capsys, tmp_path, no_build):
    monkeypatch.setenv("CLOUDFREE_MAX_MEGAPIXELS", "0.5")
    code, _, err = _main(monkeypatch, capsys, "build-dataset", "zhengzhou-demo", "--out", str(tmp_path / "d"))
    assert code == 2 and "over the 0.5 Mpx limit" in _one_line(err) and not no_build
    monkeypatch.setenv("CLOUDFREE_MAX_MEGAPIXELS", "-3")
    code, _, err = _main(monkeypatch, capsys, "build-dataset", "zhengzhou-demo", "--out", str(tmp_path / "d"))
    assert code == 2 and "CLOUDFREE_MAX_MEGAPIXELS='-3' is not a positive number" in _one_line(err)
    monkeypatch.delenv("CLOUDFREE_MAX_MEGAPIXELS")
    code, _, err = _main(monkeypatch, capsys, "build-dataset", "zhengzhou-demo", "--out", str(tmp_path / "d"))
    assert code == 0 and len(no_build) == 1, err


def test_reconstruct_refuses_a_10000_km2_region_and_runs_it_with_yes(monkeypatch, capsys, tmp_path, huge,
                                                                     no_reconstruct):
    args = ["reconstruct", str(huge), "--date", "2021-07-22", "--out", str(tmp_path / "out")]
    code, _, err = _main(monkeypatch, capsys, *args)
    line = _one_line(err)
    assert code == 2 and "over the 10 Mpx limit" in line and "GB of reconstruct intermediates" in line
    assert "pass --yes" in line and not no_reconstruct
    code, _, err = _main(monkeypatch, capsys, *args, "--dtype", "float32")
    assert code == 2 and "(~5.8 GB of reconstruct intermediates" in err  # float32 output doubles the reflectance
    code, _, err = _main(monkeypatch, capsys, *args, "--yes")
    assert code == 0 and len(no_reconstruct) == 1 and err == "", err


def test_reconstruct_warns_on_one_line_for_a_date_outside_the_window(monkeypatch, capsys, tmp_path, no_reconstruct):
    out = str(tmp_path / "out")
    code, _, err = _main(monkeypatch, capsys, "reconstruct", "zhengzhou-demo", "--date", "2021-07-22",
                         "--date", "2012-07-22", "--out", out)
    line = _one_line(err)
    assert code == 0 and len(no_reconstruct) == 1
    assert line.startswith("warning: --date 2012-07-22 is outside region zhengzhou-demo's window")
    assert "2021-07-01..2021-08-31" in line and "check the date, or widen the window" in line
    code, _, err = _main(monkeypatch, capsys, "reconstruct", "zhengzhou-demo", "--date", "2021-07-22", "--out", out)
    assert code == 0 and err == ""


def test_reconstruct_rejects_a_negative_sar_max_days(monkeypatch, capsys, tmp_path, no_reconstruct):
    code, _, err = _main(monkeypatch, capsys, "reconstruct", "zhengzhou-demo", "--date", "2021-07-22",
                         "--sar-max-days", "-1", "--out", str(tmp_path / "out"))
    line = _one_line(err)
    assert code == 2 and not no_reconstruct
    assert "--sar-max-days -1:" in line and "cannot be negative" in line and "pass 0" in line


def test_the_size_estimate_assumes_reconstructs_default_output_type():
    from pipeline.reconstruct.config import OutType, ReconstructConfig
    from pipeline.regions import RECONSTRUCT_DTYPE

    assert OutType(ReconstructConfig().dtype).value == RECONSTRUCT_DTYPE
