"""Files every stage writes the same way: atomic renames, sha256 checksums, content fingerprints.

A target path only ever holds a complete file: writers get a hidden temp name beside the target
(``.<name>.<pid>-<thread>.tmp``, unique per writer so concurrent writers never collide) and the temp is
renamed over the target on success and deleted on failure. ``remove_stale_temps`` clears what a
killed process left, so a rerun starts clean.

``OutputLock`` keeps two runs out of one output folder (``.cloudfree.lock``, replaced when its owner is dead), and
``translating_disk_full`` turns a full disk, however the writer reports it (``OSError`` ENOSPC, a GDAL error, lines
libtiff prints on stderr), into one ``DiskFullError`` line: the folder, about how much was needed, what is free.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pipeline.errors import CloudfreeError, DataError

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(parts: Mapping[str, Any], length: int = 64) -> str:
    """sha256 of the canonical JSON of ``parts`` (keys sorted, non-JSON values as ``str``), first ``length`` hex digits.

    Resume keys are fingerprints: an output is reused only when the fingerprint of what it should contain
    matches the one stored with it."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True, default=str).encode()).hexdigest()[:length]


def temp_path(path: Path) -> Path:
    """Hidden sibling temp name, unique per process and thread so concurrent writers never collide."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; rename it onto ``path`` on success, delete it on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds exactly these bytes. Returns True if written."""
    path = Path(path)
    if path.exists() and path.stat().st_size == len(data) and sha256_file(path) == sha256_bytes(data):
        return False
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return True


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def remove_stale_temps(root: Path) -> int:
    """Delete temp files a killed run left behind (``.<name>.<pid>-<tid>.tmp``); returns how many."""
    n = 0
    if not root.exists():
        return 0
    for p in root.rglob(f".*{TMP_SUFFIX}"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


# --- a full disk ---------------------------------------------------------------------------------------

# How GDAL and libtiff say the disk is full (their exceptions carry no errno): the C library's strerror, and
# GDAL's own free-space check before it creates a GeoTIFF.
_DISK_FULL_TEXT = re.compile(r"no space left on device|disk quota exceeded|free disk space available is", re.I)
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(DataError):
    """A write failed because the file system (or the user's quota) is full."""

    def __init__(self, message: str, free: int | None = None) -> None:
        super().__init__(message)
        self.free = free  # bytes free when the write failed


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def _existing(path: Path) -> Path:
    return next((p for p in [path, *path.parents] if p.exists()), Path("/"))


def is_disk_full(exc: BaseException | None, text: str = "") -> bool:
    """``exc`` (or an exception it was raised from or during) says the disk is full, or ``text`` (what GDAL and
    libtiff printed meanwhile) does."""
    if text and _DISK_FULL_TEXT.search(text):
        return True
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: str | Path, needed_bytes: int | None = None, free: int | None = None) -> DiskFullError:
    """One line: the folder that is full, about how much the write needed, how much is free there (``free``, else
    measured now), and the fix."""
    folder = Path(path)
    if free is None:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(_existing(folder)).free
    left = human_bytes(free) if free is not None else "an unknown amount"
    need = f"writing needs up to {human_bytes(needed_bytes)}, " if needed_bytes else ""
    return DiskFullError(f"disk full: no space left on the device of {folder} ({need}{left} free there); free up "
                         "space there or pass an --out folder on a disk with more room", free)


Needed = int | Callable[[], int | None] | None


@contextlib.contextmanager
def translating_disk_full(path: str | Path, needed: Needed = None, *, capture: bool = False) -> Iterator[None]:
    """Turn "disk full" raised inside (``OSError`` ENOSPC/EDQUOT, or a GDAL error saying so) into one
    ``DiskFullError`` line naming ``path``; ``needed``: the bytes the writes need (or a function giving them).

    A ``DiskFullError`` from a nested block is re-worded with this block's ``path`` and ``needed`` when given (the
    whole run's need says more than one file's). ``capture=True`` also collects what C code prints on stderr
    meanwhile (``capture_c_stderr``): libtiff reports a full disk there, not in the exception GDAL raises, and those
    lines would otherwise reach the user's terminal next to the one-line error.
    """
    with capture_c_stderr() if capture else contextlib.nullcontext() as captured:
        try:
            yield
        except DiskFullError as exc:
            if needed is None:
                raise
            n = needed() if callable(needed) else needed
            raise disk_full_error(path, n, exc.free) from exc.__cause__
        except Exception as exc:
            if not is_disk_full(exc, captured.text() if captured is not None else ""):
                raise
            n = needed() if callable(needed) else needed
            raise disk_full_error(path, n) from exc
        if captured is not None and is_disk_full(None, captured.text()):
            # GDAL does not always raise when libtiff fails to write (a dataset closed after a failed flush): what
            # was written in this block is incomplete
            n = needed() if callable(needed) else needed
            raise disk_full_error(path, n)


