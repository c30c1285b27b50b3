"""CMSN: multi-temporal Landsat cloud removal (three dates in, the last one the cloudy target date).

Shared per-date encoder of ResFFTConv blocks -> multi-temporal feature aggregation (concatenate, spatial
attention) -> coarse decoder (tanh image, ``extras['coarse']``) -> refinement conv (tanh) -> output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import CloudRemovalModel, from_tanh, spec_from_config, to_tanh
from .spec import ModelOutput


class ResFFTConv(nn.Module):
    """x + conv-BN-ReLU-conv-BN(x) + FFT magnitude path (1×1 convs on the log amplitude -> per-frequency gain)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.spatial = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(ch),
        )
        self.freq = nn.Sequential(nn.Conv2d(ch, ch, 1), nn.ReLU(inplace=True), nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        spec = torch.fft.rfft2(x.float(), norm="ortho")
        # a real gain in [0, 2] per frequency, learned from the log amplitude: rescales, keeps the phase
        gain = 1.0 + torch.tanh(self.freq(torch.log1p(spec.abs()).to(x.dtype))).float()
        f = torch.fft.irfft2(spec * gain, s=(h, w), norm="ortho")
        return torch.relu(x + self.spatial(x) + f.to(x.dtype))


class TemporalAggregation(nn.Module):
    """Concatenate per-date features, weight each date per pixel by a softmax spatial attention, fuse."""

    def __init__(self, ch: int, dates: int) -> None:
        super().__init__()
        self.att = nn.Sequential(
            nn.Conv2d(ch * dates + dates, ch, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(ch, dates, 3, padding=1)
        )
        self.fuse = nn.Conv2d(ch * dates, ch, 1)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, c, h, w = feats.shape
        cat = feats.flatten(1, 2)
        m = torch.zeros(b, t, h, w, device=feats.device, dtype=feats.dtype) if mask is None else mask[:, :, 0]
        a = torch.softmax(self.att(torch.cat([cat, m], 1)), dim=1)  # (B, T, H, W)
        return self.fuse((feats * a.unsqueeze(2)).flatten(1, 2)) + (feats * a.unsqueeze(2)).sum(1)


class CMSN(CloudRemovalModel):
    name = "cmsn"

    def __init__(self, **cfg: Any) -> None:
        super().__init__(self.build_spec(cfg))
        ch, t = cfg["channels"], self.spec.optical_dates
        self.encoder = nn.Sequential(nn.Conv2d(self.n_optical + 1, ch, 3, padding=1), nn.ReLU(inplace=True),
                                     *[ResFFTConv(ch) for _ in range(cfg["enc_blocks"])])
        self.aggregate = TemporalAggregation(ch, t)
        self.decoder = nn.Sequential(*[ResFFTConv(ch) for _ in range(cfg["dec_blocks"])])
        self.coarse_head = nn.Conv2d(ch, self.n_out, 3, padding=1)
        self.refine = nn.Sequential(
            nn.Conv2d(self.n_out + self.n_optical + 1, ch, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, self.n_out, 3, padding=1),
        )

    @staticmethod
    def build_spec(cfg: dict[str, Any]):
        return spec_from_config(
            {"optical_sensor": "landsat", **cfg}, sar_bands=(), includes_target_date=True, needs_mask=True
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        opt, mask, _ = self.inputs(batch)
        assert mask is not None  # needs_mask=True: inputs() raised without it
        b, t, c, h, w = opt.shape
        x = torch.cat([to_tanh(opt), mask], 2).flatten(0, 1)
        feats = self.encoder(x).view(b, t, -1, h, w)
        coarse = torch.tanh(self.coarse_head(self.decoder(self.aggregate(feats, mask))))
        refined = torch.tanh(coarse + self.refine(torch.cat([coarse, to_tanh(opt[:, -1]), mask[:, -1]], 1)))
        return ModelOutput(mean=from_tanh(refined), extras={"coarse": from_tanh(coarse)})


SMALL = {"optical_sensor": "landsat", "optical_dates": 3, "channels": 8, "enc_blocks": 1, "dec_blocks": 1}
PAPER = {"optical_sensor": "landsat", "optical_dates": 3, "channels": 64, "enc_blocks": 4, "dec_blocks": 4}
LOSS = {"local_weight": 1.0, "delta": 0.1, "xi": 1.0}
