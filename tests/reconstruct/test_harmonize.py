"""Training-free gap filling (pipeline.harmonize): harmonization, masks, age limit, seams, real series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from pipeline.errors import DataError
from pipeline.harmonize import (
    AGE_NONE,
    PROVENANCE_FILLED,
    PROVENANCE_NO_CLEAR,
    PROVENANCE_NODATA,
    PROVENANCE_OBSERVED,
    FillConfig,
    GroundChangeArrays,
    fill_gaps,
    shadow_bands,
)

H = W = 96


def _texture(bands: int = 4, seed: int = 0) -> np.ndarray:
    """Reflectance-like fields with structure at several scales, different per band."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(bands):
        f = ndimage.gaussian_filter(rng.standard_normal((H, W)), 3)
        f += 0.3 * ndimage.gaussian_filter(rng.standard_normal((H, W)), 1)
        f = (f - f.min()) / (f.max() - f.min())
        out.append(0.05 + 0.05 * b + 0.25 * f)
    return np.stack(out).astype(np.float32)


def _disk(cy: int, cx: int, r: float) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def _seam_ratio(image: np.ndarray, filled: np.ndarray) -> float:
    """Mean |step| between neighbours across the fill border over the mean |step| between observed neighbours."""
    border, inside = [], []
    for ax in (1, 2):
        step = np.abs(np.diff(image, axis=ax)).mean(axis=0)
        a, b = (filled[:, :-1], filled[:, 1:]) if ax == 2 else (filled[:-1], filled[1:])
        border.append(step[a != b])
        inside.append(step[~a & ~b])
    return float(np.concatenate(border).mean() / np.concatenate(inside).mean())


GAIN = np.array([1.3, 0.8, 1.1, 1.6], dtype=np.float32)[:, None, None]
OFFSET = np.array([0.02, -0.01, 0.0, 0.03], dtype=np.float32)[:, None, None]


@pytest.mark.parametrize("fit", ["local", "global"])
def test_known_linear_change_is_undone_exactly(fit: str) -> None:
    old = _texture()
    truth = GAIN * old + OFFSET  # the target date = a per-band linear radiometric change of the old date
    cloud = _disk(40, 50, 18) | _disk(75, 20, 9)
    target = np.where(cloud[None], 0.8, truth).astype(np.float32)
    res = fill_gaps(target, ~cloud, [(12, old, np.ones((H, W), bool))], FillConfig(fit=fit))
    assert np.all(res.provenance[cloud] == PROVENANCE_FILLED) and np.all(res.source_age_days[cloud] == 12)
    np.testing.assert_allclose(res.image, truth, atol=2e-5)
    (note,) = res.notes
    assert note["harmonization"] == fit and note["age_days"] == 12
    np.testing.assert_allclose(note["gain"], GAIN.ravel(), atol=1e-3)
    # without harmonization the same case is off by the radiometric change
    raw = fill_gaps(target, ~cloud, [(12, old, np.ones((H, W), bool))], FillConfig(fit="none"))
    assert np.abs(raw.image - truth)[:, cloud].mean() > 0.02


def test_a_changed_surface_is_not_fitted_onto_every_filled_pixel() -> None:
    """A flood: most of the target's clear pixels turned to water since the fill date. A line fitted on them would
    darken the whole fill (gains clamp at gain_min); the correlation guard refuses it, notes why, and the fill
    stays the old date's radiometry away from the water while windows next to it follow their own fit."""
    old = _texture(seed=3)
    cloud = _disk(48, 48, 20)
    flooded = ~cloud & ~_disk(48, 48, 34)  # everything clear around the cloud is now water
    rng = np.random.default_rng(1)
    water = (0.03 + 0.01 * rng.random((4, H, W))).astype(np.float32)
    target = np.where(flooded[None], water, old).astype(np.float32)
    target[:, cloud] = 0.8
    history = [(10, old, np.ones((H, W), bool))]
    res = fill_gaps(target, ~cloud, history, FillConfig(fit="global"))
    (note,) = res.notes
    assert note["harmonization"] == "identity" and "surface changed" in note["not_fitted_directly"]
    core = _disk(48, 48, 12)  # hidden, far from the water
    np.testing.assert_allclose(res.image[:, core], old[:, core], atol=1e-6)
    forced = fill_gaps(target, ~cloud, history, FillConfig(fit="global", min_correlation=-1.0))
    assert forced.notes[0]["harmonization"] == "global"
    assert np.abs(forced.image[:, core] - old[:, core]).mean() > 0.02  # the flood carried onto dry land
    local = fill_gaps(target, ~cloud, history, FillConfig())
    assert local.notes[0]["harmonization"] == "identity" and "local_fit" in local.notes[0]
    assert np.abs(local.image[:, core] - old[:, core]).mean() < 0.01


