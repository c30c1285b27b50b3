"""What every cloudfree flow shares: retry rule, cache policy, task runner choice, Earth Engine tagging.

- Retries: only transient failures (HTTP 429/5xx, timeouts, dropped connections, or an Earth Engine request
  whose own backoff ran out on such errors). A ``CloudfreeError`` is deterministic - bad input, no scenes,
  a rejected band - and retrying it only delays the message, so it fails at once.
- Caching: ``INPUTS + TASK_SOURCE`` with persisted results (default result storage under
  ``$PREFECT_HOME/storage``), so an identical rerun skips finished tasks; a task whose cached result
  points at files that are gone is rerun with ``refresh_cache`` (see ``run_cached``).
- Concurrency: tasks that talk to Earth Engine carry the ``earthengine`` tag; ``make serve`` creates a
  tag concurrency limit for it (production servers: ``prefect concurrency-limit create earthengine N``).
- Secrets: importing this module (every flow does) installs ``pipeline.redact`` on the root and Prefect log
  handlers, so a library message holding a key or token is scrubbed before it reaches the Prefect database.
- Task runner: threads by default; ``CLOUDFREE_DASK=local`` for a local dask cluster, or
  ``CLOUDFREE_DASK=tcp://host:8786`` for an existing ``dask.distributed`` scheduler (read at import, so a
  deployment sets it in its job variables ``env``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline import redact
from pipeline.errors import CloudfreeError

EE_TAG = "earthengine"

# At import, not in a flow body: Prefect has configured its loggers by now (``import prefect`` does), and a flow
# can log before its first line runs (parameter validation, the engine's own exception report).
redact.install()


def _software_version(context: Any, parameters: dict[str, Any]) -> str:
    from pipeline import __version__

    return __version__


# A task's source does not cover the pipeline code it calls: the package version joins the key.
CACHE_POLICY = INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_software_version)
RETRY_DELAYS = [10, 60, 300]


def is_transient_error(exc: BaseException | None) -> bool:
    """Worth retrying later: network/quota/server trouble, never a deterministic ``CloudfreeError``."""
    if exc is None:
        return False
    from pipeline.sources.earthengine.auth import EarthEngineUnreachable
    from pipeline.sources.earthengine.pixels import EarthEngineRequestError, is_transient

    if isinstance(exc, EarthEngineUnreachable):  # a CloudfreeError for its one-line message, but the network's fault
        return True
    if isinstance(exc, EarthEngineRequestError):
        # the source already backed off; retrying the task later helps only if the cause was transient
        cause = exc.__cause__
        return cause is not None and not isinstance(cause, CloudfreeError) and is_transient(cause)
    if isinstance(exc, CloudfreeError):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    try:
        import ee

        if isinstance(exc, ee.EEException):
            return is_transient(exc)
    except ImportError:  # earthengine-api is a dependency; an install without it still classifies the rest
        pass
    if isinstance(exc, OSError) and not isinstance(
        exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    ):
        return is_transient(exc)
    status = getattr(getattr(exc, "resp", None), "status", None) or getattr(exc, "status_code", None)
    if status is not None:
        return is_transient(exc)
    return False


def retry_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """``retry_condition_fn`` for tasks that call a source: retry transient errors only."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # the state's stored exception, whatever its type
            exc = e
    return is_transient_error(exc)


SOURCE_TASK = dict(
    retries=3, retry_delay_seconds=RETRY_DELAYS, retry_jitter_factor=0.2, retry_condition_fn=retry_transient
)
CACHED = dict(cache_policy=CACHE_POLICY, persist_result=True)


def source_tags(source: str) -> set[str]:
    return {f"source:{source}"} | ({EE_TAG} if source == "earthengine" else set())


def task_runner() -> Any:
    """The flows' task runner, chosen by ``CLOUDFREE_DASK`` (see the module docstring)."""
    spec = os.environ.get("CLOUDFREE_DASK", "").strip()
    if not spec:
        return ThreadPoolTaskRunner(max_workers=max(2, min(4, os.cpu_count() or 1)))
    from prefect_dask import DaskTaskRunner

    if spec == "local":
        # threads in one process: the tasks release the GIL in numpy/GDAL/torch, and nothing is pickled
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": 1, "threads_per_worker": max(2, os.cpu_count() or 1), "processes": False}
        )
    return DaskTaskRunner(address=spec)


def files_exist(paths: Iterable[str | Path | None]) -> bool:
    return all(p is None or Path(p).exists() for p in paths)


def run_cached(task: Any, outputs: Callable[[Any], Iterable[str | Path | None]], *args: Any, **kwargs: Any) -> Any:
    """Call ``task``; if its (cached) result names files that no longer exist, run it again uncached.

    The cache key is the inputs, so a deleted output folder would otherwise be "done" forever.
    """
    result = task(*args, **kwargs)
    if files_exist(outputs(result)):
        return result
    return task.with_options(refresh_cache=True)(*args, **kwargs)
