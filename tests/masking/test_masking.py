"""Unit tests of pipeline.masking.scene on small arrays built here, plus the synthetic archive against truth."""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pytest
import xarray as xr

from pipeline.errors import DataError
from pipeline.masking.codes import MaskClass
from pipeline.masking.config import MaskConfig
from pipeline.masking.scene import mask_fractions, mask_scene
from pipeline.sensors import S2_BANDS

T10 = [10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0]
SPECTRAL = ["blue", "green", "red", "nir", "swir1", "swir2"]
VEG = [0.04, 0.07, 0.04, 0.35, 0.18, 0.08]
CLOUD = [0.55, 0.56, 0.57, 0.60, 0.45, 0.30]
SNOW = [0.80, 0.78, 0.75, 0.65, 0.08, 0.05]
SHADE = [0.03, 0.04, 0.03, 0.08, 0.05, 0.03]


def _raster(bands: dict[str, np.ndarray], **attrs) -> xr.DataArray:
    names = list(bands)
    h, w = next(iter(bands.values())).shape
    return xr.DataArray(
        np.stack([np.asarray(bands[n], dtype=np.float32) for n in names]), dims=("band", "y", "x"),
        coords={"band": names, "y": 4000000.0 - 10 * (np.arange(h) + 0.5), "x": 500000.0 + 10 * (np.arange(w) + 0.5)},
        attrs={"transform": T10, "crs": "EPSG:32649", **attrs},
    )


def _paint(
    shape: tuple[int, int], regions: list[tuple[tuple[slice, slice], list[float]]], base: list[float] = VEG
) -> dict[str, np.ndarray]:
    img = np.empty((6, *shape), dtype=np.float32)
    img[:] = np.asarray(base, dtype=np.float32)[:, None, None]
    for where, spectrum in regions:
        img[(slice(None), *where)] = np.asarray(spectrum, dtype=np.float32)[:, None, None]
    return dict(zip(SPECTRAL, img))


def test_spectral_cloud_shadow_and_snow_classes() -> None:
    cloud = (slice(40, 60), slice(40, 60))
    shadow = (slice(40, 60), slice(20, 38))  # west of the cloud: sun in the east
    snow = (slice(80, 95), slice(80, 95))
    r = _raster(
        _paint((100, 100), [(cloud, CLOUD), (shadow, SHADE), (snow, SNOW)]), sun_azimuth=90.0, sun_elevation=45.0
    )
    m = mask_scene(r, method="spectral")
    assert m.dtype == np.uint8 and m.dims == ("y", "x")
    np.testing.assert_array_equal(m["x"], r["x"])
    assert m.attrs["crs"] == "EPSG:32649" and m.attrs["transform"] == T10 and m.attrs["mask_method"] == "spectral"
    v = m.values
    assert (v[cloud] == MaskClass.CLOUD).all()
    assert (v[snow] == MaskClass.SNOW).all()  # the NDSI test keeps snow out of cloud
    assert (v[shadow][:, 2:-2] == MaskClass.SHADOW).mean() > 0.95
    assert (v[0:30, 60:100] == MaskClass.CLEAR).all()


def test_shadow_follows_sun_azimuth_not_other_dark_pixels() -> None:
    cloud = (slice(40, 60), slice(40, 60))
    west, east = (slice(40, 60), slice(22, 36)), (slice(40, 60), slice(64, 78))
    bands = _paint((100, 100), [(cloud, CLOUD), (west, SHADE), (east, SHADE)])
    v = mask_scene(_raster(bands, sun_azimuth=90.0, sun_elevation=45.0), method="spectral").values
    assert (v[west] == MaskClass.SHADOW).mean() > 0.9
    assert (v[east] == MaskClass.SHADOW).mean() < 0.1
    # sun unknown and no config default: both dark patches near the cloud are taken, and said to be
    v2 = mask_scene(_raster(bands), method="spectral").values
    assert (v2[east] == MaskClass.SHADOW).mean() > 0.9
    # a config default is used when scene and raster carry no angles
    v3 = mask_scene(_raster(bands), config=MaskConfig(sun_azimuth=270.0, sun_elevation=45.0), method="spectral").values
    assert (v3[east] == MaskClass.SHADOW).mean() > 0.9 and (v3[west] == MaskClass.SHADOW).mean() < 0.1


def test_nan_pixels_are_nodata_and_fractions() -> None:
    bands = _paint((50, 40), [((slice(0, 10), slice(0, 40)), CLOUD)])
    bands["red"][45:, :] = np.nan
    m = mask_scene(_raster(bands), config=MaskConfig(shadow=False), method="spectral")
    assert (m.values[45:] == MaskClass.NODATA).all()
    f = mask_fractions(m)
    assert f["valid_fraction"] == pytest.approx(45 / 50)
    assert f["cloud_fraction"] == pytest.approx(np.isin(m.values, [1, 4]).mean())
    assert mask_fractions(np.array([[0, 1], [4, 3]], dtype=np.uint8)) == {
        "cloud_fraction": 0.5,
        "shadow_fraction": 0.0,
        "valid_fraction": 0.75,
    }


def test_qa60_bits_and_gap() -> None:
    qa = np.zeros((4, 4), dtype=np.float32)
    qa[0, :] = 1 << 10
    qa[1, :] = 1 << 11
    qa[2, 0] = np.nan
    ok = mask_scene(_raster({"QA60": qa}, datetime="2021-07-20T03:00:00+00:00"), method="qa60").values
    assert (ok[0] == MaskClass.CLOUD).all() and (ok[1] == MaskClass.THIN_CLOUD).all()
    assert ok[2, 0] == MaskClass.NODATA and (ok[3] == MaskClass.CLEAR).all()
    gap = _raster({"QA60": qa}, datetime="2023-05-01T03:00:00+00:00")
    with pytest.raises(DataError, match="QA60 is not populated"):
        mask_scene(gap, method="qa60")