class CapturedStderr:
    """What C code wrote to file descriptor 2 while a ``capture_c_stderr`` block ran."""

    def __init__(self, fd: int, start: int) -> None:
        self._fd, self._start = fd, start

    def text(self) -> str:
        end = os.lseek(self._fd, 0, os.SEEK_END)
        return os.pread(self._fd, max(0, end - self._start), self._start).decode(errors="replace")


_capture_lock = threading.Lock()
_capture: dict[str, Any] = {"depth": 0, "fd": -1, "saved": -1, "stderr": None}


def _capture_file() -> int:
    try:  # in memory: the disk being full must not stop us from hearing about it
        return os.memfd_create("cloudfree-stderr", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        import tempfile

        return os.dup(tempfile.TemporaryFile().fileno())


@contextlib.contextmanager
def capture_c_stderr() -> Iterator[CapturedStderr]:
    """Redirect file descriptor 2 (where GDAL's libtiff prints I/O errors such as "No space left on device") into
    memory while the block runs; afterwards the captured text is written back to stderr, less the "no space"
    lines when the block raised a ``DiskFullError`` (whose one line says it all).

    Nested and concurrent uses share one redirection. Python's ``sys.stderr`` (progress bars) keeps writing to
    the real stderr meanwhile; log lines written through handlers created before are replayed at the end.
    """
    with _capture_lock:
        if _capture["depth"] == 0:
            sys.stdout.flush()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            _capture["fd"] = _capture_file()
            _capture["saved"] = os.dup(2)
            os.dup2(_capture["fd"], 2)
            _capture["stderr"] = sys.stderr
            if _writes_to_fd2(sys.stderr):
                sys.stderr = os.fdopen(os.dup(_capture["saved"]), "w", buffering=1, errors="backslashreplace")
        _capture["depth"] += 1
        fd = _capture["fd"]
        captured = CapturedStderr(fd, os.lseek(fd, 0, os.SEEK_END))
    failed: BaseException | None = None
    try:
        yield captured
    except BaseException as exc:
        failed = exc
        raise
    finally:
        with _capture_lock:
            _capture["depth"] -= 1
            if _capture["depth"] == 0:
                if sys.stderr is not _capture["stderr"]:
                    with contextlib.suppress(Exception):
                        sys.stderr.close()
                    sys.stderr = _capture["stderr"]
                os.dup2(_capture["saved"], 2)
                os.close(_capture["saved"])
                text = CapturedStderr(fd, 0).text()
                os.close(fd)
                if isinstance(failed, DiskFullError):
                    text = "".join(line for line in text.splitlines(keepends=True) if not _DISK_FULL_TEXT.search(line))
                data = text.encode()
                with contextlib.suppress(OSError):
                    while data:
                        data = data[os.write(2, data):]


def _writes_to_fd2(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.fileno() == 2)
    except (AttributeError, OSError, ValueError):
        return False


# --- one run per output folder ---------------------------------------------------------------------------

LOCK_NAME = ".cloudfree.lock"
_LOCK_YOUNG_S = 5.0  # an unreadable lock younger than this is being written by its owner, not abandoned


class OutputInUseError(CloudfreeError):
    """Another live run writes into the same output folder."""


_held_lock = threading.Lock()
_held: dict[str, tuple[int, int]] = {}  # resolved folder -> (thread id, depth) of this process's locks


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), which tells a reused PID from the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int, proc_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _proc_start(pid)
    return proc_start is None or now is None or now == proc_start


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _flock_held(path: Path) -> bool | None:
    """True when a live process holds an ``flock`` on ``path``, False when none does, None when unknown."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None  # a file system without flock
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _lock_is_live(path: Path, info: dict[str, Any] | None) -> bool:
    held = _flock_held(path)
    if held:
        return True
    if info is None:  # empty or half written: its owner may be writing it right now
        try:
            return time.time() - path.stat().st_mtime < _LOCK_YOUNG_S
        except OSError:
            return False
    if held is False and info.get("flock"):
        return False  # its owner locked it with flock, and the kernel released that when the owner died
    if info.get("host") != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return _pid_alive(pid, info.get("proc_start"))


def _describe_holder(info: dict[str, Any] | None) -> str:
    if info is None:
        return "another process (its lock file is being written)"
    host = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
    argv = str(info.get("argv") or "")
    cmd = argv if argv.split(" ", 1)[0].endswith("cloudfree") else f"cloudfree {info.get('command', '?')}"
    if len(cmd) > 160:
        cmd = cmd[:157] + "..."
    return f"PID {info.get('pid', '?')}{host} ({cmd}, started {info.get('started', '?')})"


class OutputLock:
    """``<folder>/.cloudfree.lock`` while a command writes into ``folder``: a second run into the same folder stops
    with one line naming the first (its PID, command line and start time) instead of interleaving files with it.

    The lock file is created with ``O_EXCL`` and holds the owner's PID, host, command line and start time; the owner
    also keeps an ``flock`` on it, which the kernel drops when the owner dies however it dies. A lock whose owner is
    gone (no ``flock`` held, or a PID not alive on this host) is replaced with a warning. Re-entrant in the thread
    that holds it (``reconstruct_dates`` -> ``reconstruct``); ``fresh`` is False there. Folders the lock created are
    removed again on release when nothing was written into them.
    """

    UNWRITABLE = "output folder {folder} cannot be written ({reason}); pass a writable --out folder"

    def __init__(self, folder: str | Path, command: str, *, unwritable: str = UNWRITABLE) -> None:
        self.folder = Path(folder)
        self.command = command
        self.unwritable = unwritable  # the one line for a folder that cannot be created or written: {folder}, {reason}
        self.path = self.folder / LOCK_NAME
        self.fresh = False
        self._fd: int | None = None
        self._token = ""
        self._created: list[Path] = []
        self._key = ""

    def __enter__(self) -> "OutputLock":
        self._make_folder()
        try:
            self._key = str(self.folder.resolve())
            with _held_lock:
                owner = _held.get(self._key)
                if owner is not None and owner[0] == threading.get_ident():
                    _held[self._key] = (owner[0], owner[1] + 1)
                    return self
                if owner is not None:
                    raise OutputInUseError(f"{self.folder} is in use by {_describe_holder(_read_lock(self.path))} in "
                                           "another thread of this process: wait for it or use another --out")
                self._acquire()
                _held[self._key] = (threading.get_ident(), 1)
            self.fresh = True
            return self
        except BaseException:
            self._remove_created()
            raise

    def __exit__(self, *exc: Any) -> None:
        with _held_lock:
            tid, depth = _held[self._key]
            if depth > 1:
                _held[self._key] = (tid, depth - 1)
                return
            del _held[self._key]
            self._release()
        self._remove_created()

    def _make_folder(self) -> None:
        missing = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._unwritable(exc) from None
        self._created = missing  # deepest first

    def _remove_created(self) -> None:
        for p in self._created:
            try:
                p.rmdir()  # only when empty
            except OSError:
                break

    def _acquire(self) -> None:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read_lock(self.path)
                if _lock_is_live(self.path, info):
                    raise OutputInUseError(f"{self.folder} is in use by {_describe_holder(info)}: wait for it or use "
                                           "another --out") from None
                if info is not None and info != _read_lock(self.path):
                    continue  # replaced meanwhile: look again
                log.warning("%s: replacing the stale lock of %s, which is not running any more", self.folder,
                            _describe_holder(info))
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            except OSError as exc:
                if exc.errno in _DISK_FULL_ERRNOS:
                    raise disk_full_error(self.folder, 4096) from None
                raise self._unwritable(exc) from None
            self._fd = fd
            self._write_info(fd)
            return
        raise OutputInUseError(f"{self.folder} is in use by {_describe_holder(_read_lock(self.path))}: wait for it "
                               "or use another --out")

    def _write_info(self, fd: int) -> None:
        locked = False
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except (ImportError, OSError):
            pass  # a file system without flock: the PID check alone
        self._token = uuid.uuid4().hex
        info = {
            "pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
            "argv": shlex.join(["cloudfree" if Path(sys.argv[0]).name == "cloudfree" else sys.argv[0], *sys.argv[1:]])
            if sys.argv and sys.argv[0] else "",
            "started": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z"), "flock": locked,
            "proc_start": _proc_start(os.getpid()), "token": self._token,
        }
        try:
            os.write(fd, (json.dumps(info) + "\n").encode())
        except OSError as exc:
            self._release()
            if exc.errno in _DISK_FULL_ERRNOS:
                raise disk_full_error(self.folder, 4096) from None
            raise self._unwritable(exc) from None

    def _unwritable(self, exc: OSError) -> DataError:
        return DataError(self.unwritable.format(folder=self.folder, reason=exc.strerror or exc))

    def _release(self) -> None:
        if self._fd is None:
            return
        info = _read_lock(self.path)
        if info is None or info.get("token") == self._token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self._fd)  # drops the flock
        self._fd = None
