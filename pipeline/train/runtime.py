"""What training and scoring share: the device / precision / rank runtime and the opening of dataset splits.

``pipeline.train.loop`` (training) and ``pipeline.train.evaluate`` (validation, ``cloudfree evaluate``) both
build on this module, so neither has to import the other for it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
import torch.distributed as dist

from pipeline.errors import DataError
from pipeline.train.config import TrainConfig, TrainConfigError

if TYPE_CHECKING:
    from pipeline.dataset.cubes import CubeDataset

__all__ = ["Runtime", "setup_runtime", "teardown_runtime", "open_split", "dataset_fingerprint"]


@dataclass
class Runtime:
    """Where and how tensors run: device, autocast precision, memory format and this process's DDP rank."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None  # autocast dtype, None = fp32
    channels_last: bool = False
    owns_group: bool = False

    @classmethod
    def local(cls) -> Runtime:
        """One process, fp32, on the GPU when there is one (scoring outside a training run)."""
        return cls(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in batch.items():
            v = v.to(self.device, non_blocking=True)
            if self.channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
            out[k] = v
        return out


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Device, precision and (under ``torchrun``) the process group: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    prec = cfg.precision
    if prec == "auto":
        prec = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if not cuda and prec == "fp16":
        raise TrainConfigError("precision fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    if cfg.deterministic:
        # cuBLAS needs this for deterministic matmuls; must be set before the first CUDA matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif cuda:
        torch.backends.cudnn.benchmark = True
    return Runtime(device, rank, world, local, amp, cfg.channels_last and cuda, owns)


def teardown_runtime(rt: Runtime) -> None:
    """Destroy the process group if ``setup_runtime`` created it (a caller's own group stays up)."""
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def open_split(data_dir: Path | None, split: str) -> CubeDataset:
    """A split's raw samples; a folder without cubes gets the command that builds them."""
    from pipeline.dataset.cubes import CubeDataset, cube_path

    if data_dir is None:
        raise DataError(
            f"no data folder given for split {split!r}; pass the folder written by `cloudfree build-dataset`")
    data_dir = Path(data_dir)
    build = f"cloudfree build-dataset REGION --out {data_dir}"
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist; build it with `{build}`")
    if not cube_path(data_dir, split).exists():
        cubes = data_dir / "cubes"
        have = sorted(p.stem for p in cubes.glob("*.zarr")) if cubes.is_dir() else []
        raise DataError(
            f"{data_dir} has no cube for split {split!r} (cubes found: {have or 'none'}); build the dataset with "
            f"`{build}` (it writes cubes/train.zarr, val.zarr, test.zarr)")
    ds = CubeDataset(data_dir, split)
    if len(ds) == 0:
        raise DataError(f"{data_dir}: split {split!r} has no samples; "
                        "rebuild the dataset with more patches or other split fractions")
    return ds


def dataset_fingerprint(data_dir: Path | None) -> str | None:
    """sha256 of the dataset manifest the model was trained on (provenance in model.json)."""
    if data_dir is None:
        return None
    path = Path(data_dir) / "manifest.parquet"
    if not path.is_file():
        return None
    from pipeline.files import sha256_file

    return sha256_file(path)
