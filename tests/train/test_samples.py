"""Raw cube sample -> model batch per InputSpec, synthetic clouds, flips; plus the toy raw samples other tests use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.spec import InputSpec
from pipeline.errors import DataError
from pipeline.masking.codes import MaskClass
from pipeline.sensors import S2_BANDS
from pipeline.train.samples import AssembledDataset, AugmentConfig, assemble_sample, simulated_cloud


def toy_raw_samples(
    n: int = 4, dates: int = 3, size: int = 32, seed: int = 0, cloudy_inputs: bool = True
) -> list[dict]:
    """Raw samples with the CubeDataset contract: a smooth ground scene, slowly changing, S1 correlated to it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for i in range(n):
        base = 0.15 + 0.1 * np.sin(2 * np.pi * (xx * rng.uniform(0.5, 2) + yy * rng.uniform(0.5, 2)))
        bands = np.linspace(0.6, 1.4, 13, dtype=np.float32)[:, None, None]
        s2 = np.empty((dates, 13, size, size), np.float32)
        s1 = np.empty((dates, 2, size, size), np.float32)
        masks = np.zeros((dates, size, size), np.uint8)
        for d in range(dates):
            ground = base * bands * (1 + 0.05 * d)
            ground[:, : size // 4 * (d + 1) // dates] *= 0.5  # a "flood" that grows with time
            s2[d] = np.clip(ground, 0, 1)
            s1[d, 0] = np.clip(0.5 + (ground[7] - 0.15), 0, 1)
            s1[d, 1] = np.clip(0.4 + 0.5 * (ground[7] - 0.15), 0, 1)
            if cloudy_inputs and d < dates - 1:
                cloud = simulated_cloud(rng, size, size, 0.3) > 0.5
                masks[d][cloud] = MaskClass.CLOUD
                s2[d][:, cloud] = 0.8
        valid = np.ones((dates, size, size), bool)
        out.append({"s2": s2, "s2_mask": masks, "s1": s1, "valid": valid, "sample_id": f"toy_{seed}_{i}"})
    return out


RGB = ("B4", "B3", "B2")


def test_target_date_model_gets_cloudy_copy_of_reference():
    raw = toy_raw_samples(1, dates=3)[0]
    spec = InputSpec(optical_bands=S2_BANDS, optical_dates=2, includes_target_date=True, sar_bands=("VV", "VH"))
    s = assemble_sample(raw, spec, train=False, seed=0, index=0)
    assert s["optical"].shape == (2, 13, 32, 32)
    assert s["optical_mask"].shape == (2, 1, 32, 32)
    assert s["sar"].shape == (3, 2, 32, 32)
    assert s["target"].shape == (13, 32, 32)
    target = torch.from_numpy(raw["s2"][-1])
    assert torch.equal(s["target"], target)
    cloudy = s["optical"][-1]
    cloud = s["optical_mask"][-1, 0].bool()
    assert 0.02 < cloud.float().mean() < 0.98
    # outside the pasted cloud the reference is untouched; under it the input differs from the truth
    assert torch.allclose(cloudy[:, ~cloud], target[:, ~cloud])
    assert (cloudy[:, cloud] - target[:, cloud]).abs().mean() > 0.05
    assert torch.equal(s["cloud"], s["optical_mask"][-1, 0])
    # evaluation draws are reproducible, training draws change with the epoch
    again = assemble_sample(raw, spec, train=False, seed=0, index=0)
    assert torch.equal(again["optical"], s["optical"])
    fixed = AugmentConfig(flips=False, rot90=False)
    e0 = assemble_sample(raw, spec, train=True, seed=0, epoch=0, index=0, augment=fixed)
    e1 = assemble_sample(raw, spec, train=True, seed=0, epoch=1, index=0, augment=fixed)
    assert not torch.equal(e0["optical_mask"], e1["optical_mask"])


def test_real_cloud_masks_come_from_other_dates():
    raw = toy_raw_samples(1, dates=3, seed=3)[0]
    spec = InputSpec(optical_bands=RGB, optical_dates=1, includes_target_date=True)
    cfg = AugmentConfig(cloud_source="real", shadow=False, thin_prob=0.0)
    s = assemble_sample(raw, spec, train=False, index=0, augment=cfg)
    cloud = s["optical_mask"][0, 0].bool().numpy()
    candidates = [(raw["s2_mask"][d] == MaskClass.CLOUD) for d in range(2)]
    # the feathered real mask covers one of the earlier dates' clouds
    assert any(c[c].size and cloud[c].all() for c in candidates)
    assert "sar" not in s


def test_multitemporal_model_sees_earlier_dates_as_observed():
    raw = toy_raw_samples(1, dates=3)[0]
    spec = InputSpec(optical_bands=RGB, optical_dates=2, includes_target_date=False, sar_bands=("VV", "VH"))
    s = assemble_sample(raw, spec, train=False, index=0)
    idx = [S2_BANDS.index(b) for b in RGB]
    for t in range(2):
        m = raw["s2_mask"][t] != 0
        assert torch.equal(s["optical_mask"][t, 0].bool(), torch.from_numpy(m))
        assert torch.allclose(s["optical"][t], torch.from_numpy(raw["s2"][t][idx]))
    assert torch.equal(s["sar"], torch.from_numpy(raw["s1"][[0, 1, 2]]))
    assert torch.equal(s["target"], torch.from_numpy(raw["s2"][2][idx]))


def test_invalid_pixels_are_masked_not_observed():
    raw = toy_raw_samples(1, dates=3)[0]
    raw["valid"][1, :5, :5] = False
    raw["s2"][1, :, :5, :5] = np.nan
    raw["valid"][2, -3:, -3:] = False
    spec = InputSpec(optical_bands=RGB, optical_dates=2, includes_target_date=False)
    s = assemble_sample(raw, spec, train=False, index=0)
    assert torch.isfinite(s["optical"]).all()
    assert (s["optical"][1, :, :5, :5] == 0).all() and (s["optical_mask"][1, 0, :5, :5] == 1).all()
    assert (s["target_valid"][0, -3:, -3:] == 0).all() and s["target_valid"][0, 10, 10] == 1


def test_flips_and_rotations_are_consistent():
    raw = toy_raw_samples(1, dates=2)[0]
    spec = InputSpec(optical_bands=RGB, optical_dates=1, includes_target_date=False, sar_bands=("VV",))
    plain = assemble_sample(raw, spec, train=False, index=0)
    seen = set()
    for epoch in range(12):
        s = assemble_sample(raw, spec, train=True, epoch=epoch, index=0)
        # find the dihedral transform that maps the plain target onto this one and check every array follows it
        for k in range(4):
            for flip in (False, True):
                t = plain["target"].flip(-1) if flip else plain["target"]
                t = torch.rot90(t, k, dims=(-2, -1))
                if torch.equal(t, s["target"]):
                    seen.add((k, flip))
                    for name in ("optical", "sar", "optical_mask"):
                        p = plain[name].flip(-1) if flip else plain[name]
                        assert torch.equal(torch.rot90(p, k, dims=(-2, -1)), s[name]), name
                    break
            else:
                continue
            break
        else:
            pytest.fail("augmented target is not a flip/rotation of the plain one")
    assert len(seen) > 2


def test_clear_errors_for_missing_bands_dates_and_sar():
    raw = toy_raw_samples(1, dates=2)[0]
    with pytest.raises(DataError, match="earlier"):
        assemble_sample(raw, InputSpec(optical_bands=RGB, optical_dates=2, includes_target_date=False), train=False)
    with pytest.raises(DataError, match="B99"):
        assemble_sample(raw, InputSpec(optical_bands=("B99",)), train=False)
    raw["s1"][1, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="toy_0_0.*SAR"):
        assemble_sample(raw, InputSpec(optical_bands=RGB, sar_bands=("VV",)), train=False)


def test_dataset_wrapper_collates():
    spec = InputSpec(optical_bands=RGB, optical_dates=2, includes_target_date=True, sar_bands=("VV", "VH"))
    ds = AssembledDataset(toy_raw_samples(4), spec, train=True, seed=1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["optical"].shape == (4, 2, 3, 32, 32)
    assert batch["sample_id"] == [f"toy_0_{i}" for i in range(4)]


def test_random_crop_in_training_only():
    raw = toy_raw_samples(1, dates=3, size=32)[0]
    spec = InputSpec(optical_bands=RGB, optical_dates=2, includes_target_date=False, sar_bands=("VV",))
    cfg = AugmentConfig(crop=16, flips=False, rot90=False)
    full = assemble_sample(raw, spec, train=False, index=0, augment=cfg)
    assert full["target"].shape == (3, 32, 32)
    crops = [assemble_sample(raw, spec, train=True, epoch=e, index=0, augment=cfg) for e in range(4)]
    for c in crops:
        assert c["target"].shape == (3, 16, 16) and c["sar"].shape == (3, 1, 16, 16) and c["cloud"].shape == (16, 16)
        # the crop is a window of the full sample, the same window in every array
        hits = [(y, x) for y in range(17) for x in range(17)
                if torch.equal(full["target"][:, y:y + 16, x:x + 16], c["target"])]
        assert hits
        y, x = hits[0]
        assert torch.equal(full["optical_mask"][..., y:y + 16, x:x + 16], c["optical_mask"])
    assert len({tuple(c["target"].flatten()[:5].tolist()) for c in crops}) > 1
