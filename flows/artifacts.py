"""What an operator sees of a flow run in the Prefect UI: artifacts (summaries, metric tables, the quicklook, block
progress) and the ``pipeline`` library's log lines in the run's log."""

from __future__ import annotations

import base64
import io
import logging
import math
import re
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence, cast
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.logging.handlers import APILogHandler

THUMB_SIDE = 360  # px, height of the two-panel thumbnail
THUMB_QUALITY = 80  # JPEG
# The embedded thumbnail travels with the artifact through the API and the UI on every view: at most this many
# characters of data URI (the full-size PNG stays on disk, its path printed below the thumbnail).
THUMB_MAX_CHARS = 90_000
LIBRARY_LOGGER = "pipeline"


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler for the library's loggers: records made inside a flow or task run go to that
    run's log; records from a thread that no run owns (a reader pool, a dask worker) stay on the console only,
    instead of Prefect's "attempted to send logs without a flow run id" warning."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "flow_run_id", None) is None:
            from prefect.context import FlowRunContext, TaskRunContext

            if FlowRunContext.get() is None and TaskRunContext.get() is None:
                return
        super().emit(record)


_LOG_LOCK = threading.Lock()


def library_logs_to_runs(level: int = logging.INFO) -> None:
    """Send ``pipeline.*`` log records (what reconstruct, the dataset build and training report) to the Prefect run
    they are made in. Idempotent; every flow calls it first.

    The ``pipeline`` logger is raised to ``level`` only when nobody set its level (the ``cloudfree`` CLI does), so
    its lines reach the run's log although the root logger stays at WARNING. Consoles are quieted by their handlers'
    levels, never here. ``PREFECT_LOGGING_EXTRA_LOGGERS=pipeline`` already attaches Prefect's own handler; then
    only the level is set.
    """
    from pipeline import redact

    logger = logging.getLogger(LIBRARY_LOGGER)
    with _LOG_LOCK:
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            handler = _RunLogHandler()
            handler.addFilter(redact.RedactingFilter())  # secrets never reach the Prefect database
            logger.addHandler(handler)


def _key(key: str) -> str:
    # artifact keys: lower-case letters, digits and dashes only
    return re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=_key(key), description=description)


def publish_table(key: str, rows: Sequence[Mapping[str, Any]], description: str) -> None:
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    create_table_artifact(table=clean, key=_key(key), description=description)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def build_summary_markdown(summary: Mapping[str, Any], stats: Sequence[Mapping[str, Any]]) -> str:
    """The dataset report (scenes, splits, rejected patches by reason, cloud histogram) + per-scene masks."""
    lines = [str(summary["markdown"]).rstrip(), "", f"Dataset folder: `{summary['out']}`", "",
             "## Scenes masked (whole region grid)", "",
             "| scene | sensor | date | cloud | shadow | valid | mask method |", "|---|---|---|---:|---:|---:|---|"]
    lines += [f"| {s['scene_id']} | {s['sensor']} | {s['date']} | {_pct(s['cloud_fraction'])} "
              f"| {_pct(s['shadow_fraction'])} | {_pct(s['valid_fraction'])} | {s['mask_method']} |" for s in stats]
    return "\n".join(lines) + "\n"


def metrics_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``pipeline.train.evaluate.evaluate`` output -> one row per method, all pixels and cloud-covered pixels."""
    from pipeline.train.evaluate import METRICS, baseline_label

    rows = []
    for who in ("model", "composite"):
        s = result["results"][who]["all"]
        method = result["model"] if who == "model" else baseline_label(result)
        row: dict[str, Any] = {"method": method, "split": result["split"], "samples": result["n_samples"]}
        row.update({f"{k}_all": round(float(s.get(k, math.nan)), 4) for k in METRICS})
        # evaluate's scores over cloud-covered pixels are named cloud_<metric>
        row.update({f"{k}_cloud": round(float(s.get(f"cloud_{k}", math.nan)), 4) for k in METRICS})
        if "cloud_water_f1" in s:  # the water-under-cloud F1 (flood-aware score), where the bands allow an index
            row["water_f1_cloud"] = round(float(s["cloud_water_f1"]), 4)
        rows.append(row)
    return rows


def thumbnail_data_uri(png: str | Path, side: int = THUMB_SIDE, max_chars: int = THUMB_MAX_CHARS) -> str:
    """A JPEG thumbnail of the quicklook (two panels side by side) as a data URI of at most ``max_chars`` characters:
    the side shrinks until it fits (noisy imagery compresses worse)."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    while True:
        thumb = rgb.copy()
        thumb.thumbnail((side * 2, side))
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True, progressive=True)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        if len(uri) <= max_chars or side <= 64:
            return uri
        side = int(side * 0.8)


def publish_quicklook(key: str, png: str | Path, title: str) -> int:
    """The quicklook as a markdown artifact: a small embedded thumbnail (the UI cannot read local files) and the
    path of the full-size PNG. Returns the size of the markdown in characters."""
    full = Path(png).resolve()
    md = (f"# {title}\n\n![quicklook]({thumbnail_data_uri(png)})\n\n"
          f"Thumbnail; full size ({full.stat().st_size / 1e6:.1f} MB PNG): `{full}`\n")
    publish_markdown(key, md, title)
    return len(md)


class BlockProgress:
    """A Prefect progress artifact of a block-wise job, plus one INFO line per update ("block i of n written").

    ``update`` may be called from any thread (it needs no run context: the artifact is addressed by id and the
    logger carries its run's ids); a failed update is logged once and never fails the job it reports on.
    """

    def __init__(self, key: str, total: int, what: str, logger: Any) -> None:
        self.total = max(1, total)
        self.what = what
        self.logger = logger
        self.done = -1
        self._failed = False
        self._lock = threading.Lock()
        self.artifact_id: UUID | None = None
        try:
            # called from sync code, so Prefect's async_dispatch returns the id itself, not a coroutine
            self.artifact_id = cast(UUID, create_progress_artifact(
                0.0, key=_key(key), description=f"{what}: 0 of {self.total} blocks written"))
        except Exception as exc:  # as below: no progress artifact, the job itself goes on
            logger.warning("no progress artifact (%s: %s); the log still says each block", type(exc).__name__, exc)

    def update(self, done: int, elapsed_s: float | None = None, resumed: int = 0) -> None:
        """``done`` blocks written of ``total``; ``resumed`` of them were written by an earlier, interrupted run
        (they do not count towards the time per block)."""
        with self._lock:
            if done == self.done:
                return
            self.done = done
            pct = 100.0 * min(done, self.total) / self.total
            eta = ""
            if elapsed_s is not None and resumed < done < self.total:
                per_block = elapsed_s / (done - resumed)
                eta = f", {elapsed_s:.0f} s elapsed, about {per_block * (self.total - done):.0f} s left"
            self.logger.info("%s: block %d of %d written (%.0f %%%s)", self.what, done, self.total, pct, eta)
            if self.artifact_id is None or self._failed:
                return
            try:
                update_progress_artifact(self.artifact_id, pct,
                                         description=f"{self.what}: {done} of {self.total} blocks written")
            except Exception as exc:  # the API is unreachable or refuses: the job itself goes on
                self._failed = True
                self.logger.warning("progress artifact not updated any more (%s: %s)", type(exc).__name__, exc)
