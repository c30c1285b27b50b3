"""pipeline.files: atomic writes, temp names, stale temp clean-up, fingerprints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import files as pfiles
from pipeline.files import TMP_SUFFIX, fingerprint, remove_stale_temps, temp_path


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with pfiles.atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and _tmp_files(tmp_path) == []
    assert pfiles.write_bytes_atomic(target, b"new") and not pfiles.write_bytes_atomic(target, b"new")


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / "patches" / "p").mkdir(parents=True)
    (tmp_path / "patches" / "p" / ".x.tif.123-4.tmp").write_bytes(b"partial")
    (tmp_path / "patches" / "p" / "keep.tif").write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == 1
    assert [p.name for p in (tmp_path / "patches" / "p").iterdir()] == ["keep.tif"]


def test_temp_names_are_hidden_and_unique_per_thread(tmp_path):
    p = temp_path(tmp_path / "a.tif")
    assert p.name.startswith(".a.tif.") and p.name.endswith(TMP_SUFFIX) and str(os.getpid()) in p.name


def test_fingerprint_is_canonical_and_sensitive():
    a = fingerprint({"b": 1, "a": [1, 2]})
    assert a == fingerprint({"a": [1, 2], "b": 1}) and len(a) == 64
    assert fingerprint({"a": [1, 2], "b": 2}) != a
    assert fingerprint({"b": 1, "a": [1, 2]}, 16) == a[:16]


def test_failed_write_leaves_no_temp_and_no_target(tmp_path):
    with pytest.raises(ValueError):
        with pfiles.atomic_output(tmp_path / "new.txt") as tmp:
            tmp.write_text("half")
            raise ValueError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_text_written_atomically_is_world_readable_like_any_output(tmp_path):
    pfiles.write_text_atomic(tmp_path / "x.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask
