"""Patch export: atomic GeoTIFFs, a resumable journal of their checksums, and ``manifest.parquet``.

On disk (docs/architecture.md, "Data contracts")::

    DATASET/patches/<patch_id>/<sensor>_<YYYYMMDD>.tif
    DATASET/manifest.parquet
    DATASET/.journal.jsonl        # one line per finished file: path, content key, sha256

Optical patch files hold the sensor's reflectance bands as uint16 DN (band scale/offset set, so GIS tools
show reflectance) followed by one last band ``cloud_mask`` with ``pipeline.masking.codes.MaskClass`` codes
(3 = nodata; DN 0 there). No GDAL nodata value is set on optical files because the mask band's 0 means
clear. SAR files hold ``VV``, ``VH`` in float32 dB with NaN nodata. Band descriptions carry the names.

Every file is written to a hidden temp name beside its target and renamed into place, so a target path
only ever holds a complete file. After the rename its sha256 goes to the journal together with a key
that fingerprints what the file should contain (scene, patch window, bands, mask settings). A rerun
skips a file only when it exists, its key matches and its bytes still hash to the journalled sha256;
anything else (missing, truncated, edited, stale) is rewritten. GDAL writes the same bytes for the same
pixels, so an interrupted-then-resumed export produces the same checksums as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.errors import DataError
from pipeline.files import sha256_bytes, sha256_file, write_bytes_atomic
from pipeline.geotiff import MASK_BAND, write_geotiff
from pipeline.grid import Grid

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
JOURNAL_NAME = ".journal.jsonl"
MANIFEST_NAME = "manifest.parquet"

MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("patch_id", pa.string()),
        ("split", pa.string()),
        ("role", pa.string()),
        ("sensor", pa.string()),
        ("scene_id", pa.string()),
        ("datetime", pa.timestamp("us", tz="UTC")),
        ("crs", pa.string()),
        ("bounds", pa.list_(pa.float64(), 4)),
        ("cloud_fraction", pa.float64()),
        ("shadow_fraction", pa.float64()),
        ("valid_fraction", pa.float64()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("simulated", pa.bool_()),
    ]
)
MANIFEST_COLUMNS = MANIFEST_SCHEMA.names


# --- journal -----------------------------------------------------------------------------------------


class Journal:
    """Append-only record of finished files: ``{"path", "key", "sha256"}`` per line; last line wins.

    A torn last line (a kill mid-append) is ignored, so the journal never blocks a resume.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                    self.entries[e["path"]] = e
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s: ignoring a torn journal line", path)
        self._fh: io.TextIOWrapper | None = None

    def record(self, rel_path: str, key: str, sha256: str) -> None:
        e = {"path": rel_path, "key": key, "sha256": sha256}
        if self.entries.get(rel_path) == e:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a")
        self._fh.write(json.dumps(e, sort_keys=True) + "\n")
        self._fh.flush()
        self.entries[rel_path] = e

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def current(self, root: Path, rel_path: str, key: str) -> str | None:
        """The journalled sha256 if ``root/rel_path`` exists with that content key and those bytes."""
        e = self.entries.get(rel_path)
        p = root / rel_path
        if e is None or e.get("key") != key or not p.exists():
            return None
        return e["sha256"] if sha256_file(p) == e["sha256"] else None

    def compact(self, keep: set[str]) -> None:
        """Rewrite the journal with only ``keep`` paths (after a run), atomically."""
        self.close()
        lines = [json.dumps(self.entries[p], sort_keys=True) for p in sorted(keep) if p in self.entries]
        write_bytes_atomic(self.path, ("\n".join(lines) + "\n").encode() if lines else b"")


# --- patch export ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchFile:
    """One GeoTIFF to produce: which scene, which window of the region grid, and what it must contain."""

    rel_path: str  # patches/<patch_id>/<sensor>_<YYYYMMDD>.tif
    scene_id: str
    row: int
    col: int
    size: int
    key: str  # content fingerprint; a change forces a rewrite


@dataclass
class SceneArrays:
    """A whole scene on the region grid, ready to cut: DN/dB values plus (optical) the MaskClass mask."""

    data: np.ndarray  # (band, y, x) uint16 DN or float32 dB
    bands: tuple[str, ...]
    grid: Grid
    mask: np.ndarray | None  # (y, x) uint8 MaskClass codes; None for SAR
    tags: dict[str, str]
    scales: tuple[float, ...] | None = None
    offsets: tuple[float, ...] | None = None
    nodata: float | None = None


def write_patch(out: Path, f: PatchFile, scene: SceneArrays) -> str:
    window = (slice(f.row, f.row + f.size), slice(f.col, f.col + f.size))
    data = scene.data[(slice(None),) + window]
    bands = scene.bands
    scales, offsets = scene.scales, scene.offsets
    if scene.mask is not None:
        data = np.concatenate([data, scene.mask[window][None].astype(data.dtype)])
        bands = bands + (MASK_BAND,)
        scales = scales + (1.0,) if scales else None
        offsets = offsets + (0.0,) if offsets else None
    grid = scene.grid.window(f.row, f.col, f.size, f.size)
    return write_geotiff(
        out / f.rel_path, data, grid, bands, nodata=scene.nodata, tags=scene.tags, scales=scales, offsets=offsets
    )