def test_thin_cloud_the_mask_missed_beside_the_hole_does_not_bend_the_local_fit() -> None:
    """A strip of thin cloud beside the hole that the target's mask calls clear: its pixels fit no line. The windows
    reaching into it leave them out (``window_outlier_sigma``) and fill the hidden pixels next to it with the
    radiometry of the rest; keeping them brightens those fills. A milder change (a field 0.05 brighter) is kept:
    such changes usually continue under the hole."""
    old = _texture(seed=5)
    x = np.linspace(0.0, 1.0, W, dtype=np.float32)[None, None, :]
    truth = old * (1.0 + 0.1 * x) + 0.01  # a radiometric change that varies across the scene: the local fit's job
    cloud = _disk(48, 48, 16)
    strip = np.zeros((H, W), bool)
    strip[30:66, 66:74] = True  # clear by the mask, right beside the cloud's east edge
    strip &= ~cloud
    history = [(10, old, np.ones((H, W), bool))]
    near = cloud & ndimage.binary_dilation(strip, iterations=8)
    assert near.sum() > 50

    def error(brighter: float, cfg: FillConfig) -> float:
        target = truth.copy()
        target[:, strip] += brighter
        target[:, cloud] = 0.8
        res = fill_gaps(target, ~cloud, history, cfg)
        return float(np.abs(res.image - truth)[:, near].mean())

    robust, bent = error(0.3, FillConfig()), error(0.3, FillConfig(window_outlier_sigma=None))
    assert robust < 0.3 * bent and robust < 0.01 and bent > 0.02
    # the milder change is followed as before
    assert error(0.05, FillConfig()) == pytest.approx(error(0.05, FillConfig(window_outlier_sigma=None)), abs=1e-7)


def test_observed_pixels_away_from_the_border_are_returned_exactly() -> None:
    cfg = FillConfig()
    truth = _texture(seed=1)
    cloud = _disk(48, 48, 15)
    target = np.where(cloud[None], 0.9, truth).astype(np.float32)
    res = fill_gaps(target, ~cloud, [(5, 0.7 * _texture(seed=2), np.ones((H, W), bool))], cfg)
    dist = ndimage.distance_transform_edt(~cloud)
    far = dist > cfg.buffer_px + cfg.feather_px + 1
    assert np.array_equal(res.image[:, far], target[:, far])
    assert np.all(res.provenance[far] == PROVENANCE_OBSERVED) and np.all(res.source_age_days[far] == 0)
    ring = (dist > 0) & (dist <= cfg.buffer_px)  # the target's own mask misses the fringe: buffered away
    assert np.all(res.provenance[ring] == PROVENANCE_FILLED)


@pytest.mark.parametrize("history_buffer_px", [0, 3])
def test_never_filled_from_a_pixel_the_mask_calls_not_clear(history_buffer_px: int) -> None:
    truth = _texture(seed=3)
    hole = _disk(48, 48, 30)
    target = np.where(hole[None], np.nan, truth).astype(np.float32)  # nodata is hidden too
    recent_cloud = _disk(40, 40, 14)
    recent = np.where(recent_cloud[None], 0.95, truth * 1.1).astype(np.float32)
    older_cloud = _disk(60, 60, 10)
    older = np.where(older_cloud[None], 0.9, truth * 0.9).astype(np.float32)
    history = [(30, older, ~older_cloud), (8, recent, ~recent_cloud), (50, truth, np.ones((H, W), bool))]
    res = fill_gaps(target, np.ones((H, W), bool), history, FillConfig(history_buffer_px=history_buffer_px))
    age = res.source_age_days
    assert not np.any((age == 8) & recent_cloud) and not np.any((age == 30) & older_cloud)
    grown = ndimage.distance_transform_edt(~recent_cloud) <= history_buffer_px  # a disk of that radius
    assert not np.any((age == 8) & grown)  # the eroded clear mask keeps the fringe out as well
    hidden = ndimage.distance_transform_edt(~hole) <= FillConfig().buffer_px
    assert np.all(age[hidden & ~grown] == 8)  # the most recent clear date wins
    assert np.all(np.isin(age[recent_cloud & ~older_cloud], [30]))  # then the next one back
    assert np.all(age[recent_cloud & older_cloud] == 50)
    assert np.isfinite(res.image).all() and res.image[:, hole].max() < 0.6  # no cloud value anywhere


