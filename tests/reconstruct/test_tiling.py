"""Sliding-window stitching: no seams, block independence, tolerance to tile/overlap, keep-clear, resume."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from pipeline.grid import Grid
from pipeline.reconstruct.cog import BlockWriter, RasterSpec
from pipeline.reconstruct.config import ReconstructConfig
from pipeline.reconstruct.tiling import (
    BlockInputs,
    Outputs,
    Progress,
    compute_block,
    hann_weights,
    keep_clear_blend,
    lattice,
    plan_blocks,
    run_blocks,
)

H, W = 700, 1300


def _scene(h: int = H, w: int = W) -> np.ndarray:
    """A smooth field plus texture, like reflectance."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((3, h, w))
    return (0.3 + 0.1 * np.sin(x / 37.0)[None] * np.cos(y / 53.0)[None] + 0.02 * noise).astype(np.float32)


IMG = _scene()


def loader(r0, r1, c0, c1):
    return BlockInputs({"optical": IMG[None, :, r0:r1, c0:c1]}, np.zeros((r1 - r0, c1 - c0), bool))


def identity(batch):
    return batch["optical"][:, -1].numpy(), None


def contextual(batch):
    """Output depends on the whole tile (its mean), as a convnet's does: seams would show if blending were wrong."""
    x = batch["optical"][:, -1].numpy()
    return x + 0.2 * x.mean(axis=(1, 2, 3), keepdims=True), None


def local_conv(batch):
    """A 7x7 blur with zero padding: like a CNN, wrong near its tile's edges and right inside."""
    x = batch["optical"][:, -1]
    return torch.nn.functional.avg_pool2d(x, 7, stride=1, padding=3, count_include_pad=True).numpy(), None


def stitch(pred, cfg, h=H, w=W, load=loader):
    out = np.full((3, h, w), np.nan, np.float32)
    for b in plan_blocks(h, w, cfg.block):
        out[:, b.r0:b.r1, b.c0:b.c1] = compute_block(b, h, w, load, pred, cfg).mean
    return out


def test_weights_and_lattice():
    w = hann_weights(256, 1e-3)
    assert w.shape == (256, 256) and w.min() == pytest.approx(1e-6) and w.max() <= 1.0
    assert w[0, 128] == pytest.approx(1e-3, rel=1e-3)
    np.testing.assert_allclose(w, w[::-1, ::-1])
    starts = lattice(1000, 256, 64)
    assert starts[0] == -64 and np.all(np.diff(starts) == 192) and starts[-1] + 256 >= 1000 + 64
    assert len(lattice(50, 256, 64)) == 1  # AOI smaller than one tile: one reflect-padded tile


def test_identity_model_has_no_seams():
    out = stitch(identity, ReconstructConfig())
    np.testing.assert_allclose(out, IMG, atol=1e-6)
    # across tile borders (every stride from -overlap) the step equals the input's own step
    borders = [c for c in lattice(W, 256, 64) if 0 < c < W]
    step_out = np.abs(np.diff(out, axis=2))[:, :, np.array(borders) - 1]
    step_in = np.abs(np.diff(IMG, axis=2))[:, :, np.array(borders) - 1]
    assert np.abs(step_out - step_in).max() < 1e-6


def test_result_does_not_depend_on_block_size():
    a = stitch(contextual, ReconstructConfig(block=512))
    b = stitch(contextual, ReconstructConfig(block=1024))
    np.testing.assert_array_equal(a, b)


def test_tile_and_overlap_change_result_only_within_tolerance():
    ref = stitch(local_conv, ReconstructConfig(tile=256, overlap=64))
    for tile, overlap in ((256, 32), (128, 32), (192, 96)):
        other = stitch(local_conv, ReconstructConfig(tile=tile, overlap=overlap))
        assert np.abs(other - ref).max() < 5e-3, (tile, overlap)  # 0.5 % reflectance
    # without blending, the tile edges would be off by up to half the signal
    raw = local_conv({"optical": torch.from_numpy(IMG[None, None, :, :256, :256])})[0][0]
    assert np.abs(raw[:, 0, :] - ref[:, 0, :256]).max() > 0.1


def test_small_aoi_and_reflect_edges():
    h, w = 90, 130
    img = _scene(h, w)

    def small(r0, r1, c0, c1):
        return BlockInputs({"optical": img[None, :, r0:r1, c0:c1]}, np.zeros((r1 - r0, c1 - c0), bool))

    out = stitch(identity, ReconstructConfig(), h, w, small)
    np.testing.assert_allclose(out, img, atol=1e-6)


