"""pipeline.train.metrics: hand-computed cases and agreement with torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from pipeline.errors import DataError
from pipeline.train.metrics import MetricAccumulator, compute_metrics, image_metrics
from tests.models.helpers import one_thread  # noqa: F401 (fixture)


def _pair(seed: int = 0, size: int = 48, c: int = 13):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(3, c, size, size, generator=g) * 0.8 + 0.1
    p = (t + 0.05 * torch.randn(t.shape, generator=g)).clamp(0, 1)
    return p, t


def test_identical_images_are_perfect_and_psnr_is_infinite():
    _, t = _pair()
    m = compute_metrics(t, t, cloud=torch.ones(3, 1, 48, 48), ndvi_bands=(7, 3))
    assert m["psnr"] == math.inf and m["cloud_psnr"] == math.inf
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["rmse"] == 0 and m["mae"] == 0 and m["ndvi_mae"] == 0
    assert m["sam"] == pytest.approx(0.0, abs=1e-4) and m["corr"] == pytest.approx(1.0)
    acc = MetricAccumulator()
    acc.update(t, t)
    assert acc.compute()["psnr"] == math.inf


def test_constant_offset_by_hand():
    t = torch.full((2, 4, 16, 16), 0.4)
    t[:, :, :8] = 0.6  # some structure so SSIM's variance terms are not degenerate
    m = compute_metrics(t + 0.1, t)
    assert m["rmse"] == pytest.approx(0.1) and m["mae"] == pytest.approx(0.1)
    assert m["psnr"] == pytest.approx(20.0)
    assert m["corr"] == pytest.approx(1.0)


def test_spectral_angle_in_degrees():
    t = torch.zeros(1, 2, 8, 8)
    t[:, 0] = 0.5
    assert compute_metrics(2 * t.clamp(max=0.4), t)["sam"] == pytest.approx(0.0, abs=1e-4)  # same direction
    assert compute_metrics(t.flip(1), t)["sam"] == pytest.approx(90.0)
    p = t.clone()
    p[:, 1] = 0.5  # 45 degrees off
    assert compute_metrics(p, t)["sam"] == pytest.approx(45.0)


def test_agrees_with_torchmetrics_per_image():
    p, t = _pair()
    per = image_metrics(p, t)
    want_psnr = peak_signal_noise_ratio(p.double(), t.double(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    want_ssim = structural_similarity_index_measure(p.double(), t.double(), data_range=1.0, reduction="none")
    assert torch.allclose(per["psnr"], want_psnr, atol=1e-8)
    assert torch.allclose(per["ssim"], want_ssim, atol=1e-5)  # our SSIM map is float32 for speed
    assert compute_metrics(p, t)["psnr"] == pytest.approx(float(want_psnr.mean()))


def test_valid_and_cloud_masks():
    _, t = _pair(1, 32, 4)
    p = t.clone()
    p[..., :8, :] += 0.2  # errors only in the top quarter
    region = torch.zeros(3, 1, 32, 32)
    region[..., :8, :] = 1
    m = compute_metrics(p, t, valid=1 - region)
    assert m["mae"] == 0 and m["psnr"] == math.inf
    m = compute_metrics(p, t, cloud=region)
    assert m["cloud_mae"] == pytest.approx(0.2) and m["mae"] == pytest.approx(0.05)
    assert m["cloud_rmse"] == pytest.approx(0.2)
    # an image without cloud pixels is left out of the cloud means, not scored as 0 or NaN-poisoned
    region[0] = 0
    m = compute_metrics(p, t, cloud=region)
    assert m["cloud_mae"] == pytest.approx(0.2)


def test_ndvi_error_by_hand():
    t = torch.zeros(1, 2, 8, 8)
    t[:, 0], t[:, 1] = 0.6, 0.2  # nir, red -> NDVI 0.5
    p = t.clone()
    p[:, 1] = 0.6  # NDVI 0
    assert compute_metrics(p, t, ndvi_bands=(0, 1))["ndvi_mae"] == pytest.approx(0.5)
    with pytest.raises(DataError, match="ndvi_bands"):
        compute_metrics(p, t, ndvi_bands=(0, 5))


def test_accumulator_is_the_per_image_mean_over_batches():
    p, t = _pair(2)
    acc = MetricAccumulator()
    acc.update(p[:1], t[:1])
    acc.update(p[1:], t[1:])
    got, want = acc.compute(), compute_metrics(p, t)
    assert got["n_images"] == 3
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9), k


def test_bad_shapes_are_data_errors():
    p, t = _pair()
    with pytest.raises(DataError, match="pred"):
        compute_metrics(p[:, :3], t)
    with pytest.raises(DataError, match="at least 6"):
        compute_metrics(p[..., :4, :4], t[..., :4, :4])
    with pytest.raises(DataError, match="valid mask"):
        compute_metrics(p, t, valid=torch.ones(3, 2, 48, 48))


def test_psnr_of_an_empty_cloud_set_is_nan_not_inf():
    # an image without cloud pixels has nothing to score on cloud: it must drop out of cloud means
    from pipeline.train.metrics import image_metrics

    pred = torch.rand(2, 3, 16, 16)
    target = pred + 0.01
    cloud = torch.zeros(2, 1, 16, 16)
    cloud[1, :, :4] = 1
    m = image_metrics(pred, target, cloud=cloud)
    assert torch.isnan(m["cloud_psnr"][0]) and torch.isfinite(m["cloud_psnr"][1])
    assert torch.isfinite(m["psnr"]).all()
