"""Manifest -> one Zarr cube per split, and the torch ``Dataset`` that reads it lazily.

``DATASET/cubes/<split>.zarr`` (Zarr v3, written through xarray) holds, for S samples of D dates
(inputs oldest first, the reference/target date LAST), C optical bands and P x P pixels:

- ``s2`` (or ``landsat``)  (sample, date, band, y, x)      uint16 DN as exported
- ``cloud_mask``           (sample, date, y, x)            uint8 cube codes 0 clear, 1 cloud, 2 shadow, 3 nodata
- ``target``               (sample, band, y, x)            uint16 DN of the reference date (= the last date)
- ``s1``                   (sample, date, sar_band, y, x)  float32 dB, the S1 nearest each optical date
- ``crs`` (sample) and ``transform`` (sample, affine) per-sample georeferencing; ``scene_id`` /
  ``s1_scene_id`` (sample, date) provenance; coordinates ``sample_id``, ``patch_id``, ``dates``
  (sample, date), ``band``, ``sar_band``.

Every big variable is chunked one sample per chunk, so a training worker reads exactly one chunk per
variable per item. A cube is built in a hidden temp directory and renamed into place; its attrs carry
the sha256 of the manifest rows it was built from, so a rerun with an unchanged manifest skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import torch
import xarray as xr
import zarr
from tqdm.auto import tqdm

from pipeline.dataset.patches import read_manifest
from pipeline.errors import DataError
from pipeline.files import remove_stale_temps
from pipeline.geotiff import MASK_BAND, GeoTiff, read_geotiff
from pipeline.masking.codes import to_cube_codes
from pipeline.normalize import optical_to_unit, s2_dn_to_unit, sar_to_unit
from pipeline.sensors import S1_BANDS, get_sensor

log = logging.getLogger(__name__)

CUBE_FORMAT = 1
SPLITS = ("train", "val", "test")


def _role_order(role: str) -> tuple[int, int]:
    """input_1 < input_2 < ... < target (and the same for sar_* roles)."""
    r = role.removeprefix("sar_")
    return (1, 0) if r == "target" else (0, int(r.rsplit("_", 1)[1]))


def split_key(rows: pd.DataFrame) -> str:
    """sha256 over the manifest rows of one split: a changed file, date or split changes the cube."""
    cols = ["sample_id", "role", "sensor", "scene_id", "path", "sha256"]
    payload = rows[cols].astype(str).to_csv(index=False).encode()
    return hashlib.sha256(payload + f"format={CUBE_FORMAT}".encode()).hexdigest()


class _Layout:
    """What a split's cube looks like, worked out from its manifest rows."""

    def __init__(self, rows: pd.DataFrame, dataset_dir: Path) -> None:
        self.dir = dataset_dir
        rows = rows.assign(_sar=rows["role"].str.startswith("sar_"), _order=rows["role"].map(_role_order))
        rows = rows.sort_values(["sample_id", "_sar", "_order"], kind="mergesort")
        self.sample_ids = sorted(rows["sample_id"].unique())
        self.optical = {sid: g for sid, g in rows[~rows["_sar"]].groupby("sample_id", sort=True)}
        self.sar = {sid: g for sid, g in rows[rows["_sar"]].groupby("sample_id", sort=True)}
        dates = {len(g) for g in self.optical.values()}
        if len(dates) != 1:
            raise DataError(
                f"{dataset_dir}: samples have different numbers of optical dates {sorted(dates)}; rebuild the dataset"
            )
        self.n_dates = dates.pop()
        self.has_sar = bool(self.sar)
        if self.has_sar and any(len(self.sar.get(s, ())) != self.n_dates for s in self.sample_ids):
            raise DataError(f"{dataset_dir}: some samples lack an S1 date per optical date; rebuild the dataset")
        first = self.optical[self.sample_ids[0]].iloc[0]
        self.sensor = get_sensor(first["sensor"])
        self.family = self.sensor.family
        probe = read_geotiff(dataset_dir / first["path"])
        if not probe.bands or probe.bands[-1] != MASK_BAND:
            raise DataError(
                f"{dataset_dir / first['path']}: last band is {probe.bands[-1:]} not {MASK_BAND!r}; rebuild the dataset"
            )
        self.bands = probe.bands[:-1]
        self.size = probe.grid.height
        if probe.grid.width != self.size:
            raise DataError(
                f"{dataset_dir / first['path']}: patch is {probe.grid.width}x{probe.grid.height}, not square; "
                "rebuild the dataset"
            )
        self.sar_bands = S1_BANDS
        self._cache: OrderedDict[str, GeoTiff] = OrderedDict()
        self._cache_size = 4 * (self.n_dates + 1) * 2
        self._lock = threading.Lock()

    def template(self, attrs: dict[str, Any]) -> xr.Dataset:
        S, D, C, P = len(self.sample_ids), self.n_dates, len(self.bands), self.size
        ch5, ch4 = (1, D, C, P, P), (1, D, P, P)
        opt = self.optical
        crs = np.array([opt[s].iloc[-1]["crs"] for s in self.sample_ids], dtype=object)
        dates = np.stack(
            [
                opt[s]["datetime"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]")
                for s in self.sample_ids
            ]
        )
        data_vars: dict[str, Any] = {
            self.family: (("sample", "date", "band", "y", "x"), da.zeros((S, D, C, P, P), dtype="uint16", chunks=ch5)),
            "cloud_mask": (("sample", "date", "y", "x"), da.zeros((S, D, P, P), dtype="uint8", chunks=ch4)),
            "target": (("sample", "band", "y", "x"), da.zeros((S, C, P, P), dtype="uint16", chunks=(1, C, P, P))),
            "crs": (("sample",), crs),
            "transform": (("sample", "affine"), np.zeros((S, 6), dtype="float64")),
            "scene_id": (
                ("sample", "date"),
                np.array([list(opt[s]["scene_id"]) for s in self.sample_ids], dtype=object),
            ),
        }
        coords: dict[str, Any] = {
            "sample_id": ("sample", np.array(self.sample_ids, dtype=object)),
            "patch_id": ("sample", np.array([opt[s].iloc[0]["patch_id"] for s in self.sample_ids], dtype=object)),
            "dates": (("sample", "date"), dates),
            "band": ("band", np.array(self.bands, dtype=object)),
        }
        if self.has_sar:
            sar = self.sar
            data_vars["s1"] = (
                ("sample", "date", "sar_band", "y", "x"),
                da.zeros((S, D, len(self.sar_bands), P, P), dtype="float32", chunks=(1, D, len(self.sar_bands), P, P)),
            )
            data_vars["s1_scene_id"] = (
                ("sample", "date"),
                np.array([list(sar[s]["scene_id"]) for s in self.sample_ids], dtype=object),
            )
            coords["s1_dates"] = (
                ("sample", "date"),
                np.stack(
                    [
                        sar[s]["datetime"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]")
                        for s in self.sample_ids
                    ]
                ),
            )
            coords["sar_band"] = ("sar_band", np.array(self.sar_bands, dtype=object))
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)

    def _read(self, rel: str) -> GeoTiff:
        # Consecutive samples of a patch share dates (one sample's reference is the next one's input),
        # so a small per-cube cache of decoded files saves most re-reads.
        with self._lock:
            hit = self._cache.get(rel)
            if hit is not None:
                self._cache.move_to_end(rel)
                return hit
        tif = read_geotiff(self.dir / rel)
        with self._lock:
            self._cache[rel] = tif
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return tif

    def load(self, i: int) -> dict[str, np.ndarray]:
        sid = self.sample_ids[i]
        opt, masks, transform = [], [], None
        for _, row in self.optical[sid].iterrows():
            tif = self._read(row["path"])
            if tif.bands != self.bands + (MASK_BAND,) or tif.data.shape[1:] != (self.size, self.size):
                raise DataError(
                    f"{self.dir / row['path']}: bands {list(tif.bands)} / shape {tif.data.shape[1:]} differ from "
                    f"the rest of the cube ({list(self.bands) + [MASK_BAND]}, {self.size}x{self.size}); "
                    "rebuild the dataset"
                )
            opt.append(tif.data[:-1].astype(np.uint16))
            masks.append(to_cube_codes(tif.data[-1]))
            transform = list(tif.grid.transform)[:6]
        out = {
            self.family: np.stack(opt),
            "cloud_mask": np.stack(masks),
            "target": opt[-1],
            "transform": np.array(transform),
        }
        if self.has_sar:
            s1 = []
            for _, row in self.sar[sid].iterrows():
                tif = self._read(row["path"])
                if tif.bands[: len(self.sar_bands)] != self.sar_bands:
                    raise DataError(f"{self.dir / row['path']}: bands {list(tif.bands)} lack "
                                    f"{list(self.sar_bands)}; rebuild the dataset")
                s1.append(tif.data[: len(self.sar_bands)].astype(np.float32))
            out["s1"] = np.stack(s1)
        return out


