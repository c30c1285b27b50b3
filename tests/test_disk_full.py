"""A full disk, for real: ``reconstruct`` and ``build-dataset`` into a small tmpfs, run as a user runs them.

Each must stop with exit code 2 and one stderr line saying the disk is full and where, leave no file under a final name
that does not read back (GDAL can end a COG copy onto a full disk without an exception, and its truncated output
used to be renamed into place) and no hidden temp or intermediate behind. Mounting needs root (or CAP_SYS_ADMIN):
elsewhere the tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import rasterio
import yaml

from pipeline.files import LOCK_NAME
from pipeline.reconstruct.cog import raw_tiled_bytes
from pipeline.reconstruct.config import ReconstructConfig
from pipeline.regions import parse_region
from pipeline.sensors import get_sensor
from tests.regions_fixtures import tiny_region

ROOT = Path(__file__).resolve().parents[1]
CLOUDFREE = ROOT / ".venv" / "bin" / "cloudfree"
# ~110 x 100 px: one 512 px output block, so the intermediates are known to the byte (whole tiles)
MINI = tiny_region("mini", event_date="2021-07-20", bbox=[113.60, 34.71, 113.6110, 34.7190])


@contextlib.contextmanager
def tmpfs(path: Path, kib: int) -> Iterator[Path]:
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("a full disk is simulated with a Linux tmpfs; not available here")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up ({r.stderr.strip() or r.returncode}): needs root or "
                    "CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def cloudfree(*args: str) -> subprocess.CompletedProcess:
    exe = [str(CLOUDFREE)] if CLOUDFREE.exists() else [sys.executable, "-m", "pipeline.cli"]
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}  # the error line is not wrapped by the terminal width
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def assert_one_disk_full_line(r: subprocess.CompletedProcess, folder: Path) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1, r.stderr
    assert ("No space" in lines[0] or "disk full" in lines[0]) and str(folder) in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def assert_nothing_corrupt(mount: Path) -> None:
    for tif in mount.rglob("*.tif"):
        if tif.name.startswith("."):
            continue
        with rasterio.open(tif) as ds:  # raises on a truncated file
            for level in [None, *range(len(ds.overviews(1)))]:
                with rasterio.open(tif, overview_level=level) as lvl:
                    lvl.read()
    hidden = [p.name for p in mount.rglob(".*")
              if p.name.endswith((".tmp", ".partial.tif", ".cog-tmp.tif")) or p.name == LOCK_NAME]
    assert hidden == []


def test_reconstruct_stops_with_one_line_when_the_disk_fills_during_the_cog_copy(tmp_path):
    region = tmp_path / "mini.yaml"
    region.write_text(yaml.safe_dump(MINI))
    grid = parse_region(MINI).grid()
    dtype = ReconstructConfig().dtype
    dtype = getattr(dtype, "value", dtype)
    bands = len(get_sensor("s2_l1c").reflectance_bands)
    intermediates = raw_tiled_bytes(grid, bands, dtype) + raw_tiled_bytes(grid, 1, "uint8") + raw_tiled_bytes(
        grid, 1, "int16")
    # Room for the three intermediates (+ their headers, the lock and progress files: ~30 KiB) but not for the COG
    # of the image (~220 KiB in uint16, ~450 KiB in float32): measured, 14.1-14.45 MiB of float32 intermediates fail
    # in the copy, 14.8 MiB succeed.
    with tmpfs(tmp_path / "mnt", intermediates // 1024 + 100) as mount:
        out = mount / "out"
        r = cloudfree("reconstruct", str(region), "--date", "2021-07-22", "--out", str(out),
                      "--mask-method", "cloudscore", "--fit", "none")
        assert_one_disk_full_line(r, out)
        assert_nothing_corrupt(mount)
        assert not out.exists()  # the run created the folder and left nothing in it


def test_build_dataset_stops_with_one_line_when_the_disk_fills(tmp_path):
    region = tmp_path / "tiny.yaml"
    region.write_text(yaml.safe_dump(tiny_region("tiny")))
    # the masks (~60 KiB) fit, the patch files (~0.5 MiB for 2 patches) do not
    with tmpfs(tmp_path / "mnt", 300) as mount:
        out = mount / "ds"
        r = cloudfree("build-dataset", str(region), "--source", "synthetic", "--out", str(out), "--max-patches", "2",
                      "--workers", "1", "--no-progress")
        assert_one_disk_full_line(r, out)
        assert_nothing_corrupt(mount)


# --- what a failed run leaves behind (no tmpfs needed) ---------------------------------------------------------


def test_a_failed_reconstruct_deletes_its_hidden_intermediates_and_the_folder_it_made(tmp_path, monkeypatch):
    import pipeline.reconstruct.tiling as tiling
    from pipeline.reconstruct.run import reconstruct

    def broken(*a, **k):
        raise RuntimeError("a bug in the fill")

    monkeypatch.setattr(tiling, "compute_fill_block", broken)
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="a bug in the fill"):
        reconstruct(parse_region(MINI), "2021-07-22", "composite", out,
                    ReconstructConfig(mask_method="cloudscore", fill={"fit": "none"}))
    assert not (tmp_path / "new").exists()  # the intermediates (~7 MiB here) went, then the empty folders


def test_reconstruct_clears_leftovers_no_run_can_resume_and_names_a_resumable_one(tmp_path, caplog):
    from pipeline.reconstruct.run import reconstruct

    junk = [".x_20210101_composite.tif.partial.tif",  # an intermediate without its progress file
            ".y_20210101_composite.progress.json",  # a progress file without intermediates
            ".mini_20210722_composite.tif.123-456.tmp",  # a temp of a killed writer
            ".mini_20210722_composite.tif.cog-tmp.tif"]  # the COG temp name of older versions
    resumable = [".z_20210101_composite.tif.partial.tif", ".z_20210101_composite_provenance.tif.partial.tif",
                 ".z_20210101_composite.progress.json"]
    for name in junk + resumable:
        (tmp_path / name).write_bytes(b"x" * 1000)
    (tmp_path / ".cloudfree.lock").write_text('{"pid": 999999999, "host": "elsewhere-but-no", "flock": true}')
    with caplog.at_level("WARNING"):
        res = reconstruct(parse_region(MINI), "2021-07-22", "composite", tmp_path,
                          ReconstructConfig(mask_method="cloudscore", fill={"fit": "none"}))
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == sorted(resumable)  # kept for `cloudfree reconstruct z ... --date 2021-01-01` to resume
    assert "interrupted reconstruction (z_20210101_composite) left 2.0 KiB" in caplog.text
    assert "replacing the stale lock" in caplog.text
    assert res.cog.exists()
