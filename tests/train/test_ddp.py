"""DDP on CPU: 2 gloo processes reach the same weights as 1 process with the same global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.train.checkpoint import STATE_FILE
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train
from tests.train.test_samples import toy_raw_samples

# A GAN on purpose: the generator goes through DistributedDataParallel, the discriminator's gradients are
# averaged by hand. No dropout and no batch norm, so 2 x batch 2 and 1 x batch 4 are the same computation.
# SGD rather than Adam: conv biases in front of InstanceNorm get gradients that are pure rounding noise
# (~1e-9), which Adam would normalise into full-size steps of random sign.
PARAMS = {"base": "small", "optical_bands": ["B4", "B3", "B2"], "dropout": 0.0, "loss": {"perceptual": 0.0}}


def _cfg() -> TrainConfig:
    return TrainConfig(model="crgennet", model_params=PARAMS, epochs=1, batch_size=4, num_workers=0, seed=0,
                       max_steps_per_epoch=2, grad_clip=None,
                       optimizer={"name": "sgd", "lr": 0.05, "betas": (0.9, 0.999)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    train(_cfg(), None, out, train_data=toy_raw_samples(8, size=32, seed=1),
          val_data=toy_raw_samples(2, size=32, seed=2), progress=False)


@pytest.mark.integration
def test_two_gloo_ranks_match_one_process(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_cfg(), None, single, train_data=toy_raw_samples(8, size=32, seed=1),
              val_data=toy_raw_samples(2, size=32, seed=2), progress=False)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), str(ddp)), nprocs=2, join=True)
    a = torch.load(single / STATE_FILE, weights_only=True)
    b = torch.load(ddp / STATE_FILE, weights_only=True)
    assert a["loop"]["step"] == b["loop"]["step"] == 2
    moved = 0.0
    for part in ("model", "disc"):
        for k, v in a[part].items():
            torch.testing.assert_close(v, b[part][k], rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")
    # the comparison means something only if training moved the weights
    fresh = torch.load(single / STATE_FILE, weights_only=True)["optimizer"]["state"]
    moved = max(float(s["momentum_buffer"].abs().max()) for s in fresh.values())
    assert moved > 0
