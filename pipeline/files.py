"""Files every stage writes the same way: atomic renames, sha256 checksums, content fingerprints.

A target path only ever holds a complete file: writers get a hidden temp name beside the target
(``.<name>.<pid>-<thread>.tmp``, unique per writer so concurrent writers never collide) and the temp is
renamed over the target on success and deleted on failure. ``remove_stale_temps`` clears what a
killed process left, so a rerun starts clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

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
