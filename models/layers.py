"""Building blocks shared by several architectures: attention, Swin, MBConv, dense blocks, edge filters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- edge filters


def _edge_kernels(kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if kind == "sobel":
        k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
    elif kind == "scharr":
        k = torch.tensor([[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]]) / 32.0
    else:
        raise ValueError(f"unknown edge filter {kind!r}")
    return torch.stack([k, k.t()]).unsqueeze(1).to(device=device, dtype=dtype)  # (2,1,3,3): d/dx, d/dy


def image_gradients(x: torch.Tensor, kind: str = "sobel") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (gx, gy) with replicate padding, same shape as ``x`` (B,C,H,W)."""
    b, c, h, w = x.shape
    k = _edge_kernels(kind, x.device, x.dtype)
    g = F.conv2d(F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate"), k)
    g = g.reshape(b, c, 2, h, w)
    return g[:, :, 0], g[:, :, 1]


def gradient_magnitude(x: torch.Tensor, kind: str = "sobel") -> torch.Tensor:
    gx, gy = image_gradients(x, kind)
    return torch.sqrt(gx * gx + gy * gy + 1e-12)


# --------------------------------------------------------------------------- CBAM-style attention


class ChannelAttention(nn.Module):
    def __init__(self, ch: int, reduction: int = 8) -> None:
        super().__init__()
        mid = max(ch // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(ch, mid, 1), nn.ReLU(inplace=True), nn.Conv2d(mid, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(a)


class SpatialAttention(nn.Module):
    def __init__(self, kernel: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(a))


# --------------------------------------------------------------------------- Swin (shifted windows)


def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def _window_merge(x: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b, _, _, c = x.shape
    x = x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def _shift_pad_mask(hp: int, wp: int, h: int, w: int, ws: int, shift: int, device: torch.device) -> torch.Tensor | None:
    """Additive mask (nW, 1, N, N): -inf between tokens of different shifted regions and towards padding."""
    if shift == 0 and hp == h and wp == w:
        return None
    region = torch.zeros(hp, wp, device=device)
    if shift:
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                region[hs, wsl] = cnt
                cnt += 1
    pad = torch.ones(hp, wp, device=device)
    pad[:h, :w] = 0
    if shift:
        pad = torch.roll(pad, (-shift, -shift), (0, 1))
    region = _window_partition(region.view(1, hp, wp, 1), ws).squeeze(-1)[0]  # (nW, N)
    pad = _window_partition(pad.view(1, hp, wp, 1), ws).squeeze(-1)[0].bool()
    blocked = (region.unsqueeze(2) != region.unsqueeze(1)) | pad.unsqueeze(1)
    # a token may always see itself, so no row is fully masked (no NaN, even for padding queries)
    blocked = blocked & ~torch.eye(ws * ws, dtype=torch.bool, device=device)  # not &=: ONNX has no in-place and
    return torch.zeros(blocked.shape, device=device).masked_fill(blocked, float("-inf")).unsqueeze(1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws×ws windows with a learned relative position bias."""

    rel_index: torch.Tensor  # a buffer: typed here, or mypy sees nn.Module.__getattr__'s Tensor | Module

    def __init__(self, dim: int, heads: int, ws: int) -> None:
        super().__init__()
        self.heads, self.ws = heads, ws
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("rel_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1], persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, nw, n, c = x.shape  # (B, windows, tokens, C)
        qkv = self.qkv(x).view(b, nw, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.bias_table[self.rel_index.reshape(-1)].view(n, n, self.heads).permute(2, 0, 1)  # (h,N,N)
        attn_mask = bias if mask is None else bias + mask  # broadcasts to (nW, h, N, N)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask.to(x.dtype))
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """Swin Transformer block on (B, C, H, W) maps; pads to a multiple of the window and masks the padding."""

    def __init__(self, dim: int, heads: int, ws: int = 8, shift: bool = False, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ws, self.shift = ws, ws // 2 if shift else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, ws)
        self.norm2 = nn.LayerNorm(dim)
        hid = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hid), nn.GELU(), nn.Linear(hid, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = self.ws
        t = x.permute(0, 2, 3, 1)
        y = self.norm1(t)
        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))
        # a shift only makes sense when there is more than one window along an axis
        shift = self.shift if (hp > ws or wp > ws) else 0
        if shift:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        mask = _shift_pad_mask(hp, wp, h, w, ws, shift, x.device)
        y = _window_merge(self.attn(_window_partition(y, ws), mask), ws, hp, wp)
        if shift:
            y = torch.roll(y, (shift, shift), (1, 2))
        t = t + y[:, :h, :w]
        t = t + self.mlp(self.norm2(t))
        return t.permute(0, 3, 1, 2)


class SwinStage(nn.Sequential):
    def __init__(self, dim: int, depth: int, heads: int, ws: int) -> None:
        super().__init__(*[SwinBlock(dim, heads, ws, shift=bool(i % 2)) for i in range(depth)])


# --------------------------------------------------------------------------- conv blocks


class MBConv(nn.Module):
    """Inverted residual (EfficientNet MBConv): 1×1 expand, depthwise 3×3, squeeze-excite, 1×1 project."""

    def __init__(self, ch: int, expand: int = 2, groups: int = 4) -> None:
        super().__init__()
        mid = ch * expand
        self.body = nn.Sequential(
            nn.Conv2d(ch, mid, 1), nn.GroupNorm(min(groups, mid), mid), nn.SiLU(),
            nn.Conv2d(mid, mid, 3, padding=1, groups=mid), nn.GroupNorm(min(groups, mid), mid), nn.SiLU(),
        )
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, max(ch // 4, 4), 1), nn.SiLU(),
                                nn.Conv2d(max(ch // 4, 4), mid, 1), nn.Sigmoid())
        self.proj = nn.Sequential(nn.Conv2d(mid, ch, 1), nn.GroupNorm(min(groups, ch), ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return x + self.proj(h * self.se(h))


class ResidualDenseBlock(nn.Module):
    """RDB (Zhang et al. 2018): densely connected 3×3 convs, 1×1 local fusion, local residual scaled by
    ``res_scale`` (ESRGAN's 0.2 keeps deep stacks without normalisation stable)."""

    def __init__(self, ch: int, growth: int = 32, layers: int = 4, res_scale: float = 0.2) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.convs = nn.ModuleList(nn.Conv2d(ch + i * growth, growth, 3, padding=1) for i in range(layers))
        self.fuse = nn.Conv2d(ch + layers * growth, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + self.res_scale * self.fuse(torch.cat(feats, 1))
