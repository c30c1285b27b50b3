"""CRGenNet (Duan, Belgiu & Stein, ISPRS J. 2026): S1 t1 + S1 t2 + cloudy S2 t1 -> S2 t2.

Pipeline: stem (ReplicationPad + 7×7, InstanceNorm, Mish) -> DownUpBlock -> coarse tanh image ->
ExtendedConvBlock -> 4-scale Swin tower (H/2 .. H/16, shifted windows) -> decoder (channel attention on
the low-resolution stages, spatial attention on the high-resolution ones) with FusionAttention fusing
S1-t2 features into the decoder at ``fusion_stride`` -> refined tanh image. The paper's code uses RGB
optical; here the band list is configurable (default: the 13 S2 bands of the product).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .base import CloudRemovalModel, from_tanh, spec_from_config, to_tanh
from .errors import ModelConfigError
from .layers import ChannelAttention, SpatialAttention, SwinStage
from .spec import ModelOutput


def conv7(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.ReplicationPad2d(3), nn.Conv2d(cin, cout, 7, stride=stride), nn.InstanceNorm2d(cout, affine=True), nn.Mish()
    )


def conv3(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.ReplicationPad2d(dilation), nn.Conv2d(cin, cout, 3, dilation=dilation),
                         nn.InstanceNorm2d(cout, affine=True), nn.Mish())


class RefineBlock(nn.Module):
    def __init__(self, ch: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3(ch, ch), nn.Dropout2d(dropout), nn.ReplicationPad2d(1), nn.Conv2d(ch, ch, 3),
                                  nn.InstanceNorm2d(ch, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DownUpBlock(nn.Module):
    """Two 7×7 stride-2 downs, refinement blocks with dropout, two transposed-conv ups, residual (no U-Net skips)."""

    def __init__(self, ch: int, n_refine: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Sequential(conv7(ch, ch * 2, 2), conv7(ch * 2, ch * 4, 2))
        self.refine = nn.Sequential(*[RefineBlock(ch * 4, dropout) for _ in range(n_refine)])
        up = []
        for cin, cout in ((ch * 4, ch * 2), (ch * 2, ch)):
            up += [
                nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(cout, affine=True),
                nn.Mish(),
            ]
        self.up = nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.refine(self.down(x)))


class ExtendedConvBlock(nn.Module):
    """Parallel dilated 3×3 branches (wider receptive field at full resolution), 1×1 fusion, residual."""

    def __init__(self, cin: int, cout: int, dilations: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(conv3(cin, cout, d) for d in dilations)
        self.fuse = nn.Sequential(
            nn.Conv2d(cout * len(dilations), cout, 1), nn.InstanceNorm2d(cout, affine=True), nn.Mish()
        )
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.fuse(torch.cat([b(x) for b in self.branches], 1))


class FusionAttention(nn.Module):
    """Shared attention over two streams; identity at initialisation (γ = 0).

    A = softmax(Q Kᵀ / √d) with Q = [q̂_x, q̂_y], K = [k̂_x, k̂_y] (each L2-normalised over channels, then
    concatenated); out_x = x + γ_x·A V_x, out_y = y + γ_y·A V_y. Computed by
    ``scaled_dot_product_attention`` with equal q/k/v widths, which lets PyTorch pick its flash /
    memory-efficient kernels, so memory stays linear in the number of pixels (no HW×HW matrix).
    """

    def __init__(self, cx: int, cy: int) -> None:
        super().__init__()
        # q/k widths equal the value width (cx + cy): unequal widths send CPU SDPA to the O(N²) math path
        self.qx, self.kx, self.vx = (nn.Conv2d(cx, cx, 1) for _ in range(3))
        self.qy, self.ky, self.vy = (nn.Conv2d(cy, cy, 1) for _ in range(3))
        self.gamma_x = nn.Parameter(torch.zeros(1))
        self.gamma_y = nn.Parameter(torch.zeros(1))
        self.cx = cx

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape

        def tok(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(2).transpose(1, 2)  # (B, N, C)

        q = torch.cat([F.normalize(tok(self.qx(x)), dim=-1), F.normalize(tok(self.qy(y)), dim=-1)], -1)
        k = torch.cat([F.normalize(tok(self.kx(x)), dim=-1), F.normalize(tok(self.ky(y)), dim=-1)], -1)
        v = torch.cat([tok(self.vx(x)), tok(self.vy(y))], -1)
        o = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        o = o.transpose(1, 2).reshape(b, -1, h, w)
        return x + self.gamma_x * o[:, : self.cx], y + self.gamma_y * o[:, self.cx :]


class CRGenNet(CloudRemovalModel):
    name = "crgennet"
    is_gan = True

    def __init__(self, **cfg: Any) -> None:
        super().__init__(self.build_spec(cfg))
        self.cfg = cfg
        c, s, ngf = self.n_optical, self.n_sar, cfg["ngf"]
        dims, depths, heads, ws = cfg["swin_dims"], cfg["swin_depths"], cfg["swin_heads"], cfg["window"]
        if not (len(dims) == len(depths) == len(heads) == 4):
            raise ModelConfigError(
                f"crgennet: swin_dims/swin_depths/swin_heads need 4 entries (4 scales), got {dims}, {depths}, {heads}"
            )
        if cfg["fusion_stride"] not in (1, 2, 4, 8, 16):
            raise ModelConfigError(f"crgennet: fusion_stride={cfg['fusion_stride']!r} must be one of 1, 2, 4, 8, 16")
        self.stem = conv7(2 * s + c, ngf)
        self.downup = DownUpBlock(ngf, cfg["n_refine"], cfg["dropout"])
        self.coarse_head = nn.Sequential(nn.ReplicationPad2d(3), nn.Conv2d(ngf, self.n_out, 7), nn.Tanh())
        self.extended = ExtendedConvBlock(ngf + self.n_out, ngf)
        self.embed = nn.ModuleList(nn.Conv2d(cin, cout, 2, stride=2) for cin, cout in zip([ngf] + dims[:-1], dims))
        self.tower = nn.ModuleList(SwinStage(d, n, h, ws) for d, n, h in zip(dims, depths, heads))
        # decoder: H/16 -> H/8 -> H/4 (channel attention) -> H/2 -> H (spatial attention)
        dec_out = [dims[2], dims[1], dims[0], ngf]
        dec_in = [dims[3], dims[2], dims[1], dims[0]]
        skip_ch = [dims[2], dims[1], dims[0], ngf]
        self.ups = nn.ModuleList(nn.ConvTranspose2d(ci, co, 2, stride=2) for ci, co in zip(dec_in, dec_out))
        self.dec = nn.ModuleList(conv3(co + sk, co) for co, sk in zip(dec_out, skip_ch))
        self.dec_att = nn.ModuleList(
            [ChannelAttention(dec_out[0]), ChannelAttention(dec_out[1]), SpatialAttention(), SpatialAttention()]
        )
        # FusionAttention on the decoder stage whose output is at 1/fusion_stride resolution
        self.fusion_stage = {8: 0, 4: 1, 2: 2, 1: 3, 16: -1}[cfg["fusion_stride"]]
        fch = dims[3] if self.fusion_stage < 0 else dec_out[self.fusion_stage]
        n_down = {1: 0, 2: 1, 4: 2, 8: 3, 16: 4}[cfg["fusion_stride"]]
        sar_layers: list[nn.Module] = [conv7(s, min(ngf, fch))]
        ch = min(ngf, fch)
        for i in range(n_down):
            nxt = fch if i == n_down - 1 else min(ch * 2, fch)
            sar_layers.append(conv3(ch, nxt))
            sar_layers.append(nn.Conv2d(nxt, nxt, 2, stride=2))
            ch = nxt
        if ch != fch:
            sar_layers.append(conv3(ch, fch))
        self.sar_enc = nn.Sequential(*sar_layers)
        self.fusion = FusionAttention(fch, fch)
        self.fusion_merge = nn.Conv2d(2 * fch, fch, 1)
        self.out_head = nn.Sequential(conv3(ngf, ngf), nn.ReplicationPad2d(3), nn.Conv2d(ngf, self.n_out, 7), nn.Tanh())

    @staticmethod
    def build_spec(cfg: dict[str, Any]):
        return spec_from_config(cfg, optical_dates=1, includes_target_date=False, needs_mask=False)

    def _fuse(self, x: torch.Tensor, s1_t2: torch.Tensor) -> torch.Tensor:
        fx, fy = self.fusion(x, self.sar_enc(s1_t2))
        return self.fusion_merge(torch.cat([fx, fy], 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        opt, _, sar = self.inputs(batch)
        assert sar is not None  # the spec has sar_bands: inputs() raised without SAR
        s1_t1, s1_t2, s2_t1 = to_tanh(sar[:, 0]), to_tanh(sar[:, 1]), to_tanh(opt[:, 0])
        h, w = s2_t1.shape[-2:]
        ph, pw = (-h) % 16, (-w) % 16
        if ph or pw:  # the tower halves four times
            s1_t1, s1_t2, s2_t1 = (F.pad(t, (0, pw, 0, ph), mode="replicate") for t in (s1_t1, s1_t2, s2_t1))
        f = self.downup(self.stem(torch.cat([s1_t1, s1_t2, s2_t1], 1)))
        coarse = self.coarse_head(f)
        f = self.extended(torch.cat([f, coarse], 1))
        skips = [f]
        x = f
        for emb, stage in zip(self.embed, self.tower):
            x = stage(emb(x))
            skips.append(x)
        x = skips.pop()
        if self.fusion_stage < 0:
            x = self._fuse(x, s1_t2)
        for i, (up, dec, att) in enumerate(zip(self.ups, self.dec, self.dec_att)):
            x = att(dec(torch.cat([up(x), skips.pop()], 1)))
            if i == self.fusion_stage:
                x = self._fuse(x, s1_t2)
        out = self.out_head(x)
        return ModelOutput(mean=from_tanh(out[..., :h, :w]), extras={"coarse": from_tanh(coarse[..., :h, :w])})

    def condition(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        opt, _, sar = self.inputs(batch)
        assert sar is not None  # the spec has sar_bands: inputs() raised without SAR
        return torch.cat([sar[:, 0], sar[:, 1], opt[:, 0]], 1)

    def discriminator(self) -> nn.Module:
        return MultiScaleDiscriminator(self.n_out + 2 * self.n_sar + self.n_optical, self.cfg["ndf"])


class _DScale(nn.Module):
    def __init__(self, cin: int, ndf: int, n_down: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = cin
        for i in range(n_down):
            nxt = ndf * min(2**i, 8)
            layers += [spectral_norm(nn.Conv2d(ch, nxt, 4, stride=2, padding=1)), nn.LeakyReLU(0.2, inplace=True)]
            ch = nxt
        self.body = nn.Sequential(*layers)
        self.ca, self.sa = ChannelAttention(ch), SpatialAttention()
        self.head = spectral_norm(nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.sa(self.ca(self.body(x))))


class MultiScaleDiscriminator(nn.Module):
    """Three conditional discriminators on full, ½ and ¼ resolution, each ending at H/16 (spectral norm,
    channel + spatial attention). ``forward(image, cond)`` with images in [0, 1] -> list of 3 score maps."""

    def __init__(self, cin: int, ndf: int = 64) -> None:
        super().__init__()
        self.scales = nn.ModuleList(_DScale(cin, ndf, n) for n in (4, 3, 2))

    def forward(self, image: torch.Tensor, cond: torch.Tensor | None) -> list[torch.Tensor]:
        x = to_tanh(image if cond is None else torch.cat([image, cond], 1))
        outs = []
        for i, d in enumerate(self.scales):
            outs.append(d(x if i == 0 else F.avg_pool2d(x, 2**i)))
        return outs


SMALL = {"ngf": 8, "n_refine": 1, "dropout": 0.1, "swin_dims": [8, 16, 16, 32], "swin_depths": [2, 2, 2, 2],
         "swin_heads": [1, 2, 2, 4], "window": 4, "fusion_stride": 4, "ndf": 8, "optical_dates": 1}
PAPER = {"ngf": 64, "n_refine": 4, "dropout": 0.1, "swin_dims": [96, 192, 384, 768], "swin_depths": [2, 2, 6, 2],
         "swin_heads": [3, 6, 12, 24], "window": 8, "fusion_stride": 4, "ndf": 64, "optical_dates": 1}
LOSS = {"perceptual": 1.0, "cosine": 1.0, "ms_ssim": 1.0, "l1": 0.0, "coarse_weight": 0.5,
        "adversarial": "lsgan", "adv_weight": 0.01, "gp_weight": 10.0}
SMALL_LOSS = {"perceptual": 0.0, "l1": 1.0}  # CPU preset: no ImageNet VGG16 offline; L1 keeps the pixel term
