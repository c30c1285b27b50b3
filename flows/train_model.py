"""``train-model``: a dataset's cubes -> a checkpoint (``pipeline.train.loop.train``) -> metrics vs composite.

Training is one task (its own loop checkpoints every epoch and resumes exactly with ``resume``); the
evaluation task scores the best checkpoint and the training-free composite baseline on the same samples
and publishes the table as an artifact.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.artifacts import library_logs_to_runs, metrics_rows, publish_markdown, publish_table
from flows.common import CACHED, run_cached, task_runner
from flows.params import TrainParams


def _dataset_sha(data: str) -> str:
    # the cache key must change when the dataset is rebuilt under the same folder name
    from pipeline.train.runtime import dataset_fingerprint

    return str(dataset_fingerprint(Path(data)))


def _init_sha(init_from: str | None) -> str | None:
    # new weights under the same init_from folder must not hit the cache of a run started from the old ones
    if init_from is None:
        return None
    from pipeline.files import sha256_file

    path = Path(init_from) / "model.pt"
    return sha256_file(path) if path.is_file() else None  # train() names the missing file in one line


@task(name="train", **CACHED)
def train_task(data: str, model: str, config: str, epochs: int, batch_size: int | None, max_steps_per_epoch: int | None,
               time_limit_s: float | None, num_workers: int, seed: int, out: str, resume: bool,
               dataset_sha: str, init_from: str | None = None, init_sha: str | None = None) -> dict[str, Any]:
    from pipeline.train.config import load_train_config
    from pipeline.train.loop import train

    cfg = load_train_config(config, model, epochs=epochs, batch_size=batch_size, seed=seed, num_workers=num_workers,
                            max_steps_per_epoch=max_steps_per_epoch, time_limit_s=time_limit_s, init_from=init_from)
    r = train(cfg, Path(data), Path(out), resume=resume, progress=sys.stderr.isatty())
    get_run_logger().info("trained %s for %d epoch(s) in %.0f s; best %s %s at epoch %s", model, r.epochs_run,
                          r.seconds, r.monitor, "-" if r.best_value is None else f"{r.best_value:.4f}", r.best_epoch)
    return {"run_dir": str(r.run_dir), "epochs_run": r.epochs_run, "best_epoch": r.best_epoch,
            "best_value": r.best_value, "monitor": r.monitor, "history": r.history, "seconds": r.seconds,
            "samples_per_s": r.samples_per_s}


@task(name="evaluate", **CACHED)
def evaluate_task(run_dir: str, data: str, split: str, model_sha256: str) -> dict[str, Any]:
    from pipeline.train.evaluate import evaluate

    return evaluate(Path(run_dir), Path(data), split)


def _run_files(result: dict[str, Any]) -> list[Path]:
    run = Path(result["run_dir"])
    return [run / "model.pt", run / "model.json"]


@flow(name="train-model", task_runner=task_runner())
def train_model(params: TrainParams) -> dict[str, Any]:
    """Train a model on a dataset built by build-dataset; score it against the composite baseline."""
    from pipeline.files import sha256_file
    from pipeline.train.evaluate import baseline_label, markdown_table

    library_logs_to_runs()
    logger = get_run_logger()
    logger.info("training %s (%s, %d epochs) on %s into %s", params.model, params.config, params.epochs, params.data,
                params.out)
    result = run_cached(train_task, _run_files, params.data, params.model, params.config, params.epochs,
                        params.batch_size, params.max_steps_per_epoch, params.time_limit_s, params.num_workers,
                        params.seed, params.out, params.resume, _dataset_sha(params.data), params.init_from,
                        _init_sha(params.init_from))
    hist = result["history"]
    if hist:
        rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()} for h in hist]
        publish_table(f"training-{params.model}", rows,
                      f"Per-epoch training loss and validation metrics of {params.out}")
    if params.evaluate_split:
        logger.info("scoring %s and the composite baseline on the %s split", result["run_dir"], params.evaluate_split)
        model_sha = sha256_file(Path(result["run_dir"]) / "model.pt")
        ev = evaluate_task(result["run_dir"], params.data, params.evaluate_split, model_sha)
        title = f"{params.model} vs {baseline_label(ev)} on {params.evaluate_split}"
        publish_table(f"metrics-{params.model}", metrics_rows(ev), f"{title}: all and cloud-covered pixels")
        publish_markdown(f"evaluation-{params.model}", markdown_table(ev), title)
        result["evaluation"] = ev
        logger.info("\n%s", markdown_table(ev))
    return result
