"""Plain SAR + optical U-Net baseline: the cloudy target date (and ``optical_dates - 1`` earlier dates), their
cloud masks and the S1 of the target date -> clear optical. ``optical_dates: 1`` is the mono-temporal
DSen2-CR setting; the default 2 also sees the previous overpass, as the composite baseline and CRGenNet do.

With ``residual`` (the default) it follows DSen2-CR's long skip: the prediction is the cloudy input plus a
learned correction whose last layer starts near zero, so the untrained net returns (about) its input and training
is spent on the cloud-covered pixels rather than on relearning the clear ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CloudRemovalModel, clamp_unit, spec_from_config
from .errors import ModelConfigError
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
        self.down = nn.ModuleList(
            [conv_block(cin, chans[0])] + [conv_block(chans[i], chans[i + 1]) for i in range(depth)]
        )
        self.up = nn.ModuleList(
            [nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))]
        )
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
    skip_index: torch.Tensor  # a buffer (residual only): typed here, or mypy sees Tensor | Module

    def __init__(self, **cfg: Any) -> None:
        super().__init__(self.build_spec(cfg))
        cin = (
            self.n_optical * self.spec.optical_dates + self.n_sar + (self.spec.optical_dates if cfg["use_mask"] else 0)
        )
        self.use_mask = cfg["use_mask"]
        self.net = UNetCore(cin, self.n_out, cfg["base_channels"], cfg["depth"])
        self.residual = bool(cfg.get("residual", True))
        if self.residual:
            missing = [b for b in self.spec.out_bands if b not in self.spec.optical_bands]
            if missing:
                raise ModelConfigError(
                    f"unet: residual=True adds the input to the output, but output bands {missing} are not "
                    "among the optical input bands; add them to optical_bands or set residual: false"
                )
            self.register_buffer(
                "skip_index",
                torch.tensor([self.spec.optical_bands.index(b) for b in self.spec.out_bands]),
                persistent=False,
            )
            # near zero, not zero: a zero last layer would also zero every other layer's first gradient
            nn.init.normal_(self.net.head.weight, std=1e-3)
            assert self.net.head.bias is not None  # a Conv2d with the default bias=True
            nn.init.zeros_(self.net.head.bias)

    @staticmethod
    def build_spec(cfg: dict[str, Any]):
        return spec_from_config(cfg, includes_target_date=True, needs_mask=bool(cfg["use_mask"]))

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        opt, mask, sar = self.inputs(batch)
        parts = [opt.flatten(1, 2)]
        if self.use_mask:
            assert mask is not None  # needs_mask=use_mask: inputs() raised otherwise
            parts.append(mask.flatten(1, 2))
        if sar is not None:
            parts.append(sar[:, -1])
        y = self.net(torch.cat(parts, 1))
        if self.residual:
            return ModelOutput(mean=clamp_unit(opt[:, -1].index_select(1, self.skip_index) + y))
        return ModelOutput(mean=torch.sigmoid(y))


SMALL = {"optical_dates": 2, "base_channels": 8, "depth": 2, "use_mask": True, "residual": True}
PAPER = {"optical_dates": 2, "base_channels": 64, "depth": 4, "use_mask": True, "residual": True}
LOSS = {"l1": 1.0}
