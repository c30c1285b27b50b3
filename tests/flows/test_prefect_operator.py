"""What an operator sees of a flow run, without a server: the watcher that turns reconstruct's progress file into
progress updates, the pipeline log handler, the readable summary, the metrics table, artifact keys and the size of
the embedded quicklook. tests/flows/test_prefect_integration.py checks the same through a served deployment run.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("prefect")

from flows import artifacts  # noqa: E402
from flows import reconstruct_aoi as fr  # noqa: E402
from flows.params import ReconstructParams  # noqa: E402
from pipeline.regions import parse_region  # noqa: E402

TINY = parse_region({"name": "tiny-aoi", "bbox": [113.62, 34.72, 113.642, 34.738],
                     "window": {"start": "2021-07-01", "end": "2021-08-31"}})
DATE = dt.date(2021, 7, 22)


class Recorder:
    """Stands in for ``BlockProgress`` (which needs a Prefect API): the block counts it is told, in order."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.resumed: list[int] = []

    def update(self, done: int, elapsed_s: float | None = None, resumed: int = 0) -> None:
        self.counts.append(done)
        self.resumed.append(resumed)


def _write_progress(path: Path, fingerprint: str, done: list[str]) -> None:
    path.write_text(json.dumps({"fingerprint": fingerprint, "done": done}))


def _wait_for(rec: Recorder, count: int, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if rec.counts and rec.counts[-1] == count:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"watcher reported {rec.counts}, expected a last count of {count}")


def test_watcher_reports_each_rewrite_of_the_progress_file_and_ignores_a_stale_one(tmp_path):
    path = fr.progress_file(TINY, DATE, "composite", str(tmp_path))
    # an interrupted run of other settings left its file: it says nothing about this run
    _write_progress(path, "other", ["0_0", "0_512"])
    rec, stop = Recorder(), threading.Event()
    watcher = threading.Thread(target=fr._watch, args=(path, fr._blocks_done(path), rec, stop, 0.01))
    watcher.start()
    try:
        threading.Event().wait(0.1)
        assert rec.counts == []
        _write_progress(path, "ours", ["0_0"])  # this run's first block replaces it
        _wait_for(rec, 1)
        _write_progress(path, "ours", ["0_0", "0_512"])
        _wait_for(rec, 2)
        path.unlink()  # the run committed and cleared it: no report of "0 blocks"
        threading.Event().wait(0.1)
    finally:
        stop.set()
        watcher.join(5)
    assert not watcher.is_alive()
    assert rec.counts == [1, 2]  # once per change, never the stale file's 2 or a cleared file's 0
    assert rec.resumed == [0, 0]


def test_watcher_tells_blocks_of_an_interrupted_run_of_the_same_settings(tmp_path):
    path = fr.progress_file(TINY, DATE, "composite", str(tmp_path))
    _write_progress(path, "same", ["0_0", "0_512"])  # resumed: these two are not this run's work
    rec, stop = Recorder(), threading.Event()
    watcher = threading.Thread(target=fr._watch, args=(path, fr._blocks_done(path), rec, stop, 0.01))
    watcher.start()
    try:
        _write_progress(path, "same", ["0_0", "0_512", "512_0"])
        _wait_for(rec, 3)
    finally:
        stop.set()
        watcher.join(5)
    assert rec.counts == [3] and rec.resumed == [2]


def test_progress_file_is_where_reconstruct_writes_it(tmp_path, monkeypatch):
    from pipeline.reconstruct.run import OutputPaths

    assert fr.progress_file(TINY, DATE, "composite", str(tmp_path)) == OutputPaths(
        tmp_path, "tiny-aoi_20210722_composite").progress == tmp_path / ".tiny-aoi_20210722_composite.progress.json"
    import pipeline.train.checkpoint as ck

    monkeypatch.setattr(ck, "read_meta", lambda run: {"model": "unet"})
    assert fr.model_name("runs/x") == "unet"
    assert fr.progress_file(TINY, DATE, "runs/x", str(tmp_path)).name == ".tiny-aoi_20210722_unet.progress.json"