def test_keep_clear_is_bit_exact_and_feathers_reconstructed_side():
    h, w = 300, 300
    observed = _scene(h, w)
    clear = np.ones((h, w), bool)
    clear[100:200, 100:200] = False  # a cloud
    nodata = np.zeros((h, w), bool)
    nodata[:, -3:] = True

    def load(r0, r1, c0, c1):  # the model sees the ground (as if it reconstructed it) but adds a bias
        return BlockInputs({"optical": observed[None, :, r0:r1, c0:c1]}, nodata[r0:r1, c0:c1],
                           observed[:, r0:r1, c0:c1], clear[r0:r1, c0:c1])

    def biased(batch):
        return batch["optical"][:, -1].numpy() + 0.05, None

    cfg = ReconstructConfig(keep_clear=True, feather=8)
    res = compute_block(plan_blocks(h, w, 1024)[0], h, w, load, biased, cfg)
    keep = clear & ~nodata
    assert np.array_equal(res.mean[:, keep].view(np.uint32), observed[:, keep].view(np.uint32))
    assert (res.provenance[keep] == 0).all() and (res.provenance[~clear] == 2).all()  # 2: predicted by a model
    assert (res.provenance[nodata] == 255).all()
    assert np.isnan(res.mean[:, nodata]).all()
    err = res.mean - observed
    # next to the cloud edge the +0.05 bias is removed almost fully, fading out over the feather width
    assert abs(err[0, 100, 150]) < 0.006 and abs(err[0, 104, 150] - 0.05 * 5 / 9) < 1e-5
    assert abs(err[0, 150, 150] - 0.05) < 1e-6  # deep inside the cloud the prediction is untouched
    assert np.abs(err[:, 100, 110:190]).max() < 0.006  # no 0.05 step at the seam


def test_keep_clear_blend_without_clear_pixels_is_prediction():
    pred = np.full((2, 10, 10), 0.3, np.float32)
    out = keep_clear_blend(pred, np.zeros_like(pred), np.zeros((10, 10), bool), 4)
    np.testing.assert_array_equal(out, pred)


def _outputs(tmp_path, grid, resume=False):
    mean = BlockWriter(tmp_path / "out.tif", grid, RasterSpec.reflectance(["B4", "B3", "B2"]), resume=resume)
    prov = BlockWriter(tmp_path / "out_provenance.tif", grid, RasterSpec.provenance(), resume=resume)
    return Outputs(mean, prov)


def test_interrupted_run_leaves_no_cog_and_resumes_by_blocks(tmp_path):
    grid = Grid("EPSG:32649", Affine(10, 0, 500_000, 0, -10, 3_800_000), W, H)
    cfg = ReconstructConfig(block=512)
    n_blocks = len(plan_blocks(H, W, 512))
    calls = []

    def counted(batch):
        calls.append(1)
        return contextual(batch)

    def crash_after_two(res):
        if res.block.index == 1:
            raise KeyboardInterrupt

    outs = _outputs(tmp_path, grid)
    progress = Progress(tmp_path / ".out.progress.json", "fp1")
    with pytest.raises(KeyboardInterrupt):
        run_blocks(H, W, loader, counted, cfg, outs, progress, on_block=crash_after_two)
    assert not (tmp_path / "out.tif").exists() and not (tmp_path / "out_provenance.tif").exists()

    progress = Progress(tmp_path / ".out.progress.json", "fp1")
    assert progress.resumed and len(progress.done) == 2
    outs = _outputs(tmp_path, grid, resume=True)
    n = run_blocks(H, W, loader, counted, cfg, outs, progress)
    assert n == n_blocks - 2
    for w in outs.all():
        w.commit()
    progress.clear()
    with rasterio.open(tmp_path / "out.tif") as ds:
        resumed = ds.read()
    np.testing.assert_array_equal(resumed, stitch(contextual, cfg))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif", "out_provenance.tif"]


def test_progress_of_another_run_is_ignored(tmp_path):
    p = Progress(tmp_path / "p.json", "a")
    p.mark("0_0")
    assert Progress(tmp_path / "p.json", "a").done == {"0_0"}
    assert Progress(tmp_path / "p.json", "b").done == set()
