"""``cloudfree train``, ``cloudfree evaluate`` and ``cloudfree export-model``.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N $(which cloudfree) train ...`` (each rank reads the
torchrun environment; ``--batch-size`` is the global batch).
"""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Any, Optional

import typer

from pipeline.cli.app import app, console
from pipeline.train.config import TrainConfig, train_default


class ExportFormat(str, enum.Enum):
    torchscript = "torchscript"
    onnx = "onnx"


def _override(name: str, flag: str, help: str | None = None) -> Any:
    """An option that sets ``TrainConfig.<name>``: help and the shown default come from the field.

    Its own default stays None, meaning "not given": only a given flag overrides the ``--config`` file.
    """
    field = TrainConfig.model_fields[name]
    default = train_default(name)
    return typer.Option(None, flag, help=help or field.description,
                        show_default=False if default is None else str(default))


@app.command("train")
def train_cmd(
    data: Path = typer.Option(..., "--data", help="dataset folder written by `cloudfree build-dataset` (holds cubes/)"),
    model: str = typer.Option(..., "--model", help="registry name: unet, crgennet, srggan, cmsn, uncrtaints, cafusion"),
    out: Path = typer.Option(..., "--out", help="run folder: model.pt, model.json, train_state.pt, tb/"),
    config: str = typer.Option(train_default("model_params"), "--config",
                               help="small | paper | a YAML/JSON file of training settings"),
    epochs: Optional[int] = _override("epochs", "--epochs"),
    batch_size: Optional[int] = _override("batch_size", "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate; default: the model's published one"),
    seed: Optional[int] = _override("seed", "--seed"),
    precision: Optional[str] = _override("precision", "--precision"),
    grad_clip: Optional[float] = _override("grad_clip", "--grad-clip", help="max global gradient norm"),
    patience: Optional[int] = _override("patience", "--patience", help="early stopping: epochs without improvement"),
    monitor: Optional[str] = _override("monitor", "--monitor"),
    workers: Optional[int] = _override("num_workers", "--workers"),
    max_steps: Optional[int] = _override("max_steps_per_epoch", "--max-steps-per-epoch"),
    time_limit: Optional[float] = _override("time_limit_s", "--time-limit"),
    vgg_weights: Optional[str] = _override("vgg_weights", "--vgg-weights"),
    init_from: Optional[str] = _override("init_from", "--init-from",
                                         help="fine-tune: a finished run folder whose weights start this run"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out exactly where it stopped"),
) -> None:
    """Train a model on a dataset's cubes; best checkpoint by a validation metric, TensorBoard logs in OUT/tb."""
    import os

    from pydantic import ValidationError

    from pipeline.train.config import OptimConfig, TrainConfigError, load_train_config
    from pipeline.train.loop import train

    logging.getLogger("pipeline").setLevel(logging.INFO)
    cfg = load_train_config(config, model, epochs=epochs, batch_size=batch_size, seed=seed, precision=precision,
                            grad_clip=grad_clip, patience=patience, monitor=monitor, num_workers=workers,
                            max_steps_per_epoch=max_steps, time_limit_s=time_limit, vgg_weights=vgg_weights,
                            init_from=init_from)
    if lr is not None:
        # --lr changes one field of the file's (or the model's published) optimiser, keeping the others
        try:
            optimizer = OptimConfig.model_validate({**cfg.resolved_optimizer().model_dump(), "lr": lr})
        except ValidationError as exc:
            raise TrainConfigError(f"--lr {lr}: {exc.errors()[0]['msg']}") from None
        cfg = cfg.model_copy(update={"optimizer": optimizer})
    result = train(cfg, data, out, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        best = "-" if result.best_value is None else f"{result.best_value:.4f}"
        total = f", {result.total_seconds:.0f} s in all sessions" if resume else ""
        console.print(f"trained {model} for {result.epochs_run} epoch(s) in {result.seconds:.0f} s{total} "
                      f"({result.samples_per_s:.1f} samples/s); best {result.monitor} {best} "
                      f"at epoch {result.best_epoch}{' (early stop)' if result.stopped_early else ''}; "
                      f"checkpoint {out / 'model.pt'}", highlight=False)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint",
                                    help="run folder of `cloudfree train` (model.pt + model.json)"),
    data: Path = typer.Option(..., "--data", help="dataset folder with cubes/"),
    split: str = typer.Option("test", "--split", help="train | val | test"),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help="where metrics.json and metrics.md go (default RUN/eval-SPLIT)"),
    batch_size: int = typer.Option(8, "--batch-size", help="samples per forward pass (at least 1)"),
) -> None:
    """Metrics on all and cloud-covered pixels, per band group, next to the composite baseline."""
    from pipeline.train.config import TrainConfigError
    from pipeline.train.evaluate import evaluate, markdown_table

    if batch_size < 1:
        raise TrainConfigError(f"--batch-size {batch_size}: must be at least 1 (e.g. 8; lower it if memory runs out)")
    result = evaluate(checkpoint, data, split, out, batch_size=batch_size)
    console.print(markdown_table(result), markup=False, highlight=False)
    console.print(f"written: {(out or checkpoint / f'eval-{split}') / 'metrics.json'}", highlight=False)


@app.command("export-model")
def export_model_cmd(
    run: Path = typer.Argument(..., help="run folder of `cloudfree train`"),
    fmt: ExportFormat = typer.Option(ExportFormat.torchscript, "--format", help="torchscript | onnx"),
    size: int = typer.Option(64, "--size", help="patch side of the example input used for tracing and the check"),
) -> None:
    """Export a trained model to TorchScript or ONNX, verified against the eager model."""
    from pipeline.train.export import export_model

    path = export_model(run, fmt.value, size=size)
    console.print(f"written: {path}", highlight=False)