def test_pipeline_records_get_a_run_handler_once_and_none_leaks_outside_a_run(monkeypatch):
    from prefect.logging.handlers import APILogHandler

    from pipeline.redact import RedactingFilter

    logger = logging.getLogger("pipeline")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    artifacts.library_logs_to_runs()
    artifacts.library_logs_to_runs()
    (handler,) = [h for h in logger.handlers if isinstance(h, APILogHandler)]
    assert logger.level == logging.INFO
    assert any(isinstance(f, RedactingFilter) for f in handler.filters)
    sent = []
    monkeypatch.setattr("prefect.logging.handlers.emit_api_log", sent.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Prefect's "without a flow run id" warning would fail here
        logging.getLogger("pipeline.reconstruct.run").info("outside any run")
    assert sent == []
    # a level someone chose (the CLI's) is left alone
    monkeypatch.setattr(logger, "level", logging.WARNING)
    artifacts.library_logs_to_runs()
    assert logger.level == logging.WARNING


def test_quicklook_thumbnail_fits_the_budget_even_for_noise(tmp_path):
    from PIL import Image

    png = tmp_path / "q.png"
    noise = np.random.default_rng(0).integers(0, 256, (529, 1040, 3), dtype=np.uint8)  # compresses worst
    Image.fromarray(noise).save(png)
    assert png.stat().st_size > 1_000_000
    uri = artifacts.thumbnail_data_uri(png)
    assert len(uri) <= artifacts.THUMB_MAX_CHARS
    head, data = uri.split(",", 1)
    assert head == "data:image/jpeg;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as thumb:
        assert thumb.width <= 2 * artifacts.THUMB_SIDE and thumb.height <= artifacts.THUMB_SIDE
        assert thumb.width > 100  # still a picture, not a stamp


def test_artifact_keys_are_lowercase_dashes():
    assert artifacts._key("reconstruct-Zhengzhou_Demo-20210722-unet") == "reconstruct-zhengzhou-demo-20210722-unet"
    assert artifacts._key("quicklook--a b--") == "quicklook-a-b"


RESULT = {
    "cog": "/o/a.tif", "provenance": "/o/a_provenance.tif", "stac": "/o/a.json", "quicklook": "/o/a_quicklook.png",
    "uncertainty": None, "source_days": None, "warnings": [], "fill": None, "model": "unet", "blocks": 4,
    "blocks_computed": 1, "resumed": True, "optical_dates": ["2021-07-22"], "sar_dates": [], "scene_ids": ["s"],
    "target_scene_ids": ["s"], "optical_sensor": "s2_l1c",
    "validation": {"a.tif": True, "a_provenance.tif": False, "stac_core": True, "stac_extensions": {
        "https://stac-extensions.github.io/projection/v2.0.0/schema.json": "valid",
        "https://stac-extensions.github.io/eo/v1.1.0/schema.json": "not checked: schema not available offline"}},
}
EVAL = {"split": "test", "data": "data/zz", "n_samples": 12, "model": "unet", "model_sha256": "abc",
        "results": {"model": {"all": {"psnr": 30.0, "ssim": 0.9, "sam": 3.0, "mae": 0.01, "rmse": 0.02,
                                      "cloud_psnr": 25.0, "cloud_ssim": 0.8, "cloud_sam": 5.0, "cloud_mae": 0.02,
                                      "cloud_rmse": 0.03}},
                    "composite": {"all": {"psnr": 28.0, "ssim": 0.85, "sam": 4.0, "mae": 0.015, "rmse": 0.025}}}}


def test_summary_is_readable_markdown_not_a_dict(monkeypatch):
    monkeypatch.setattr(fr, "model_name", lambda checkpoint: "unet")
    params = ReconstructParams.model_construct(region="tiny-aoi", date=DATE, checkpoint="runs/x", source="synthetic")
    md = fr.summary_markdown(params, TINY, RESULT, None, [EVAL])
    assert "{" not in md and "True" not in md, md  # no dict, no Python booleans
    assert "- `a.tif`: valid Cloud Optimized GeoTIFF" in md
    assert "- `a_provenance.tif`: **NOT a valid COG**" in md
    assert "- STAC extension projection v2.0.0: valid" in md
    assert "- STAC extension eo v1.1.0: not checked: schema not available offline" in md
    assert "4 block(s), 1 computed in this run (the rest resumed)" in md
    assert "| unet | cloud-covered | 25.0000 | 0.8000 |" in md
    assert "| last clear (not harmonized) | cloud-covered | - |" in md  # no figure is not "nan"


def test_metrics_table_has_truth_and_the_checkpoints_benchmark(tmp_path, monkeypatch):
    truth = {"scene_id": "s", "cloud_fraction": 0.4,
             "metrics": {"psnr": 35.0, "cloud_psnr": 31.0, "ssim": 0.95, "cloud_ssim": 0.9}}
    rows = fr.metrics_table("unet", truth, [EVAL])
    assert [(r["method"], r["pixels"]) for r in rows] == [
        ("unet", "all"), ("unet", "cloud-covered"), ("unet", "all"), ("unet", "cloud-covered"),
        ("last clear (not harmonized)", "all"), ("last clear (not harmonized)", "cloud-covered")]
    assert rows[1]["psnr"] == 31.0 and rows[3]["psnr"] == 25.0 and rows[4]["psnr"] == 28.0
    assert rows[0]["scored on"].startswith("this COG vs true clear scene") and "test split" in rows[2]["scored on"]
    assert fr.metrics_table("composite", None, []) == []

    # the checkpoint's evaluation counts only for the weights it scored
    import pipeline.train.checkpoint as ck

    run = tmp_path / "run"
    (run / "eval-test").mkdir(parents=True)
    (run / "eval-test" / "metrics.json").write_text(json.dumps(EVAL))
    monkeypatch.setattr(ck, "read_meta", lambda r: {"model": "unet", "model_sha256": "abc"})
    assert fr.benchmark(str(run)) == [EVAL]
    monkeypatch.setattr(ck, "read_meta", lambda r: {"model": "unet", "model_sha256": "retrained"})
    assert fr.benchmark(str(run)) == []
    assert fr.benchmark("composite") == []


def test_demo_quiet_raises_only_the_console_handlers_and_restores_them():
    from flows.cli import _console_level

    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    try:
        with _console_level(logging.WARNING):
            assert handler.level == logging.WARNING
            logging.getLogger("pipeline.test").warning("kept")
        assert handler.level == logging.NOTSET
    finally:
        root.removeHandler(handler)


def test_block_progress_logs_each_count_once_and_survives_a_failing_api(monkeypatch, caplog):
    from uuid import uuid4

    created, updates = [], []
    monkeypatch.setattr(artifacts, "create_progress_artifact",
                        lambda progress, key, description: created.append((progress, key)) or uuid4())

    def update(artifact_id, progress, description):
        updates.append(progress)
        if len(updates) == 2:
            raise ConnectionError("server gone")

    monkeypatch.setattr(artifacts, "update_progress_artifact", update)
    logger = logging.getLogger("tests.block-progress")
    p = artifacts.BlockProgress("reconstruct-progress-Tiny_AOI-20210722-unet", 4, "tiny", logger)
    assert created == [(0.0, "reconstruct-progress-tiny-aoi-20210722-unet")]
    with caplog.at_level(logging.INFO, logger="tests.block-progress"):
        p.update(1, 10.0)
        p.update(1, 11.0)  # no change: no line, no update
        p.update(3, 20.0, resumed=1)
        p.update(4)
    lines = [r.getMessage() for r in caplog.records if r.name == "tests.block-progress"]
    assert lines[0] == "tiny: block 1 of 4 written (25 %, 10 s elapsed, about 30 s left)"
    assert lines[1] == "tiny: block 3 of 4 written (75 %, 20 s elapsed, about 10 s left)"  # 2 blocks in 20 s
    assert lines[2].startswith("progress artifact not updated any more (ConnectionError")
    assert lines[3] == "tiny: block 4 of 4 written (100 %)"
    assert updates == [25.0, 75.0]  # after the failure the API is left alone
