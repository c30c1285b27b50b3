"""pipeline.files: atomic writes, temp names, stale temp clean-up, fingerprints, a full disk, the output lock."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
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


# --- a full disk ------------------------------------------------------------------------------------------


def test_enospc_becomes_one_line_naming_the_folder_the_need_and_what_is_free(tmp_path):
    with pytest.raises(pfiles.DiskFullError) as exc:
        with pfiles.translating_disk_full(tmp_path, 5 * 2**20):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.tif"))
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path) in msg and "disk full" in msg
    assert "5.0 MiB" in msg and "free there" in msg and "--out" in msg
    with pytest.raises(PermissionError):  # any other error passes through untouched
        with pfiles.translating_disk_full(tmp_path, 1):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_libtiff_saying_no_space_on_stderr_is_a_disk_full_error_and_stays_off_the_terminal(tmp_path, capfd):
    # GDAL may close a GeoTIFF it could not finish without raising; libtiff only prints the reason on fd 2
    with pytest.raises(pfiles.DiskFullError, match="disk full"):
        with pfiles.translating_disk_full(tmp_path, None, capture=True):
            os.write(2, b"_tiffWriteProc: No space left on device.\n")
            os.write(2, b"something else a library printed\n")
    err = capfd.readouterr().err
    assert "No space left" not in err and "something else a library printed" in err
    with pfiles.translating_disk_full(tmp_path, None, capture=True):
        os.write(2, b"a harmless line\n")
    assert capfd.readouterr().err == "a harmless line\n"  # replayed when nothing went wrong


# --- the output folder lock ---------------------------------------------------------------------------------


HOLD = """
import sys
from pipeline.files import OutputLock
with OutputLock(sys.argv[1], "reconstruct"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_is_one_line_naming_the_pid_and_a_killed_owners_lock_is_replaced(tmp_path, caplog):
    out = tmp_path / "out"
    proc = _holder(out)
    try:
        with pytest.raises(pfiles.OutputInUseError) as exc:
            with pfiles.OutputLock(out, "reconstruct"):
                pass
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith(f"{out} is in use by PID {proc.pid} (")
        assert "started " in msg and msg.endswith("wait for it or use another --out")
        assert (out / pfiles.LOCK_NAME).exists()  # the holder's lock is left alone
    finally:
        proc.kill()
        proc.wait()
    assert (out / pfiles.LOCK_NAME).exists()  # SIGKILL: nothing removed it, but the kernel dropped its flock
    with caplog.at_level(logging.WARNING, logger="pipeline.files"):
        with pfiles.OutputLock(out, "build-dataset"):
            info = json.loads((out / pfiles.LOCK_NAME).read_text())
            assert info["pid"] == os.getpid() and info["command"] == "build-dataset"
    assert f"replacing the stale lock of PID {proc.pid}" in caplog.text


def test_a_lock_of_a_dead_pid_is_replaced_and_one_of_a_live_pid_is_not(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / pfiles.LOCK_NAME
    fake = {"pid": dead.pid, "host": socket.gethostname(), "command": "reconstruct", "argv": "cloudfree reconstruct x",
            "started": "2024-01-01 00:00:00 +0000"}
    lock.write_text(json.dumps(fake))
    with caplog.at_level(logging.WARNING, logger="pipeline.files"):
        with pfiles.OutputLock(tmp_path, "reconstruct"):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"stale lock of PID {dead.pid} (cloudfree reconstruct x, started 2024-01-01" in caplog.text
    assert not lock.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a lock written without flock (another file system, an older version): the PID decides
        lock.write_text(json.dumps({**fake, "pid": live.pid}))
        with pytest.raises(pfiles.OutputInUseError, match=f"in use by PID {live.pid} "):
            with pfiles.OutputLock(tmp_path, "reconstruct"):
                pass
    finally:
        live.kill()
        live.wait()


def test_the_lock_is_released_after_success_and_after_an_exception(tmp_path):
    out = tmp_path / "a" / "b"
    with pfiles.OutputLock(out, "reconstruct") as lock:
        assert lock.fresh and (out / pfiles.LOCK_NAME).exists()
        (out / "result.tif").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["result.tif"]
    with pytest.raises(RuntimeError):
        with pfiles.OutputLock(out, "reconstruct"):
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["result.tif"]  # lock gone, the existing folder kept
    fresh = tmp_path / "new" / "deeper"
    with pytest.raises(RuntimeError):
        with pfiles.OutputLock(fresh, "reconstruct"):
            raise RuntimeError("an early error")
    assert not (tmp_path / "new").exists()  # the folders the run created, empty again, are gone


def test_the_lock_is_reentrant_in_its_thread_and_refuses_another_thread(tmp_path):
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with pfiles.OutputLock(tmp_path, "reconstruct"):
                pass
        except BaseException as exc:  # the test looks at it
            errors.append(exc)

    with pfiles.OutputLock(tmp_path, "reconstruct") as outer:
        with pfiles.OutputLock(tmp_path, "reconstruct") as inner:
            assert outer.fresh and not inner.fresh
        assert (tmp_path / pfiles.LOCK_NAME).exists()  # still held by the outer one
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], pfiles.OutputInUseError)
    assert f"in use by PID {os.getpid()}" in str(errors[0]) and "another thread" in str(errors[0])
    assert not (tmp_path / pfiles.LOCK_NAME).exists()
