"""File-system and argument mistakes on the command line: one line naming the path/value and the fix, exit 2."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.app import describe_os_error
from pipeline.errors import CheckpointError
from pipeline.train.checkpoint import read_meta, safe_load

CLI = [sys.executable, "-m", "pipeline.cli"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_output_under_a_file_names_the_file(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    line = _one_error_line(_run("preview", "zhengzhou-demo", "--date", "2021-07-22", "--output",
                                str(blocker / "ql.png"), cwd=tmp_path))
    assert str(blocker) in line and "a file stands where a folder is needed" in line


def test_output_where_nothing_can_be_written_names_the_target_not_the_temp(tmp_path):
    line = _one_error_line(_run("preview", "zhengzhou-demo", "--date", "2021-07-22", "--output", "/proc/ql.png",
                                cwd=tmp_path))
    assert "/proc/ql.png:" in line and ".tmp" not in line and "choose another output path" in line


def test_evaluate_batch_size_zero_names_the_value(tmp_path):
    line = _one_error_line(_run("evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path),
                                "--batch-size", "0", cwd=tmp_path))
    assert "--batch-size 0: must be at least 1" in line


def test_disk_full_line_says_what_is_left():
    exc = OSError(errno.ENOSPC, "No space left on device", "/tmp/out/.scene.tif.123-456.tmp")
    line = describe_os_error(exc)
    assert line is not None and line.startswith("/tmp/out/scene.tif: No space left on device (")
    assert "MiB free on /tmp" in line and "larger disk" in line


def test_os_errors_that_are_bugs_keep_their_traceback():
    assert describe_os_error(OSError(errno.EBADF, "Bad file descriptor", "/x")) is None
    assert describe_os_error(OSError(errno.EACCES, "Permission denied")) is None  # no path to name


def test_random_bytes_checkpoint_is_one_whole_sentence(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as info:
        safe_load(junk, "model")
    msg = str(info.value)
    assert msg.startswith(f"{junk} is not a readable model (") and msg.endswith("copy it again or retrain")


def test_checkpoint_given_as_the_model_file_points_to_its_folder(tmp_path):
    weights = tmp_path / "run" / "model.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=rf"{weights} is a file; --checkpoint takes the run folder"):
        read_meta(weights)


def test_exported_model_gets_the_usual_file_mode(tmp_path):
    from pipeline.train.export import _publish

    tmp = tmp_path / ".model.ts.abc"
    tmp.write_bytes(b"x")
    tmp.chmod(0o600)  # what NamedTemporaryFile creates
    old = os.umask(0o022)
    try:
        _publish(tmp, tmp_path / "model.ts")
    finally:
        os.umask(old)
    assert (tmp_path / "model.ts").stat().st_mode & 0o777 == 0o644