def test_auto_ignores_qa60_in_gap_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    bands = _paint((30, 30), [((slice(0, 10), slice(0, 30)), CLOUD)])
    bands["QA60"] = np.zeros((30, 30), dtype=np.float32)  # empty in the gap: would read "clear"
    with caplog.at_level(logging.WARNING, logger="pipeline.masking.scene"):
        m = mask_scene(_raster(bands, datetime="2023-01-02T00:00:00Z"))
    assert m.attrs["mask_method"] == "spectral"
    assert "QA60" in caplog.text
    assert (m.values[0:10] == MaskClass.CLOUD).all()


def test_scl_classes() -> None:
    scl = np.array([[0, 1, 3, 4], [8, 9, 10, 11]], dtype=np.float32)
    v = mask_scene(_raster({"SCL": scl}), method="scl").values
    assert v.tolist() == [[3, 3, 2, 0], [1, 1, 4, 5]]


def test_qa_pixel_priorities() -> None:
    bits = lambda *b: sum(1 << i for i in b)  # noqa: E731
    qa = np.array(
        [
            [bits(0), bits(1), bits(2), bits(3, 8, 9)],
            [bits(4), bits(5), bits(6), bits(7, 6)],
            [bits(3, 5), bits(4, 5), bits(2, 4), 0],
        ],
        dtype=np.float32,
    )
    v = mask_scene(_raster({"QA_PIXEL": qa}, sensor="landsat8_l2")).values
    assert v.tolist() == [[3, 1, 4, 1], [2, 5, 0, 0], [1, 2, 4, 0]]


def test_cloudscore_thresholds() -> None:
    cs = np.array([[0.9, 0.6, 0.59, 0.3]], dtype=np.float32)
    v = mask_scene(_raster({"cs_cdf": cs}), config=MaskConfig(shadow=False), method="cloudscore").values
    assert v.tolist() == [[0, 0, 4, 1]]


def test_forced_method_missing_bands_names_them() -> None:
    r = _raster(_paint((8, 8), []))
    with pytest.raises(DataError, match=r"s2cloudless.*B1.*B5.*auto"):
        mask_scene(r, method="s2cloudless")
    with pytest.raises(DataError, match="qa_pixel.*QA_PIXEL"):
        mask_scene(r, method="qa_pixel")
    with pytest.raises(DataError, match="unknown mask method"):
        mask_scene(r, method="fmask")
    with pytest.raises(DataError, match="no cloud mask can be computed"):
        mask_scene(_raster({"VV": np.zeros((4, 4))}))
    with pytest.raises(DataError, match="pixel_size_m"):
        mask_scene(_raster(_paint((8, 8), [])).assign_attrs(transform=None), method="spectral")


def test_s2cloudless_bands_and_precomputed_probability() -> None:
    rng = np.random.default_rng(0)
    h = w = 32
    veg = [0.08, 0.06, 0.08, 0.04, 0.10, 0.30, 0.35, 0.35, 0.37, 0.12, 0.002, 0.18, 0.08]
    img = {
        b: np.full((h, w), v, np.float32) + rng.normal(0, 0.003, (h, w)).astype(np.float32)
        for b, v in zip(S2_BANDS, veg)
    }
    for b in S2_BANDS:
        img[b][:, :16] = 0.6 if b != "B10" else 0.05  # a bright white block on the left half
    m = mask_scene(_raster(img, sensor="s2_l1c"), config=MaskConfig(shadow=False))
    assert m.attrs["mask_method"] == "s2cloudless"
    assert (m.values[:, :8] == MaskClass.CLOUD).all() and (m.values[:, 24:] == MaskClass.CLEAR).all()
    prob = np.zeros((h, w), np.float32)
    prob[:16] = 90.0
    m2 = mask_scene(_raster({"CLOUD_PROB": prob}), config=MaskConfig(shadow=False), method="s2cloudless").values
    assert (m2[:10] == MaskClass.CLOUD).all() and (m2[24:] == MaskClass.CLEAR).all()


@pytest.mark.slow
def test_synthetic_archive_against_truth() -> None:
    """mask_scene(auto) = s2cloudless (0.4 / 4 / 2) + projected shadows, against the simulator's truth.

    Scored on whole-region reads, the extent dataset building masks: a shadow inside a patch is often cast
    by a cloud outside it, which no mask computed on the patch alone can see. Dates: a broken sky, a
    scattered one and a hazy one (haze below the visibility level must not count as cloud).
    """
    synthetic = pytest.importorskip("pipeline.sources.synthetic.source")
    from pipeline.regions import load_region

    region = load_region("zhengzhou-demo")
    grid = region.grid()
    src = synthetic.SyntheticSource()
    scenes = {s.id[-20:-14]: s for s in src.search(region, dt.date(2021, 7, 1), dt.date(2021, 10, 30), "s2")}
    inter = union = s_inter = s_union = 0
    for day in ("211025", "210821", "210702"):
        truth = src.truth(scenes[day], grid)["mask"].values
        pred = mask_scene(src.read(scenes[day], grid), scenes[day]).values
        tc, pc = np.isin(truth, [1, 4]), np.isin(pred, [1, 4])
        inter, union = inter + (tc & pc).sum(), union + (tc | pc).sum()
        s_inter += ((truth == 2) & (pred == 2)).sum()
        s_union += ((truth == 2) | (pred == 2)).sum()
    assert inter / union >= 0.85
    assert s_inter / s_union >= 0.5
