"""SRGGAN: U-Net generator with a structural guidance branch, PatchGAN discriminator.

The guidance branch sees the Sobel gradient magnitude and a binary edge map of the input (optical mean
and each SAR band: SAR edges survive under clouds) and injects its features into every encoder scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import CloudRemovalModel, from_tanh, spec_from_config, to_tanh
from .layers import gradient_magnitude
from .spec import ModelOutput
from .unet import UNetCore


def structural_guidance(images: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, 2K, H, W): Sobel gradient magnitude, and edges above mean + 1 std per image/channel."""
    mag = gradient_magnitude(images)
    mu = mag.mean((-2, -1), keepdim=True)
    sd = mag.std((-2, -1), keepdim=True)
    edges = (mag > mu + sd).to(images.dtype)
    return torch.cat([mag, edges], 1)


class SRGGAN(CloudRemovalModel):
    name = "srggan"
    is_gan = True

    def __init__(self, **cfg: Any) -> None:
        super().__init__(self.build_spec(cfg))
        self.cfg = cfg
        base, depth = cfg["base_channels"], cfg["depth"]
        cin = self.n_optical * self.spec.optical_dates + self.n_sar
        n_guid = 2 * (1 + self.n_sar)
        self.net = UNetCore(cin, self.n_out, base, depth)
        chans = self.net.chans
        guide: list[nn.Module] = [nn.Sequential(nn.Conv2d(n_guid, chans[0], 3, padding=1), nn.LeakyReLU(0.2))]
        for i in range(depth):
            guide.append(nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.LeakyReLU(0.2)))
        self.guide = nn.ModuleList(guide)

    @staticmethod
    def build_spec(cfg: dict[str, Any]):
        return spec_from_config(cfg, includes_target_date=True, needs_mask=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        opt, _, sar = self.inputs(batch)
        cloudy = opt[:, -1]
        parts = [to_tanh(opt.flatten(1, 2))]
        structure = [cloudy.mean(1, keepdim=True)]
        if sar is not None:
            parts.append(to_tanh(sar[:, -1]))
            structure.append(sar[:, -1])
        g = structural_guidance(torch.cat(structure, 1))
        h, w = g.shape[-2:]
        m = 2**self.net.depth
        g = nn.functional.pad(g, (0, (-w) % m, 0, (-h) % m), mode="replicate")
        inj = []
        for layer in self.guide:
            g = layer(g)
            inj.append(g)
        out = torch.tanh(self.net(torch.cat(parts, 1), inj))
        return ModelOutput(mean=from_tanh(out), extras={"guidance": inj[0].detach().mean(1, keepdim=True)})

    def discriminator(self) -> nn.Module:
        return PatchGAN(
            self.n_out + self.n_optical * self.spec.optical_dates + self.n_sar * (self.spec.optical_dates + 1),
            self.cfg["ndf"],
            self.cfg["d_layers"],
        )


class PatchGAN(nn.Module):
    """pix2pix PatchGAN (70×70 receptive field with 3 layers): ``forward(image, cond)`` -> score map."""

    def __init__(self, cin: int, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cin, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        ch = ndf
        for i in range(1, n_layers + 1):
            nxt = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, nxt, 4, stride=stride, padding=1), nn.InstanceNorm2d(nxt, affine=True),
                       nn.LeakyReLU(0.2, inplace=True)]
            ch = nxt
        layers.append(nn.Conv2d(ch, 1, 4, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.net(to_tanh(image if cond is None else torch.cat([image, cond], 1)))


SMALL = {"optical_dates": 1, "base_channels": 8, "depth": 2, "ndf": 8, "d_layers": 2}
PAPER = {"optical_dates": 1, "base_channels": 64, "depth": 4, "ndf": 64, "d_layers": 3}
LOSS = {"l1": 1.0, "perceptual": 0.1, "style": 50.0, "structural": 0.5, "gradient": 0.5,
        "adversarial": "lsgan", "adv_weight": 0.01, "gp_weight": 10.0}
SMALL_LOSS = {"perceptual": 0.0, "style": 0.0}  # CPU preset: no ImageNet VGG16 offline
