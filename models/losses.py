"""Every loss written once; per-model compositions; adversarial helpers (least squares, WGAN-GP).

All image losses take reflectance in [0, 1], ``(B, C, H, W)``, and an optional weight/validity map
``(B, 1, H, W)``: pixels with weight 0 do not count. SSIM / MS-SSIM come from torchmetrics.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from .bands import rgb_indices
from .errors import ModelConfigError
from .layers import image_gradients
from .refine import filled_pixels
from .spec import InputSpec, ModelOutput
from .vgg import VGG16Features, load_vgg16

_MS_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# --------------------------------------------------------------------------- elementary terms


def _wmean(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` (B,C,H,W) weighted by ``w`` (B,1,H,W) broadcast over channels."""
    if w is None:
        return x.mean()
    w = w.expand_as(x)
    return (x * w).sum() / w.sum().clamp_min(1e-8)


def l1_loss(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    return _wmean((pred - target).abs(), w)


def l2_loss(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    return _wmean((pred - target) ** 2, w)


def _fill_invalid(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    # window-based losses cannot skip pixels; showing them the target makes invalid pixels "perfect"
    return pred if valid is None else torch.where(valid > 0.5, pred, target)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1 − SSIM (Gaussian 11, σ 1.5, data range 1)."""
    p = _fill_invalid(pred, target, valid)
    # a tuple only with return_full_image / return_contrast_sensitivity
    ssim = cast(torch.Tensor, structural_similarity_index_measure(p, target, data_range=1.0, kernel_size=11, sigma=1.5))
    return 1.0 - ssim


def ms_ssim_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1 − MS-SSIM; uses as many of the 5 standard scales as the patch size allows (3 at 64², 5 at 256²)."""
    side = min(pred.shape[-2:])
    n = 5
    # torchmetrics' own size rule for len(betas) scales with an 11-px kernel
    while n > 1 and side <= 10 * max(1, n - 1) ** 2:
        n -= 1
    betas = tuple(b / sum(_MS_BETAS[:n]) for b in _MS_BETAS[:n])
    p = _fill_invalid(pred, target, valid)
    if n == 1:
        return ssim_loss(p, target)
    val = multiscale_structural_similarity_index_measure(
        p, target, data_range=1.0, kernel_size=11, sigma=1.5, betas=betas, normalize="relu"
    )
    return 1.0 - val


def cosine_loss(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cosine similarity of per-pixel spectra (the differentiable cousin of SAM)."""
    return _wmean(1.0 - F.cosine_similarity(pred, target, dim=1, eps=1e-6).unsqueeze(1), w)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient consistency: L1 between Sobel gradients of prediction and target."""
    pgx, pgy = image_gradients(pred)
    tgx, tgy = image_gradients(target)
    return _wmean((pgx - tgx).abs() + (pgy - tgy).abs(), w)


def fft_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Frequency loss: L1 between log-amplitude spectra (orthonormal 2-D FFT)."""
    p = _fill_invalid(pred, target, valid)
    fp = torch.fft.rfft2(p.float(), norm="ortho").abs()
    ft = torch.fft.rfft2(target.float(), norm="ortho").abs()
    return (torch.log1p(fp) - torch.log1p(ft)).abs().mean()


def pearson_loss(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """1 − Pearson correlation per image (over all bands and valid pixels), averaged over the batch."""
    b = pred.shape[0]
    ww = torch.ones_like(pred[:, :1]) if w is None else w
    ww = ww.expand_as(pred).reshape(b, -1)
    p, t = pred.reshape(b, -1), target.reshape(b, -1)
    n = ww.sum(1).clamp_min(1.0)
    pm, tm = (p * ww).sum(1) / n, (t * ww).sum(1) / n
    pc, tc = (p - pm[:, None]) * ww, (t - tm[:, None]) * ww
    r = (pc * tc).sum(1) / (torch.sqrt((pc * pc).sum(1) * (tc * tc).sum(1)) + 1e-8)
    return (1.0 - r).mean()


def structure_loss(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """SSCR's loss: 0.9·L1 + 0.001·(1 − Pearson)."""
    return 0.9 * l1_loss(pred, target, w) + 0.001 * pearson_loss(pred, target, w)


def gaussian_nll(
    mean: torch.Tensor, var: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None = None
) -> torch.Tensor:
    """Gaussian negative log-likelihood with a diagonal variance (constant term included)."""
    nll = F.gaussian_nll_loss(mean, target, var, full=True, eps=1e-6, reduction="none")
    return _wmean(nll, w)


def cloud_weighted_mse(pred: torch.Tensor, target: torch.Tensor, cloud: torch.Tensor | None, cloud_weight: float,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """MSE where cloud pixels weigh ``cloud_weight`` (> 1) and clear pixels 1."""
    w = torch.ones_like(pred[:, :1]) if cloud is None else 1.0 + (cloud_weight - 1.0) * (cloud > 0.5).to(pred.dtype)
    if valid is not None:
        w = w * valid
    return _wmean((pred - target) ** 2, w)


def gram(feat: torch.Tensor) -> torch.Tensor:
    b, c, h, w = feat.shape
    f = feat.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


class VGGLoss(nn.Module):
    """Perceptual (feature L1) and Gram style losses on the RGB bands of multispectral images."""

    def __init__(self, vgg: VGG16Features, rgb: tuple[int, int, int]) -> None:
        super().__init__()
        self.vgg = vgg
        self.rgb = list(rgb)

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = _fill_invalid(pred, target, valid)[:, self.rgb]
        with torch.no_grad():
            ft = self.vgg(target[:, self.rgb])
        fp = self.vgg(p)
        perceptual = _total(F.l1_loss(a, b) for a, b in zip(fp, ft)) / len(fp)
        style = _total(F.l1_loss(gram(a), gram(b)) for a, b in zip(fp, ft)) / len(fp)
        return perceptual, style


# --------------------------------------------------------------------------- per-model compositions


def _valid(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    v = batch.get("target_valid")
    return None if v is None else v.to(batch["target"].dtype)


def _target_cloud(batch: dict[str, torch.Tensor], spec: InputSpec) -> torch.Tensor | None:
    """Cloud mask at the target date, which only inputs of ``includes_target_date`` models carry."""
    m = batch.get("optical_mask")
    if m is None or not spec.includes_target_date:
        return None
    return m[:, -1]


class ModelLoss(nn.Module):
    """``loss(output, batch) -> (total, parts)``: weighted sum of named terms, zero-weight terms skipped."""

    def __init__(self, name: str, cfg: dict[str, Any], spec: InputSpec, terms: dict[str, Callable[..., torch.Tensor]],
                 vgg: VGGLoss | None = None) -> None:
        super().__init__()
        self.model_name, self.cfg, self.spec = name, dict(cfg), spec
        self.terms = terms
        self.vgg = vgg

    def forward(
        self, output: ModelOutput, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ctx = {"out": output, "batch": batch, "target": batch["target"], "valid": _valid(batch),
               "cloud": _target_cloud(batch, self.spec)}
        if self.vgg is not None:
            ctx["vgg"] = self.vgg(output.mean, ctx["target"], ctx["valid"])
        parts: dict[str, torch.Tensor] = {}
        total = output.mean.new_zeros(())
        for key, fn in self.terms.items():
            val = fn(ctx)
            parts[key] = val.detach()
            total = total + val
        parts["total"] = total.detach()
        return total, parts


def _filled(ctx: dict) -> torch.Tensor:
    """Valid target pixels the composite filled from an earlier date: where a ``refine`` model's correction applies."""
    filled = filled_pixels(ctx["batch"]["composite_info"])
    return filled if ctx["valid"] is None else filled * ctx["valid"]


def _on_image(
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    pick: Callable[[dict], torch.Tensor],
) -> Callable[[dict], torch.Tensor]:
    """The loss term of the image ``pick`` takes from the context (a function: binds ``pick`` per loop pass)."""
    return lambda c: loss(pick(c), c["target"], c["valid"])


def _weighted(weight: float, fn: Callable[[dict], torch.Tensor]) -> Callable[[dict], torch.Tensor]:
    return lambda ctx: weight * fn(ctx)


def _need_vgg(name: str, cfg: dict[str, Any], spec: InputSpec, vgg_weights: str | None) -> VGGLoss | None:
    if not (cfg.get("perceptual", 0) or cfg.get("style", 0)):
        return None
    if vgg_weights is None:
        raise ModelConfigError(
            f"{name}: the perceptual/style loss needs VGG16 ImageNet weights: pass vgg_weights=PATH to "
            "torchvision's vgg16 state dict (vgg16-397923af.pth), or set loss perceptual=0 and style=0 in the config"
        )
    rgb = rgb_indices(spec.out_bands)
    if rgb is None:
        raise ModelConfigError(
            f"{name}: the perceptual/style loss needs red, green and blue among the output bands {spec.out_bands}; "
            "add B4/B3/B2 (S2) or SR_B4/SR_B3/SR_B2 (Landsat) or set perceptual=0 and style=0"
        )
    return VGGLoss(load_vgg16(vgg_weights), rgb)


def build_loss(name: str, cfg: dict[str, Any], spec: InputSpec, vgg_weights: str | None = None) -> ModelLoss:
    """The generator / regression loss of model ``name`` from its config's ``loss`` dict."""
    vgg = _need_vgg(name, cfg, spec, vgg_weights)
    T: dict[str, Callable[[dict], torch.Tensor]] = {}
    w = cfg.get

    def add(key: str, weight: float, fn: Callable[[dict], torch.Tensor]) -> None:
        if weight:
            T[key] = _weighted(float(weight), fn)

    if name in ("unet", "composite"):
        add("l1", w("l1", 1.0), lambda c: l1_loss(c["out"].mean, c["target"], c["valid"]))
    elif name == "refine":
        # the model changes only the pixels the fill took from an earlier date: the loss is on those
        add("l1", w("l1", 1.0), lambda c: l1_loss(c["out"].mean, c["target"], _filled(c)))
    elif name == "crgennet":
        for img_key, scale in (("mean", 1.0), ("coarse", float(w("coarse_weight", 0.5)))):
            if not scale:
                continue
            pick: Callable[[dict], torch.Tensor] = (
                (lambda c: c["out"].mean) if img_key == "mean" else (lambda c: c["out"].extras["coarse"])
            )
            sfx = "" if img_key == "mean" else "_coarse"
            add("cosine" + sfx, scale * w("cosine", 1.0), _on_image(cosine_loss, pick))
            add("ms_ssim" + sfx, scale * w("ms_ssim", 1.0), _on_image(ms_ssim_loss, pick))
            add("l1" + sfx, scale * w("l1", 0.0), _on_image(l1_loss, pick))
        add("perceptual", w("perceptual", 1.0), lambda c: c["vgg"][0])
    elif name == "srggan":
        add("l1", w("l1", 1.0), lambda c: l1_loss(c["out"].mean, c["target"], c["valid"]))
        add("perceptual", w("perceptual", 0.1), lambda c: c["vgg"][0])
        add("style", w("style", 50.0), lambda c: c["vgg"][1])
        add("structural", w("structural", 0.5), lambda c: ssim_loss(c["out"].mean, c["target"], c["valid"]))
        add("gradient", w("gradient", 0.5), lambda c: gradient_loss(c["out"].mean, c["target"], c["valid"]))
    elif name == "cmsn":
        def mtgl(c: dict) -> torch.Tensor:
            coarse = c["out"].extras["coarse"]
            glob = l1_loss(coarse, c["target"], c["valid"])
            cloud = c["cloud"] if c["valid"] is None or c["cloud"] is None else c["cloud"] * c["valid"]
            local = (
                l1_loss(coarse, c["target"], cloud) if cloud is not None and cloud.sum() > 0 else coarse.new_zeros(())
            )
            return glob + float(w("local_weight", 1.0)) * local
        add("mtgl", 1.0, mtgl)
        add("freq", w("delta", 0.1), lambda c: fft_loss(c["out"].mean, c["target"], c["valid"]))
        add("refine", w("xi", 1.0), lambda c: l1_loss(c["out"].mean, c["target"], c["valid"]))
    elif name == "uncrtaints":
        kind = w("kind", "gnll")
        fns = {
            "l1": lambda c: l1_loss(c["out"].mean, c["target"], c["valid"]),
            "l2": lambda c: l2_loss(c["out"].mean, c["target"], c["valid"]),
            "gnll": lambda c: gaussian_nll(c["out"].mean, c["out"].var, c["target"], c["valid"]),
            "structure": lambda c: structure_loss(c["out"].mean, c["target"], c["valid"]),
        }
        if kind not in fns:
            raise ModelConfigError(f"uncrtaints: loss kind={kind!r}; choose one of {sorted(fns)}")
        add(kind, 1.0, fns[kind])
    elif name == "cafusion":
        cw = float(w("cloud_weight", 2.0))
        if cw <= 1.0:
            raise ModelConfigError(f"cafusion: loss cloud_weight={cw} must be > 1 (cloud pixels weigh more)")
        add("cloud_mse", 1.0, lambda c: cloud_weighted_mse(c["out"].mean, c["target"], c["cloud"], cw, c["valid"]))
        add("ssim", w("ssim", 0.5), lambda c: ssim_loss(c["out"].mean, c["target"], c["valid"]))
    else:
        raise ModelConfigError(f"no loss defined for model {name!r}")
    return ModelLoss(name, cfg, spec, T, vgg)


# --------------------------------------------------------------------------- adversarial


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    # the builtin sum, typed: it starts from int 0, which adding to a tensor leaves unchanged
    return cast(torch.Tensor, sum(terms))


def _as_list(d: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(d) if isinstance(d, (list, tuple)) else [d]


def lsgan_d_loss(d_real: Any, d_fake: Any) -> torch.Tensor:
    return _total(0.5 * (((r - 1) ** 2).mean() + (f**2).mean()) for r, f in zip(_as_list(d_real), _as_list(d_fake)))


def lsgan_g_loss(d_fake: Any) -> torch.Tensor:
    return _total(((f - 1) ** 2).mean() for f in _as_list(d_fake))


def wgan_d_loss(d_real: Any, d_fake: Any) -> torch.Tensor:
    return _total(f.mean() - r.mean() for r, f in zip(_as_list(d_real), _as_list(d_fake)))


def wgan_g_loss(d_fake: Any) -> torch.Tensor:
    return _total(-f.mean() for f in _as_list(d_fake))


def gradient_penalty(
    disc: nn.Module, real: torch.Tensor, fake: torch.Tensor, cond: torch.Tensor | None
) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): (‖∇D(x̂)‖₂ − 1)² at random interpolates x̂ of real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    score = _total(d.sum() for d in _as_list(disc(x, cond)))
    (g,) = torch.autograd.grad(score, x, create_graph=True)
    return ((g.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


class AdversarialLoss:
    """Least-squares (``lsgan``) or Wasserstein with gradient penalty (``wgan-gp``) GAN objectives.

    ``discriminator_loss`` trains D (pass ``fake`` detached); ``generator_loss`` is already multiplied
    by ``weight`` and is added to the content loss. Images are in [0, 1]; discriminators map them.
    """

    KINDS = ("lsgan", "wgan-gp")

    def __init__(self, kind: str = "lsgan", weight: float = 0.01, gp_weight: float = 10.0) -> None:
        if kind not in self.KINDS:
            raise ModelConfigError(f"adversarial={kind!r}; choose one of {self.KINDS}")
        self.kind, self.weight, self.gp_weight = kind, weight, gp_weight

    def discriminator_loss(self, disc: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                           cond: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d_real, d_fake = disc(real, cond), disc(fake, cond)
        if self.kind == "lsgan":
            loss = lsgan_d_loss(d_real, d_fake)
            return loss, {"d_lsgan": loss.detach()}
        wd = wgan_d_loss(d_real, d_fake)
        gp = gradient_penalty(disc, real, fake, cond)
        return wd + self.gp_weight * gp, {"d_wgan": wd.detach(), "d_gp": gp.detach()}

    def generator_loss(
        self, disc: nn.Module, fake: torch.Tensor, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d_fake = disc(fake, cond)
        g = lsgan_g_loss(d_fake) if self.kind == "lsgan" else wgan_g_loss(d_fake)
        return self.weight * g, {"g_adv": g.detach()}


__all__ = [
    "l1_loss",
    "l2_loss",
    "ssim_loss",
    "ms_ssim_loss",
    "cosine_loss",
    "gradient_loss",
    "fft_loss",
    "pearson_loss",
    "structure_loss",
    "gaussian_nll",
    "cloud_weighted_mse",
    "gram",
    "VGGLoss",
    "ModelLoss",
    "build_loss",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "wgan_d_loss",
    "wgan_g_loss",
    "gradient_penalty",
    "AdversarialLoss",
]
