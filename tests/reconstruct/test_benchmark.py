"""``cloudfree benchmark``: truth-known cases cut from an archive, run through ``reconstruct`` and scored.

Fast unit tests on a hand-made series (case choice, pasting, the case source); the real SEN12MS-CR-TS series
(a subset of its cases, one benchmark run shared by several tests); the synthetic archive through the command
line; bad input (too few dates, no clear target, no cloud to paste) as one line with nothing written.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from affine import Affine
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app, main
from pipeline.grid import Grid
from pipeline.masking.codes import MaskClass
from pipeline.reconstruct import benchmark as bm
from pipeline.reconstruct.cases import (
    BenchmarkError,
    CaseSource,
    Series,
    archive_region,
    build_cases,
    make_case,
    on_grid,
)
from pipeline.regions import Window, parse_region
from pipeline.sources.base import Scene, raster_attrs

SERIES_DIR = "sen12mscr-ts"
FLOOR_DB = 2.0  # composite (the harmonized fill) over last-clear on hidden pixels, per case
FLOOR_TARGET = dt.date(2018, 8, 9)  # a clear target of the real series with +4..6 dB in bench/harmonize_real.py
LAST_DATE = dt.date(2018, 9, 18)  # the series' second cloudy date (80 % not clear)

# --- a hand-made series ---------------------------------------------------------------------------------------

DAY0 = dt.date(2021, 9, 1)
GRID = Grid("EPSG:32649", Affine(10.0, 0.0, 700_000.0, 0.0, -10.0, 3_800_000.0), 8, 6)
BANDS = ("B2", "B3", "B4")
# not-clear share per date: 0, 0, 50 % (the donor), 0 (a target), 100 % (overcast), 0 (a target)
COVER = (0.0, 0.0, 0.5, 0.0, 1.0, 0.0)


def _scene(i: int, suffix: str = "") -> Scene:
    when = dt.datetime.combine(DAY0 + dt.timedelta(days=5 * i), dt.time(3), tzinfo=dt.timezone.utc)
    return Scene(f"s2-{i}{suffix}", "s2_l1c", when, {}, None, {"simulated": False})


def _series() -> Series:
    region = parse_region({"name": "hand", "bbox": [113.64, 34.74, 113.65, 34.75],
                           "window": {"start": "2021-09-01", "end": "2021-09-30"}, "sensors": ["s2"]})
    t, (h, w) = len(COVER), GRID.shape
    refl = np.stack([np.full((len(BANDS), h, w), 0.1 * (i + 1), np.float32) for i in range(t)])
    codes = np.zeros((t, h, w), np.uint8)
    codes[2, :, : w // 2] = MaskClass.CLOUD
    codes[4] = MaskClass.CLOUD
    scenes = [[_scene(i)] for i in range(t)]
    scenes[3].append(_scene(3, "-second"))  # two scenes on one date: the mosaic stands for both
    return Series(region, GRID, "fake", "s2_l1c", BANDS, [s[0].date for s in scenes], scenes, refl, codes, "auto")


class FakeArchive:
    """The archive behind the hand-made series: every scene, pixels from the series."""

    name = "fake"

    def __init__(self, series: Series) -> None:
        self.series = series
        self.all = [s for group in series.scenes for s in group]

    def scenes(self, sensor: str | None = None) -> list[Scene]:
        return list(self.all)

    def search(self, region, start, end, sensor) -> list[Scene]:
        return [s for s in self.all if start <= s.date <= end]

    def read(self, scene: Scene, grid: Grid, bands=None) -> xr.DataArray:
        i = self.series.dates.index(scene.date)
        names = list(bands or BANDS)
        values = self.series.refl[i][[BANDS.index(b) for b in names]]
        return xr.DataArray(values, dims=("band", "y", "x"), coords={"band": names, **grid.coords()},
                            attrs=raster_attrs(scene, grid, simulated=False))


def test_cases_pair_clear_targets_with_cloudy_donors():
    s = _series()
    cases = build_cases(s, persistent=0)
    assert [(c.variant, c.target, c.donor) for c in cases] == [("standard", 3, 2), ("standard", 5, 2)]
    persistent = [c for c in build_cases(s, persistent=2) if c.variant == "persistent"]
    # the dates before each target get the overcast date's cloud (the only one besides the target's donor)
    assert [c.history for c in persistent] == [((2, 4), (1, 4)), ((4, 2), (3, 4))]
    assert persistent[0].name(s) == "2021-09-16 <- cloud 2021-09-11 + 09-11<-09-21, 09-06<-09-21"
    assert [(c.target, c.donor) for c in build_cases(s, persistent=0, max_cases=1)] == [(3, 2)]
    assert [c.target for c in build_cases(s, persistent=0, targets=[s.dates[5]])] == [5]
    with pytest.raises(BenchmarkError, match=r"--target 2021-09-11 \(50 % not clear\): not a clear target date.*"
                                             r"use one of 2021-09-16, 2021-09-26"):
        build_cases(s, targets=[s.dates[2]])


def test_case_pastes_the_donor_cloud_and_scores_what_it_hid():
    s = _series()
    case = make_case(s, build_cases(s, persistent=0)[0])
    left = np.zeros(GRID.shape, bool)
    left[:, :4] = True
    assert (case.hidden == left).all()  # the donor's cloud over the clear target
    assert np.allclose(case.image[:, left], 0.3) and np.allclose(case.image[:, ~left], 0.4)
    assert np.allclose(case.truth, 0.4)
    assert (case.codes_on(3)[left] == MaskClass.CLOUD).all() and (case.codes_on(3)[~left] == 0).all()
    assert (case.codes_on(1) == s.codes[1]).all()


def test_stale_pixels_are_those_no_recent_date_saw_clear():
    s = _series()  # dates 5 days apart; date 2 cloudy on the left half, date 4 overcast
    standard = make_case(s, build_cases(s, persistent=0)[0])  # target 3 under date 2's cloud
    age = bm.last_clear_age(standard)
    assert (age[:, :4] == 10).all() and (age[:, 4:] == 5).all()  # date 1 saw the left half, date 2 the right
    truth = standard.truth[[s.bands.index(b) for b in s.reflectance_bands]]
    off = truth + np.float32(0.1)
    assert bm.stale_scores(age, off, truth, standard.hidden, min_pixels=1)["stale_hidden"] == 0.0

    case = make_case(s, [c for c in build_cases(s, persistent=2) if c.variant == "persistent"][0])
    case.product_codes.update(case.pasted_codes)  # what remask finds: the pasted overcast masked as cloud
    assert (bm.last_clear_age(case) == 15).all()  # dates 1 and 2 clouded: date 0 is the last to see the ground
    case.product_codes[0] = np.full(GRID.shape, MaskClass.CLOUD, np.uint8)
    age = bm.last_clear_age(case)
    assert np.isinf(age).all()
    got = bm.stale_scores(age, off, truth, case.hidden, min_pixels=1)
    assert got["stale_hidden"] == 1.0 and got["stale_hidden_psnr"] == pytest.approx(20.0, abs=1e-4)
    assert math.isnan(bm.stale_scores(age, off, truth, case.hidden)["stale_hidden_psnr"])  # 24 pixels: too few


def test_case_source_serves_pasted_dates_and_hides_later_ones():
    s = _series()
    archive = FakeArchive(s)
    spec = [c for c in build_cases(s, persistent=1) if c.variant == "persistent"][0]  # target 3, date 2 clouded
    src = CaseSource(archive, make_case(s, spec))
    found = src.search(s.region, DAY0, DAY0 + dt.timedelta(days=60), "s2")
    assert [sc.id for sc in found] == ["s2-0", "s2-1", "s2-2", "s2-3"]  # later dates and the second scene hidden
    assert src.scenes is not None and [sc.id for sc in src.scenes()] == ["s2-0", "s2-1", "s2-2", "s2-3"]
    window = GRID.window(1, 2, 3, 8)  # reaches past the right edge: NaN there
    target = src.read(found[3], window, ["B4"]).values
    assert target.shape == (1, 3, 8) and np.allclose(target[0, :, :2], 0.3) and np.allclose(target[0, :, 2:6], 0.4)
    assert np.isnan(target[0, :, 6:]).all()
    assert np.allclose(src.read(found[2], GRID).values, 0.5)  # date 2 under the overcast date's cloud everywhere
    assert np.allclose(src.read(found[1], GRID).values, 0.2)  # delegated


def test_on_grid_warps_what_is_not_a_window():
    values = np.arange(48, dtype=np.float32).reshape(1, 6, 8)
    coarse = Grid(GRID.crs, GRID.transform @ Affine.scale(2), 4, 3)
    out = on_grid(values, GRID, coarse, [False])
    assert out.shape == (1, 3, 4) and np.isfinite(out).all() and 0 <= out.min() and out.max() <= 47


def test_methods_resolve_or_fail_in_one_line(tmp_path):
    assert [m.name for m in bm.resolve_methods(["composite", str(tmp_path)])] == ["composite", str(tmp_path)]
    with pytest.raises(BenchmarkError, match="neither a training-free method .* nor a training run folder"):
        bm.resolve_methods(["nope"])
    with pytest.raises(BenchmarkError, match="twice"):
        bm.resolve_methods(["composite", "composite"])
    assert bm.default_methods() == ["composite", "last-clear", "global-fit"]
    fits = {m.name: m.config.fill.fit for m in bm.resolve_methods(bm.default_methods())}
    assert fits == {"composite": "local", "last-clear": "none", "global-fit": "global"}


# --- the real series ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_report(real_data, tmp_path_factory):
    """One benchmark on the real series up to its second cloudy date (9 of 17 dates, to keep it short): one clear
    target under one real cloud, standard and persistent (K=3: the 3 dates before it under the other cloud)."""
    from pipeline.sources.registry import get_source

    methods = ["composite", "last-clear"]
    out = tmp_path_factory.mktemp("bench") / "out"
    src = get_source("local", root=real_data / SERIES_DIR)
    region = archive_region(src)
    region = region.model_copy(update={"window": Window(start=region.window.start, end=LAST_DATE)})
    report = bm.run_benchmark(region, src, out, methods=methods, persistent=3, max_cases=1, targets=[FLOOR_TARGET])
    return report, methods, out


def test_real_benchmark_writes_table_json_and_quicklooks(real_report):
    report, methods, out = real_report
    assert report.series.region.name == "sen12mscr-ts" and len(report.series.dates) == 9
    data = json.loads((out / "benchmark.json").read_text())
    assert [c["variant"] for c in data["cases"]] == ["standard", "persistent"]
    assert all(c["target"] == "2018-08-09" and c["hidden_pixels"] > 1000 for c in data["cases"])
    assert len(data["cases"][1]["history"]) == 3
    assert [m["name"] for m in data["methods"]] == methods
    for case in data["cases"]:
        for name in methods:
            r = case["methods"][name]
            assert set(r["hidden"]) == set(r["all"]) == {"psnr", "ssim", "sam", "mae"}
            assert r["hidden"]["psnr"] > 10 and 0 < r["all"]["ssim"] <= 1 and r["unfilled"] < 0.5
            assert isinstance(r["warnings"], list) and r["seconds"] > 0
        ql = Image.open(out / case["quicklook"])
        h, w = report.series.grid.shape
        assert ql.width > (2 + len(methods)) * w and ql.height > 2 * h  # two rows of truth | input | methods
    assert set(data["means"]) == {"standard", "persistent"} and set(data["means"]["standard"]) == set(methods)
    rows = bm.table_rows(report.means)
    assert len(rows) == 2 * len(methods) and all(len(r) == 3 + len(bm.columns(report.means)) for r in rows)
    assert (out / "benchmark.md").read_text().count("\n| ") == 1 + len(rows)


def test_real_benchmark_fills_nothing_from_a_cloudy_pixel(real_report):
    report, methods, _ = real_report
    for case in report.cases:
        for name in methods:
            assert case.methods[name]["filled_from_cloudy"] == 0, (case.name, name)


def test_real_benchmark_composite_beats_last_clear(real_report):
    report, _, _ = real_report
    for case in report.cases:
        gain = case.methods["composite"]["hidden"]["psnr"] - case.methods["last-clear"]["hidden"]["psnr"]
        assert gain >= FLOOR_DB, (case.name, gain)


# --- the synthetic archive through the command line -------------------------------------------------------------

runner = CliRunner()


def test_benchmark_command_on_the_synthetic_archive(tmp_path):
    region = {"name": "bench-tiny", "bbox": [113.640, 34.740, 113.668, 34.763], "sensors": ["s2"],
              "window": {"start": "2022-03-20", "end": "2022-04-20"}}  # 2 cloudy, 04-03 and 04-08 clear, 04-13 overcast
    parse_region(region, "bench-tiny")  # the dict is a valid region
    path = tmp_path / "bench-tiny.yaml"
    path.write_text(yaml.safe_dump(region))
    out = tmp_path / "out"
    r = runner.invoke(app, ["benchmark", str(path), "--source", "synthetic", "--out", str(out), "--max-cases", "1",
                            "--persistent", "1", "--methods", "composite"])
    assert r.exit_code == 0, r.output
    assert "standard" in r.output and "persistent" in r.output and "composite" in r.output
    data = json.loads((out / "benchmark.json").read_text())
    assert data["archive"]["source"] == "synthetic"
    assert [c["variant"] for c in data["cases"]] == ["standard", "persistent", "simulator"]
    assert [m["name"] for m in data["methods"]] == ["composite"]
    assert all((out / c["quicklook"]).exists() for c in data["cases"])
    # the simulator case: a cloudy date under its own cloud, scored on the simulator's truth where its true mask
    # hides the ground; the product fills what its own mask calls cloudy
    sim = data["cases"][2]
    assert sim["name"].endswith("under its own cloud (simulator truth)") and sim["hidden_share"] >= 0.05
    scores = sim["methods"]["composite"]
    assert scores["hidden"]["psnr"] > 20 and scores["provenance"].get("1", 0) > 0 and scores["filled_from_cloudy"] == 0


# --- bad input ----------------------------------------------------------------------------------------------------


def _archive(real: Path, dest: Path, days: list[str]) -> Path:
    """A local archive of some dates of the real series, in its SEN12MS-CR-TS layout."""
    for f in sorted((real / SERIES_DIR).rglob("*.tif")):
        if any(d in f.name for d in days):
            target = dest / f.relative_to(real / SERIES_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    return dest


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["cloudfree", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("days, message", [
    (["2018-08-09"], "has 1 s2_l1c date(s) over region archive (2018-08-09); the benchmark needs at least 2"),
    (["2018-07-05", "2018-09-18", "2018-11-02"], "has no clear target date: none is <= 2 % not clear"),
    (["2018-06-10", "2018-06-25", "2018-07-20", "2018-07-30"], "has no cloudy date to paste: none is 20..90 %"),
])
def test_an_archive_without_cases_is_one_line_and_writes_nothing(real_data, tmp_path, monkeypatch, capsys, days,
                                                                  message):
    root = _archive(real_data, tmp_path / "archive", days)
    out = tmp_path / "out"
    code, err = _main(monkeypatch, capsys, "benchmark", "--root", str(root), "--out", str(out))
    assert code == 2 and message in err and "Traceback" not in err and err.count("error:") == 1, err
    assert not out.exists()


def test_benchmark_needs_a_region_or_an_archive(monkeypatch, capsys, tmp_path):
    code, err = _main(monkeypatch, capsys, "benchmark", "--out", str(tmp_path / "out"))
    assert code == 2 and "give a REGION" in err and "--root DIR" in err
    code, err = _main(monkeypatch, capsys, "benchmark", "--root", str(tmp_path), "--source", "synthetic")
    assert code == 2 and "--root only applies to --source local" in err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_folder_is_refused_before_any_case_runs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(BenchmarkError, match="a-file is not a writable folder; pass a --out folder"):
        bm.run_benchmark(None, FakeArchive(_series()), blocker / "out")
