"""The ``refine`` model: a learned correction of the harmonized composite, on self-supervised samples.

Untrained it is the composite, pixel for pixel; training moves only the pixels the fill took from another date;
the composite it corrects is the fill ``reconstruct`` runs, built from the sample's own earlier dates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.registry import build_model, model_spec
from pipeline.errors import DataError
from pipeline.harmonize import PROVENANCE_FILLED, FillConfig, GroundChangeArrays, fill_gaps, shadow_bands
from pipeline.masking.codes import MaskClass
from pipeline.normalize import unit_to_sar
from pipeline.train.checkpoint import load_checkpoint, meta_fill, read_meta
from pipeline.train.config import AugmentConfig, TrainConfig, TrainConfigError
from pipeline.train.loop import train
from pipeline.train.samples import assemble_sample, paste_clouds
from tests.train.test_samples import toy_raw_samples

SMALL = {"base": "small", "base_channels": 8, "depth": 1}


def raw_samples(n: int, seed: int) -> list[dict]:
    out = toy_raw_samples(n, dates=4, size=32, seed=seed)
    for raw in out:
        raw["dates"] = np.array([18800, 18810, 18820, 18830])  # days since 1970: ten days apart
    return out


def batch_of(sample: dict) -> dict[str, torch.Tensor]:
    return {k: v[None] for k, v in sample.items() if torch.is_tensor(v) and v.dim() > 0}


def test_untrained_refine_reproduces_the_composite_exactly():
    raw = raw_samples(1, seed=3)[0]
    model = build_model("refine", SMALL).eval()
    sample = assemble_sample(raw, model.spec, train=False, seed=0, index=0)
    with torch.no_grad():
        out = model(batch_of(sample)).mean[0]
    assert torch.equal(out, sample["composite"])
    # the composite is the fill of the cloudy target from the sample's earlier dates, as reconstruct runs it
    cloudy = sample["optical"][-1].numpy()
    clear = sample["optical_mask"][-1, 0].numpy() < 0.5
    history = [(float(30 - 10 * d), np.where(raw["valid"][d][None], raw["s2"][d], np.nan),
                raw["s2_mask"][d] == MaskClass.CLEAR) for d in range(3)]
    bands = shadow_bands("s2_l1c", model.spec.optical_bands)
    assert bands is not None  # the missed-shadow check (when configured) runs in training as in reconstruct
    # and with the S1 of each date, which tests a flagged shadow for a changed ground as reconstruct's S1 does
    s1 = unit_to_sar(raw["s1"], axis=1)
    change = GroundChangeArrays([s1[3]], {float(30 - 10 * d): s1[d] for d in range(3)})
    want = fill_gaps(cloudy, clear, history, FillConfig(), shadow_bands=bands, ground_change=change)
    assert want.shadow_check == "optical+S1"
    # where no earlier date was clear the fill has no value: the composite keeps the cloudy observation and says so
    none = ~np.isfinite(want.image).all(axis=0)
    np.testing.assert_array_equal(sample["composite"].numpy(), np.clip(np.where(none, cloudy, want.image), 0, 1))
    np.testing.assert_array_equal(sample["composite_info"][1].numpy(), none)
    filled = want.provenance == PROVENANCE_FILLED
    assert filled.mean() > 0.05
    np.testing.assert_array_equal(sample["composite_info"][0].numpy(), filled)
    assert np.abs(sample["composite"].numpy()[:, filled] - raw["s2"][-1][:, filled]).mean() < 0.02


def test_a_few_training_steps_move_only_the_pixels_the_fill_took_from_an_earlier_date(tmp_path):
    cfg = TrainConfig(model="refine", model_params=SMALL, epochs=3, batch_size=4, num_workers=0, seed=0,
                      optimizer={"lr": 3e-3}, patience=None, composite_fill={"max_age_days": 60})
    res = train(cfg, None, tmp_path / "run", train_data=raw_samples(8, seed=1), val_data=raw_samples(4, seed=2),
                progress=False)
    # the fill the model learnt to correct travels with it; resuming on another one would mix two targets
    assert meta_fill(read_meta(tmp_path / "run")) == FillConfig(max_age_days=60)
    # older runs read as what they were trained on: before the record no shadow check, before its S1 test optical
    # only, before the class offsets none
    assert meta_fill({"train": {}}) == FillConfig(shadow_check_px=0, class_offsets=0)
    assert meta_fill({"train": {"composite_fill": {"max_age_days": 60}}}) == FillConfig(
        max_age_days=60, shadow_check_px=0, class_offsets=0)
    assert meta_fill({"train": {"composite_fill": {"shadow_check_px": 40}}}) == FillConfig(
        shadow_sar_change_db=None, class_offsets=0)
    assert meta_fill({"train": {"composite_fill": FillConfig().model_dump()}}) == FillConfig()
    with pytest.raises(TrainConfigError, match=r"composite_fill max_age_days 60 \(this config: 90\); resume with the "
                                               r"same composite_fill"):
        train(cfg.model_copy(update={"epochs": 4, "composite_fill": FillConfig()}), None, tmp_path / "run",
              resume=True, train_data=raw_samples(8, seed=1), val_data=raw_samples(4, seed=2), progress=False)
    # epoch 0 is the untrained model, i.e. the composite: the baseline the checkpoint has to beat
    assert res.history[0]["epoch"] == 0 and "cloud_psnr" in res.history[0]
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    model, meta = load_checkpoint(tmp_path / "run")
    assert meta["spec"]["needs_composite"] and meta["epoch"] == res.best_epoch
    assert res.best_value >= res.history[0]["cloud_psnr"]

    # fine-tuned from that run, epoch 0 scores its weights and, next to them, the composite they correct
    tuned = train(cfg.model_copy(update={"epochs": 1, "init_from": str(tmp_path / "run")}), None, tmp_path / "tuned",
                  train_data=raw_samples(8, seed=1), val_data=raw_samples(4, seed=2), progress=False)
    assert tuned.history[0]["cloud_psnr"] == pytest.approx(res.best_value, abs=1e-4)
    assert tuned.history[0]["composite_cloud_psnr"] == pytest.approx(res.history[0]["cloud_psnr"], abs=1e-6)

    trained = build_model("refine", SMALL).eval()
    with torch.no_grad():  # an arbitrary correction: what a trained head does
        trained.net.head.bias.fill_(0.05)
    sample = assemble_sample(raw_samples(1, seed=5)[0], trained.spec, train=False, seed=0, index=0)
    with torch.no_grad():
        out = trained(batch_of(sample)).mean[0]
    filled = sample["composite_info"][0] > 0
    assert filled.any() and not filled.all()
    assert torch.equal(out[:, ~filled], sample["composite"][:, ~filled])
    assert torch.allclose(out[:, filled], (sample["composite"][:, filled] + 0.05).clamp(0, 1))


def test_the_composite_is_made_with_the_fill_configuration_given():
    raw = raw_samples(1, seed=5)[0]
    spec = model_spec("refine", SMALL)
    default = assemble_sample(raw, spec, train=False, seed=0, index=0)
    recent = assemble_sample(raw, spec, train=False, seed=0, index=0, fill=FillConfig(max_age_days=15))
    age = 2  # composite_info: filled, no clear observation, source age / 100
    assert default["composite_info"][age].max() > 0.15  # the sample's dates are 10, 20 and 30 days before
    assert 0 < recent["composite_info"][age].max() <= 0.10
    assert recent["composite_info"][1].sum() > default["composite_info"][1].sum()


def test_a_sample_without_dates_is_refused_in_one_line():
    raw = raw_samples(1, seed=0)[0]
    del raw["dates"]
    with pytest.raises(DataError, match=r"sample toy_0_0 has no 'dates': a refine model's composite needs each "
                                        r"date's day"):
        assemble_sample(raw, model_spec("refine", SMALL), train=False, seed=0, index=0)


def test_a_real_cloud_can_bring_its_own_pixels():
    rng = np.random.default_rng(0)
    clear = np.full((3, 16, 16), 0.1, np.float32)
    masks = np.zeros((1, 16, 16), np.uint8)
    masks[0, 2:8, 2:10] = MaskClass.CLOUD
    masks[0, 9:11, 2:10] = MaskClass.SHADOW
    donor = rng.uniform(0.3, 0.9, (1, 3, 16, 16)).astype(np.float32)
    cfg = AugmentConfig(cloud_source="real", donor_pixels_prob=1.0)
    cloudy, hidden = paste_clouds(rng, clear, np.array([490.0, 560.0, 665.0]), masks, cfg, donor)
    np.testing.assert_array_equal(hidden, masks[0] != MaskClass.CLEAR)
    np.testing.assert_array_equal(cloudy[:, hidden], donor[0][:, hidden])
    np.testing.assert_array_equal(cloudy[:, ~hidden], clear[:, ~hidden])


def test_a_refine_model_is_validated_on_the_cloud_pixels_its_fill_covers():
    # where no earlier date was clear, model and composite both hold the cloudy observation and reconstruct writes no
    # data: scored, those pixels swamp the score and checkpoint selection cannot see the correction
    from torch.utils.data import DataLoader

    from pipeline.train.evaluate import image_scores, mean_scores, scored_cloud, validate
    from pipeline.train.runtime import Runtime
    from pipeline.train.samples import AssembledDataset

    model = build_model("refine", SMALL).eval()
    loader = DataLoader(AssembledDataset(raw_samples(4, seed=2), model.spec, train=False, seed=0), batch_size=4)
    batch = next(iter(loader))
    filled = batch["composite_info"][:, 0] > 0
    cloud = batch["cloud"] > 0
    assert (cloud & filled).any() and (cloud & ~filled).any()
    np.testing.assert_array_equal(scored_cloud(batch, model.spec).numpy(), (cloud & filled).numpy())

    scores, _ = validate(model, loader, Runtime.local())
    valid = batch["target_valid"]
    on_filled = mean_scores(image_scores(batch["composite"], batch["target"], valid, (cloud & filled).float()))
    on_all = mean_scores(image_scores(batch["composite"], batch["target"], valid, cloud.float()))
    assert scores["cloud_psnr"] == pytest.approx(on_filled["cloud_psnr"], abs=1e-4)
    assert on_filled["cloud_psnr"] > on_all["cloud_psnr"] + 3.0  # the unfilled pixels are the cloud itself

    # a model that fills every pixel itself is scored on every cloud pixel
    unet = build_model("unet", SMALL)
    assert scored_cloud(batch, unet.spec) is batch["cloud"]
