"""Batch exports for large jobs: ``ee.batch.Export.image.toCloudStorage`` / ``toDrive`` with a task ledger.

Interactive ``computePixels`` suits a few hundred patches; a whole region's archive goes through batch
tasks. ``run_exports`` keeps at most ``max_in_flight`` tasks queued (Earth Engine caps a user at ~3000),
polls them, resubmits failed ones a bounded number of times, and records every task in a ledger file
(``DATASET/.ee_tasks.json``, rewritten atomically) so a rerun never resubmits a finished or running
task, also when the ledger was lost, by matching task descriptions on the server. ``gather`` turns the
exported GeoTIFFs into the dataset's patch files (``pipeline.dataset.patches`` layout: band names, scales, mask
band, atomic writes) after checking each file sits exactly on its patch grid.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence

import numpy as np

from pipeline.errors import DataError, SourceError
from pipeline.files import write_bytes_atomic
from pipeline.geotiff import MASK_BAND, read_geotiff, write_geotiff
from pipeline.grid import Grid
from pipeline.sensors import get_sensor

log = logging.getLogger(__name__)

LEDGER_NAME = ".ee_tasks.json"
VALID_EXPORT_BAND = "valid"
_DESC_OK = re.compile(r"[^A-Za-z0-9_\-.,:;]")
ACTIVE = {"UNSUBMITTED", "READY", "RUNNING", "CANCEL_REQUESTED"}
FAILED = {"FAILED", "CANCELLED"}


@dataclass(frozen=True)
class Destination:
    """Where exports land: a Cloud Storage bucket (``gcs``) or a Google Drive folder (``drive``)."""

    kind: Literal["gcs", "drive"]
    bucket_or_folder: str
    prefix: str = "cloudfree"


@dataclass(frozen=True)
class ExportJob:
    """One patch file to export: the scene image (with its mask band), the patch grid and its file name."""

    patch_id: str
    sensor: str
    scene_id: str
    datetime: dt.datetime
    grid: Grid
    image: Any = field(compare=False, repr=False)  # ee.Image ready to export (see ``export_image``)

    @property
    def stem(self) -> str:
        return f"{self.sensor}_{self.datetime:%Y%m%d}"

    @property
    def rel_path(self) -> str:
        return f"patches/{self.patch_id}/{self.stem}.tif"

    def description(self, tag: str) -> str:
        # Earth Engine task descriptions: <= 100 characters of a restricted set.
        return _DESC_OK.sub("_", f"cf_{tag}_{self.patch_id}_{self.stem}")[:100]


def export_image(image: Any, sensor: str, mask: Any | None = None) -> Any:
    """The image a patch file is made from: reflectance DN + ``cloud_mask`` (optical) or dB + validity (SAR)."""
    import ee

    s = get_sensor(sensor)
    img = ee.Image(image)
    if s.family == "s1":
        data = img.select(["VV", "VH"])
        valid = data.mask().reduce(ee.Reducer.min()).gt(0).unmask(0, False).rename(VALID_EXPORT_BAND)
        return data.unmask(0, False).toFloat().addBands(valid.toFloat())
    if mask is None:
        raise SourceError(f"optical export of {sensor} needs its mask image (ee_masks.mask_image)")
    bands = list(s.reflectance_bands)
    integer = all(np.dtype(s.band(b).dtype).kind in "ui" for b in bands)
    # A GeoTIFF export has one data type: uint16 DN (plus codes 0..5) when the bands allow it.
    cast = (lambda i: i.toUint16()) if integer else (lambda i: i.toFloat())
    return cast(img.select(bands).unmask(0, False)).addBands(cast(ee.Image(mask).rename(MASK_BAND)))


class TaskBackend(Protocol):
    def start(self, job: ExportJob, description: str, dest: Destination) -> str: ...  # returns operation name
    def status(self, name: str) -> dict[str, Any]: ...  # {"state", "error_message"?, "destination_uris"?}
    def existing(self) -> dict[str, dict[str, Any]]: ...  # description -> {"name", "state"}


class EarthEngineTasks:
    """``TaskBackend`` on earthengine-api (``ee.batch``); calls go through the source's retry policy."""

    def __init__(self, retry: Any | None = None) -> None:
        self.retry = retry

    def task(self, job: ExportJob, description: str, dest: Destination) -> Any:
        import ee

        t = job.grid.transform
        common = dict(
            image=job.image,
            description=description,
            fileNamePrefix=f"{dest.prefix}/{job.patch_id}/{job.stem}",
            crs=job.grid.crs,
            crsTransform=[t.a, t.b, t.c, t.d, t.e, t.f],
            dimensions=f"{job.grid.width}x{job.grid.height}",
            maxPixels=int(1e10),
            fileFormat="GeoTIFF",
        )
        if dest.kind == "gcs":
            return ee.batch.Export.image.toCloudStorage(bucket=dest.bucket_or_folder, **common)
        return ee.batch.Export.image.toDrive(folder=dest.bucket_or_folder, **common)

    def start(self, job: ExportJob, description: str, dest: Destination) -> str:
        from pipeline.sources.earthengine.pixels import with_retries

        task = self.task(job, description, dest)
        with_retries(task.start, f"export task {description}", self.retry)
        return str(task.name)

    def status(self, name: str) -> dict[str, Any]:
        import ee
        from ee import _cloud_api_utils

        from pipeline.sources.earthengine.pixels import with_retries

        op = with_retries(lambda: ee.data.getOperation(name), f"status of {name}", self.retry)
        return _cloud_api_utils.convert_operation_to_task(op)

    def existing(self) -> dict[str, dict[str, Any]]:
        import ee
        from ee import _cloud_api_utils

        from pipeline.sources.earthengine.pixels import with_retries

        out: dict[str, dict[str, Any]] = {}
        for op in with_retries(ee.data.listOperations, "task list", self.retry):
            st = _cloud_api_utils.convert_operation_to_task(op)
            desc = st.get("description")
            # Newest first: keep the first (latest) task per description.
            if desc and desc not in out:
                out[desc] = {"name": st.get("name"), "state": st.get("state")}
        return out