@dataclass
class ExportResult:
    sha256: dict[str, str]  # rel_path -> sha256, for every planned file
    written: int
    skipped: int
    repaired: int  # files that existed but were missing from the journal, stale or corrupt
    removed: int  # files under patches/ that are not part of this dataset any more


def check_existing(out: Path, files: Sequence[PatchFile], journal: Journal, workers: int) -> dict[str, str]:
    """Planned files already on disk with the right content key and checksum (hashed in parallel)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        shas = list(pool.map(lambda f: journal.current(out, f.rel_path, f.key), files))
    return {f.rel_path: s for f, s in zip(files, shas) if s is not None}


def export_patches(
    out: Path,
    files: Sequence[PatchFile],
    load_scene: Callable[[str], SceneArrays],
    *,
    workers: int = 4,
    progress: bool = True,
) -> ExportResult:
    """Produce every planned patch file, reading each scene at most once; resumable and concurrent.

    Scenes load one ahead of the writers (a one-thread prefetch) while ``workers`` threads cut and
    compress patches; GDAL releases the GIL while compressing, so writers overlap on free cores
    (``bench/export.py`` measures the gain).
    """
    out = Path(out)
    journal = Journal(out / JOURNAL_NAME)
    try:
        done = check_existing(out, files, journal, workers)
        todo = [f for f in files if f.rel_path not in done]
        repaired = sum(1 for f in todo if (out / f.rel_path).exists())
        by_scene: dict[str, list[PatchFile]] = {}
        for f in todo:
            by_scene.setdefault(f.scene_id, []).append(f)
        scene_ids = sorted(by_scene)
        shas = dict(done)
        bar = tqdm(
            total=len(files), initial=len(done), desc="export patches", unit="patch", disable=not progress, leave=False
        )
        with bar, ThreadPoolExecutor(1, thread_name_prefix="scene-read") as reader, ThreadPoolExecutor(
            max(1, workers), thread_name_prefix="patch-write"
        ) as writers:
            nxt: Future | None = reader.submit(load_scene, scene_ids[0]) if scene_ids else None
            for i, sid in enumerate(scene_ids):
                assert nxt is not None
                scene = nxt.result()
                nxt = reader.submit(load_scene, scene_ids[i + 1]) if i + 1 < len(scene_ids) else None
                futures = [(f, writers.submit(write_patch, out, f, scene)) for f in by_scene[sid]]
                try:
                    for f, fut in futures:
                        sha = fut.result()
                        journal.record(f.rel_path, f.key, sha)
                        shas[f.rel_path] = sha
                        bar.update()
                except BaseException:
                    for _, fut in futures:
                        fut.cancel()
                    if nxt is not None:
                        nxt.cancel()
                    raise
        removed = _remove_unplanned(out, {f.rel_path for f in files})
        journal.compact({f.rel_path for f in files} | {k for k in journal.entries if not k.startswith("patches/")})
    finally:
        journal.close()
    return ExportResult(shas, written=len(todo), skipped=len(done), repaired=repaired, removed=removed)


def _remove_unplanned(out: Path, planned: set[str]) -> int:
    root = out / "patches"
    n = 0
    if not root.exists():
        return 0
    for p in sorted(root.rglob("*.tif")):
        rel = p.relative_to(out).as_posix()
        if rel not in planned:
            p.unlink()
            n += 1
    for d in sorted((d for d in root.iterdir() if d.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if n:
        log.info("removed %d patch file(s) that are no longer part of the dataset", n)
    return n


# --- manifest ----------------------------------------------------------------------------------------


def manifest_bytes(df: pd.DataFrame) -> bytes:
    """Serialize the manifest deterministically (fixed schema, no pandas index, fixed writer options)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest is missing columns {missing}")
    table = pa.Table.from_pandas(df[MANIFEST_COLUMNS], schema=MANIFEST_SCHEMA, preserve_index=False)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def write_manifest(df: pd.DataFrame, path: str | Path) -> str:
    """Write ``manifest.parquet`` atomically (skipped if identical bytes are there); returns its sha256."""
    data = manifest_bytes(df)
    write_bytes_atomic(path, data)
    return sha256_bytes(data)


def read_manifest(dataset_dir: str | Path) -> pd.DataFrame:
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.exists():
        raise DataError(
            f"{path}: no manifest; build the dataset first with 'cloudfree build-dataset REGION --out {dataset_dir}'"
        )
    try:
        df = pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); rerun 'cloudfree build-dataset' to rewrite it") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: manifest lacks columns {missing}; rebuild the dataset with this version of cloudfree")
    return df
