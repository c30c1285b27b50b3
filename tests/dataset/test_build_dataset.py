"""End-to-end ``build_dataset`` on a tiny synthetic region: outputs, no-op reruns, resume, repair, errors."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import geotiff
from pipeline.dataset import patches as ex
from pipeline.dataset.build import build_dataset
from pipeline.dataset.cubes import CubeDataset, cube_path
from pipeline.dataset.selection import SelectionError
from pipeline.errors import DataError, SourceError
from pipeline.files import TMP_SUFFIX, sha256_file
from pipeline.regions import parse_region
from pipeline.sources.synthetic.source import SyntheticSource
from tests.regions_fixtures import tiny_region

TINY = tiny_region("tiny")


def write_region(folder: Path, **changes) -> Path:
    data = {**TINY, **changes}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("build")
    region = write_region(base)
    t = time.perf_counter()
    report = build_dataset(region, "synthetic", base / "ds", workers=2, progress=False)
    return {"region": region, "out": base / "ds", "report": report, "seconds": time.perf_counter() - t}


def test_build_writes_manifest_patches_cubes_and_report(built):
    out, report = built["out"], built["report"]
    m = ex.read_manifest(out)
    assert list(m.columns) == ex.MANIFEST_COLUMNS and len(m) > 0
    assert report.samples == m["sample_id"].nunique() > 0
    assert set(m["role"]) == {"input_1", "target", "sar_input_1", "sar_target"}
    assert m["simulated"].all()
    for _, r in m.drop_duplicates("path").iterrows():
        assert sha256_file(out / r["path"]) == r["sha256"]
    # every reference date is <= 5 % cloud+shadow by the mask stored in its own patch file
    for _, r in m[m["role"] == "target"].drop_duplicates("path").iterrows():
        mask = geotiff.read_geotiff(out / r["path"]).data[-1]
        assert np.isin(mask, [1, 2, 4]).mean() <= 0.05 + 1e-9
        assert r["cloud_fraction"] + r["shadow_fraction"] <= 0.05 + 1e-9
    # a patch lives in one split, and no two patches of different splits share a pixel
    assert (m.groupby("patch_id")["split"].nunique() == 1).all()
    pb = m.drop_duplicates("patch_id")[["patch_id", "split", "bounds"]].to_numpy()
    for i in range(len(pb)):
        for j in range(i + 1, len(pb)):
            a, b = pb[i][2], pb[j][2]
            if pb[i][1] != pb[j][1]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"{pb[i][0]} overlaps {pb[j][0]}"
    assert report.rejected.get("overlaps a patch of another split (dropped to prevent leakage)", 0) > 0
    # deterministic row order: by sample, inputs before target, optical before SAR
    assert m["sample_id"].is_monotonic_increasing
    # cubes per split, matching the manifest
    for split, n in report.split_samples.items():
        ds = CubeDataset(out, split)
        assert len(ds) == n
        s = ds[len(ds) - 1]
        assert s["s2"].shape[:2] == (2, 13) and s["s1"].shape[:2] == (2, 2)
    info = (out / "dataset.json").read_text()
    assert sha256_file(out / ex.MANIFEST_NAME) in info and '"simulated": true' in info
    md = (out / "report.md").read_text()
    assert "Patches rejected, by reason" in md and "█" in md and "SIMULATED" in md
    assert sorted(p.name for p in (out / "masks").iterdir()) and tmp_files(out) == []


def test_second_run_is_a_noop(built):
    out = built["out"]
    before = mtimes(out)
    t = time.perf_counter()
    r = build_dataset(built["region"], "synthetic", out, workers=2, progress=False)
    second = time.perf_counter() - t
    assert r.files_written == 0 and r.files_skipped == r.files and r.masks_computed == 0 and r.cubes_written == []
    assert mtimes(out) == before  # nothing rewritten
    # The issue asks for <= 10 %; the tiny region makes fixed costs (imports warm, search) weigh more, so be lenient.
    assert second <= 0.35 * built["seconds"], (second, built["seconds"])


def test_killed_midway_then_rerun_gives_the_identical_manifest(built, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = ex.write_patch

    def failing(out, f, scene):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("injected failure: disk went away")
        return real(out, f, scene)

    monkeypatch.setattr(ex, "write_patch", failing)
    out = tmp_path / "ds"
    with pytest.raises(OSError, match="injected"):
        build_dataset(built["region"], "synthetic", out, workers=1, progress=False)
    assert not (out / ex.MANIFEST_NAME).exists() and not (out / "cubes").exists()
    assert tmp_files(out) == []
    monkeypatch.setattr(ex, "write_patch", real)
    r = build_dataset(built["region"], "synthetic", out, workers=2, progress=False)
    assert r.files_skipped >= 39 and r.masks_computed == 0
    assert (out / ex.MANIFEST_NAME).read_bytes() == (built["out"] / ex.MANIFEST_NAME).read_bytes()


def test_rerun_repairs_truncated_patch_and_mask(built, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(built["out"], out)
    m = ex.read_manifest(out)
    patch = out / m["path"].iloc[0]
    patch.write_bytes(patch.read_bytes()[:1000])
    mask = sorted((out / "masks").iterdir())[0]
    mask.write_bytes(mask.read_bytes()[:500])
    with pytest.raises(DataError, match="truncated"):
        geotiff.read_geotiff(patch)
    r = build_dataset(built["region"], "synthetic", out, workers=2, progress=False)
    assert r.files_repaired == 1 and r.files_written == 1 and r.masks_computed == 1
    assert (out / ex.MANIFEST_NAME).read_bytes() == (built["out"] / ex.MANIFEST_NAME).read_bytes()
    assert r.cubes_written == []  # same manifest -> cubes untouched


def test_no_scenes_is_a_clear_error_and_writes_nothing(tmp_path, real_data):
    # The user's folder holds real SEN12MS-CR scenes from eastern China, none over the tiny Zhengzhou AOI.
    region = write_region(tmp_path)
    with pytest.raises(
        SourceError, match=r"no s2 scenes found for region tiny between 2021-07-01 and 2021-07-31 in source 'local'"
    ):
        build_dataset(
            region, "local", tmp_path / "ds", source_options={"root": real_data / "sen12mscr"}, progress=False
        )
    assert not (tmp_path / "ds").exists()  # the folder the build created is removed when it stays empty


def test_real_sen12mscr_pair_becomes_a_dataset(tmp_path, real_data):
    """Real pixels through the whole chain: s2cloudless masks (no cs_cdf in the files).

    The cloud-free date is the reference.
    """
    region = write_region(
        tmp_path, name="real", bbox=[119.177, 33.491, 119.197, 33.509], crs="EPSG:32650",
        window={"start": "2017-10-01", "end": "2017-10-31"}, patch={"size": 64, "stride": 64},
        splits={"train": 0.6, "val": 0.2, "test": 0.2, "block_size": 1, "seed": 0},
    )
    r = build_dataset(
        region, "local", tmp_path / "ds", source_options={"root": real_data / "sen12mscr"}, progress=False
    )
    m = ex.read_manifest(tmp_path / "ds")
    assert r.mask_method == "s2cloudless" and not r.simulated and not m["simulated"].any()
    assert r.samples == r.patches_total == 6
    assert set(m[m["role"] == "target"]["scene_id"]) == {"ROIs1970_fall_139_p839_s2_cloudfree"}
    assert set(m[m["role"] == "input_1"]["scene_id"]) == {"ROIs1970_fall_139_p839_s2_cloudy"}
    assert (m[m["role"] == "input_1"]["cloud_fraction"] > 0.5).all()
    s = CubeDataset(tmp_path / "ds", "train")[0]
    assert s["s2"].shape == (2, 13, 64, 64) and float(s["s2"][-1].mean()) > 0.01


def test_no_patch_passes_names_the_rule_and_counts(tmp_path):
    region = write_region(tmp_path, selection={**TINY["selection"], "input_dates": 4, "max_gap_days": 2})
    with pytest.raises(SelectionError) as err:
        build_dataset(region, "synthetic", tmp_path / "ds", progress=False)
    msg = str(err.value)
    assert (
        "passes the tcsen12 rule" in msg
        and "49 patch(es): tcsen12: fewer than 4 earlier optical date(s) within 2 days" in msg
    )
    assert not (tmp_path / "ds" / ex.MANIFEST_NAME).exists() and tmp_files(tmp_path) == []


def test_band_missing_for_the_mask_method(tmp_path):
    region = write_region(tmp_path)
    with pytest.raises(DataError, match="QA_PIXEL"):
        build_dataset(region, "synthetic", tmp_path / "ds", mask_method="qa_pixel", workers=1, progress=False)
    assert not (tmp_path / "ds" / ex.MANIFEST_NAME).exists() and tmp_files(tmp_path) == []
    with pytest.raises(DataError, match="unknown mask method 'fmask'"):
        build_dataset(region, "synthetic", tmp_path / "ds", mask_method="fmask", progress=False)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"cannot write the output folder.*choose a writable --out"):
        build_dataset(write_region(tmp_path), "synthetic", blocker / "ds", progress=False)


def test_cli_prints_summary_and_errors_cleanly(built, tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    import pipeline.cli.dataset  # noqa: F401  (registers build-dataset until the lead adds it to pipeline.cli)
    from pipeline.cli import app, main

    out = tmp_path / "ds"
    shutil.copytree(built["out"], out)
    ok = CliRunner().invoke(app, ["build-dataset", str(built["region"]), "--out", str(out), "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert "patches rejected" in ok.output and "█" in ok.output and "0 written" in ok.output
    monkeypatch.setattr(
        sys, "argv", ["cloudfree", "build-dataset", str(built["region"]), "--out", str(built["region"] / "x")]
    )
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error:" in err and "cannot write the output folder" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_the_identical_manifest(built, tmp_path):
    """A real kill -9 during export (not a Python exception): temp files and a torn journal line are repaired."""
    import signal
    import subprocess

    out = tmp_path / "ds"
    code = (
        "import sys; from pipeline.dataset.build import build_dataset; "
        "build_dataset(sys.argv[1], 'synthetic', sys.argv[2], workers=2, progress=False)"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, str(built["region"]), str(out)], cwd=root)
    journal = out / ex.JOURNAL_NAME
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 30:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed; raise the threshold"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / ex.MANIFEST_NAME).exists()
    r = build_dataset(built["region"], "synthetic", out, workers=2, progress=False)
    assert r.files_skipped >= 30 and tmp_files(out) == []
    assert (out / ex.MANIFEST_NAME).read_bytes() == (built["out"] / ex.MANIFEST_NAME).read_bytes()


@pytest.mark.slow
def test_zhengzhou_demo_end_to_end(tmp_path):
    out = tmp_path / "zz"
    t = time.perf_counter()
    r = build_dataset("zhengzhou-demo", "synthetic", out, progress=False)
    first = time.perf_counter() - t
    m = ex.read_manifest(out)
    assert r.patches_total == 49 and r.samples > 0 and set(r.split_samples) == {"train", "val", "test"}
    ref = m[m["role"] == "target"]
    assert ((ref["cloud_fraction"] + ref["shadow_fraction"]) <= 0.05 + 1e-9).all()
    for split in r.split_samples:
        assert cube_path(out, split).exists()
    assert (out / "report.md").exists()
    before = mtimes(out)
    t = time.perf_counter()
    r2 = build_dataset("zhengzhou-demo", "synthetic", out, progress=False)
    second = time.perf_counter() - t
    assert r2.files_written == 0 and mtimes(out) == before
    assert second <= 0.10 * first, (second, first)
    assert isinstance(pd.Timestamp(m["datetime"].iloc[0]), pd.Timestamp)


# -- --max-patches bounds the work: scenes are read on a window around the kept patches, not the whole AOI ----------

# ~730 x 720 px with 64 px patches; a short shadow reach keeps the window's halo small
WIDE = tiny_region("wide", bbox=[113.60, 34.71, 113.68, 34.775])
SHORT_SHADOWS = {"cloud_height_max_m": 500.0, "shadow_search_m": 300.0}


class _RecordingSource(SyntheticSource):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.reads: list[tuple[str, int, int]] = []

    def read(self, scene, grid, bands=None):
        self.reads.append((scene.id, grid.width, grid.height))
        return super().read(scene, grid, bands)


def test_max_patches_reads_a_window_not_the_aoi(tmp_path):
    import rasterio

    grid = parse_region(WIDE).grid()
    src = _RecordingSource()
    out = tmp_path / "ds"
    rep = build_dataset(parse_region(WIDE), src, out, max_patches=2, mask_method="cloudscore",
                        mask_config=SHORT_SHADOWS, workers=1, progress=False)
    assert rep.patches_kept == 2 and rep.read_window and rep.patches_examined < rep.patches_total
    assert src.reads and all(w * h <= 0.25 * grid.width * grid.height for _, w, h in src.reads), src.reads[:3]
    m = ex.read_manifest(out)
    assert m["patch_id"].nunique() == 2
    for _, r in m.drop_duplicates("path").iterrows():  # patch files carry their place on the region grid
        with rasterio.open(out / r["path"]) as ds:
            assert list(ds.bounds) == pytest.approx(r["bounds"])
    manifest = (out / ex.MANIFEST_NAME).read_bytes()
    again = build_dataset(parse_region(WIDE), _RecordingSource(), out, max_patches=2, mask_method="cloudscore",
                          mask_config=SHORT_SHADOWS, workers=1, progress=False)
    assert again.files_written == 0 and again.masks_computed == 0
    assert (out / ex.MANIFEST_NAME).read_bytes() == manifest


def test_capped_build_cuts_masks_from_the_whole_grid_cache(tmp_path):
    out = tmp_path / "ds"
    full = build_dataset(parse_region(WIDE), SyntheticSource(), out, mask_method="cloudscore",
                         mask_config=SHORT_SHADOWS, workers=1, progress=False)
    capped = build_dataset(parse_region(WIDE), SyntheticSource(), out, max_patches=2, mask_method="cloudscore",
                           mask_config=SHORT_SHADOWS, workers=1, progress=False)
    assert capped.masks_computed == 0 and capped.masks_cached == full.masks_computed
    assert capped.patches_kept == 2
