"""A real ``prefect server start`` + process worker on a free loopback port, deployments from ``prefect.yaml``,
and ``prefect deployment run 'reconstruct-aoi/default' --watch`` through the CLI (what ``make serve`` users do);
then what an operator sees of that run, read back through the Prefect API: INFO log lines (the pipeline's
included) although this session exports ``PREFECT_LOGGING_LEVEL=WARNING`` (tests/conftest.py), one log line per
block and a progress artifact at 100 %, artifact keys naming the model, and a quicklook small enough to embed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(tmp_path, monkeypatch):
    from flows import serve

    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    state = serve.start(port=None)
    try:
        yield state, home
    finally:
        serve.stop()
        for key in ("worker_pid", "server_pid"):
            assert not serve._alive(state[key]), f"{key} {state[key]} still running after stop"
        assert not (home / "cloudfree-serve.json").exists()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_deployment_run_through_the_cli_writes_the_cog(served, tmp_path):
    import rasterio

    state, home = served
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=state["api_url"], PREFECT_CLI_PROMPT="false")
    prefect = str(Path(sys.executable).with_name("prefect"))
    out = tmp_path / "cog-out"
    # the default deployment's parameters, with the output redirected out of the repo
    params = {
        "params": {
            "region": "zhengzhou-demo",
            "date": "2021-07-22",
            "checkpoint": "composite",
            "source": "synthetic",
            "out": str(out),
            "mask_method": "cloudscore",
            "block": 512,  # 4 blocks over the ~1035 x 1026 px AOI, so there is progress to follow
        }
    }
    deps = subprocess.run([prefect, "deployment", "ls"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert deps.returncode == 0, deps.stderr
    for name in ("reconstruct-aoi/default", "train-model/default", "build-dataset/new-aoi"):
        assert name in deps.stdout.replace("│", " "), deps.stdout
    limit = subprocess.run([prefect, "concurrency-limit", "inspect", "earthengine"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert limit.returncode == 0 and "8" in limit.stdout, limit.stdout + limit.stderr
    run = subprocess.run([prefect, "deployment", "run", "reconstruct-aoi/default", "--params", json.dumps(params),
                          "--watch", "--watch-timeout", "780"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=840)
    log = (home / "worker.log").read_text(errors="replace")[-4000:]
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\nworker log:\n{log}"
    assert "Completed" in run.stdout
    cog = out / "zhengzhou-demo_20210722_composite.tif"
    assert cog.is_file(), sorted(p.name for p in out.glob("*")) if out.exists() else "no output folder"
    with rasterio.open(cog) as ds:
        assert ds.crs.to_string() == "EPSG:32649" and ds.descriptions[1] == "B2"
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
    _operator_view(state["api_url"], flow_run_id, out)

    # the nightly cron of build-dataset/new-aoi turned into scheduled flow runs (the server's scheduler works)
    deadline = time.monotonic() + 120
    while True:
        ls = subprocess.run(
            [prefect, "flow-run", "ls", "--flow-name", "build-dataset", "--state-type", "SCHEDULED", "-o", "json"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert ls.returncode == 0, ls.stderr
        scheduled = json.loads(ls.stdout or "[]")
        if scheduled or time.monotonic() > deadline:
            break
        time.sleep(5)
    server_log = (home / "server.log").read_text(errors="replace")
    assert scheduled, "no scheduled build-dataset runs; server scheduler errors: " + (
        "SQLAlchemy >= 2.1 breaks Prefect 3.8.8's scheduler ('Can't evaluate bulk DML statement'): pin sqlalchemy<2.1"
        if "bulk DML" in server_log
        else server_log[-2000:]
    )
    # the cron is "0 2 * * *" UTC: every scheduled run starts at 02:00 UTC
    starts = [dt.datetime.fromisoformat(r["expected_start_time"]).astimezone(dt.timezone.utc) for r in scheduled]
    assert all((t.hour, t.minute) == (2, 0) for t in starts), starts


def _operator_view(api_url: str, flow_run_id: str, out: Path) -> None:
    """What the run's page shows: its logs and artifacts, read through the API as the UI does."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        (deployment,) = [d for d in client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["default"])))
            if d.entrypoint.endswith(":reconstruct_aoi")]
    text = "\n".join(f"{lg.level} {lg.name}: {lg.message}" for lg in logs)
    info = [lg for lg in logs if lg.level == 20]
    assert any("reconstructing zhengzhou-demo on 2021-07-22" in lg.message for lg in info), text[-3000:]
    # the library's own loggers reach the run's log (pipeline.reconstruct.run says what it fills from)
    assert any(lg.name.startswith("pipeline.") and "harmonized fill" in lg.message for lg in info), text[-3000:]
    # the watcher's line per change of the progress file: the last block and at least one before it
    done = {int(m.group(1)) for lg in info if (m := re.search(r"block (\d+) of 4 written", lg.message))}
    assert 4 in done and min(done) < 4, text[-3000:]

    by_key = {a.key: a for a in arts}
    key = "zhengzhou-demo-20210722-composite"
    assert {f"reconstruct-{key}", f"quicklook-{key}", f"reconstruct-progress-{key}"} <= set(by_key), sorted(by_key)
    assert by_key[f"reconstruct-progress-{key}"].data == 100
    quicklook = by_key[f"quicklook-{key}"].data
    assert len(quicklook) < 100_000, len(quicklook)  # was ~1 MB of PNG data URI per run
    assert str(out.resolve() / "zhengzhou-demo_20210722_composite_quicklook.png") in quicklook
    summary = by_key[f"reconstruct-{key}"].data
    assert "STAC Item core schema: valid" in summary and "{'" not in summary, summary  # no raw dict
    # the deployment's own parameters score the COG, so an unchanged default run publishes a metrics table
    assert deployment.parameters["params"]["score_truth"] is True


@pytest.mark.integration
def test_stop_without_start_is_harmless(tmp_path, monkeypatch):
    from flows import serve

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    serve.stop()
    assert serve.read_state() is None
