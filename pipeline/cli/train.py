"""``cloudfree train``, ``cloudfree evaluate`` and ``cloudfree export-model``.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N $(which cloudfree) train ...`` (each rank reads the
torchrun environment; ``--batch-size`` is the global batch).
"""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.app import app, console


class ExportFormat(str, enum.Enum):
    torchscript = "torchscript"
    onnx = "onnx"


@app.command("train")
def train_cmd(
    data: Path = typer.Option(..., "--data", help="dataset folder written by `cloudfree build-dataset` (holds cubes/)"),
    model: str = typer.Option(..., "--model", help="registry name: unet, crgennet, srggan, cmsn, uncrtaints, cafusion"),
    out: Path = typer.Option(..., "--out", help="run folder: model.pt, model.json, train_state.pt, tb/"),
    config: str = typer.Option("small", "--config", help="small | paper | a YAML/JSON file of training settings"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="total epochs (a resumed run continues up to this)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="global batch; default: the model's published one"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate; default: the model's published one"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="max gradient norm"),
    patience: Optional[int] = typer.Option(None, "--patience", help="early stopping patience (epochs)"),
    monitor: Optional[str] = typer.Option(None, "--monitor", help="validation metric for the best checkpoint, e.g. cloud_psnr"),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers per rank"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps-per-epoch", help="cap on steps per epoch"),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="seconds; stop after the epoch that passes it"),
    vgg_weights: Optional[str] = typer.Option(None, "--vgg-weights", help="torchvision vgg16 state dict for perceptual losses"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out exactly where it stopped"),
) -> None:
    """Train a model on a dataset's cubes; best checkpoint by a validation metric, TensorBoard logs in OUT/tb."""
    from pipeline.train.config import OptimConfig, load_train_config
    from pipeline.train.loop import train

    logging.getLogger("pipeline").setLevel(logging.INFO)
    cfg = load_train_config(config, model, epochs=epochs, batch_size=batch_size, seed=seed, precision=precision,
                            grad_clip=grad_clip, patience=patience, monitor=monitor, num_workers=workers,
                            max_steps_per_epoch=max_steps, time_limit_s=time_limit, vgg_weights=vgg_weights)
    if lr is not None:
        cfg = cfg.model_copy(update={"optimizer": (cfg.optimizer or cfg.defaults().optimizer).model_copy(update={"lr": lr})})
        OptimConfig.model_validate(cfg.optimizer.model_dump())
    result = train(cfg, data, out, resume=resume)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        best = "-" if result.best_value is None else f"{result.best_value:.4f}"
        console.print(f"trained {model} for {result.epochs_run} epoch(s) in {result.seconds:.0f} s "
                      f"({result.samples_per_s:.1f} samples/s); best {result.monitor} {best} at epoch {result.best_epoch}"
                      f"{' (early stop)' if result.stopped_early else ''}; checkpoint {out / 'model.pt'}", highlight=False)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="run folder of `cloudfree train` (model.pt + model.json)"),
    data: Path = typer.Option(..., "--data", help="dataset folder with cubes/"),
    split: str = typer.Option("test", "--split", help="train | val | test"),
    out: Optional[Path] = typer.Option(None, "--out", help="where metrics.json and metrics.md go (default RUN/eval-SPLIT)"),
    batch_size: int = typer.Option(8, "--batch-size"),
) -> None:
    """Metrics on all and cloud-covered pixels, per band group, next to the composite baseline."""
    from pipeline.train.evaluate import evaluate, markdown_table

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
