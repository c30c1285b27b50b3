"""Compositing baselines that need no training: most recent clear observation, or temporal median of clear ones.

Pixels with no clear observation on any date fall back to the temporal median of all valid-looking inputs
(cloudy values included), and ``extras['clear_count']`` says how many clear dates each pixel had, so
callers can flag them (provenance) instead of mistaking them for observations.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import CloudRemovalModel, spec_from_config
from .errors import ModelConfigError
from .spec import ModelOutput

METHODS = ("recent", "median")


class Composite(CloudRemovalModel):
    name = "composite"
    trainable = False

    def __init__(self, **cfg: Any) -> None:
        super().__init__(self.build_spec(cfg))
        if cfg["method"] not in METHODS:
            raise ModelConfigError(f"composite: method={cfg['method']!r} is not one of {METHODS}")
        self.method = cfg["method"]

    @staticmethod
    def build_spec(cfg: dict[str, Any]):
        return spec_from_config(cfg, sar_bands=(), needs_mask=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        opt, mask, _ = self.inputs(batch)
        assert mask is not None  # needs_mask=True: inputs() raised without it
        clear = mask < 0.5  # (B,T,1,H,W)
        count = clear.sum(1)  # (B,1,H,W)
        if self.method == "recent":
            t = torch.arange(opt.shape[1], device=opt.device).view(1, -1, 1, 1, 1)
            latest = torch.where(clear, t, -1).amax(1, keepdim=True)  # (B,1,1,H,W), -1 where never clear
            out = opt.gather(1, latest.clamp(min=0).expand(-1, 1, opt.shape[2], -1, -1)).squeeze(1)
        else:
            out = torch.nanmedian(torch.where(clear, opt, torch.nan), dim=1).values
        fallback = opt.median(dim=1).values
        out = torch.where(count > 0, out, fallback)
        return ModelOutput(mean=out.clamp(0, 1), extras={"clear_count": count.to(opt.dtype)})


SMALL = {"optical_dates": 3, "method": "recent"}
PAPER = dict(SMALL)
LOSS = {"l1": 1.0}
