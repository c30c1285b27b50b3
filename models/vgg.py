"""VGG16 feature extractor for perceptual / style losses; weights come from a file the user names.

The file is torchvision's ``vgg16`` state dict (e.g. ``vgg16-397923af.pth``): only ``features.*`` up to
conv4_3 are read, the classifier is ignored. Nothing is downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from .errors import ModelConfigError

# torchvision vgg16 "D" config up to relu4_3 (module index 22).
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class VGG16Features(nn.Module):
    # buffers (register_buffer): typed here, or mypy sees nn.Module.__getattr__'s Tensor | Module
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, layers: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        cin = 3
        for v in _CFG:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                cin = int(v)
        self.features = nn.Sequential(*mods)
        self.taps = sorted(LAYERS[name] for name in layers)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG16Features":
        return super().train(False)  # frozen feature extractor: always eval

    def forward(self, rgb01: torch.Tensor) -> list[torch.Tensor]:
        x = (rgb01 - self.mean) / self.std
        out = []
        for i, m in enumerate(self.features):
            x = m(x)
            if i in self.taps:
                out.append(x)
                if i == self.taps[-1]:
                    break
        return out


def load_vgg16(path: str | Path) -> VGG16Features:
    """VGG16 features with ImageNet weights from ``path`` (torchvision vgg16 state dict)."""
    p = Path(path)
    if not p.is_file():
        raise ModelConfigError(
            f"VGG16 weights file {str(p)!r} does not exist; pass the path of torchvision's vgg16 state dict "
            "(vgg16-397923af.pth) or set the perceptual/style loss weights to 0"
        )
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ModelConfigError(f"VGG16 weights file {str(p)!r} is not a loadable state dict: {exc}") from exc
    if not isinstance(sd, dict):
        raise ModelConfigError(f"VGG16 weights file {str(p)!r} holds {type(sd).__name__}, not a state dict")
    net = VGG16Features()
    want = net.features.state_dict()
    missing = [f"features.{k}" for k in want if f"features.{k}" not in sd]
    if missing:
        raise ModelConfigError(
            f"VGG16 weights file {str(p)!r} lacks {missing[:4]}...; it must be torchvision's vgg16 state dict"
        )
    try:
        net.features.load_state_dict({k: sd[f"features.{k}"] for k in want})
    except RuntimeError as exc:
        raise ModelConfigError(f"VGG16 weights file {str(p)!r} has wrong tensor shapes: {exc}") from exc
    return net