def cube_path(dataset_dir: str | Path, split: str) -> Path:
    return Path(dataset_dir) / "cubes" / f"{split}.zarr"


def _cube_is_current(path: Path, key: str) -> bool:
    if not path.exists():
        return False
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("split_sha256") == key
    except (FileNotFoundError, ValueError, KeyError,
            zarr.errors.BaseZarrError) as exc:  # a broken store is simply rebuilt
        log.warning("%s: unreadable cube (%s); rebuilding it", path, exc)
        return False


def _replace_dir(tmp: Path, path: Path) -> None:
    """Swap a finished store into place; the old one is moved aside first so ``path`` is never half-built."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.{os.getpid()}.old.tmp")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old)


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """A member the cube template wrote as an array (zarr types every member as array or group)."""
    arr = group[name]
    assert isinstance(arr, zarr.Array)
    return arr


def write_cube(
    rows: pd.DataFrame, dataset_dir: Path, split: str, attrs: dict[str, Any], *, workers: int = 4, progress: bool = True
) -> tuple[Path, bool]:
    """Write ``cubes/<split>.zarr`` from the split's manifest rows. Returns (path, written?)."""
    path = cube_path(dataset_dir, split)
    key = split_key(rows)
    if _cube_is_current(path, key):
        return path, False
    layout = _Layout(rows, dataset_dir)
    all_attrs = {
        **attrs,
        "split": split,
        "split_sha256": key,
        "family": layout.family,
        "sensor": layout.sensor.key,
        "bands": list(layout.bands),
        "sar_bands": list(layout.sar_bands) if layout.has_sar else [],
        "n_dates": layout.n_dates,
        "cube_format": CUBE_FORMAT,
        "mask_codes": "0 clear, 1 cloud, 2 shadow, 3 nodata",
        "date_order": "inputs oldest first; the last date is the reference (target)",
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        layout.template(all_attrs).to_zarr(str(tmp), mode="w", compute=False, zarr_format=3, consolidated=False)
        group = zarr.open_group(str(tmp), mode="r+")
        arrays = {name: _array(group, name) for name in (layout.family, "cloud_mask", "target", "s1") if name in group}
        transforms = np.zeros((len(layout.sample_ids), 6))

        def one(i: int) -> None:
            sample = layout.load(i)
            for name, arr in arrays.items():
                arr[i] = sample[name]
            transforms[i] = sample["transform"]

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(tqdm(pool.map(one, range(len(layout.sample_ids))), total=len(layout.sample_ids),
                      desc=f"cube {split}", disable=not progress, leave=False))
        _array(group, "transform")[:] = transforms
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path, True


def build_cubes(
    dataset_dir: str | Path, attrs: dict[str, Any] | None = None, *, workers: int = 4, progress: bool = True
) -> dict[str, Path]:
    """Manifest -> ``cubes/<split>.zarr`` for every split present; stale split cubes are removed."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    remove_stale_temps(dataset_dir / "cubes")
    out = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            stale = cube_path(dataset_dir, split)
            if stale.exists():
                shutil.rmtree(stale)
            continue
        out[split], _ = write_cube(rows, dataset_dir, split, dict(attrs or {}), workers=workers, progress=progress)
    return out


def open_cube(dataset_dir: str | Path, split: str) -> xr.Dataset:
    """The split's cube as a lazy xarray Dataset (no dask: indexing reads only the touched chunks)."""
    path = cube_path(dataset_dir, split)
    if not path.exists():
        have = sorted(p.stem for p in (Path(dataset_dir) / "cubes").glob("*.zarr"))
        raise DataError(
            f"{path}: no cube for split {split!r} (have: {have or 'none'}); run 'cloudfree build-dataset' first"
        )
    try:
        return xr.open_zarr(str(path), consolidated=False, chunks=None, zarr_format=3)
    except (FileNotFoundError, ValueError, KeyError, zarr.errors.BaseZarrError) as exc:
        raise DataError(f"{path}: unreadable cube ({exc}); rerun 'cloudfree build-dataset' to rebuild it") from None


class CubeDataset(torch.utils.data.Dataset):
    """Raw samples of one split, normalized per docs/architecture.md; dates oldest first, the LAST the reference.

    Yields ``<family>`` (D, C, H, W) float32 in [0, 1] (``s2``: DN / 10000; ``landsat``: C2 scale/offset,
    clipped), ``<family>_mask`` (D, H, W) uint8 cube codes, ``<family>_bands``, ``s1`` (D, 2, H, W) float32
    in [0, 1] and ``s1_bands`` when the cube has SAR, ``valid`` (D, H, W) bool (optical not nodata; invalid
    optical pixels are 0), ``dates`` (D,) int64 days since 1970-01-01, and ``sample_id``. The store is
    opened lazily once per process (so once per DataLoader worker), never pickled.
    """

    def __init__(self, dataset_dir: str | Path, split: str) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        ds = open_cube(self.dataset_dir, split)
        self._len = int(ds.sizes["sample"])
        self.family = str(ds.attrs["family"])
        self.sensor = get_sensor(str(ds.attrs["sensor"]))
        self.bands = tuple(str(b) for b in ds["band"].values)
        self.sar_bands = tuple(str(b) for b in ds.attrs.get("sar_bands", []))
        self.attrs = dict(ds.attrs)
        ds.close()
        self._ds: xr.Dataset | None = None
        self._pid: int | None = None
        if self.family == "landsat":
            self._scale = np.array([self.sensor.band(b).scale for b in self.bands], dtype=np.float32)[:, None, None]
            self._offset = np.array([self.sensor.band(b).offset for b in self.bands], dtype=np.float32)[:, None, None]

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ds"], state["_pid"] = None, None
        return state

    def _store(self) -> xr.Dataset:
        if self._ds is None or self._pid != os.getpid():
            self._ds = open_cube(self.dataset_dir, self.split)
            self._pid = os.getpid()
        return self._ds

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self._len <= index < self._len:
            raise IndexError(f"sample {index} out of range for {self._len} samples in split {self.split!r}")
        s = self._store().isel(sample=index)
        dn = np.asarray(s[self.family].values)
        mask = np.asarray(s["cloud_mask"].values, dtype=np.uint8)
        if self.family == "s2":
            opt = s2_dn_to_unit(dn)
        else:
            opt = optical_to_unit(dn.astype(np.float32) * self._scale + self._offset)
        valid = mask != 3
        opt = np.where(valid[:, None], opt, np.float32(0)).astype(np.float32)
        days = (s["dates"].values.astype("datetime64[D]") - np.datetime64("1970-01-01", "D")).astype(np.int64)
        out: dict[str, Any] = {
            self.family: torch.from_numpy(opt),
            f"{self.family}_mask": torch.from_numpy(mask),
            f"{self.family}_bands": self.bands,
            "valid": torch.from_numpy(valid),
            "dates": torch.from_numpy(days),
            "sample_id": str(s["sample_id"].values),
        }
        if "s1" in s:
            out["s1"] = torch.from_numpy(np.ascontiguousarray(sar_to_unit(s["s1"].values, self.sar_bands, axis=1)))
            out["s1_bands"] = self.sar_bands
        return out


def dataset_summary(dataset_dir: str | Path) -> dict[str, Any]:
    """``dataset.json`` as a dict (for consumers that want counts and band lists without opening cubes)."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.exists():
        raise DataError(f"{path}: missing; run 'cloudfree build-dataset' first")
    return json.loads(path.read_text())
