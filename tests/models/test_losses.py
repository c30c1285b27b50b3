"""Losses: hand-computed values, masking, per-model compositions, VGG weights handling, adversarial helpers."""

from __future__ import annotations

import math

import pytest
import torch

from models import losses as L
from models.errors import ModelConfigError
from models.registry import build_model, list_models, model_loss
from tests.models.helpers import make_batch, one_thread, write_random_vgg  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> str:
    return write_random_vgg(tmp_path_factory.mktemp("vgg") / "vgg16_random.pth")


def _img(seed: int, size: int = 64, c: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, c, size, size, generator=g)


@pytest.mark.parametrize(
    "fn",
    [
        L.l1_loss,
        L.l2_loss,
        L.cosine_loss,
        L.gradient_loss,
        L.fft_loss,
        L.ssim_loss,
        L.ms_ssim_loss,
        L.pearson_loss,
        L.structure_loss,
    ],
)
@pytest.mark.parametrize("size", [64, 256])
def test_zero_for_identical_positive_otherwise(fn, size):
    a, b = _img(0, size), _img(1, size)
    assert float(fn(a, a)) == pytest.approx(0.0, abs=1e-5)
    assert float(fn(a, b)) > 1e-3


def test_hand_computed_values():
    t = torch.full((1, 2, 4, 4), 0.5)
    p = t + 0.1
    assert float(L.l1_loss(p, t)) == pytest.approx(0.1)
    assert float(L.l2_loss(p, t)) == pytest.approx(0.01)
    # Pearson: an affine copy correlates perfectly, a negated one anti-correlates
    x = _img(3, 16)
    assert float(L.pearson_loss(2 * x + 1, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.pearson_loss(-x, x)) == pytest.approx(2.0, abs=1e-6)
    y = _img(4, 16)
    r = torch.stack([torch.corrcoef(torch.stack([y[i].flatten(), x[i].flatten()]))[0, 1] for i in range(2)])
    want = 0.9 * (y - x).abs().mean() + 0.001 * (1 - r).mean()
    assert float(L.structure_loss(y, x)) == pytest.approx(float(want), rel=1e-5)
    # Gaussian NLL = mean of ½·(log 2πσ² + (x−μ)²/σ²)
    mu, var, tgt = torch.full((1, 1, 2, 2), 0.2), torch.full((1, 1, 2, 2), 0.04), torch.full((1, 1, 2, 2), 0.4)
    want = 0.5 * (math.log(2 * math.pi * 0.04) + 0.04 / 0.04)
    assert float(L.gaussian_nll(mu, var, tgt)) == pytest.approx(want, rel=1e-5)
    # cosine: parallel spectra cost nothing, orthogonal ones cost 1
    a = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    assert float(L.cosine_loss(3 * a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.cosine_loss(a.flip(1), a)) == pytest.approx(1.0)


def test_cloud_weighted_mse_by_hand():
    t = torch.zeros(1, 1, 1, 2)
    p = torch.tensor([[[[0.1, 0.2]]]])
    cloud = torch.tensor([[[[0.0, 1.0]]]])
    want = (1 * 0.01 + 3 * 0.04) / (1 + 3)
    assert float(L.cloud_weighted_mse(p, t, cloud, 3.0)) == pytest.approx(want)
    assert float(L.cloud_weighted_mse(p, t, None, 3.0)) == pytest.approx(0.025)


def test_invalid_target_pixels_do_not_count():
    t = _img(0, 32)
    p = t.clone()
    p[..., :8] = 1.0  # wrong only where the target is invalid
    valid = torch.ones(2, 1, 32, 32)
    valid[..., :8] = 0
    for fn in (L.l1_loss, L.l2_loss, L.cosine_loss, L.ssim_loss, L.ms_ssim_loss, L.fft_loss):
        assert float(fn(p, t, valid)) == pytest.approx(0.0, abs=1e-5), fn.__name__
        assert float(fn(p, t)) > 1e-3


@pytest.mark.parametrize("name", list_models())
def test_model_loss_total_is_the_sum_of_its_parts(name, vgg_file):
    torch.manual_seed(0)
    m = build_model(name, "small")
    b = make_batch(m.spec, 2, 64)
    loss = model_loss(name, "small", vgg_weights=vgg_file)
    total, parts = loss(m(b), b)
    assert torch.isfinite(total) and total.dim() == 0
    terms = {k: v for k, v in parts.items() if k != "total"}
    assert terms and float(total.detach()) == pytest.approx(float(sum(terms.values())), rel=1e-5)
    if m.trainable:
        total.backward()


def test_perceptual_loss_needs_a_named_weights_file(tmp_path, vgg_file):
    with pytest.raises(ModelConfigError, match="vgg_weights=PATH"):
        model_loss("crgennet", "paper")
    with pytest.raises(ModelConfigError, match="does not exist"):
        model_loss("srggan", "paper", vgg_weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"classifier.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ModelConfigError, match="lacks"):
        model_loss("srggan", "paper", vgg_weights=str(bad))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelConfigError, match="not a loadable state dict"):
        model_loss("srggan", "paper", vgg_weights=str(junk))
    # switching the VGG terms off is explicit, not a silent fallback
    names = set(model_loss("srggan", {"base": "paper", "loss": {"perceptual": 0, "style": 0}}).terms)
    assert names == {"l1", "structural", "gradient"}
    # the CPU preset says so itself: no VGG terms, nothing to load
    assert set(model_loss("srggan", "small").terms) == {"l1", "structural", "gradient"}
    assert "perceptual" not in set(model_loss("crgennet", "small").terms)
    with pytest.raises(ModelConfigError, match="red, green and blue"):
        model_loss("crgennet", {"base": "paper", "optical_bands": ["B8", "B11", "B12"]}, vgg_weights=vgg_file)


def test_vgg_features_load_from_torchvision_keys(vgg_file):
    from models.vgg import load_vgg16

    net = load_vgg16(vgg_file)
    sd = torch.load(vgg_file, weights_only=True)
    assert torch.equal(net.features[0].weight, sd["features.0.weight"])
    assert all(not p.requires_grad for p in net.parameters())
    feats = net(torch.rand(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]


def test_loss_kind_options_for_uncrtaints():
    for kind in ("l1", "l2", "gnll", "structure"):
        assert set(model_loss("uncrtaints", {"base": "small", "loss": {"kind": kind}}).terms) == {kind}
    with pytest.raises(ModelConfigError, match="kind"):
        model_loss("uncrtaints", {"base": "small", "loss": {"kind": "huber"}})
    with pytest.raises(ModelConfigError, match="cloud_weight"):
        model_loss("cafusion", {"base": "small", "loss": {"cloud_weight": 1.0}})


def test_adversarial_objectives_by_hand():
    one, zero = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    assert float(L.lsgan_d_loss([one, one], [zero, zero])) == 0.0
    assert float(L.lsgan_d_loss(zero, one)) == pytest.approx(1.0)
    assert float(L.lsgan_g_loss(zero)) == pytest.approx(1.0)
    assert float(L.wgan_d_loss(one, zero)) == pytest.approx(-1.0)

    class Linear(torch.nn.Module):  # D(x) = <a, x>: its input gradient has norm ‖a‖ everywhere
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.full((1, 1, 2, 2), 1.5))

        def forward(self, x, cond):
            return (x * self.a).sum((1, 2, 3))

    gp = L.gradient_penalty(Linear(), torch.rand(3, 1, 2, 2), torch.rand(3, 1, 2, 2), None)
    assert float(gp.detach()) == pytest.approx((3.0 - 1.0) ** 2)
    with pytest.raises(ModelConfigError, match="adversarial="):
        L.AdversarialLoss("hinge")
