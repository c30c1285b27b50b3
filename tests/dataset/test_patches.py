"""Atomic GeoTIFF export, the checksum journal (skip / repair / resume) and the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from affine import Affine

from pipeline import files as pfiles
from pipeline import geotiff
from pipeline.dataset import patches as ex
from pipeline.errors import DataError
from pipeline.files import TMP_SUFFIX
from pipeline.grid import Grid

GRID = Grid("EPSG:32649", Affine(10.0, 0.0, 700000.0, 0.0, -10.0, 3850000.0), 96, 96)


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def _scene(seed: int, sar: bool = False) -> ex.SceneArrays:
    rng = np.random.default_rng(seed)
    if sar:
        data = rng.normal(-12, 3, (2, 96, 96)).astype(np.float32)
        return ex.SceneArrays(data, ("VV", "VH"), GRID, None, {"scene_id": f"s1_{seed}"}, nodata=float("nan"))
    data = rng.integers(0, 10000, (3, 96, 96)).astype(np.uint16)
    mask = rng.integers(0, 4, (96, 96)).astype(np.uint8)
    return ex.SceneArrays(
        data, ("B2", "B3", "B4"), GRID, mask, {"scene_id": f"s2_{seed}"}, scales=(1e-4,) * 3, offsets=(0.0,) * 3
    )


SCENES = {"a": _scene(1), "b": _scene(2), "c": _scene(3, sar=True)}


def _files() -> list[ex.PatchFile]:
    out = []
    for sid in SCENES:
        for r, c in [(0, 0), (0, 32), (32, 32)]:
            out.append(ex.PatchFile(f"patches/r{r:05d}c{c:05d}/{sid}.tif", sid, r, c, 64, f"key-{sid}-{r}-{c}"))
    return sorted(out, key=lambda f: f.rel_path)


def test_export_writes_skips_and_repairs(tmp_path):
    reads: list[str] = []

    def load(sid: str) -> ex.SceneArrays:
        reads.append(sid)
        return SCENES[sid]

    files = _files()
    r1 = ex.export_patches(tmp_path, files, load, workers=2, progress=False)
    assert (r1.written, r1.skipped, r1.repaired) == (9, 0, 0)
    assert sorted(reads) == ["a", "b", "c"]  # each scene read once
    for f in files:
        assert pfiles.sha256_file(tmp_path / f.rel_path) == r1.sha256[f.rel_path]
    opt = geotiff.read_geotiff(tmp_path / "patches/r00000c00032/a.tif")
    assert opt.bands == ("B2", "B3", "B4", "cloud_mask")
    np.testing.assert_array_equal(opt.data[:3], SCENES["a"].data[:, 0:64, 32:96])
    np.testing.assert_array_equal(opt.data[3], SCENES["a"].mask[0:64, 32:96])
    assert opt.grid == GRID.window(0, 32, 64, 64)
    sar = geotiff.read_geotiff(tmp_path / "patches/r00032c00032/c.tif")
    assert sar.bands == ("VV", "VH") and sar.data.dtype == np.float32

    mtimes = {f.rel_path: (tmp_path / f.rel_path).stat().st_mtime_ns for f in files}
    reads.clear()
    r2 = ex.export_patches(tmp_path, files, load, workers=2, progress=False)
    assert (r2.written, r2.skipped) == (0, 9) and reads == [] and r2.sha256 == r1.sha256
    assert mtimes == {f.rel_path: (tmp_path / f.rel_path).stat().st_mtime_ns for f in files}

    # corrupt one file, truncate another, delete a third; change the content key of a fourth
    (tmp_path / files[0].rel_path).write_bytes(b"garbage")
    p = tmp_path / files[1].rel_path
    p.write_bytes(p.read_bytes()[:100])
    (tmp_path / files[2].rel_path).unlink()
    files[3] = ex.PatchFile(files[3].rel_path, files[3].scene_id, files[3].row, files[3].col, 64, "new-key")
    (tmp_path / "patches" / "stale").mkdir()
    (tmp_path / "patches" / "stale" / "old.tif").write_bytes(b"x")
    r3 = ex.export_patches(tmp_path, files, load, workers=2, progress=False)
    assert (r3.written, r3.repaired, r3.removed) == (4, 3, 1)
    assert r3.sha256 == r1.sha256  # same pixels, same bytes
    assert not (tmp_path / "patches" / "stale").exists() and _tmp_files(tmp_path) == []


def test_export_interrupted_midway_resumes_to_the_same_result(tmp_path, monkeypatch):
    files = _files()
    ref = ex.export_patches(tmp_path / "ref", files, SCENES.__getitem__, workers=2, progress=False)

    calls = {"n": 0}
    real = ex.write_patch

    def flaky(out, f, scene):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("injected failure")
        return real(out, f, scene)

    monkeypatch.setattr(ex, "write_patch", flaky)
    with pytest.raises(OSError, match="injected"):
        ex.export_patches(tmp_path / "run", files, SCENES.__getitem__, workers=1, progress=False)
    monkeypatch.setattr(ex, "write_patch", real)
    journal = ex.Journal(tmp_path / "run" / ex.JOURNAL_NAME)
    assert 0 < len(journal.entries) < len(files)
    assert _tmp_files(tmp_path / "run") == []
    done = set(journal.entries)
    r = ex.export_patches(tmp_path / "run", files, SCENES.__getitem__, workers=2, progress=False)
    assert r.skipped == len(done) and r.written == len(files) - len(done)
    assert r.sha256 == ref.sha256


def test_journal_ignores_a_torn_last_line(tmp_path):
    j = ex.Journal(tmp_path / "j.jsonl")
    j.record("a", "k", "s")
    j.close()
    with open(tmp_path / "j.jsonl", "a") as fh:
        fh.write('{"path": "b", "ke')
    assert set(ex.Journal(tmp_path / "j.jsonl").entries) == {"a"}


def _manifest_df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": ["p_20210706"] * 2,
            "patch_id": ["p"] * 2,
            "split": ["train"] * 2,
            "role": ["input_1", "target"],
            "sensor": ["s2_l1c"] * 2,
            "scene_id": ["a", "b"],
            "datetime": pd.to_datetime(["2021-07-01T03:00Z", "2021-07-06T03:00Z"]),
            "crs": ["EPSG:32649"] * 2,
            "bounds": [[0.0, 1.0, 2.0, 3.0]] * 2,
            "cloud_fraction": [0.5, 0.0],
            "shadow_fraction": [0.1, 0.0],
            "valid_fraction": [1.0, 1.0],
            "path": ["patches/p/a.tif", "patches/p/b.tif"],
            "sha256": ["0" * 64, "1" * 64],
            "simulated": [True, True],
        }
    )


def test_manifest_roundtrip_is_byte_deterministic(tmp_path):
    df = _manifest_df()
    sha = ex.write_manifest(df, tmp_path / ex.MANIFEST_NAME)
    mtime = (tmp_path / ex.MANIFEST_NAME).stat().st_mtime_ns
    assert ex.write_manifest(df.copy(), tmp_path / ex.MANIFEST_NAME) == sha
    assert (tmp_path / ex.MANIFEST_NAME).stat().st_mtime_ns == mtime  # identical bytes are not rewritten
    back = ex.read_manifest(tmp_path)
    assert list(back.columns) == ex.MANIFEST_COLUMNS and str(back["datetime"].dt.tz) == "UTC"
    assert list(back["bounds"].iloc[0]) == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="missing columns"):
        ex.write_manifest(df.drop(columns=["sha256"]), tmp_path / "x.parquet")


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        ex.read_manifest(tmp_path)
    (tmp_path / ex.MANIFEST_NAME).write_bytes(b"not parquet")
    with pytest.raises(DataError, match="unreadable manifest"):
        ex.read_manifest(tmp_path)