def test_history_buffer_falls_back_to_the_unbuffered_mask_only_when_nothing_else_is_clear() -> None:
    truth = _texture(seed=10)
    hole = _disk(48, 48, 20)
    target = np.where(hole[None], 0.9, truth).astype(np.float32)
    only_cloud = _disk(48, 48, 12)  # the single history date is cloudy in the middle of the target's hole
    history = [(10, np.where(only_cloud[None], 0.95, truth), ~only_cloud)]
    cfg = FillConfig(history_buffer_px=3)
    res = fill_gaps(target, ~hole, history, cfg)
    fringe = (ndimage.distance_transform_edt(~only_cloud) <= 3) & ~only_cloud
    assert np.all(res.provenance[fringe & hole] == PROVENANCE_FILLED)  # clear by its mask: used, as a last resort
    assert res.notes[0]["pixels_within_history_buffer"] == int((fringe & hole).sum())
    assert np.all(res.provenance[only_cloud] == PROVENANCE_NO_CLEAR)  # never the cloud itself
    strict = fill_gaps(target, ~hole, history, FillConfig(history_buffer_px=3, history_buffer_fallback=False))
    assert np.all(strict.provenance[fringe & hole] == PROVENANCE_NO_CLEAR)


def test_buffer_ring_with_nothing_to_fill_from_keeps_the_observation() -> None:
    truth = _texture(seed=11)
    cloud = _disk(48, 48, 15)
    target = np.where(cloud[None], 0.9, truth).astype(np.float32)
    res = fill_gaps(target, ~cloud, [], FillConfig(buffer_px=3))
    assert np.all(res.provenance[cloud] == PROVENANCE_NO_CLEAR) and np.isnan(res.image[:, cloud]).all()
    assert np.array_equal(res.image[:, ~cloud], target[:, ~cloud]) and not res.notes


def test_max_age_gives_no_clear_class_and_nan() -> None:
    truth = _texture(seed=4)
    cloud = _disk(48, 48, 20)
    target = np.where(cloud[None], 0.9, truth).astype(np.float32)
    cloudy_again = _disk(48, 48, 26)
    history = [(10, np.where(cloudy_again[None], 0.9, truth), ~cloudy_again), (45, truth, np.ones((H, W), bool))]
    short = fill_gaps(target, ~cloud, history, FillConfig(max_age_days=30))
    assert np.all(short.provenance[cloud] == PROVENANCE_NO_CLEAR)
    assert np.isnan(short.image[:, cloud]).all() and np.all(short.source_age_days[cloud] == AGE_NONE)
    long = fill_gaps(target, ~cloud, history, FillConfig(max_age_days=60))
    assert np.all(long.provenance[cloud] == PROVENANCE_FILLED) and np.all(long.source_age_days[cloud] == 45)
    assert np.isfinite(long.image).all()


def test_nodata_everywhere_is_its_own_class() -> None:
    truth = _texture(seed=5)
    outside = np.zeros((H, W), bool)
    outside[:, :20] = True  # off every footprint
    target = np.where(outside[None], np.nan, truth).astype(np.float32)
    hist = np.where(outside[None], np.nan, truth).astype(np.float32)
    res = fill_gaps(target, ~outside, [(7, hist, np.ones((H, W), bool))])
    assert np.all(res.provenance[outside] == PROVENANCE_NODATA) and np.isnan(res.image[:, outside]).all()
    assert np.all(res.source_age_days[outside] == AGE_NONE)


def test_feathered_border_shows_no_seam_and_the_check_catches_one() -> None:
    old = _texture(seed=6)
    rng = np.random.default_rng(6)
    # the change is not exactly linear (per-pixel scatter, as real surfaces change), so a fit is imperfect
    truth = (GAIN * old + OFFSET + 0.004 * rng.standard_normal(old.shape)).astype(np.float32)
    cloud = _disk(45, 45, 22)
    target = np.where(cloud[None], 0.9, truth).astype(np.float32)
    history = [(9, old, np.ones((H, W), bool))]

    def ratio(cfg: FillConfig) -> float:
        res = fill_gaps(target, ~cloud, history, cfg)
        return _seam_ratio(res.image, res.provenance == PROVENANCE_FILLED)

    assert ratio(FillConfig()) <= 1.05
    seam = ratio(FillConfig(fit="none", feather_px=0))
    assert seam > 1.5, "the seam check must fail on a copied fill with a hard edge"
    assert ratio(FillConfig(fit="none", feather_px=3)) < seam  # feathering alone already softens the step


