"""Model zoo: registry, specs, and per-model behaviour with the ``small`` configs on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.bands import LANDSAT_SR_BANDS, S1_BANDS, S2_BANDS
from models.crgennet import FusionAttention
from models.errors import ModelConfigError, ModelInputError
from models.layers import SwinBlock, _shift_pad_mask
from models.registry import (
    MODELS,
    adversarial_loss,
    build_model,
    list_models,
    model_info,
    model_loss,
    model_spec,
    resolve_config,
)
from models.spec import InputSpec, ModelOutput
from tests.models.helpers import (  # noqa: F401 (fixtures)
    ALL_MODELS,
    OVERFIT_LR,
    TRAINABLE,
    make_batch,
    one_thread,
    vgg_file_fixture,
)


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, "small")


# --------------------------------------------------------------------------- registry and specs


def test_registry_lists_every_model_with_info():
    assert list_models() == ALL_MODELS
    for name in ALL_MODELS:
        info = model_info(name)
        assert info["name"] == name and info["description"]
        assert InputSpec.from_dict(info["spec_small"]) == model_spec(name, "small")
        assert info["is_gan"] == (name in ("crgennet", "srggan"))
        assert MODELS[name].small and MODELS[name].paper


def test_default_specs_follow_the_product_data():
    crg = model_spec("crgennet", "paper")
    assert crg.optical_bands == S2_BANDS and crg.sar_bands == S1_BANDS
    assert crg.optical_dates == 1 and not crg.includes_target_date
    cm = model_spec("cmsn")
    assert cm.optical_sensor == "landsat" and cm.optical_bands == LANDSAT_SR_BANDS and cm.sar_bands == ()
    assert cm.optical_dates == 3 and cm.includes_target_date and cm.needs_mask
    comp = model_spec("composite")
    assert comp.needs_mask and comp.optical_dates == 3 and comp.sar_bands == ()
    for name, dates in (("cafusion", 1), ("unet", 2)):
        s = model_spec(name, "paper")
        assert s.includes_target_date and s.optical_dates == dates and s.sar_bands == S1_BANDS
    assert model_spec("uncrtaints", "paper").optical_dates == 3
    rgb = model_spec("crgennet", {"optical_bands": ["B4", "B3", "B2"]})
    assert rgb.optical_bands == ("B4", "B3", "B2")
    ls = model_spec("composite", {"optical_sensor": "landsat", "optical_dates": 5})
    assert ls.optical_bands == LANDSAT_SR_BANDS and ls.optical_dates == 5


def test_resolved_config_round_trips_through_json():
    cfg = resolve_config("crgennet", {"base": "small", "optical_bands": ["B4", "B3", "B2"], "loss": {"l1": 1.0}})
    stored = json.loads(json.dumps(cfg))
    assert resolve_config("crgennet", stored) == cfg
    a, b = build_model("crgennet", cfg), build_model("crgennet", stored)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a.spec == b.spec == model_spec("crgennet", stored)
    assert cfg["loss"]["l1"] == 1.0


def test_bad_names_and_keys_are_clear_errors():
    with pytest.raises(ModelConfigError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(ModelConfigError, match="unknown config key.*'depthh'"):
        build_model("unet", {"depthh": 3})
    with pytest.raises(ModelConfigError, match="unknown loss key"):
        model_loss("unet", {"loss": {"l3": 1.0}})
    with pytest.raises(ModelConfigError, match="config='huge'"):
        build_model("unet", "huge")
    with pytest.raises(ModelConfigError, match="optical_dates=2 is not possible"):
        model_spec("crgennet", {"optical_dates": 2})
    with pytest.raises(ModelConfigError, match="sar_bands"):
        model_spec("cmsn", {"sar_bands": ["VV"]})
    with pytest.raises(ModelConfigError, match="unknown or repeated"):
        model_spec("unet", {"optical_bands": ["B4", "SR_B4"]})
    with pytest.raises(ModelConfigError, match="fusion_stride"):
        build_model("crgennet", {"base": "small", "fusion_stride": 3})


def test_batch_that_does_not_match_the_spec_is_rejected():
    m = _build("unet")
    b = make_batch(m.spec, 1, 32)
    b["optical"] = b["optical"][:, :, :4]
    with pytest.raises(ModelInputError, match=r"batch\['optical'\].*13 bands"):
        m(b)
    b = make_batch(m.spec, 1, 32)
    del b["sar"]
    with pytest.raises(ModelInputError, match=r"batch\['sar'\]"):
        m(b)


# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_64_shape_range_and_determinism(name):
    outs = []
    for _ in range(2):
        m = _build(name, seed=7).eval()
        with torch.no_grad():
            outs.append(m(make_batch(m.spec, 2, 64, seed=3)))
    o = outs[0]
    assert isinstance(o, ModelOutput)
    assert o.mean.shape == (2, len(m.spec.out_bands), 64, 64)
    assert torch.isfinite(o.mean).all() and o.mean.min() >= 0 and o.mean.max() <= 1
    assert torch.equal(o.mean, outs[1].mean)
    assert o.mean.std() > 0
    if name == "uncrtaints":
        assert o.var is not None and o.var.shape == o.mean.shape and (o.var > 0).all()
    else:
        assert o.var is None


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_256(name):
    m = _build(name).eval()
    with torch.no_grad():
        o = m(make_batch(m.spec, 2, 256))
    assert o.mean.shape == (2, len(m.spec.out_bands), 256, 256)
    assert torch.isfinite(o.mean).all() and o.mean.min() >= 0 and o.mean.max() <= 1


@pytest.mark.parametrize("name", ["crgennet", "cafusion", "srggan"])
def test_sizes_not_divisible_by_window_or_stride(name):
    m = _build(name).eval()
    with torch.no_grad():
        o = m(make_batch(m.spec, 1, 42))
    assert o.mean.shape[-2:] == (42, 42) and torch.isfinite(o.mean).all()


@pytest.mark.parametrize("name", TRAINABLE)
def test_gradients_reach_every_parameter(name):
    m = _build(name).train()
    b = make_batch(m.spec, 2, 32)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    # one step first: zero-initialised gates (FusionAttention's γ) block gradients upstream only at init
    for _ in range(2):
        opt.zero_grad()
        o = m(b)
        loss = (o.mean - b["target"]).abs().mean() + (0 if o.var is None else o.var.mean())
        for v in o.extras.values():
            loss = loss + (v - b["target"]).abs().mean() if v.shape == b["target"].shape else loss
        loss.backward()
        opt.step()
    dead = [
        n
        for n, p in m.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert not dead, f"{name}: no gradient reaches {dead}"


@pytest.mark.parametrize("name", TRAINABLE)
def test_overfit_one_sample_halves_l1(name, vgg_file):
    torch.manual_seed(0)
    m = build_model(name, "small").train()
    loss_fn = model_loss(name, "small", vgg_weights=vgg_file)
    b = make_batch(m.spec, 1, 32)
    opt = torch.optim.Adam(m.parameters(), lr=OVERFIT_LR[name])
    l1 = []
    for step in range(21):
        o = m(b)
        l1.append(float((o.mean.detach() - b["target"]).abs().mean()))
        if step == 20:
            break
        opt.zero_grad()
        loss_fn(o, b)[0].backward()
        opt.step()
    assert l1[-1] <= 0.5 * l1[0], f"{name}: L1 {l1[0]:.4f} -> {l1[-1]:.4f}"


def test_composite_is_not_trainable_and_has_no_parameters():
    m = _build("composite")
    assert not m.trainable and sum(p.numel() for p in m.parameters()) == 0


# --------------------------------------------------------------------------- composite


def _composite_batch():
    # 3 dates, 1 band, 2 pixels: pixel 0 clear on dates 0 and 1, pixel 1 never clear
    opt = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.9, 0.8]]).view(1, 3, 1, 1, 2)
    mask = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]).view(1, 3, 1, 1, 2)
    return {"optical": opt, "optical_mask": mask}


def test_composite_recent_and_median_by_hand():
    cfg = {"base": "small", "optical_bands": ["B4"]}
    b = _composite_batch()
    recent = build_model("composite", cfg)(b)
    assert recent.mean[0, 0, 0, 0].item() == pytest.approx(0.3)  # latest clear date
    assert recent.mean[0, 0, 0, 1].item() == pytest.approx(0.4)  # never clear: median of all dates
    assert recent.extras["clear_count"].flatten().tolist() == [2.0, 0.0]
    med = build_model("composite", {**cfg, "method": "median", "optical_dates": 3})(b)
    # torch.nanmedian returns the lower middle value for an even count
    assert med.mean[0, 0, 0, 0].item() == pytest.approx(0.1)
    with pytest.raises(ModelConfigError, match="method"):
        build_model("composite", {**cfg, "method": "mean"})


# --------------------------------------------------------------------------- CRGenNet parts


def test_fusion_attention_is_identity_at_init():
    torch.manual_seed(0)
    fa = FusionAttention(8, 8)
    x, y = torch.randn(2, 8, 12, 10), torch.randn(2, 8, 12, 10)
    ox, oy = fa(x, y)
    assert torch.equal(ox, x) and torch.equal(oy, y)


def test_fusion_attention_matches_explicit_shared_softmax():
    torch.manual_seed(0)
    fa = FusionAttention(4, 4)
    with torch.no_grad():
        fa.gamma_x.fill_(1.0)
        fa.gamma_y.fill_(0.5)
    x, y = torch.randn(1, 4, 6, 5), torch.randn(1, 4, 6, 5)
    ox, oy = fa(x, y)

    def tok(t):
        return t.flatten(2).transpose(1, 2)[0]

    q = torch.cat([F.normalize(tok(fa.qx(x)), dim=-1), F.normalize(tok(fa.qy(y)), dim=-1)], -1)
    k = torch.cat([F.normalize(tok(fa.kx(x)), dim=-1), F.normalize(tok(fa.ky(y)), dim=-1)], -1)
    a = torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), -1)
    ref_x = x + (a @ tok(fa.vx(x))).T.reshape(1, 4, 6, 5)
    ref_y = y + 0.5 * (a @ tok(fa.vy(y))).T.reshape(1, 4, 6, 5)
    assert torch.allclose(ox, ref_x, atol=1e-5) and torch.allclose(oy, ref_y, atol=1e-5)


def test_swin_single_padded_window_equals_global_attention_over_real_pixels():
    torch.manual_seed(0)
    blk = SwinBlock(8, 2, ws=8, shift=True).eval()  # 6×6 < one 8×8 window: no shift, padding masked
    x = torch.randn(1, 8, 6, 6)
    out = blk(x)
    t = x.permute(0, 2, 3, 1).reshape(36, 8)
    att = blk.attn
    qkv = att.qkv(blk.norm1(t)).view(36, 3, 2, 4).permute(1, 2, 0, 3)
    idx = torch.tensor([i * 8 + j for i in range(6) for j in range(6)])
    bias = att.bias_table[att.rel_index.reshape(-1)].view(64, 64, 2).permute(2, 0, 1)[:, idx][:, :, idx]
    a = torch.softmax(qkv[0] @ qkv[1].transpose(1, 2) / 2.0 + bias, -1)
    y = att.proj((a @ qkv[2]).transpose(0, 1).reshape(36, 8))
    t = t + y
    t = t + blk.mlp(blk.norm2(t))
    assert torch.allclose(out, t.view(1, 6, 6, 8).permute(0, 3, 1, 2), atol=1e-5)


def test_shifted_window_mask_separates_wrapped_regions():
    m = _shift_pad_mask(8, 8, 8, 8, ws=4, shift=2, device=torch.device("cpu"))
    assert m.shape == (4, 1, 16, 16)
    assert torch.isfinite(m[0]).all()  # top-left window holds one region
    assert torch.isinf(m[3]).sum() > 0  # bottom-right window mixes wrapped regions: blocked
    assert torch.isfinite(torch.diagonal(m[3, 0])).all()


def test_crgennet_coarse_output_and_discriminator_scales():
    m = _build("crgennet").eval()
    b = make_batch(m.spec, 2, 64)
    o = m(b)
    assert o.extras["coarse"].shape == o.mean.shape
    d = m.discriminator()
    scores = d(o.mean, m.condition(b))
    assert [s.shape for s in scores] == [(2, 1, 4, 4)] * 3  # full, ½, ¼ all end at H/16
    assert m.condition(b).shape[1] == 2 * 2 + 13


@pytest.mark.parametrize("name", ["crgennet", "srggan"])
@pytest.mark.parametrize("kind", ["lsgan", "wgan-gp"])
def test_adversarial_steps_give_gradients(name, kind):
    m = _build(name)
    b = make_batch(m.spec, 2, 64)
    d = m.discriminator()
    adv = adversarial_loss(name, {"base": "small", "loss": {"adversarial": kind}})
    o = m(b)
    d_loss, d_parts = adv.discriminator_loss(d, b["target"], o.mean.detach(), m.condition(b))
    d_loss.backward()
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad)
    assert (("d_gp" in d_parts) == (kind == "wgan-gp"))
    g_loss, _ = adv.generator_loss(d, o.mean, m.condition(b))
    g_loss.backward()
    assert torch.isfinite(g_loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert adversarial_loss("unet") is None


def test_crgennet_paper_config_size():
    n = sum(p.numel() for p in build_model("crgennet", "paper").parameters())
    assert abs(n - 41.25e6) / 41.25e6 < 0.05, n
