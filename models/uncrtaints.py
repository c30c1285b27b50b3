"""UnCRtainTS / SSCR family: multi-date S1 + S2 -> clear S2 with a per-pixel diagonal variance.

Per-date encoder (1×1 stem + MBConv blocks, optional SSCR SAR-structure branch on Scharr edges) ->
lightweight temporal attention (L-TAE style: learned master query per head over the dates, per pixel) ->
MBConv decoder -> mean (sigmoid, [0, 1]) and variance (softplus, > 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CloudRemovalModel, spec_from_config
from .errors import ModelConfigError
from .layers import MBConv, gradient_magnitude
from .spec import ModelOutput


class TemporalAttention(nn.Module):
    """Per-pixel attention over dates with a learned master query per head (as L-TAE); output (B, C, H, W)."""

    def __init__(self, ch: int, heads: int, d_k: int, max_dates: int) -> None:
        super().__init__()
        if ch % heads:
            raise ModelConfigError(f"uncrtaints: channels={ch} must be divisible by heads={heads}")
        self.heads, self.d_k = heads, d_k
        self.pos = nn.Parameter(torch.zeros(max_dates, ch))
        nn.init.normal_(self.pos, std=0.02)
        self.norm = nn.GroupNorm(min(4, ch), ch)
        self.key = nn.Linear(ch, heads * d_k)
        self.query = nn.Parameter(torch.randn(heads, d_k) / math.sqrt(d_k))
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = feats.shape
        x = self.norm(feats.flatten(0, 1)).view(b, t, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c)
        x = x + self.pos[:t]
        k = self.key(x).view(-1, t, self.heads, self.d_k).transpose(1, 2)  # (N, heads, T, dk)
        v = x.view(-1, t, self.heads, c // self.heads).transpose(1, 2)  # (N, heads, T, c/heads)
        # One query per head shared by every pixel: an explicit softmax over the few dates. Handing SDPA the query
        # expanded to N pixels (stride 0) broke its CUDA backward ("more than one element of the written-to
        # tensor refers to a single memory location"); a materialised copy would cost N x heads x dk for nothing.
        att = torch.einsum("hd,nhtd->nht", self.query.to(k.dtype), k) / math.sqrt(self.d_k)
        o = torch.einsum("nht,nhtc->nhc", att.softmax(-1), v)  # (N, heads, c/heads)
        o = o.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self.out(o) + feats.mean(1)


class UnCRtainTS(CloudRemovalModel):
    name = "uncrtaints"

    def __init__(self, **cfg: Any) -> None:
        super().__init__(self.build_spec(cfg))
        ch = cfg["channels"]
        self.stem = nn.Sequential(nn.Conv2d(self.n_optical + self.n_sar, ch, 1), nn.SiLU())
        self.encoder = nn.Sequential(*[MBConv(ch) for _ in range(cfg["enc_blocks"])])
        self.use_structure = bool(cfg["sar_structure"]) and self.n_sar > 0
        if self.use_structure:
            self.structure = nn.Sequential(
                nn.Conv2d(self.n_sar, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1)
            )
        self.temporal = TemporalAttention(ch, cfg["heads"], cfg["d_k"], max(self.spec.optical_dates, 1))
        self.decoder = nn.Sequential(*[MBConv(ch) for _ in range(cfg["dec_blocks"])])
        self.mean_head = nn.Conv2d(ch, self.n_out, 1)
        self.var_head = nn.Conv2d(ch, self.n_out, 1)

    @staticmethod
    def build_spec(cfg: dict[str, Any]):
        return spec_from_config(cfg, includes_target_date=True, needs_mask=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        opt, _, sar = self.inputs(batch)
        b, t, c, h, w = opt.shape
        x = opt if sar is None else torch.cat([opt, sar[:, :t]], 2)  # S1 aligned with each optical date
        f = self.encoder(self.stem(x.flatten(0, 1)))
        if self.use_structure:
            assert sar is not None  # use_structure needs n_sar > 0: inputs() raised without SAR
            # Scharr edges of speckle-prone SAR: structure that clouds do not hide (SSCR)
            f = f + self.structure(gradient_magnitude(sar[:, :t].flatten(0, 1), "scharr"))
        z = self.decoder(self.temporal(f.view(b, t, -1, h, w)))
        mean = torch.sigmoid(self.mean_head(z))
        var = F.softplus(self.var_head(z)) + 1e-4
        return ModelOutput(mean=mean, var=var)


SMALL = {
    "optical_dates": 2,
    "channels": 16,
    "enc_blocks": 1,
    "dec_blocks": 1,
    "heads": 4,
    "d_k": 4,
    "sar_structure": True,
}
PAPER = {
    "optical_dates": 3,
    "channels": 128,
    "enc_blocks": 4,
    "dec_blocks": 5,
    "heads": 16,
    "d_k": 4,
    "sar_structure": True,
}
LOSS = {"kind": "gnll"}