def test_chained_through_an_intermediate_date() -> None:
    base = _texture(seed=7)
    target_truth = 1.2 * base + 0.01
    left = np.zeros((H, W), bool)
    left[:, :40] = True
    target = np.where(left[None], target_truth, 0.9).astype(np.float32)  # only the left is clear
    right = np.zeros((H, W), bool)
    right[:, 56:] = True
    recent = (0.8 * base - 0.02).astype(np.float32)  # clear only where the target is not: no common pixels
    history = [(6, np.where(right[None], recent, 0.9), right), (20, base, np.ones((H, W), bool))]
    res = fill_gaps(target, left, history, FillConfig(min_common_pixels=100))
    notes = {n["age_days"]: n for n in res.notes}
    assert notes[6]["harmonization"] == "chained" and notes[6]["via_age_days"] == 20
    from_recent = res.source_age_days == 6
    assert from_recent.sum() > 1000
    np.testing.assert_allclose(res.image[:, from_recent], target_truth[:, from_recent], atol=1e-4)


def test_nothing_to_fit_uses_identity_and_says_so() -> None:
    old = _texture(seed=8)
    res = fill_gaps(np.full((4, H, W), 0.9, np.float32), np.zeros((H, W), bool), [(15, old, np.ones((H, W), bool))])
    (note,) = res.notes
    assert note["harmonization"] == "identity" and "copied as is" in note["warning"]
    np.testing.assert_array_equal(res.image, old)
    assert np.all(res.provenance == PROVENANCE_FILLED)


def test_gains_are_clamped() -> None:
    old = _texture(seed=9)
    truth = 4.0 * old - 0.3  # far outside any plausible radiometric change
    cloud = _disk(48, 48, 20)
    history = [(3, old, np.ones((H, W), bool))]
    res = fill_gaps(np.where(cloud[None], 0.9, truth), ~cloud, history, FillConfig(fit="global"))
    assert max(res.notes[0]["gain"]) <= 2.0


def test_bad_input_is_one_clear_error() -> None:
    img = _texture()
    ok = np.ones((H, W), bool)
    with pytest.raises(DataError, match="history entry 0 .* shape"):
        fill_gaps(img, ok, [(3, img[:, :50], ok[:, :50])])
    with pytest.raises(DataError, match="age_days=0"):
        fill_gaps(img, ok, [(0, img, ok)])
    with pytest.raises(DataError, match="clear mask has shape"):
        fill_gaps(img, ok[:10], [])
    with pytest.raises(ValidationError, match="gain_min"):
        FillConfig(gain_min=3.0)
    with pytest.raises(ValidationError):
        FillConfig(window=9)  # unknown field
    assert all(f.description for f in FillConfig.model_fields.values())


# -- real series: pasted real clouds on a clear date, the product's own masks ---------------------------------


def _real_case(real_data: Path) -> tuple[list, dict]:
    import rasterio
    from affine import Affine
    from rasterio.warp import transform as warp_points

    from pipeline.grid import Grid
    from pipeline.masking.codes import is_contaminated
    from pipeline.masking.scene import mask_scene
    from pipeline.regions import utm_crs
    from pipeline.sources.registry import get_source

    root = real_data / "sen12mscr-ts"
    if not root.exists():
        pytest.skip(f"{root} not found")
    src = get_source("local", root=root)
    scenes = {str(s.date): s for s in src.scenes("s2")}
    with rasterio.open(scenes["2018-07-30"].properties["files"][0]) as ds:
        b = ds.bounds
        crs = utm_crs((b.left + b.right) / 2, (b.bottom + b.top) / 2)
        xs, ys = warp_points(ds.crs, crs, [b.left, b.right, b.right, b.left], [b.top, b.top, b.bottom, b.bottom])
    # the product reads onto a UTM grid; mask_scene's metre buffers are meaningless on the files' degree grid
    left, top = np.ceil(max(xs[0], xs[3]) / 10) * 10, np.floor(min(ys[0], ys[1]) / 10) * 10
    grid = Grid(crs, Affine(10.0, 0.0, left, 0.0, -10.0, top), 180, 240)
    data = {}
    for day in ("2018-06-10", "2018-06-25", "2018-07-05", "2018-07-20", "2018-07-30", "2018-09-18"):
        raster = src.read(scenes[day], grid).load()
        data[day] = (raster.values.astype(np.float32), ~is_contaminated(mask_scene(raster, scenes[day]).values))
    return scenes, data


