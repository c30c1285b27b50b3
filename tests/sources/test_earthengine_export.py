"""Batch exports offline: the export request pins the patch grid; the task loop caps, polls, retries and
resumes; gathered files land in the dataset's patch layout and a shifted export is refused."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.errors import DataError, SourceError
from pipeline.geotiff import MASK_BAND, read_geotiff
from pipeline.grid import Grid
from pipeline.regions import load_region
from pipeline.sources.base import Scene
from pipeline.sources.earthengine import batch as ee_export
from pipeline.sources.earthengine.batch import Destination, ExportJob

WHEN = dt.datetime(2021, 7, 20, 3, 5, tzinfo=dt.timezone.utc)
GRID = Grid("EPSG:32649", Affine(10, 0, 737850.0, 0, -10, 3854220.0), 16, 16)


def _job(i: int, sensor: str = "s2_l1c", grid: Grid = GRID) -> ExportJob:
    return ExportJob(f"r00000c{i:05d}", sensor, f"scene{i}", WHEN, grid, image=None)


def _constants(graph: Any) -> list[Any]:
    out: list[Any] = []
    if isinstance(graph, dict):
        if "constantValue" in graph:
            out.append(graph["constantValue"])
        for v in graph.values():
            out += _constants(v)
    elif isinstance(graph, list):
        for v in graph:
            out += _constants(v)
    return out


def test_export_request_pins_the_patch_grid(ee_offline):
    from pipeline.sources.earthengine.source import EarthEngineSource

    region = load_region("zhengzhou-demo")
    scene = Scene("IDX", "s2_l1c", WHEN, {}, 0.1, {"ee_index": "IDX"})
    pid, pgrid = region.patches()[1]
    job = EarthEngineSource().export_job(scene, pid, pgrid, region.grid())
    task = ee_export.EarthEngineTasks().task(job, job.description("demo"), Destination("gcs", "my-bucket", "exports"))
    cfg = task.config
    assert cfg["description"] == "cf_demo_r00000c00128_s2_l1c_20210720"
    dest = cfg["fileExportOptions"]["cloudStorageDestination"]
    assert dest == {"bucket": "my-bucket", "filenamePrefix": "exports/r00000c00128/s2_l1c_20210720"}
    import ee

    expr = cfg["expression"]
    graph = expr if isinstance(expr, dict) else ee.serializer.encode(expr, for_cloud_api=True)
    consts = _constants(graph)
    assert list(pgrid.transform)[:6] in consts and pgrid.crs in consts  # reprojected onto the exact grid
    assert "Image.reproject" in json.dumps(graph) and "scale" not in cfg
    assert [MASK_BAND] in consts  # the mask travels as the last band
    drive = ee_export.EarthEngineTasks().task(job, "d", Destination("drive", "cloudfree-exports"))
    assert drive.config["fileExportOptions"]["driveDestination"]["folder"] == "cloudfree-exports"


class FakeTasks:
    """A batch system whose tasks take ``runs`` polls; scripted failures per description."""

    def __init__(
        self,
        fail_first: set[str] = frozenset(),
        always_fail: set[str] = frozenset(),
        runs: int = 2,
        server: dict | None = None,
    ):
        self.fail_first, self.always_fail, self.runs = set(fail_first), set(always_fail), runs
        self.started: list[str] = []
        self.polls: dict[str, int] = {}
        self.desc: dict[str, str] = {}
        self.server = server if server is not None else {}
        self.max_active = 0

    def start(self, job, description, dest):
        name = f"projects/p/operations/{description}-{len(self.started)}"
        self.started.append(description)
        self.desc[name] = description
        self.polls[name] = 0
        return name

    def status(self, name):
        self.polls[name] += 1
        active = sum(1 for n, p in self.polls.items() if p < self.runs)
        self.max_active = max(self.max_active, active + (1 if self.polls[name] <= self.runs else 0))
        d = self.desc[name]
        if self.polls[name] < self.runs:
            state = "RUNNING"
        elif d in self.always_fail or (d in self.fail_first and self.started.count(d) == 1):
            state = "FAILED"
        else:
            state = "COMPLETED"
        self.server[d] = {"name": name, "state": state}
        return {"state": state, "error_message": "Internal error" if state == "FAILED" else None}

    def existing(self):
        return dict(self.server)


def test_tasks_capped_polled_retried_and_resumed(tmp_path):
    jobs = [_job(i) for i in range(7)]
    ledger = tmp_path / ".ee_tasks.json"
    fake = FakeTasks(fail_first={jobs[2].description("t")})
    inflight: list[int] = []

    def sleep(_s):
        inflight.append(sum(1 for t in json.loads(ledger.read_text()).values() if t["state"] in ee_export.ACTIVE))

    out = ee_export.run_exports(
        jobs, Destination("gcs", "b"), ledger, backend=fake, tag="t", max_in_flight=3, sleep=sleep
    )
    assert all(t["state"] == "COMPLETED" for t in out.values()) and len(out) == 7
    assert max(inflight) == 3  # never more than the cap queued
    assert fake.started.count(jobs[2].description("t")) == 2  # the failed one was resubmitted once
    assert len(fake.started) == 8
    # Rerun with the ledger: nothing is resubmitted.
    again = FakeTasks(server=fake.server)
    ee_export.run_exports(jobs, Destination("gcs", "b"), ledger, backend=again, tag="t", sleep=lambda s: None)
    assert again.started == []
    # Ledger lost: the server's task list still prevents resubmitting finished tasks.
    ledger.unlink()
    third = FakeTasks(server=fake.server)
    ee_export.run_exports(
        jobs + [_job(9)], Destination("gcs", "b"), ledger, backend=third, tag="t", sleep=lambda s: None
    )
    assert third.started == [_job(9).description("t")]


def test_task_that_keeps_failing_is_reported(tmp_path):
    jobs = [_job(0), _job(1)]
    fake = FakeTasks(always_fail={jobs[1].description("t")}, runs=1)
    with pytest.raises(SourceError, match=r"1 export task\(s\) failed after 2 attempts .*r00000c00001.*Internal error"):
        ee_export.run_exports(
            jobs,
            Destination("gcs", "b"),
            tmp_path / "l.json",
            backend=fake,
            tag="t",
            max_attempts=2,
            sleep=lambda s: None,
        )
    assert json.loads((tmp_path / "l.json").read_text())[jobs[0].description("t")]["state"] == "COMPLETED"


def _write_export(path: Path, grid: Grid, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    prof = dict(
        driver="GTiff",
        width=grid.width,
        height=grid.height,
        count=data.shape[0],
        dtype=data.dtype.name,
        crs=grid.crs,
        transform=grid.transform,
    )
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)


def test_gather_writes_the_dataset_layout_and_refuses_shifted_grids(tmp_path):
    dest = Destination("drive", "folder", "cloudfree")
    synced = tmp_path / "drive"
    dn = np.random.default_rng(0).integers(0, 10000, (14, 16, 16)).astype(np.uint16)
    dn[13] = 0
    dn[13, :4] = 1  # cloud rows
    s1 = np.stack([np.full((16, 16), -12.0), np.full((16, 16), -19.0), np.ones((16, 16))]).astype(np.float32)
    s1[2, 0, 0] = 0  # invalid pixel
    opt, sar = _job(0), _job(1, "s1_grd")
    _write_export(synced / "cloudfree" / opt.patch_id / f"{opt.stem}.tif", GRID, dn)
    _write_export(synced / "cloudfree" / sar.patch_id / f"{sar.stem}.tif", GRID, s1)
    out = ee_export.gather([opt, sar], dest, tmp_path / "ds", ee_export.folder_fetcher(synced, dest))
    assert set(out) == {"patches/r00000c00000/s2_l1c_20210720.tif", "patches/r00000c00001/s1_grd_20210720.tif"}
    o = read_geotiff(tmp_path / "ds" / opt.rel_path)
    assert o.bands[-1] == MASK_BAND and o.bands[0] == "B1" and len(o.bands) == 14
    np.testing.assert_array_equal(o.data, dn)
    assert o.grid.transform == GRID.transform and o.tags["source"] == "earthengine"
    with rasterio.open(tmp_path / "ds" / opt.rel_path) as src:
        assert src.scales[0] == pytest.approx(1e-4)
    s = read_geotiff(tmp_path / "ds" / sar.rel_path)
    assert s.bands == ("VV", "VH") and np.isnan(s.data[:, 0, 0]).all() and s.data[0, 1, 1] == -12.0
    # One pixel off: refused, nothing written for it.
    shifted = Grid(GRID.crs, GRID.transform @ Affine.translation(1, 0), 16, 16)
    bad = _job(2)
    _write_export(synced / "cloudfree" / bad.patch_id / f"{bad.stem}.tif", shifted, dn)
    with pytest.raises(DataError, match="is not the patch grid"):
        ee_export.gather([bad], dest, tmp_path / "ds", ee_export.folder_fetcher(synced, dest))
    assert not (tmp_path / "ds" / bad.rel_path).exists()
