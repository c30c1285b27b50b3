"""Helpers for the model, loss and metric tests (no tests here): synthetic learnable batches, a random VGG16 file."""

from __future__ import annotations

import math

import pytest
import torch

from models.spec import InputSpec


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CI box is shared: intra-op threads fighting other processes cost up to 100x on these tiny tensors."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_batch(spec: InputSpec, batch: int = 2, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch per models/spec.py: clear target, cloudy optical inputs with their mask, S1 derived from the scene."""
    g = torch.Generator().manual_seed(seed)
    c_out, t = len(spec.out_bands), spec.optical_dates
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.rand(batch, 1, 1, 1, generator=g) * 2 * math.pi
    offset = 0.15 + 0.6 * torch.rand(1, c_out, 1, 1, generator=g)
    pattern = torch.sin(2 * math.pi * (2 * xs + ys) + phase) * torch.cos(2 * math.pi * ys * 1.5)
    target = (offset + 0.15 * pattern).clamp(0, 1)
    r = ((xs - 0.5) ** 2 + (ys - 0.4) ** 2).sqrt()
    mask = torch.zeros(batch, t, 1, size, size)
    optical = target.unsqueeze(1).repeat(1, t, 1, 1, 1) + 0.01 * torch.randn(batch, t, c_out, size, size, generator=g)
    for d in range(t):
        cloud = (r < 0.2 + 0.08 * d).float()
        mask[:, d, 0] = cloud
        optical[:, d] = optical[:, d] * (1 - cloud) + 0.9 * cloud
    out = {
        "optical": optical.clamp(0, 1)[:, :, : len(spec.optical_bands)],
        "optical_mask": mask,
        "target": target,
        "target_valid": torch.ones(batch, 1, size, size),
    }
    if spec.needs_composite:
        # the observed ground, and a fill a little off the truth under the last date's cloud (as a harmonized
        # earlier date is)
        hidden = mask[:, -1]
        out["composite"] = torch.where(hidden > 0, (target * 0.9 + 0.02).clamp(0, 1), target)
        out["composite_info"] = torch.cat([hidden, torch.zeros_like(hidden), 0.1 * hidden], 1)
    if spec.sar_bands:
        s = len(spec.sar_bands)
        sar = 0.5 + 0.3 * pattern.unsqueeze(1) + 0.05 * torch.randn(batch, t + 1, s, size, size, generator=g)
        out["sar"] = sar.clamp(0, 1)
    return out


ALL_MODELS = ["cafusion", "cmsn", "composite", "crgennet", "refine", "srggan", "uncrtaints", "unet"]
TRAINABLE = [n for n in ALL_MODELS if n != "composite"]


def write_random_vgg(path) -> str:
    """A VGG16 ``features.*`` state dict with random weights, in torchvision's key format (tests never download)."""
    from models.vgg import VGG16Features

    torch.manual_seed(1234)
    net = VGG16Features()
    torch.save({f"features.{k}": v for k, v in net.features.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module", name="vgg_file")
def vgg_file_fixture(tmp_path_factory) -> str:
    """A random VGG16 file per test module (import this and request ``vgg_file``)."""
    return write_random_vgg(tmp_path_factory.mktemp("vgg") / "vgg16_random.pth")


# learning rates per model for the 20-step overfit (cafusion has no normalisation in its dense trunk and,
# like GLF-CR, needs a smaller step)
OVERFIT_LR = {"crgennet": 3e-3, "srggan": 1e-2, "cmsn": 3e-3, "uncrtaints": 1e-2, "unet": 1e-2, "cafusion": 1e-3,
              "refine": 3e-3}