def test_real_series_harmonized_beats_last_clear(real_data: Path) -> None:
    scenes, data = _real_case(real_data)
    target_day = "2018-07-30"
    truth, t_clear = data[target_day]
    assert t_clear.mean() > 0.98
    earlier = ("2018-06-10", "2018-06-25", "2018-07-05", "2018-07-20")
    history = [((scenes[target_day].date - scenes[d].date).days, *data[d]) for d in earlier]
    last_clear = FillConfig(fit="none", buffer_px=0, history_buffer_px=0, feather_px=0)
    gains = []
    for cloudy in ("2018-07-05", "2018-09-18"):
        c_refl, c_clear = data[cloudy]
        hidden = ~c_clear
        assert 0.2 <= hidden.mean() <= 0.9
        image = np.where(hidden[None], c_refl, truth)
        psnr = {}
        for name, cfg in (("last-clear", last_clear), ("harmonized", FillConfig())):
            res = fill_gaps(image, c_clear, history, cfg)
            scored = hidden & np.isfinite(res.image).all(axis=0)
            assert scored.sum() > 0.99 * hidden.sum()
            psnr[name] = 20 * np.log10(1 / np.sqrt(((res.image[:, scored] - truth[:, scored]) ** 2).mean()))
            filled = res.provenance == PROVENANCE_FILLED
            for age, _refl, ok in history:
                assert not np.any(filled & (res.source_age_days == age) & ~ok), f"{name} filled from a cloudy pixel"
        gains.append(psnr["harmonized"] - psnr["last-clear"])
        assert psnr["harmonized"] > 36.0, psnr
    # measured 3.2 and 3.4 dB (bench/harmonize_real.py: +3.7 dB over 16 cases)
    assert min(gains) >= 2.0, gains


# -- the local fit's lattice, the block path, the fast morphology ---------------------------------------------


