"""A learned correction on top of the harmonized composite: the training-free fill stays the baseline a model adds to.

The model sees the composite (``batch['composite']``: the harmonized fill of the target date, the same fill
``reconstruct --checkpoint composite`` writes), where it came from (``batch['composite_info']``: filled from an
earlier date, no clear observation at all, and the age of the fill's source date), the cloudy target date itself
and its cloud mask (the composite already carries the history, so ``optical_dates`` is 1), and, when the config
names ``sar_bands``, Sentinel-1 of the target date, which sees through the cloud what the composite cannot know:
water that was not there on the fill's date. It predicts a correction that is
added to the composite on the pixels the fill took from an earlier date; pixels the target date observed pass
through unchanged, and so do pixels no date saw clearly (the composite's "no clear observation": under a thick
cloud the model would only have the cloud to go by, so they stay nodata).

The correction's last layer starts at zero, so an untrained model returns the composite exactly and training can
only move it where the loss (on the filled pixels) says the composite is wrong: a learned model has to earn its
place against the best training-free estimate instead of relearning it. On a pixel the target does not observe
the fill's error comes from the surface changing between the fill's date and the target (phenology, harvest, a
flood receding) and from the parts of the cloud the mask missed; both leave traces the network can read in the
clear surroundings, in the earlier dates and in the thin cloud itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import CloudRemovalModel, clamp_unit, spec_from_config
from .errors import ModelConfigError, ModelInputError
from .spec import ModelOutput
from .unet import UNetCore

# composite_info channels: filled from another date, no clear observation (the fill kept the target's value),
# age of the source date in days / AGE_SCALE
INFO_CHANNELS = ("filled", "unobserved", "age")
AGE_SCALE = 100.0


def filled_pixels(info: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) float, 1 where ``composite_info`` says the fill took the pixel from an earlier date: the only
    pixels the model corrects (and the loss scores)."""
    return (info[:, :1] > 0).to(info.dtype)


class Refine(CloudRemovalModel):
    name = "refine"

    def __init__(self, **cfg: Any) -> None:
        super().__init__(self.build_spec(cfg))
        if self.spec.out_bands != self.spec.optical_bands:
            raise ModelConfigError(
                f"refine: output bands {list(self.spec.out_bands)} must be the optical bands "
                f"{list(self.spec.optical_bands)}: the model corrects the composite of those bands")
        cin = 2 * self.n_optical + 1 + len(INFO_CHANNELS) + self.n_sar
        self.net = UNetCore(cin, self.n_out, int(cfg["base_channels"]), int(cfg["depth"]))
        # exactly zero: the untrained model is the composite. The head still gets a gradient on the first step
        # (its input features are not zero), and every layer below it from the second step on.
        nn.init.zeros_(self.net.head.weight)
        assert self.net.head.bias is not None
        nn.init.zeros_(self.net.head.bias)

    @staticmethod
    def build_spec(cfg: dict[str, Any]):
        return spec_from_config(cfg, includes_target_date=True, needs_mask=True, needs_composite=True,
                                optical_dates=1)

    def composite_inputs(self, batch: dict[str, torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated (composite (B, C, H, W), composite_info (B, 3, H, W))."""
        b, _, _, h, w = like.shape
        comp, info = batch.get("composite"), batch.get("composite_info")
        want = (b, self.n_out, h, w)
        if comp is None or tuple(comp.shape) != want:
            raise ModelInputError(
                f"{self.name}: batch['composite'] is {None if comp is None else tuple(comp.shape)}, expected {want}: "
                "the harmonized fill of the target date (pipeline.train.samples builds it for training, reconstruct "
                "at inference)")
        if info is None or tuple(info.shape) != (b, len(INFO_CHANNELS), h, w):
            raise ModelInputError(
                f"{self.name}: batch['composite_info'] is {None if info is None else tuple(info.shape)}, expected "
                f"{(b, len(INFO_CHANNELS), h, w)} ({', '.join(INFO_CHANNELS)})")
        return comp, info

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        opt, mask, sar = self.inputs(batch)
        assert mask is not None  # needs_mask=True: inputs() raised without it
        comp, info = self.composite_inputs(batch, opt)
        parts = [comp, info, opt.flatten(1, 2), mask.flatten(1, 2)]
        if sar is not None:
            parts.append(sar[:, -1])  # the slot of the target date
        correction = self.net(torch.cat(parts, 1))
        return ModelOutput(mean=clamp_unit(comp + filled_pixels(info) * correction))


# optical only by default: it then works on any archive; add "sar_bands": ["VV", "VH"] where S1 is there
SMALL = {"base_channels": 16, "depth": 3, "sar_bands": []}
PAPER = {"base_channels": 48, "depth": 4, "sar_bands": []}
LOSS = {"l1": 1.0}
