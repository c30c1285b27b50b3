"""The synthetic source: search cadence and ids, the raster contract, physics sanity, truth, determinism."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pytest
from affine import Affine

from pipeline.errors import SourceError
from pipeline.grid import Grid
from pipeline.masking.codes import MaskClass
from pipeline.regions import load_region
from pipeline.sensors import S2_BANDS, QAPixel, get_sensor
from pipeline.sources.base import Source
from pipeline.sources.registry import get_source
from pipeline.sources.synthetic import source as synmod
from pipeline.sources.synthetic.source import MISSIONS, SyntheticSource, mgrs_tile, operating, wrs2_path_row
from pipeline.sources.synthetic.world import CROP, FLOODED, FOREST, WATER


@pytest.fixture(scope="module")
def region():
    return load_region("zhengzhou-demo")


@pytest.fixture(scope="module")
def src() -> SyntheticSource:
    return SyntheticSource(seed=0)


@pytest.fixture(scope="module")
def s2(region, src):
    return src.search(region, region.window.start, region.window.end, "s2")


@pytest.fixture(scope="module")
def patch(region) -> Grid:
    return region.grid().window(128, 256, 256, 256)


def _by_regime(scenes, regime):
    return [s for s in scenes if s.properties["synth_regime"] == regime]


def _partly_cloudy(scenes, src, grid, lo=0.1, hi=0.6):
    """A scene whose truth over ``grid`` has some thick cloud and some clear ground (no haze/cirrus day)."""
    for sc in scenes:
        if (
            sc.properties["synth_haze"]
            or sc.properties["synth_cirrus"]
            or sc.properties["synth_regime"] in ("clear", "overcast")
        ):
            continue
        m = src.truth(sc, grid)["mask"].values
        if lo <= np.mean(m == MaskClass.CLOUD) <= hi and np.mean(m == MaskClass.CLEAR) > 0.2:
            return sc
    pytest.fail("no partly cloudy scene in the window")


# -- search ---------------------------------------------------------------------------------------
def test_is_a_source_and_registered():
    assert isinstance(SyntheticSource(), Source)
    assert get_source("synthetic", seed=3).seed == 3
    assert SyntheticSource().name == "synthetic"


def test_s2_search_cadence_ids_and_properties(s2):
    assert len(s2) >= 12
    days = [(b.date - a.date).days for a, b in zip(s2, s2[1:])]
    assert set(days) == {5}
    assert {s.properties["platform"] for s in s2} == {"SENTINEL-2A", "SENTINEL-2B"}
    assert s2[0].properties["platform"] != s2[1].properties["platform"]
    for s in s2:
        assert re.fullmatch(r"\d{8}T\d{6}_\d{8}T\d{6}_T49SGU", s.id), s.id
        assert s.id.startswith(s.datetime.strftime("%Y%m%dT%H%M%S"))
        assert s.sensor == "s2_l1c" and s.properties["simulated"] is True
        assert 0.0 <= s.cloud_cover <= 1.0
        # mid-morning overpass at 34.7 N in July/August: sun in the south-east, high
        assert 100 < s.properties["sun_azimuth"] < 160
        assert 50 < s.properties["sun_elevation"] < 75
    assert mgrs_tile(113.65, 34.75) == "49SGU"


def test_zhengzhou_july_climatology_gives_references_and_cloudy_dates(s2):
    covers = [s.cloud_cover for s in s2]
    assert sum(c < 0.05 for c in covers) >= 4, covers
    assert sum(c >= 0.95 for c in covers) >= 2, covers
    # the days around the 20 July 2021 rainstorm are overcast
    storm = [s for s in s2 if dt.date(2021, 7, 17) <= s.date <= dt.date(2021, 7, 21)]
    assert storm and all(s.cloud_cover >= 0.95 for s in storm)


def test_landsat_and_s1_search(region, src):
    # July-August 2021: Landsat 9 is not operational yet (2021-10-31), Landsat 8 alone every 16 days
    ls = src.search(region, region.window.start, region.window.end, "landsat")
    assert len(ls) >= 3
    assert [(b.date - a.date).days for a, b in zip(ls, ls[1:])] == [16] * (len(ls) - 1)
    assert {s.sensor for s in ls} == {"landsat8_l2"} and {s.properties["platform"] for s in ls} == {"LANDSAT_8"}
    assert src.search(region, region.window.start, region.window.end, "landsat9_l2") == []
    both = src.search(region, dt.date(2022, 7, 1), dt.date(2022, 8, 31), "landsat")
    assert [(b.date - a.date).days for a, b in zip(both, both[1:])] == [8] * (len(both) - 1)
    assert {s.sensor for s in both} == {"landsat8_l2", "landsat9_l2"}
    for s in ls + both:
        assert re.fullmatch(r"LC0[89]_124036_\d{8}", s.id), s.id
        assert s.id.endswith(s.date.strftime("%Y%m%d"))
    only8 = src.search(region, dt.date(2022, 7, 1), dt.date(2022, 8, 31), "landsat8_l2")
    assert [s.id for s in only8] == [s.id for s in both if s.sensor == "landsat8_l2"]
    assert wrs2_path_row(114.25, 30.6) == (123, 39)

    s1 = src.search(region, region.window.start, region.window.end, "s1")
    assert [(b.date - a.date).days for a, b in zip(s1, s1[1:])] == [6] * (len(s1) - 1)
    assert {s.properties["platform"] for s in s1} == {"SENTINEL-1A", "SENTINEL-1B"}
    for s in s1:
        assert re.fullmatch(r"S1[AB]_IW_GRDH_1SDV_\d{8}T\d{6}_\d{8}T\d{6}_\d{6}_[0-9A-F]{6}_[0-9A-F]{4}", s.id), s.id
        assert s.cloud_cover is None
        assert s.properties["orbit_pass"] in ("ASCENDING", "DESCENDING")
        assert s.properties["instrument_mode"] == "IW" and s.properties["simulated"] is True


def _platforms(scenes):
    return [s.properties["platform"] for s in scenes]


def _gaps(scenes):
    return {(b.date - a.date).days for a, b in zip(scenes, scenes[1:])}


def test_s2_mission_dates(region, src):
    assert src.search(region, dt.date(2015, 1, 1), dt.date(2015, 6, 22), "s2") == []
    first = src.search(region, dt.date(2015, 6, 1), dt.date(2015, 12, 31), "s2")
    assert first and first[0].date >= dt.date(2015, 6, 23) and first[0].date <= dt.date(2015, 7, 3)
    # S2A alone until S2B (2017-03-07): one satellite, a 10-day revisit
    alone = src.search(region, dt.date(2016, 6, 1), dt.date(2016, 8, 31), "s2")
    assert set(_platforms(alone)) == {"SENTINEL-2A"} and _gaps(alone) == {10}
    switch = src.search(region, dt.date(2017, 2, 1), dt.date(2017, 4, 30), "s2")
    assert all(s.date >= dt.date(2017, 3, 7) for s in switch if s.properties["platform"] == "SENTINEL-2B")
    assert _gaps([s for s in switch if s.date >= dt.date(2017, 3, 7)]) == {5}
    # S2C takes over S2A's slot (2025-01-21): still a 5-day revisit, never three satellites on one cycle
    recent = src.search(region, dt.date(2025, 1, 1), dt.date(2025, 3, 31), "s2")
    assert _gaps(recent) == {5}
    assert {p for s, p in zip(recent, _platforms(recent)) if s.date > dt.date(2025, 1, 21)} == {
        "SENTINEL-2B",
        "SENTINEL-2C",
    }
    # L1C and L2A fly the same platforms on the same dates
    assert [s.id for s in src.search(region, dt.date(2016, 7, 1), dt.date(2016, 7, 31), "s2_l2a")] == \
        [s.id for s in alone if s.date.month == 7]


def test_landsat_mission_dates(region, src):
    # the synthetic archive simulates OLI only: nothing before Landsat 8 (2013-04-11), L7/L5 are not served
    assert src.search(region, dt.date(2012, 1, 1), dt.date(2013, 4, 10), "landsat") == []
    first = src.search(region, dt.date(2013, 1, 1), dt.date(2013, 6, 30), "landsat")
    assert first and first[0].date >= dt.date(2013, 4, 11) and _gaps(first) == {16}
    assert src.search(region, dt.date(2021, 1, 1), dt.date(2021, 10, 30), "landsat9_l2") == []
    late = src.search(region, dt.date(2021, 9, 1), dt.date(2022, 1, 31), "landsat")
    l9 = [s for s in late if s.sensor == "landsat9_l2"]
    assert l9 and min(s.date for s in l9) >= dt.date(2021, 10, 31)
    assert _gaps([s for s in late if s.date >= dt.date(2021, 10, 31)]) == {8}
    assert _gaps([s for s in late if s.date < dt.date(2021, 10, 31)]) == {16}


def test_s1_mission_dates(region, src):
    assert src.search(region, dt.date(2014, 4, 3), dt.date(2014, 10, 2), "s1") == []
    early = src.search(region, dt.date(2014, 10, 1), dt.date(2015, 3, 31), "s1")
    assert early[0].date >= dt.date(2014, 10, 3) and set(_platforms(early)) == {"SENTINEL-1A"} and _gaps(early) == {12}
    end_b = src.search(region, dt.date(2021, 11, 1), dt.date(2022, 3, 31), "s1")
    b = [s for s in end_b if s.properties["platform"] == "SENTINEL-1B"]
    assert b and max(s.date for s in b) <= dt.date(2021, 12, 23)
    # S1B's failure: a 12-day single-satellite revisit until S1C
    after = [s for s in end_b if s.date > dt.date(2021, 12, 23)]
    assert set(_platforms(after)) == {"SENTINEL-1A"} and _gaps(after) == {12}
    gap = src.search(region, dt.date(2023, 1, 1), dt.date(2023, 12, 31), "s1")
    assert set(_platforms(gap)) == {"SENTINEL-1A"} and _gaps(gap) == {12}
    # S1C was launched 2024-12-05 but delivers routine data from 2025-05 (pipeline.sensors.S1_SATELLITES)
    commissioning = src.search(region, dt.date(2025, 1, 1), dt.date(2025, 4, 30), "s1")
    assert set(_platforms(commissioning)) == {"SENTINEL-1A"} and _gaps(commissioning) == {12}
    c = src.search(region, dt.date(2025, 5, 1), dt.date(2025, 6, 30), "s1")
    assert set(_platforms(c)) == {"SENTINEL-1A", "SENTINEL-1C"} and _gaps(c) == {6}
    assert all(s.id.startswith("S1C_") for s in c if s.properties["platform"] == "SENTINEL-1C")
    # S1C flies S1B's ground track: same relative orbits over the region
    assert {s.properties["relative_orbit"] for s in c if s.properties["platform"] == "SENTINEL-1C"} == \
        {s.properties["relative_orbit"] for s in b}


def test_s1_dates_follow_the_constellation_rule(region, src):
    """The archive and the pairing default (pipeline.sensors) agree: 12-day gaps in 2022, 6 while two satellites fly,
    and S1B only in its routine period."""
    from pipeline.sensors import S1_SATELLITES, s1_revisit_days

    y2022 = src.search(region, dt.date(2022, 1, 1), dt.date(2022, 12, 31), "s1")
    assert len(y2022) >= 30 and _gaps(y2022) == {12} and set(_platforms(y2022)) == {"SENTINEL-1A"}
    assert all(s1_revisit_days(s.date) == 12 for s in y2022)
    y2019 = src.search(region, dt.date(2019, 1, 1), dt.date(2019, 12, 31), "s1")
    assert _gaps(y2019) == {6} and set(_platforms(y2019)) == {"SENTINEL-1A", "SENTINEL-1B"}
    b_first, b_last = S1_SATELLITES["SENTINEL-1B"]
    y2016 = src.search(region, dt.date(2016, 6, 1), dt.date(2016, 12, 31), "s1")
    b = [s.date for s in y2016 if s.properties["platform"] == "SENTINEL-1B"]
    assert b and min(b) >= b_first and _gaps([s for s in y2016 if s.date < b_first]) == {12}
    # the relative orbit of S1B's slot is anchored on its launch, not on its first routine day
    assert {s.properties["relative_orbit"] for s in y2016 if s.properties["platform"] == "SENTINEL-1B"} <= \
        {s.properties["relative_orbit"] for s in y2019 if s.properties["platform"] == "SENTINEL-1B"}
    assert b_last == dt.date(2021, 12, 23)


def test_every_scene_was_acquired_while_its_platform_operated(region, src):
    for sensor in ("s2", "landsat", "s1"):
        scenes = src.search(region, dt.date(2013, 1, 1), dt.date(2026, 1, 1), sensor)
        assert scenes
        assert all(operating(s.properties["platform"], s.date) for s in scenes), sensor
        assert {s.properties["platform"] for s in scenes} <= set(MISSIONS)


def test_unknown_sensor_is_a_clear_error(region, src):
    with pytest.raises(SourceError, match="landsat7_l2"):
        src.search(region, region.window.start, region.window.end, "landsat7_l2")
    foreign = dict(
        id="x", sensor="s2_l1c", datetime=dt.datetime(2021, 7, 1, tzinfo=dt.timezone.utc), footprint={}, cloud_cover=0.0
    )
    from pipeline.sources.base import Scene

    with pytest.raises(SourceError, match="synthetic source"):
        src.read(Scene(**foreign), region.grid().window(0, 0, 8, 8))


def test_cloud_cover_is_the_true_cloud_fraction(region, src, s2):
    sc = next(s for s in s2 if 0.1 < s.cloud_cover < 0.9)
    g = region.grid()
    coarse = Grid(g.crs, g.transform @ Affine.scale(4), g.width // 4, g.height // 4)  # same area, 40 m pixels
    m = src.truth(sc, coarse)["mask"].values
    true = np.mean((m == MaskClass.CLOUD) | (m == MaskClass.THIN_CLOUD))
    assert abs(true - sc.cloud_cover) < 0.05


# -- raster contract ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family,key", [("s2", "s2_l1c"), ("s2", "s2_l2a"), ("landsat", "landsat8_l2"), ("s1", "s1_grd")]
)
def test_read_follows_the_raster_contract(region, src, patch, family, key):
    sc = src.search(region, dt.date(2021, 7, 1), dt.date(2021, 7, 31), key)[0]
    da = src.read(sc, patch)
    sensor = get_sensor(key)
    assert da.dims == ("band", "y", "x") and da.dtype == np.float32
    assert list(da.band.values) == list(sensor.band_names)
    assert da.shape == (len(sensor.band_names), 256, 256)
    np.testing.assert_array_equal(da.x.values, patch.coords()["x"])
    np.testing.assert_array_equal(da.y.values, patch.coords()["y"])
    assert da.attrs["simulated"] is True and da.attrs["scene_id"] == sc.id and da.attrs["sensor"] == key
    assert da.attrs["crs"] == patch.crs and da.attrs["transform"] == list(patch.transform)[:6]
    assert np.isfinite(da.values).all()
    if family != "s1":
        refl = da.sel(band=list(sensor.reflectance_bands)).values
        assert refl.min() > -0.05 and refl.max() < 1.2
    sub = src.read(sc, patch, ["B3"] if family == "s2" else (["SR_B3"] if family == "landsat" else ["VH"]))
    np.testing.assert_array_equal(sub.values[0], da.sel(band=sub.band.values[0]).values)
    if key == "s2_l2a":
        assert "B10" not in da.band.values and "SCL" in da.band.values
    if key == "s1_grd":
        ang = da.sel(band="angle").values
        assert 30.0 <= ang.min() and ang.max() <= 45.5


def test_patch_read_equals_window_of_full_grid(region, src, s2):
    full_grid = region.grid()
    pid, pg = region.patches()[9]
    row, col = int(pid[1:6]), int(pid[7:])
    sc = _by_regime(s2, "scattered")[0]
    bands = ["B2", "B8", "B10", "QA60", "CLOUD_PROB", "cs_cdf"]
    full = src.read(sc, full_grid, bands).values
    part = src.read(sc, pg, bands).values
    np.testing.assert_array_equal(part, full[:, row : row + 256, col : col + 256])
    tf, tp = src.truth(sc, full_grid), src.truth(sc, pg)
    np.testing.assert_array_equal(tp["mask"].values, tf["mask"].values[row : row + 256, col : col + 256])
    np.testing.assert_array_equal(tp["landcover"].values, tf["landcover"].values[row : row + 256, col : col + 256])
    # Landsat is simulated on its own 30 m world lattice and S1 has per-pixel speckle: both line up too
    for key, b in (("landsat8_l2", ["SR_B4", "QA_PIXEL"]), ("s1_grd", ["VV"])):
        other = src.search(region, dt.date(2021, 7, 1), dt.date(2021, 7, 31), key)[0]
        w = full_grid.window(301, 407, 100, 90)
        np.testing.assert_array_equal(
            src.read(other, w, b).values, src.read(other, full_grid, b).values[:, 301:401, 407:497]
        )


def test_determinism_same_seed_identical_other_scene_other_clouds(region, s2, patch):
    a, b = SyntheticSource(seed=0, cache=False), SyntheticSource(seed=0, cache=False)
    sc = _by_regime(s2, "scattered")[0]
    np.testing.assert_array_equal(a.read(sc, patch).values, b.read(sc, patch).values)
    other = _by_regime(s2, "scattered")[1]
    ma, mo = a.truth(sc, patch)["mask"].values, a.truth(other, patch)["mask"].values
    assert np.mean(ma != mo) > 0.1
    seeded = SyntheticSource(seed=1).search(region, region.window.start, region.window.end, "s2")
    assert [s.id for s in seeded] != [s.id for s in s2] or [s.cloud_cover for s in seeded] != [
        s.cloud_cover for s in s2
    ]


# -- physics sanity -------------------------------------------------------------------------------
def _ndvi(da):
    nir, red = da.sel(band="B8").values, da.sel(band="B4").values
    return (nir - red) / (nir + red)


def test_vegetation_and_water_spectra(region, src, s2):
    grid = region.grid().window(0, 0, 512, 512)
    late = [s for s in _by_regime(s2, "clear") if s.date.month == 8][0]
    t = src.truth(late, grid)
    ndvi = _ndvi(t["clear"])
    lc = t["landcover"].values
    veg = (lc == CROP) | (lc == FOREST)
    assert veg.sum() > 1000
    assert 0.5 <= np.median(ndvi[veg]) <= 0.9
    assert np.mean((ndvi[veg] > 0.5) & (ndvi[veg] < 0.9)) > 0.8
    water = (lc == WATER) | (lc == FLOODED)
    assert water.sum() > 50
    assert np.median(ndvi[water]) < 0.0
    # red edge: B5 < B6 < B7 over crops; water dark in NIR and SWIR
    c = t["clear"]
    assert np.median(c.sel(band="B5").values[veg]) < np.median(c.sel(band="B7").values[veg])
    assert np.median(c.sel(band="B8").values[water]) < 0.1 and np.median(c.sel(band="B11").values[water]) < 0.06


def test_thick_cloud_is_bright_and_shadow_darkens(region, src, s2, patch):
    sc = _partly_cloudy(s2, src, patch)
    da, t = src.read(sc, patch), src.truth(sc, patch)
    m, cot = t["mask"].values, t["cloud_optical_thickness"].values
    b2 = da.sel(band="B2").values
    assert np.mean(b2[(m == MaskClass.CLOUD) & (cot > 5)] > 0.3) > 0.95
    assert np.median(b2[m == MaskClass.CLOUD]) > 0.3
    shadow = m == MaskClass.SHADOW
    if shadow.sum() > 100:
        b8 = da.sel(band="B8").values
        clear_b8 = t["clear"].sel(band="B8").values
        assert np.median(b8[shadow] / clear_b8[shadow]) < 0.6
    assert "cloud_optical_thickness" in t and t.attrs["simulated"] is True


def test_s2cloudless_finds_the_true_clouds(region, src, s2, patch):
    from s2cloudless import S2PixelCloudDetector

    sc = _partly_cloudy(s2, src, patch)
    da = src.read(sc, patch, list(S2_BANDS))
    x = np.clip(np.moveaxis(da.values, 0, -1), 0.0, 1.0)[None]
    det = S2PixelCloudDetector(threshold=0.4, all_bands=True, average_over=4, dilation_size=2)
    found = det.get_cloud_masks(x)[0].astype(bool)
    m = src.truth(sc, patch)["mask"].values
    cloud, clear = m == MaskClass.CLOUD, m == MaskClass.CLEAR
    assert found[cloud].mean() >= 0.8
    assert found[clear].mean() <= 0.10


def test_quality_bands_follow_the_clouds_imperfectly(region, src, s2, patch):
    sc = _partly_cloudy(s2, src, patch)
    da, m = src.read(sc, patch), src.truth(sc, patch)["mask"].values
    cloud, clear = m == MaskClass.CLOUD, m == MaskClass.CLEAR
    prob, cs = da.sel(band="CLOUD_PROB").values, da.sel(band="cs_cdf").values
    assert prob.min() >= 0 and prob.max() <= 100 and np.array_equal(prob, np.round(prob))
    assert np.median(prob[cloud]) > 60 and np.median(prob[clear]) < 20
    assert np.mean(cs[clear] >= 0.6) > 0.9 and np.mean(cs[cloud] < 0.6) > 0.9
    assert 0 < np.mean((prob >= 40) != cloud) < 0.2  # consistent, but not a copy of truth
    qa = da.sel(band="QA60").values.astype(np.uint16)
    assert np.mean(((qa >> 10) & 1)[cloud]) > 0.8 and np.mean(((qa >> 10) & 1)[clear]) < 0.02
    l2a = src.search(region, sc.date, sc.date, "s2_l2a")[0]
    assert l2a.id == sc.id  # L1C and L2A share system:index, so the same clouds
    scl = src.read(l2a, patch, ["SCL"]).values[0]
    assert np.mean(np.isin(scl[cloud], (8, 9, 10))) > 0.9 and np.mean(np.isin(scl[clear], (8, 9, 10))) < 0.1


def test_landsat_qa_pixel_agrees_with_truth(region, src, patch):
    scenes = src.search(region, region.window.start, region.window.end, "landsat")
    sc = next(s for s in scenes if 0.1 < s.cloud_cover < 0.9)
    qa = src.read(sc, patch, ["QA_PIXEL"]).values[0]
    t = src.truth(sc, patch)
    m, lc = t["mask"].values, t["landcover"].values
    cloud = QAPixel.bit(qa, QAPixel.CLOUD)
    np.testing.assert_array_equal(cloud, m == MaskClass.CLOUD)
    assert not (QAPixel.bit(qa, QAPixel.CLEAR) & cloud).any()
    assert np.all(QAPixel.confidence(qa, QAPixel.CLOUD_CONF)[cloud] == 3)
    shadow = m == MaskClass.SHADOW
    np.testing.assert_array_equal(QAPixel.bit(qa, QAPixel.SHADOW), shadow)
    water_clear = (lc == WATER) & (m == MaskClass.CLEAR)
    if water_clear.any():
        assert QAPixel.bit(qa, QAPixel.WATER)[water_clear].mean() > 0.8
    # native 30 m: blocks of 3 x 3 identical pixels on the 10 m grid
    sr = src.read(sc, patch, ["SR_B4"]).values[0]
    assert len(np.unique(sr)) < sr.size / 5


def test_s1_water_dark_speckle_enl(region, src, patch):
    s1 = src.search(region, dt.date(2021, 7, 1), dt.date(2021, 7, 12), "s1")[0]
    grid = region.grid().window(0, 0, 512, 512)
    da, t = src.read(s1, grid), src.truth(s1, grid)
    lc = t["landcover"].values
    from scipy.ndimage import binary_erosion

    water = binary_erosion(lc == WATER, iterations=1)
    assert water.sum() > 30
    assert np.median(da.sel(band="VV").values[water]) < -15
    # speckle alone: observed / speckle-free linear power is gamma(ENL 4.4) noise with CV 1/sqrt(ENL)
    ratio = 10 ** ((da.sel(band="VV").values - t["clear"].sel(band="VV").values) / 10)
    assert abs(ratio.mean() - 1) < 0.02
    assert ratio.std() / ratio.mean() == pytest.approx(1 / np.sqrt(4.4), rel=0.05)
    # and on a homogeneous area of the image itself: pure open water (speckle-free sigma0 within 0.5 dB)
    clear_vv = t["clear"].sel(band="VV").values
    homog = water & (np.abs(clear_vv - np.median(clear_vv[water])) < 0.5)
    assert homog.sum() > 30
    lin = 10 ** (da.sel(band="VV").values[homog] / 10)
    assert lin.std() / lin.mean() == pytest.approx(1 / np.sqrt(4.4), rel=0.2)


def test_flood_after_event_and_visible_to_sar(region, src):
    grid = region.grid()
    s2 = src.search(region, dt.date(2021, 7, 10), dt.date(2021, 7, 25), "s2")
    before = next(s for s in s2 if s.date < region.event_date)
    after = next(s for s in s2 if s.date > region.event_date)
    fb = src.truth(before, grid.window(0, 0, 512, 512))["flooded"].values.mean()
    fa = src.truth(after, grid.window(0, 0, 512, 512))["flooded"].values.mean()
    assert fb == 0 and fa > 0.03
    late = src.search(region, dt.date(2021, 8, 25), dt.date(2021, 8, 31), "s2")[0]
    assert src.truth(late, grid.window(0, 0, 512, 512))["flooded"].values.mean() < fa  # receded
    s1 = src.search(region, dt.date(2021, 7, 15), dt.date(2021, 7, 27), "s1")
    s1b = next(s for s in s1 if s.date < region.event_date)
    s1a = next(s for s in s1 if s.date > region.event_date)
    g = grid.window(0, 0, 512, 512)
    dark_b = np.mean(src.read(s1b, g, ["VV"]).values < -17)
    dark_a = np.mean(src.read(s1a, g, ["VV"]).values < -17)
    assert dark_a > dark_b + 0.02


def test_every_output_says_simulated(region, src, s2, patch):
    sc = s2[0]
    assert sc.properties["simulated"] is True
    assert src.read(sc, patch, ["B2"]).attrs["simulated"] is True
    t = src.truth(sc, patch)
    assert t.attrs["simulated"] is True and all(v.attrs["simulated"] is True for v in t.data_vars.values())


def test_outside_footprint_is_nodata_and_other_crs_works(region, src, s2):
    sc = s2[0]
    g = region.grid()
    far = Grid(g.crs, g.transform @ Affine.translation(30000, 0), 16, 16)  # 300 km east: off the tile
    da = src.read(sc, far, ["B2", "QA60"])
    assert np.isnan(da.sel(band="B2").values).all()
    w, s, e, n = region.bbox
    geo = Grid("EPSG:4326", Affine(0.0005, 0, w, 0, -0.0005, n), 40, 30)
    dg = src.read(sc, geo, ["B4", "QA60"])
    assert dg.shape == (2, 30, 40) and dg.attrs["crs"] == "EPSG:4326" and np.isfinite(dg.values).all()
    assert set(src.truth(sc, geo).data_vars) >= {"clear", "mask"}


def test_cirrus_shows_in_b10_and_counts_as_thin_cloud(region, src, patch):
    scenes = src.search(region, dt.date(2021, 1, 1), dt.date(2021, 12, 31), "s2")
    sc = next(s for s in scenes if s.properties["synth_cirrus"] > 0.04 and s.properties["synth_cover"] < 0.5)
    da, m = src.read(sc, patch, ["B10", "QA60"]), src.truth(sc, patch)["mask"].values
    b10 = da.sel(band="B10").values
    thin, clear = m == MaskClass.THIN_CLOUD, m == MaskClass.CLEAR
    assert thin.sum() > 100
    assert np.median(b10[thin]) > 0.015  # ice clouds above the water vapour: bright in the 1375 nm band
    if clear.sum() > 100:
        assert np.median(b10[clear]) < 0.006
    qa = da.sel(band="QA60").values.astype(np.uint16)
    assert ((qa >> 11) & 1).any()


# -- read/truth sharing ---------------------------------------------------------------------------
def test_truth_and_read_share_work_but_not_arrays(region, s2, patch):
    sc = _by_regime(s2, "scattered")[0]
    cold = SyntheticSource(seed=0, cache=False)
    ref_read, ref_truth = cold.read(sc, patch), cold.truth(sc, patch)
    synmod.clear_caches()
    warm = SyntheticSource(seed=0)
    t = warm.truth(sc, patch)
    da = warm.read(sc, patch)
    assert len(synmod._RENDERS) == 1  # one render served both
    np.testing.assert_array_equal(da.values, ref_read.values)
    for v in ref_truth.data_vars:
        np.testing.assert_array_equal(t[v].values, ref_truth[v].values)
    # callers own what they get: scribbling on it does not leak into the next read or truth
    for v in t.data_vars:
        t[v].values[...] = 0
    da.values[...] = 0
    t2, da2 = warm.truth(sc, patch), warm.read(sc, patch)
    for v in ref_truth.data_vars:
        np.testing.assert_array_equal(t2[v].values, ref_truth[v].values)
    np.testing.assert_array_equal(da2.values, ref_read.values)
    # same id with other weather (another region's calibration) is another render, not a stale one
    import dataclasses

    other = dataclasses.replace(sc, properties={**sc.properties, "synth_cover": 1.0})
    assert (warm.truth(other, patch)["mask"].values == MaskClass.CLOUD).all()


def test_render_cache_is_bounded(region, s2, monkeypatch):
    monkeypatch.setattr(synmod, "RENDER_CACHE_PIXELS", 3 * 64 * 64)
    synmod.clear_caches()
    src = SyntheticSource(seed=0)
    g = region.grid()
    for i in range(6):
        src.read(s2[i], g.window(64 * i, 0, 64, 64), ["B2"])
    assert len(synmod._RENDERS) == 3
    big = g.window(0, 0, 128, 128)
    src.read(s2[0], big, ["B2"])  # larger than the bound alone: kept, the rest dropped
    assert len(synmod._RENDERS) == 1


def test_sensor_noise_is_anchored_to_world_pixels_not_to_the_grid():
    from pipeline.sources.synthetic.render import sensor_noise

    res = 10.0
    xs, ys = np.arange(50) * res + 1005.0, (np.arange(40) * res + 2005.0)[::-1]  # north-up rows
    full = sensor_noise(xs, ys, res, 7, list(range(13)))
    window = sensor_noise(xs[10:30], ys[5:20], res, 7, list(range(13)))
    rows_up = sensor_noise(xs, ys[::-1], res, 7, list(range(13)))  # the same pixels, rows south to north
    for b in range(13):
        np.testing.assert_array_equal(window[b], full[b][5:20, 10:30])
        np.testing.assert_array_equal(rows_up[b], full[b][::-1])
    assert abs(np.corrcoef(full[0].ravel(), full[1].ravel())[0, 1]) < 0.1  # bands independent
    assert 0.9 < np.std(np.stack(full)) < 1.1
