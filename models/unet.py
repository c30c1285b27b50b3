"""Plain SAR + optical U-Net baseline (mono-temporal): cloudy optical + its cloud mask + S1 -> clear optical."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CloudRemovalModel, spec_from_config
from .spec import ModelOutput


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNetCore(nn.Module):
    """Encoder-decoder with skips; pads inputs to a multiple of 2**depth and crops back."""

    def __init__(self, cin: int, cout: int, base: int, depth: int, extra_skip: list[int] | None = None) -> None:
        super().__init__()
        chans = [base * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList([conv_block(cin, chans[0])] + [conv_block(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))])
        self.dec = nn.ModuleList([conv_block(chans[i] * 2, chans[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], cout, 1)
        self.chans = chans

    def forward(self, x: torch.Tensor, injections: list[torch.Tensor] | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x if i == 0 else F.max_pool2d(x, 2))
            if injections is not None:
                x = x + injections[i]
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], 1))
        return self.head(x)[..., :h, :w]


class UNet(CloudRemovalModel):
    name = "unet"

    def __init__(self, **cfg: Any) -> None:
        super().__init__(self.build_spec(cfg))
        cin = self.n_optical * self.spec.optical_dates + self.n_sar + (self.spec.optical_dates if cfg["use_mask"] else 0)
        self.use_mask = cfg["use_mask"]
        self.net = UNetCore(cin, self.n_out, cfg["base_channels"], cfg["depth"])

    @staticmethod
    def build_spec(cfg: dict[str, Any]):
        return spec_from_config(cfg, includes_target_date=True, needs_mask=bool(cfg["use_mask"]))

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        opt, mask, sar = self.inputs(batch)
        parts = [opt.flatten(1, 2)]
        if self.use_mask:
            parts.append(mask.flatten(1, 2))
        if sar is not None:
            parts.append(sar[:, -1])
        return ModelOutput(mean=torch.sigmoid(self.net(torch.cat(parts, 1))))


SMALL = {"optical_dates": 1, "base_channels": 8, "depth": 2, "use_mask": True}
PAPER = {"optical_dates": 1, "base_channels": 64, "depth": 4, "use_mask": True}
LOSS = {"l1": 1.0}
