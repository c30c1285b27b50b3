"""Cloud-attentive SAR-optical fusion (GLF-CR family, mono-temporal).

Separate S1 / S2 shallow CNN encoders -> pixel-unshuffle (space to channels, ×r) -> groups of residual
dense blocks followed by Swin blocks -> global feature fusion (concat of all groups, 1×1 then 3×3) ->
pixel-shuffle reconstruction -> residual add of the cloudy input, clamped to [0, 1] (straight-through).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CloudRemovalModel, clamp_unit, spec_from_config
from .layers import ResidualDenseBlock, SwinStage
from .spec import ModelOutput


class CAFusion(CloudRemovalModel):
    name = "cafusion"

    def __init__(self, **cfg: Any) -> None:
        super().__init__(self.build_spec(cfg))
        ch, r = cfg["channels"], cfg["shuffle"]
        self.r = r
        self.enc_opt = nn.Sequential(
            nn.Conv2d(self.n_optical + 1, ch, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(ch, ch, 3, padding=1)
        )
        self.enc_sar = nn.Sequential(
            nn.Conv2d(self.n_sar, ch, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(ch, ch, 3, padding=1)
        )
        feat = cfg["feat"]
        # GroupNorm on the trunk's input and output: without it the residual branch swings wildly under Adam
        self.shallow = nn.Sequential(nn.Conv2d(2 * ch * r * r, feat, 3, padding=1), nn.GroupNorm(4, feat))
        self.groups = nn.ModuleList(
            nn.Sequential(
                *[ResidualDenseBlock(feat, cfg["growth"], cfg["rdb_layers"]) for _ in range(cfg["rdb_per_group"])],
                SwinStage(feat, cfg["swin_depth"], cfg["heads"], cfg["window"]),
            )
            for _ in range(cfg["groups"])
        )
        self.gff = nn.Sequential(nn.Conv2d(feat * cfg["groups"], feat, 1), nn.Conv2d(feat, feat, 3, padding=1))
        self.trunk_norm = nn.GroupNorm(4, feat)
        self.recon = nn.Sequential(
            nn.Conv2d(feat, ch * r * r, 3, padding=1), nn.PixelShuffle(r), nn.Conv2d(ch, self.n_out, 3, padding=1)
        )

    @staticmethod
    def build_spec(cfg: dict[str, Any]):
        return spec_from_config(cfg, includes_target_date=True, needs_mask=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        opt, mask, sar = self.inputs(batch)
        assert mask is not None and sar is not None  # needs_mask and sar_bands: inputs() raised otherwise
        cloudy = opt[:, -1]
        h, w = cloudy.shape[-2:]
        ph, pw = (-h) % self.r, (-w) % self.r
        x_o = torch.cat([cloudy, mask[:, -1]], 1)
        x_s = sar[:, -1]
        if ph or pw:
            x_o, x_s = (F.pad(t, (0, pw, 0, ph), mode="replicate") for t in (x_o, x_s))
        f = torch.cat([F.pixel_unshuffle(self.enc_opt(x_o), self.r), F.pixel_unshuffle(self.enc_sar(x_s), self.r)], 1)
        f0 = self.shallow(f)
        outs, x = [], f0
        for g in self.groups:
            x = g(x)
            outs.append(x)
        x = self.trunk_norm(self.gff(torch.cat(outs, 1)) + f0)
        res = self.recon(x)[..., :h, :w]
        y = cloudy + res
        return ModelOutput(mean=clamp_unit(y))


SMALL = {"optical_dates": 1, "channels": 16, "shuffle": 2, "feat": 32, "groups": 1, "rdb_per_group": 1, "growth": 16,
         "rdb_layers": 2, "swin_depth": 2, "heads": 2, "window": 4}
PAPER = {"optical_dates": 1, "channels": 32, "shuffle": 2, "feat": 96, "groups": 6, "rdb_per_group": 1, "growth": 32,
         "rdb_layers": 4, "swin_depth": 2, "heads": 6, "window": 8}
LOSS = {"cloud_weight": 2.0, "ssim": 0.5}
