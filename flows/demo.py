"""The end-to-end demo: build-dataset -> train-model -> reconstruct-aoi on zhengzhou-demo (synthetic archive).

Runs the three flows in this process. Without ``PREFECT_API_URL`` Prefect starts a temporary local server
(SQLite) for the duration, so a fresh machine needs nothing running. Each flow caches its tasks, so a second
``make demo`` only re-checks outputs. Every output says it is a simulation.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REGION = "zhengzhou-demo"
DATE = dt.date(2021, 7, 22)  # two days after the 2021-07-20 flood, a Sentinel-2 overpass


@dataclass
class DemoConfig:
    region: str = REGION
    date: dt.date = DATE
    data_root: Path = Path("data")  # the dataset goes to data_root/<region>
    run: Path = Path("runs") / f"{REGION}-unet"
    out: Path = Path("out") / "demo"
    model: str = "unet"
    epochs: int = 12  # ~25 s each for the small U-Net on 2 cores; train_seconds usually ends it first
    max_steps_per_epoch: int | None = None
    train_seconds: float | None = 240.0  # keeps `make demo` within ~10 min on 2 cores; the best epoch so far is kept
    mask_method: str = "cloudscore"


@dataclass
class DemoResult:
    dataset: dict[str, Any]
    training: dict[str, Any]
    reconstruction: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(cfg: DemoConfig, step: Callable[[str], None] = lambda s: None) -> DemoResult:
    """Run the three flows; ``step`` is told when each starts (the CLI prints it)."""
    from flows.build_dataset import build_dataset
    from flows.params import BuildDatasetParams, ReconstructParams, TrainParams
    from flows.reconstruct_aoi import reconstruct_aoi
    from flows.train_model import train_model

    seconds: dict[str, float] = {}
    data = cfg.data_root / cfg.region

    t = time.perf_counter()
    step(f"1/3 build-dataset: {cfg.region} from the synthetic archive -> {data}")
    (dataset,) = build_dataset(BuildDatasetParams(region=cfg.region, source="synthetic", out_root=str(cfg.data_root)))
    seconds["build-dataset"] = time.perf_counter() - t

    t = time.perf_counter()
    step(f"2/3 train-model: {cfg.model}, {cfg.epochs} epoch(s) -> {cfg.run}")
    resume = (cfg.run / "train_state.pt").exists()  # a rerun continues (or finds it finished) instead of refusing
    training = train_model(
        TrainParams(
            data=str(data),
            model=cfg.model,
            config="small",
            epochs=cfg.epochs,
            max_steps_per_epoch=cfg.max_steps_per_epoch,
            time_limit_s=cfg.train_seconds,
            out=str(cfg.run),
            resume=resume,
            evaluate_split="test",
        )
    )
    seconds["train-model"] = time.perf_counter() - t

    t = time.perf_counter()
    step(f"3/3 reconstruct-aoi: {cfg.region} on {cfg.date} with {cfg.run} -> {cfg.out}")
    rec = reconstruct_aoi(
        ReconstructParams(
            region=cfg.region,
            date=cfg.date,
            checkpoint=str(cfg.run),
            source="synthetic",
            out=str(cfg.out),
            mask_method=cfg.mask_method,
            # an analyst expects the pixels the date saw clearly back as observed (provenance 0), not re-predicted
            keep_clear=True,
        )
    )
    seconds["reconstruct-aoi"] = time.perf_counter() - t
    return DemoResult(dataset, training, rec, seconds)