class Ledger:
    """description -> {"name", "state", "attempts", "error"}; saved atomically after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tasks: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                self.tasks = json.loads(path.read_text())
            except json.JSONDecodeError:
                log.warning("%s is unreadable; rebuilding it from the server's task list", path)

    def save(self) -> None:
        write_bytes_atomic(self.path, json.dumps(self.tasks, indent=1, sort_keys=True).encode())


def run_exports(
    jobs: Sequence[ExportJob],
    dest: Destination,
    ledger_path: Path,
    *,
    backend: TaskBackend | None = None,
    tag: str = "ds",
    max_in_flight: int = 100,
    max_attempts: int = 3,
    poll_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, dict[str, Any]]:
    """Run every job to COMPLETED (resumable); raise ``SourceError`` naming the tasks that kept failing."""
    backend = backend or EarthEngineTasks()
    ledger = Ledger(ledger_path)
    by_desc = {j.description(tag): j for j in jobs}
    if len(by_desc) != len(jobs):
        raise SourceError(
            "two export jobs share a patch, sensor and date; deduplicate dates first (selection.dedupe_dates)"
        )
    server = backend.existing()
    for desc in by_desc:
        known = ledger.tasks.get(desc)
        remote = server.get(desc)
        # The server wins for tasks the ledger does not know (a crash between start and save).
        if remote and (known is None or known.get("name") == remote.get("name") or known.get("state") in ACTIVE):
            ledger.tasks[desc] = {**(known or {"attempts": 1}), **remote}
    ledger.save()
    queue = [d for d in by_desc if ledger.tasks.get(d, {}).get("state") not in ({"COMPLETED"} | ACTIVE)]
    failed: dict[str, str] = {}
    skipped = sum(1 for d in by_desc if ledger.tasks.get(d, {}).get("state") == "COMPLETED")
    if skipped:
        log.info("%d export task(s) already completed; not resubmitted", skipped)
    while True:
        active = [d for d in by_desc if ledger.tasks.get(d, {}).get("state") in ACTIVE]
        while queue and len(active) < max_in_flight:
            d = queue.pop(0)
            entry = ledger.tasks.get(d, {"attempts": 0})
            name = backend.start(by_desc[d], d, dest)
            ledger.tasks[d] = {"name": name, "state": "READY", "attempts": int(entry.get("attempts", 0)) + 1}
            ledger.save()
            active.append(d)
        if not active:
            break
        sleep(poll_s)
        for d in active:
            st = backend.status(ledger.tasks[d]["name"])
            state = str(st.get("state", "UNKNOWN"))
            ledger.tasks[d].update(state=state, error=st.get("error_message"), uris=st.get("destination_uris"))
            if state in FAILED:
                if ledger.tasks[d]["attempts"] < max_attempts:
                    log.warning("export %s %s (%s); resubmitting", d, state, st.get("error_message"))
                    queue.append(d)
                else:
                    failed[d] = str(st.get("error_message") or state)
        ledger.save()
    if failed:
        first = "; ".join(f"{d}: {e}" for d, e in list(failed.items())[:3])
        raise SourceError(
            f"{len(failed)} export task(s) failed after {max_attempts} attempts ({first}); see {ledger_path}"
        )
    return ledger.tasks


def gather(
    jobs: Iterable[ExportJob],
    dest: Destination,
    dataset_dir: Path,
    fetch: Callable[[ExportJob], Path],
) -> dict[str, str]:
    """Write each exported file as ``DATASET/patches/<patch_id>/<sensor>_<date>.tif``; returns rel_path -> sha256.

    ``fetch(job)`` gives a local path of the exported GeoTIFF (``gcs_fetcher`` / ``folder_fetcher``).
    """
    out: dict[str, str] = {}
    for job in jobs:
        src = fetch(job)
        tif = read_geotiff(src)
        g, want = tif.grid, job.grid
        same_grid = (
            g.width == want.width
            and g.height == want.height
            and np.allclose(list(g.transform)[:6], list(want.transform)[:6], atol=1e-6)
        )
        if not same_grid or _epsg(g.crs) != _epsg(want.crs):
            raise DataError(
                f"{src}: exported grid {g.crs} {tuple(g.transform)[:6]} {g.width}x{g.height} is not the patch grid "
                f"{want.to_dict()}; re-export it"
            )
        s = get_sensor(job.sensor)
        tags = {
            "scene_id": job.scene_id,
            "sensor": job.sensor,
            "datetime": job.datetime.isoformat(),
            "source": "earthengine",
            "simulated": "False",
        }
        if s.family == "s1":
            data = tif.data[:2].astype(np.float32)
            data[:, tif.data[2] == 0] = np.nan
            sha = write_geotiff(dataset_dir / job.rel_path, data, want, ("VV", "VH"), nodata=float("nan"), tags=tags)
        else:
            bands = tuple(s.reflectance_bands) + (MASK_BAND,)
            if tif.data.shape[0] != len(bands):
                raise DataError(
                    f"{src}: {tif.data.shape[0]} bands, expected {len(bands)} ({', '.join(bands)}); re-export it"
                )
            scales = [s.band(b).scale for b in bands[:-1]] + [1.0]
            offsets = [s.band(b).offset for b in bands[:-1]] + [0.0]
            sha = write_geotiff(
                dataset_dir / job.rel_path, tif.data, want, bands, tags=tags, scales=scales, offsets=offsets
            )
        out[job.rel_path] = sha
    return out


def _epsg(crs: str) -> str:
    from rasterio.crs import CRS

    return CRS.from_user_input(crs).to_string()


def folder_fetcher(folder: Path, dest: Destination) -> Callable[[ExportJob], Path]:
    """Exports synced to a local folder (Google Drive for desktop, ``gsutil rsync``)."""

    def fetch(job: ExportJob) -> Path:
        p = Path(folder) / dest.prefix / job.patch_id / f"{job.stem}.tif"
        if not p.exists():
            raise DataError(f"{p}: exported file not found; wait for Drive to sync or download it there")
        return p

    return fetch


def gcs_fetcher(dest: Destination, cache_dir: Path) -> Callable[[ExportJob], Path]:
    """Download exports from the bucket with google-cloud-storage (application default credentials)."""
    if dest.kind != "gcs":
        raise SourceError("gcs_fetcher needs a 'gcs' destination; for Drive use folder_fetcher on the synced folder")

    def fetch(job: ExportJob) -> Path:
        from google.cloud import storage

        name = f"{dest.prefix}/{job.patch_id}/{job.stem}.tif"
        target = Path(cache_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        storage.Client().bucket(dest.bucket_or_folder).blob(name).download_to_filename(str(tmp))
        tmp.replace(target)
        return target

    return fetch
