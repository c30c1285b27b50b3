"""Flows under ``prefect_test_harness``: parameters, per-scene tasks, caching across runs, retries, artifacts.

A ~2 x 2 km inline AOI (patch 64) keeps every flow run to seconds. Result storage goes to a temp folder so
"the second run is cached" is about this session's first run, not an earlier pytest session.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

pytest.importorskip("prefect")

from prefect import flow  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.common import is_transient_error  # noqa: E402
from flows.params import BuildDatasetParams, ReconstructParams, TrainParams, region_from_geojson  # noqa: E402
from pipeline.errors import RegionError, SourceError  # noqa: E402

GEOM = {"type": "Polygon",
        "coordinates": [[[113.62, 34.72], [113.642, 34.72], [113.642, 34.738], [113.62, 34.738], [113.62, 34.72]]]}
TINY = dict(name="tiny-aoi", geometry=GEOM, start="2021-07-01", end="2021-08-31", event_date="2021-07-20",
            patch_size=64)
DATE = "2021-07-22"  # a synthetic Sentinel-2 overpass


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=90):
            yield


def _task_kind(run) -> str:
    return run.name.rsplit("-", 1)[0] if not run.name.startswith("mask-") else "mask-scene"


def task_runs(flow_run_id, timeout: float = 60.0, expect: dict[str, int] | None = None) -> list:
    """Task runs of one flow run, once the server has recorded them (at least ``expect[kind]`` runs of each
    kind) and their final states: events land asynchronously, so a run can be missing or unfinished for a moment."""
    from collections import Counter

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        seen = Counter(_task_kind(r) for r in runs)
        done = (all(r.state is not None and r.state.is_final() for r in runs)
                and all(seen[k] >= n for k, n in (expect or {}).items()))
        if done or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def task_states(flow_run_id, expect: dict[str, int] | None = None) -> dict[str, list[str]]:
    """task name -> state names of the task runs of one flow run."""
    out: dict[str, list[str]] = {}
    for r in sorted(task_runs(flow_run_id, expect=expect), key=lambda r: r.expected_start_time or r.created):
        out.setdefault(_task_kind(r), []).append(r.state.name)
    return out


def artifacts_of(flow_run_id) -> dict[str, str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.type for a in arts}


# --- parameters: no server needed ----------------------------------------------------------------------------


def test_region_from_geojson_builds_the_bbox_region():
    r = region_from_geojson({"type": "Feature", "geometry": GEOM, "properties": {}}, "tiny-aoi", "2021-07-01",
                            "2021-08-31")
    assert r.bbox == pytest.approx((113.62, 34.72, 113.642, 34.738))
    g = r.grid()
    assert g.crs == "EPSG:32649" and 180 < g.width < 230 and 180 < g.height < 230


@pytest.mark.parametrize("geometry, needle", [
    ('{"type": "Polygon", "coordinates": [[[113.6, 34.7]', "not valid JSON"),
    ({"type": "Point", "coordinates": [113.6, 34.7]}, "Point"),
    ({"type": "Polygon", "coordinates": "nope"}, "malformed GeoJSON"),
    ({"type": "Polygon", "coordinates": [[[34.7, 113.6], [34.8, 113.6], [34.8, 113.7], [34.7, 113.6]]]}, "latitude"),
])
def test_inline_geojson_errors_name_the_problem(geometry, needle):
    with pytest.raises(RegionError, match=needle):
        region_from_geojson(geometry, "bad-aoi", "2021-07-01", "2021-08-31")


def test_bad_parameters_are_validation_errors_with_the_fix(tmp_path):
    with pytest.raises(ValidationError, match="region 'atlantis' not found.*known regions"):
        ReconstructParams(region="atlantis", date=DATE)
    with pytest.raises(ValidationError, match="outside region zhengzhou-demo's window 2021-07-01..2021-08-31"):
        ReconstructParams(region="zhengzhou-demo", date="2021-06-01")
    with pytest.raises(ValidationError, match="no model.pt \\+ model.json"):
        ReconstructParams(region="zhengzhou-demo", date=DATE, checkpoint=str(tmp_path / "nope"))
    with pytest.raises(ValidationError, match="malformed GeoJSON"):
        ReconstructParams(region={**TINY, "geometry": {"type": "Polygon", "coordinates": 5}}, date=DATE)
    with pytest.raises(ValidationError, match="unknown model 'resnet'"):
        TrainParams(data=str(tmp_path), model="resnet")
    with pytest.raises(ValidationError, match="no cubes/ folder"):
        TrainParams(data=str(tmp_path), model="unet")
    with pytest.raises(ValidationError, match="unknown mask method 'magic'; use one of: cheapest, auto"):
        BuildDatasetParams(region="zhengzhou-demo", mask_method="magic")
    with pytest.raises(ValidationError, match="max_patches 0: Input should be greater than or equal to 1"):
        BuildDatasetParams(region="zhengzhou-demo", max_patches=0)
    with pytest.raises(ValidationError, match="score_truth needs the synthetic source"):
        ReconstructParams(region="zhengzhou-demo", date=DATE, source="earthengine", score_truth=True)
    with pytest.raises(ValidationError, match=r"overlap 300: must be smaller than the tile \(256 px\)"):
        ReconstructParams(region="zhengzhou-demo", date=DATE, overlap=300)
    with pytest.raises(ValidationError, match="mask_method 'magic': unknown mask method"):
        ReconstructParams(region="zhengzhou-demo", date=DATE, mask_method="magic")
    ok = ReconstructParams(region=TINY, date=DATE)
    assert ok.resolved_region().name == "tiny-aoi"
    cfg = ReconstructParams(region=TINY, date=DATE, tile=128, aux_dates="latest", source_options={"seed": 3}).config()
    assert (cfg.tile, cfg.overlap, cfg.aux_dates) == (128, 64, "latest")
    assert cfg.source.name == "synthetic" and cfg.source.options == {"seed": 3}


def test_scheduled_build_targets_active_regions_without_a_dataset(tmp_path):
    p = BuildDatasetParams(out_root=str(tmp_path))
    assert [r.name for r in p.targets()] == ["zhengzhou-demo"]  # the only region file marked active
    (tmp_path / "zhengzhou-demo").mkdir()
    (tmp_path / "zhengzhou-demo" / "dataset.json").write_text("{}")
    assert p.targets() == []


def test_transient_errors_are_told_from_deterministic_ones():
    import ee

    from pipeline.sources.earthengine.pixels import EarthEngineRequestError

    assert is_transient_error(TimeoutError("read timed out"))
    assert is_transient_error(ConnectionResetError())
    assert is_transient_error(ee.EEException("Too many concurrent aggregations."))
    assert not is_transient_error(ee.EEException("User memory limit exceeded."))
    assert not is_transient_error(SourceError("no s2 scenes found"))
    assert not is_transient_error(FileNotFoundError("x.tif"))
    assert not is_transient_error(ValueError("timeout"))
    try:
        raise EarthEngineRequestError("kept failing after 6 attempts") from ee.EEException("Quota exceeded")
    except EarthEngineRequestError as exc:
        exhausted = exc
    try:
        raise EarthEngineRequestError("rejected") from ee.EEException(
            "Image.select: Pattern 'B99' did not match any bands.")
    except EarthEngineRequestError as exc:
        rejected = exc
    assert is_transient_error(exhausted) and not is_transient_error(rejected)


def test_oversized_regions_are_skipped_by_the_nightly_run_and_refused_by_name(harness, tmp_path, monkeypatch):
    from flows.build_dataset import build_dataset

    monkeypatch.setenv("CLOUDFREE_MAX_MEGAPIXELS", "0.01")  # every region is "too large" now
    assert build_dataset(BuildDatasetParams(out_root=str(tmp_path))) == []  # zhengzhou-demo skipped, nothing built
    assert not any(tmp_path.iterdir())
    state = build_dataset(BuildDatasetParams(region=TINY, out_root=str(tmp_path)), return_state=True)
    assert state.is_failed() and "over the 0.01 Mpx limit" in state.message


@pytest.mark.slow
def test_nightly_run_builds_a_2022_aoi_made_with_regions_new(harness, tmp_path, monkeypatch):
    # After Sentinel-1B (2021-12-23) S1 revisits every 12 days: the default pairing must still find S1 for
    # a new event's patches, or the nightly deployment fails for every AOI after 2021.
    from typer.testing import CliRunner

    from flows.build_dataset import build_dataset
    from pipeline.cli import app

    regions = tmp_path / "regions"
    regions.mkdir()
    made = CliRunner().invoke(app, ["regions", "new", "sindh-2022", "--bbox", "67.9", "26.4", "68.0", "26.5",
                                    "--event-date", "2022-08-29", "--days-before", "16", "--days-after", "0",
                                    "--active", "--out", str(regions / "sindh-2022.yaml")])
    assert made.exit_code == 0, made.output
    monkeypatch.setenv("CLOUDFREE_REGIONS_DIR", str(regions))
    built = build_dataset(BuildDatasetParams(out_root=str(tmp_path / "data"), max_patches=2,
                                             mask_method="cloudscore"))
    assert [b["region"] for b in built] == ["sindh-2022"] and built[0]["patches_kept"] == 2
    assert (tmp_path / "data" / "sindh-2022" / "dataset.json").exists()


# --- flow runs ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_build(harness, tmp_path_factory):
    from flows.build_dataset import build_dataset

    root = tmp_path_factory.mktemp("datasets")
    params = BuildDatasetParams(region=TINY, out_root=str(root))
    first = build_dataset(params, return_state=True)
    second = build_dataset(params, return_state=True)
    return params, first, second


def test_build_dataset_flow_masks_per_scene_and_builds(tiny_build):
    params, first, _ = tiny_build
    assert first.is_completed(), first.message
    (summary,) = first.result()
    out = Path(summary["out"])
    assert (out / "manifest.parquet").is_file() and (out / "cubes" / "train.zarr").is_dir()
    n = len(summary["scenes_masked"])
    assert n > 10
    # the per-scene tasks filled the build's mask cache: the build task masked nothing itself
    assert summary["masks_cached"] == n and summary["masks_computed"] == 0
    states = task_states(first.state_details.flow_run_id, expect={"mask-scene": n, "build-patches-and-cubes": 1})
    assert states["mask-scene"].count("Completed") == n
    arts = artifacts_of(first.state_details.flow_run_id)
    assert arts == {"dataset-tiny-aoi": "markdown", "scenes-tiny-aoi": "table"}


def test_second_identical_build_reuses_cached_results(tiny_build):
    _, first, second = tiny_build
    assert second.is_completed(), second.message
    kinds = {"search-scenes", "mask-scene", "build-patches-and-cubes"}
    states = task_states(second.state_details.flow_run_id, expect=dict.fromkeys(kinds, 1))
    assert set(states) == kinds
    assert all(s == "Cached" for names in states.values() for s in names), states
    assert second.result()[0]["manifest_sha256"] == first.result()[0]["manifest_sha256"]


def test_build_task_reruns_when_its_cached_outputs_were_deleted(tiny_build):
    import shutil

    from flows.build_dataset import build_dataset

    params, first, _ = tiny_build
    out = Path(first.result()[0]["out"])
    shutil.rmtree(out / "cubes")
    state = build_dataset(params, return_state=True)
    assert state.is_completed(), state.message
    assert (out / "cubes" / "train.zarr").is_dir()
    states = task_states(state.state_details.flow_run_id, expect={"build-patches-and-cubes": 2})
    assert states["build-patches-and-cubes"] == ["Cached", "Completed"]


def test_reconstruct_flow_writes_cog_stac_quicklook_and_artifacts(harness, tmp_path):
    import rasterio

    from flows.reconstruct_aoi import reconstruct_aoi

    params = ReconstructParams(region=TINY, date=DATE, out=str(tmp_path / "out"), mask_method="cloudscore",
                               score_truth=True)
    state = reconstruct_aoi(params, return_state=True)
    assert state.is_completed(), state.message
    res = state.result()
    with rasterio.open(res["cog"]) as ds:
        assert ds.crs.to_string() == "EPSG:32649"
        assert ds.descriptions[:4] == ("B1", "B2", "B3", "B4")
    assert Path(res["stac"]).is_file() and Path(res["quicklook"]).is_file()
    m = res["truth"]["metrics"]
    assert 10 < m["psnr"] < 60 and m["cloud_psnr"] <= m["psnr"] + 1e-9  # clouded pixels are the hard ones
    arts = artifacts_of(state.state_details.flow_run_id)
    key = "tiny-aoi-20210722-composite"  # region, date and model: another model's run keeps its own "latest"
    assert arts == {f"reconstruct-{key}": "markdown", f"reconstruct-metrics-{key}": "table",
                    f"quicklook-{key}": "markdown", f"reconstruct-progress-{key}": "progress"}
    again = reconstruct_aoi(params, return_state=True)
    assert set(task_states(again.state_details.flow_run_id, expect={"reconstruct": 1})["reconstruct"]) == {"Cached"}


@pytest.mark.parametrize("params, needle", [
    ({"region": "atlantis", "date": DATE}, "region 'atlantis' not found"),
    ({"region": {**TINY, "geometry": '{"type": "Polygon"'}, "date": DATE}, "not valid JSON"),
    ({"region": "zhengzhou-demo", "date": "2022-01-01"}, "outside region zhengzhou-demo's window"),
    ({"region": "zhengzhou-demo", "date": DATE, "checkpoint": "runs/does-not-exist"}, "no model.pt \\+ model.json"),
])
def test_bad_parameters_fail_the_flow_run_fast_with_the_message(harness, params, needle):
    import re

    from flows.reconstruct_aoi import reconstruct_aoi

    t = time.perf_counter()
    state = reconstruct_aoi(params=params, return_state=True)
    assert state.is_failed()
    assert time.perf_counter() - t < 30
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state.is_failed()
    assert "Validation of flow parameters failed" in run.state.message
    with pytest.raises(Exception, match="invalid parameters") as info:
        state.result()
    assert re.search(needle, str(info.value))
    assert not task_states(run.id)  # nothing ran


def _search_once_with(monkeypatch, fail):
    """Run build-dataset's search task once (retries without delay, no cache) on a synthetic source whose
    ``search`` first calls ``fail(n)`` with its call count; returns (final state, call counter)."""
    import flows.build_dataset as fb
    from pipeline.regions import parse_region
    from pipeline.sources.synthetic.source import SyntheticSource

    calls = {"n": 0}

    class Failing(SyntheticSource):
        def search(self, *a, **k):
            calls["n"] += 1
            fail(calls["n"])
            return super().search(*a, **k)

    monkeypatch.setattr(fb, "get_source", lambda name, **kw: Failing(**kw))
    region = parse_region({"name": "tiny-aoi", "bbox": [113.62, 34.72, 113.642, 34.738],
                           "window": {"start": "2021-07-01", "end": "2021-07-20"}})
    search = fb.search_scenes.with_options(retry_delay_seconds=0, cache_policy=NO_CACHE, persist_result=False)

    @flow
    def one_search():
        return search(region, "synthetic", {})

    return one_search(return_state=True), calls


def test_source_task_retries_a_transient_error_once_then_succeeds(harness, monkeypatch):
    def timeout_first(n):
        if n == 1:
            raise TimeoutError("The read operation timed out")

    state, calls = _search_once_with(monkeypatch, timeout_first)
    assert state.is_completed(), state.message
    assert calls["n"] == 3  # s2 failed once, then s2 and s1 on the retry
    (run,) = task_runs(state.state_details.flow_run_id)
    assert run.run_count == 2


def test_source_task_does_not_retry_a_deterministic_error(harness, monkeypatch):
    def always(n):
        raise SourceError("the source cannot serve sensor 's2' here; pick another --source")

    state, calls = _search_once_with(monkeypatch, always)
    assert state.is_failed() and calls["n"] == 1
    assert "pick another --source" in state.message


@pytest.mark.slow
def test_train_flow_checkpoint_and_metrics_table(tiny_build, tmp_path):
    from flows.train_model import train_model

    _, first, _ = tiny_build
    data = first.result()[0]["out"]
    params = TrainParams(data=data, model="unet", epochs=1, max_steps_per_epoch=2, batch_size=4,
                         out=str(tmp_path / "run"), evaluate_split="val")
    state = train_model(params, return_state=True)
    assert state.is_completed(), state.message
    res = state.result()
    assert (tmp_path / "run" / "model.pt").is_file()
    assert set(res["evaluation"]["results"]) == {"model", "composite"}
    arts = artifacts_of(state.state_details.flow_run_id)
    assert arts["metrics-unet"] == "table" and arts["evaluation-unet"] == "markdown"
    # the table's cells are the evaluation's figures, cloud-covered pixels included
    from flows.artifacts import metrics_rows

    ev = res["evaluation"]
    rows = {r["method"]: r for r in metrics_rows(ev)}
    for who, name in (("model", "unet"), ("composite", "last clear (not harmonized)")):
        s = ev["results"][who]["all"]
        assert rows[name]["mae_all"] == pytest.approx(s["mae"], abs=1e-4)
        assert rows[name]["mae_cloud"] == pytest.approx(s["cloud_mae"], abs=1e-4)
        # the demo's bands (B3, B11) give the water-under-cloud F1 its MNDWI; NaN where no image had water there
        assert ev["water_index"] == "mndwi > 0.2"
        assert rows[name]["water_f1_cloud"] == pytest.approx(s["cloud_water_f1"], abs=1e-4, nan_ok=True)
    # the trained checkpoint is a valid reconstruct parameter now
    assert ReconstructParams(region=TINY, date=DATE, checkpoint=str(tmp_path / "run")).checkpoint
    # and a start for fine-tuning: the tuned run's epoch 0 scores the given weights
    tuned = train_model(params.model_copy(update={"out": str(tmp_path / "tuned"), "init_from": str(tmp_path / "run"),
                                                  "evaluate_split": None}), return_state=True)
    assert tuned.is_completed(), tuned.message
    first_epoch = tuned.result()["history"][0]
    assert first_epoch["epoch"] == 0 and first_epoch["cloud_psnr"] == pytest.approx(res["best_value"], abs=1e-4)


def test_dask_task_runner_is_chosen_by_environment_and_runs_tasks(harness, monkeypatch):
    from prefect import task
    from prefect_dask import DaskTaskRunner

    from flows.common import task_runner

    monkeypatch.setenv("CLOUDFREE_DASK", "tcp://10.0.0.5:8786")
    remote = task_runner()
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    monkeypatch.setenv("CLOUDFREE_DASK", "local")
    local = task_runner()
    assert isinstance(local, DaskTaskRunner) and local.address is None

    @task
    def square(x: int) -> int:
        return x * x

    @flow(task_runner=local)
    def squares() -> list[int]:
        return [f.result() for f in square.map([1, 2, 3])]

    assert squares() == [1, 4, 9]