def _changed_date(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An earlier date and the target's truth: a per-band change whose gain and offset drift across the scene
    (as haze and phenology do), so the local fit differs from the global one."""
    old = _texture(seed=seed)
    y, x = np.mgrid[0:H, 0:W] / H
    gain = GAIN * (1 + 0.25 * np.sin(3 * x + 2 * y))[None]
    truth = (gain * old + OFFSET + 0.02 * np.cos(4 * y)[None]).astype(np.float32)
    return old, truth


def _reference_local(x: np.ndarray, y: np.ndarray, common: np.ndarray, a_g: np.ndarray, b_g: np.ndarray,
                     cfg: FillConfig) -> np.ndarray:
    """The local fit at every pixel, the guided-filter construction written out with box filters."""
    size = cfg.window_px

    def box(v: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(v, size=size, mode="constant") * float(size * size)

    n = np.rint(box(common.astype(np.float64)))
    enough = n >= cfg.window_min_pixels
    n = np.where(enough, n, 0.0)
    n_all = np.rint(box(np.ones(common.shape)))
    out = np.empty(x.shape)
    for k in range(x.shape[0]):
        xs, ys = x[k][common].astype(np.float64), y[k][common].astype(np.float64)
        cx, cy, gv = xs.mean(), ys.mean(), xs.var()
        xc, yc = np.where(common, x[k] - cx, 0.0), np.where(common, y[k] - cy, 0.0)
        g_my = a_g[k] * cx + b_g[k] - cy
        tot = n + cfg.prior_pixels
        sx, sy, sxx, sxy = (np.where(enough, box(v), 0.0) for v in (xc, yc, xc * xc, xc * yc))
        mx, my = sx / tot, (sy + cfg.prior_pixels * g_my) / tot
        vx = (sxx + cfg.prior_pixels * gv) / tot - mx * mx
        cxy = (sxy + cfg.prior_pixels * a_g[k] * gv) / tot - mx * my
        a = np.where(vx > cfg.min_variance, cxy / np.maximum(vx, 1e-30), a_g[k]).clip(cfg.gain_min, cfg.gain_max)
        b = my - a * mx
        out[k] = box(a) / n_all * (x[k] - cx) + box(b) / n_all + cy
    return out


def test_local_fit_on_the_lattice_follows_the_fit_at_every_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import harmonize

    old, truth = _changed_date(seed=12)
    cloud = _disk(50, 45, 25)
    target = np.where(cloud[None], 0.9, truth).astype(np.float32)
    history = [(10, old, np.ones((H, W), bool))]
    # the local fit's construction alone (the class offsets shift its target; tested on their own)
    cfg = FillConfig(buffer_px=0, history_buffer_px=0, feather_px=0, robust_sigma=None, class_offsets=0)
    a_g, b_g = harmonize._global_fit(old[:, ~cloud].astype(np.float64), truth[:, ~cloud].astype(np.float64), cfg)
    reference = _reference_local(old, target, ~cloud, a_g, b_g, cfg)[:, cloud]
    globally = fill_gaps(target, ~cloud, history, cfg.model_copy(update={"fit": "global"})).image[:, cloud]

    monkeypatch.setattr(harmonize, "_LATTICE_MAX_STEP", 1)  # a window at every pixel: the construction itself
    np.testing.assert_allclose(fill_gaps(target, ~cloud, history, cfg).image[:, cloud], reference, atol=1e-5)
    monkeypatch.undo()
    assert harmonize._lattice_step(cfg.window_px) == (5, 3)
    lattice = fill_gaps(target, ~cloud, history, cfg).image[:, cloud]
    off = np.sqrt(((lattice - reference) ** 2).mean())
    # the lattice costs a small share of what the local fit gains over the global one
    assert off < 0.1 * np.sqrt(((globally - reference) ** 2).mean()), off
    assert np.sqrt(((lattice - truth[:, cloud]) ** 2).mean()) < np.sqrt(((globally - truth[:, cloud]) ** 2).mean())


def _two_class_fields(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8 px fields of two classes with the same red but different NIR and SWIR; by the target date the crop
    (high NIR) greened up (red 0.08 -> 0.05) and the bare fields dried (red 0.08 -> 0.11): the change differs by
    class in a band where no line through the old reflectance can tell the classes apart."""
    rng = np.random.default_rng(seed)
    crop = rng.random((H // 8, W // 8)).repeat(8, 0).repeat(8, 1) < 0.5
    noise = 0.004 * rng.standard_normal((4, H, W))
    old = np.stack([np.full((H, W), 0.06), np.full((H, W), 0.08), np.where(crop, 0.35, 0.2),
                    np.where(crop, 0.18, 0.3)]) + noise
    truth = old.copy()
    truth[1] += np.where(crop, -0.03, 0.03)
    return old.astype(np.float32), truth.astype(np.float32)


def test_class_offsets_carry_each_classs_change_into_a_large_cloud() -> None:
    old, truth = _two_class_fields(seed=21)
    cloud = _disk(48, 48, 30)
    target = np.where(cloud[None], 0.9, truth).astype(np.float32)
    history = [(12.0, old, np.ones((H, W), bool))]
    interior = _disk(48, 48, 30 - 15)  # beyond the local fit's 15 px windows: there the line alone used to decide

    def rmse(cfg: FillConfig) -> float:
        out = fill_gaps(target, ~cloud, history, cfg).image
        return float(np.sqrt(((out[:, interior] - truth[:, interior]) ** 2).mean()))

    on = fill_gaps(target, ~cloud, history)
    assert on.notes[0]["class_offsets"]["classes"] == FillConfig().class_offsets
    on_rmse, off_rmse = rmse(FillConfig()), rmse(FillConfig(class_offsets=0))
    assert on_rmse < 0.4 * off_rmse, (on_rmse, off_rmse)
    assert rmse(FillConfig(fit="global")) < 0.4 * rmse(FillConfig(fit="global", class_offsets=0))
    # deterministic (a fixed sample and seed): a resumed run fills identically
    assert np.array_equal(fill_gaps(target, ~cloud, history).image, on.image, equal_nan=True)


def test_a_block_fills_as_the_whole_image_when_it_says_where_it_lies() -> None:
    from pipeline.harmonize import fit_date, history_usable, target_fit_pixels

    old, truth = _changed_date(seed=13)
    cloud = _disk(75, 78, 12)
    target = np.where(cloud[None], 0.9, truth).astype(np.float32)
    recent_cloud = _disk(70, 90, 6)
    recent = np.where(recent_cloud[None], 0.8, 0.95 * truth + 0.01).astype(np.float32)
    history = [(5.0, recent, ~recent_cloud), (20.0, old, np.ones((H, W), bool))]
    cfg = FillConfig()
    ages = [a for a, _, _ in history]
    refl = [r for _, r, _ in history]
    usable = [history_usable(r, c, cfg) for _, r, c in history]
    fit_pixels = target_fit_pixels(target, ~cloud, cfg)
    fits = {a: fit_date(i, ages, refl, usable, target, fit_pixels, cfg) for i, a in enumerate(ages)}
    whole = fill_gaps(target, ~cloud, history, cfg, fits=fits)
    r0, c0 = 23, 37  # not on the lattice (5 px)
    cut = [(a, r[:, r0:, c0:], c[r0:, c0:]) for a, r, c in history]
    block = fill_gaps(target[:, r0:, c0:], ~cloud[r0:, c0:], cut, cfg, fits=fits, origin=(r0, c0))
    inner = (slice(None), slice(30, None), slice(30, None))  # beyond the reach of the block's edge
    mine = whole.image[:, r0:, c0:][inner]
    assert {n["age_days"] for n in whole.notes} == {5.0, 20.0} and block.notes[0]["harmonization"] == "local"
    assert np.array_equal(block.provenance[inner[1:]], whole.provenance[r0:, c0:][inner[1:]])
    assert np.abs(block.image[inner] - mine).max() < 1e-6
    # anchored at the block's own first pixel instead, the lattice moves and the fill with it
    shifted = fill_gaps(target[:, r0:, c0:], ~cloud[r0:, c0:], cut, cfg, fits=fits)
    assert np.abs(shifted.image[inner] - mine).max() > 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_fast_morphology_matches_ndimage(seed: int) -> None:
    from pipeline.harmonize import _dilate, _feather

    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 50, 2))
    mask = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 3)) > rng.uniform(0.4, 0.6)
    for radius in range(1, 8):
        r = np.arange(-radius, radius + 1)
        disk = (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius
        assert np.array_equal(_dilate(mask, radius), ndimage.binary_dilation(mask, structure=disk)), radius
    if mask.any():
        dist = ndimage.distance_transform_edt(~mask)
        for f in range(1, 6):
            want = np.where(mask, 1.0, np.clip(1.0 - dist / (f + 1), 0.0, 1.0)).astype(np.float32)
            assert np.array_equal(_feather(mask, f), want), f


def test_a_shadow_the_mask_missed_beside_a_cloud_is_filled_and_a_flood_there_is_not() -> None:
    """Bands blue, green, red, NIR, SWIR1. A shadow takes the direct beam: every band darker, the infrared most; a
    flood keeps the visible level and loses the infrared. Only the first is the mask's miss."""
    old = _texture(bands=5)
    cloud = _disk(48, 30, 10)
    shadow = _disk(48, 52, 6)  # ~12 px from the cloud
    flood = _disk(26, 36, 6)
    far_dark = _disk(85, 85, 5)  # as dark as the shadow, but 60 px from the cloud
    target = old.copy()
    darker = np.array([0.8, 0.7, 0.65, 0.4, 0.3], dtype=np.float32)[:, None]
    target[:, shadow] *= darker
    target[:, far_dark] *= darker
    target[:, flood] *= np.array([1.0, 1.05, 1.1, 0.2, 0.1], dtype=np.float32)[:, None]
    target[:, cloud] = 0.6
    clear = ~cloud
    history = [(10.0, old, np.ones((H, W), bool))]
    bands = (0, 1, 2, 3, 4)

    check = FillConfig(shadow_check_px=40, shadow_sar_change_db=None)  # the optical test alone
    res = fill_gaps(target, clear, history, check, shadow_bands=bands)
    assert res.shadow_check == "optical"
    assert res.missed_shadow is not None
    assert res.missed_shadow[shadow].mean() > 0.9
    assert not res.missed_shadow[flood].any() and not res.missed_shadow[far_dark].any()
    assert (res.provenance[shadow] == PROVENANCE_FILLED).all()
    inner = _disk(48, 52, 4)
    assert np.abs(res.image[:, inner] - old[:, inner]).max() < 0.02  # the ground under the shadow, from history
    assert (res.provenance[flood] == PROVENANCE_OBSERVED).all()
    np.testing.assert_array_equal(res.image[:, _disk(26, 36, 2)], target[:, _disk(26, 36, 2)])

    # without the bands' order, or with the check off, the mask is taken as it is
    for plain in (fill_gaps(target, clear, history, check),
                  fill_gaps(target, clear, history, FillConfig(shadow_check_px=0), shadow_bands=bands)):
        assert plain.missed_shadow is None and (plain.provenance[shadow] == PROVENANCE_OBSERVED).all()
    with pytest.raises(DataError, match=r"shadow_bands \[0, 1, 2\] must give the indices of blue, green, red, nir, "
                                        r"swir1"):
        fill_gaps(target, clear, history, check, shadow_bands=(0, 1, 2))


def test_the_shadow_checks_s1_test_keeps_a_flood_that_arrived_since_the_history_date() -> None:
    """On a flood's first day, flooded ground under thin haze passes the optical test (every band darker than the
    pre-flood history). S1 tells it from a shadow: the backscatter of flooded ground changed, a shadow's did not.
    The default check needs S1 near the target; without it the mask is taken as it is."""
    rng = np.random.default_rng(3)
    old = _texture(bands=5)
    cloud = _disk(48, 30, 10)
    shadow = _disk(48, 52, 6)
    flood = _disk(26, 36, 6)
    target = old.copy()
    target[:, shadow] *= np.array([0.8, 0.7, 0.65, 0.4, 0.3], dtype=np.float32)[:, None]
    target[:, flood] *= np.array([0.8, 0.8, 0.8, 0.3, 0.2], dtype=np.float32)[:, None]  # hazy flood: all darker
    target[:, cloud] = 0.6
    clear = ~cloud
    history = [(10.0, old, np.ones((H, W), bool))]
    bands = (0, 1, 2, 3, 4)

    def s1(flooded: bool) -> np.ndarray:
        db = np.stack([np.full((H, W), -9.0), np.full((H, W), -16.0)]).astype(np.float32)
        if flooded:
            db[:, flood] -= 10.0  # open water: specular, dark
        speckle = rng.gamma(4.4, 1 / 4.4, db.shape)  # GRD's ~4.4 looks
        return (db + 10 * np.log10(speckle)).astype(np.float32)

    change = GroundChangeArrays([s1(flooded=True)], {10.0: s1(flooded=False)})
    optical = fill_gaps(target, clear, history, FillConfig(shadow_sar_change_db=None), shadow_bands=bands)
    assert optical.missed_shadow is not None and optical.missed_shadow[flood].mean() > 0.9  # what S1 must undo

    res = fill_gaps(target, clear, history, FillConfig(), shadow_bands=bands, ground_change=change)
    assert res.shadow_check == "optical+S1"
    assert res.missed_shadow is not None and res.shadow_kept_by_sar is not None
    assert res.missed_shadow[shadow].mean() > 0.9 and (res.provenance[_disk(48, 52, 4)] == PROVENANCE_FILLED).all()
    core = _disk(26, 36, 4)  # the 5 x 5 mean blurs the flood's edge with dry ground
    # speckle may let a lone edge pixel through (its fill's buffer and feather then touch its neighbours)
    assert res.missed_shadow[flood].mean() < 0.05 and res.shadow_kept_by_sar[core].all()
    assert (res.provenance[core] == PROVENANCE_OBSERVED).all()
    assert (res.image[:, core] == target[:, core]).all(axis=0).mean() > 0.9

    # S1 missing at a pixel on either date counts as changed: the pixel stays as the mask has it
    holed = GroundChangeArrays([s1(flooded=False)], {10.0: s1(flooded=False)})
    holed.target[0][:, shadow] = np.nan
    kept = fill_gaps(target, clear, history, FillConfig(), shadow_bands=bands, ground_change=holed)
    assert kept.shadow_kept_by_sar is not None and kept.shadow_kept_by_sar[_disk(48, 52, 3)].all()
    # no S1 near the target, or none for the history date: the check cannot tell a flood, and leaves the mask be
    for change in (None, GroundChangeArrays([], {10.0: s1(flooded=False)})):
        none = fill_gaps(target, clear, history, FillConfig(), shadow_bands=bands, ground_change=change)
        assert none.shadow_check == "no S1" and none.missed_shadow is None
        assert (none.provenance[shadow] == PROVENANCE_OBSERVED).all()
    no_history = fill_gaps(target, clear, history, FillConfig(), shadow_bands=bands,
                           ground_change=GroundChangeArrays([s1(flooded=False)], {}))
    assert no_history.missed_shadow is not None and not no_history.missed_shadow.any()


def test_shadow_bands_are_found_by_sensor() -> None:
    s2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
    assert shadow_bands("s2_l1c", s2) == (1, 2, 3, 7, 11)
    assert shadow_bands("s2_l1c", ["B2", "B3", "B4", "B8"]) is None  # no SWIR1: no check
    landsat = ["SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"]
    assert shadow_bands("landsat8_l2", landsat) == (1, 2, 3, 4, 5)
