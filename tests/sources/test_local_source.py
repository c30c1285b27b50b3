"""The ``local`` source on real SEN12MS-CR and Landsat C2 L2 files, and on tiny rasters written from code
in the real SEN12MS-CR(-TS) and Region_T folder hierarchies (torchgeo style: real UTM CRS and transform)."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.warp import transform as warp_points

from pipeline.errors import DataError, SourceError
from pipeline.grid import Grid
from pipeline.regions import load_region, parse_region
from pipeline.sensors import S2_BANDS
from pipeline.sources.base import Source
from pipeline.sources.local.layouts import LAYOUTS
from pipeline.sources.local.source import LocalSource
from pipeline.sources.registry import get_source

FALL, WINTER = "ROIs1970_fall_139_p839", "ROIs2017_winter_112_p797"
L8_TROPICS = "LC08_L2SP_008059_20191201_20200825_02_T1"
L8_GREENLAND = "LC08_L2SP_005009_20150710_20200908_02_T2"


def _file_grid(path: Path) -> tuple[np.ndarray, Grid]:
    with rasterio.open(path) as src:
        return src.read(), Grid(src.crs.to_string(), src.transform, src.width, src.height)


def _write(path: Path, data: np.ndarray, crs: str, transform: Affine, nodata: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
    )
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _region(bbox, name="test-aoi", sensors=("s1", "s2", "landsat"), window=("2021-07-01", "2021-08-31")):
    return parse_region(
        {"name": name, "bbox": list(bbox), "sensors": list(sensors), "window": {"start": window[0], "end": window[1]}}
    )


# -- real SEN12MS-CR ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sen12(real_data) -> LocalSource:
    return LocalSource(real_data / "sen12mscr")


def test_sen12mscr_triplets_indexed_with_crs_transform_bands(sen12, real_data):
    assert isinstance(sen12, Source) and sen12.name == "local"
    scenes = {s.id: s for s in sen12.scenes()}
    assert len(scenes) == 6
    crs = {FALL: "EPSG:32650", WINTER: "EPSG:32631"}  # the winter patch is in Belgium/Netherlands, zone 31
    for sample in (FALL, WINTER):
        for kind, sensor, role, bands in (
            ("s1", "s1_grd", "sar", ("VV", "VH")),
            ("s2_cloudy", "s2_l1c", "cloudy", S2_BANDS),
            ("s2_cloudfree", "s2_l1c", "cloudfree", S2_BANDS),
        ):
            s = scenes[f"{sample}_{kind}"]
            assert s.sensor == sensor and s.cloud_cover is None
            assert s.properties["role"] == role and s.properties["sample"] == sample
            assert s.properties["bands"] == bands and s.properties["date_known"] is False
            assert s.properties["layout"] == "sen12mscr_flat" and s.properties["simulated"] is False
            path = Path(s.properties["files"][0])
            assert path == (real_data / "sen12mscr" / kind / f"{sample}.tif").resolve()
            with rasterio.open(path) as src:
                assert src.crs.to_string() == crs[sample]
                assert src.count == len(bands)
    fall = scenes[f"{FALL}_s2_cloudy"].properties
    assert (fall["roi"], fall["season"], fall["scene"], fall["patch"]) == ("ROIs1970", "fall", 139, 839)
    # stable pseudo-dates: cloudy first, its cloud-free target (and S1) one day later, inside the season
    c, f, s1 = (scenes[f"{FALL}_{k}"].datetime for k in ("s2_cloudy", "s2_cloudfree", "s1"))
    assert c < f == s1 and f - c == dt.timedelta(days=1) and dt.date(2017, 9, 1) <= c.date() <= dt.date(2017, 11, 30)
    assert [s.id for s in sen12.scenes("s1")] == [f"{WINTER}_s1", f"{FALL}_s1"]


def test_read_on_own_grid_returns_file_pixels_exactly(sen12, real_data):
    scenes = {s.id: s for s in sen12.scenes()}
    dn, grid = _file_grid(real_data / "sen12mscr" / "s2_cloudy" / f"{FALL}.tif")
    assert grid.crs == "EPSG:32650"
    assert tuple(grid.transform)[:6] == (10.0, 0.0, 701879.9106015414, 0.0, -10.0, 3710139.5406956286)
    r = sen12.read(scenes[f"{FALL}_s2_cloudy"], grid)
    assert isinstance(r.data, da.Array)  # lazy until asked
    assert r.dims == ("band", "y", "x") and tuple(r.band.values) == S2_BANDS and r.shape == (13, 256, 256)
    v = r.values
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, dn.astype(np.float32) * np.float32(1e-4))  # DN = reflectance x 10000
    np.testing.assert_allclose(r.x.values[[0, -1]], [701884.9106015414, 701879.9106015414 + 2555])
    assert r.attrs["simulated"] is False and r.attrs["crs"] == "EPSG:32650" and r.attrs["sensor"] == "s2_l1c"
    assert r.attrs["scene_id"] == f"{FALL}_s2_cloudy" and r.attrs["transform"] == list(grid.transform)[:6]
    assert r.attrs["datetime"].startswith("2017-10-15")

    s1_db, s1_grid = _file_grid(real_data / "sen12mscr" / "s1" / f"{WINTER}.tif")
    s1 = sen12.read(scenes[f"{WINTER}_s1"], s1_grid, ["VH"]).values
    np.testing.assert_array_equal(s1[0], s1_db[1])  # dB stays dB, band picked by name
    assert np.nanmax(s1) < 10 and np.nanmin(s1) > -60


def test_read_on_shifted_and_coarser_grids(sen12, real_data):
    scene = next(s for s in sen12.scenes() if s.id == f"{FALL}_s2_cloudfree")
    dn, g = _file_grid(real_data / "sen12mscr" / "s2_cloudfree" / f"{FALL}.tif")
    refl = dn.astype(np.float32) * np.float32(1e-4)

    # whole-pixel shift: same pixels, moved; what falls outside the file is NaN
    shifted = g.window(3, 5, 256, 256)
    v = sen12.read(scene, shifted, ["B4", "B8"]).values
    np.testing.assert_allclose(v[:, :-3, :-5], refl[[3, 7], 3:, 5:], rtol=1e-6)
    assert np.isnan(v[:, -3:, :]).all() and np.isnan(v[:, :, -5:]).all()

    # 20 m grid on the same origin: each output pixel summarises a 2x2 block
    coarse = Grid(g.crs, Affine(20.0, 0, g.transform.c, 0, -20.0, g.transform.f), 128, 128)
    c = sen12.read(scene, coarse, ["B4"]).values[0]
    blocks = refl[3].reshape(128, 2, 128, 2).mean(axis=(1, 3))
    assert not np.isnan(c).any()
    assert np.corrcoef(c.ravel(), blocks.ravel())[0, 1] > 0.95
    assert abs(float(c.mean()) - float(blocks.mean())) < 0.01

    # another CRS (the neighbouring UTM zone): reprojected by GDAL, values stay in the source's range
    left, bottom, right, top = g.bounds_lonlat()
    xs, ys = warp_points("EPSG:4326", "EPSG:32651", [left, right], [bottom, top])
    other = Grid("EPSG:32651", Affine(10.0, 0, min(xs) + 500, 0, -10.0, max(ys) - 500), 150, 150)
    o = sen12.read(scene, other, ["B4"]).values[0]
    assert np.isfinite(o[40:110, 40:110]).all()
    assert refl[3].min() - 1e-6 <= np.nanmin(o) and np.nanmax(o) <= refl[3].max() + 1e-6


def test_read_rejects_unknown_band_and_foreign_scene(sen12, real_data):
    scene = sen12.scenes("s1")[0]
    _, g = _file_grid(Path(scene.properties["files"][0]))
    with pytest.raises(SourceError, match=r"has no band\(s\) \['B4'\] on disk; it has: VV, VH"):
        sen12.read(scene, g, ["B4"])
    foreign = type(scene)("nope", "s1_grd", scene.datetime, scene.footprint, None, {})
    with pytest.raises(SourceError, match="'nope' is not in the local index"):
        sen12.read(foreign, g)


def test_search_by_region_and_undated_window_is_logged(sen12, caplog):
    near_fall = _region((119.1, 33.4, 119.4, 33.6))
    with caplog.at_level(logging.WARNING, logger="pipeline.sources.local.source"):
        found = sen12.search(near_fall, dt.date(2021, 7, 1), dt.date(2021, 8, 31), "s2")
    assert [s.id for s in found] == [f"{FALL}_s2_cloudy", f"{FALL}_s2_cloudfree"]
    assert "sen12mscr_flat carry no acquisition dates" in caplog.text and "ignored" in caplog.text
    assert sen12.search(_region((100.0, 10.0, 100.5, 10.5)), None, None, "s2") == []
    assert len(sen12.search(None, None, None, "s1_grd")) == 2  # no region: everything of that sensor
    with pytest.raises(SourceError, match="unknown sensor 'modis'"):
        sen12.search(None, None, None, "modis")


# -- real Landsat C2 L2 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def landsat(real_data) -> LocalSource:
    return LocalSource(real_data / "landsat-c2-l2")


def test_landsat_scenes_from_file_names_and_mtl(landsat):
    scenes = {s.id: s for s in landsat.scenes()}
    assert set(scenes) == {L8_TROPICS, L8_GREENLAND}
    s = scenes[L8_TROPICS]
    assert s.sensor == "landsat8_l2" and s.family == "landsat"
    assert s.datetime == dt.datetime(2019, 12, 1, 15, 13, 51, 861099, tzinfo=dt.timezone.utc)
    assert s.cloud_cover == pytest.approx(0.8102)  # MTL CLOUD_COVER 81.02 %
    assert s.properties["sun_azimuth"] == pytest.approx(136.31696044) and s.properties[
        "sun_elevation"
    ] == pytest.approx(57.08727307)
    assert (s.properties["wrs_path"], s.properties["wrs_row"]) == (8, 59) and s.properties["date_known"] is True
    assert s.properties["bands"] == ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7", "QA_PIXEL")
    assert scenes[L8_GREENLAND].cloud_cover == pytest.approx(0.5465)


def test_landsat_search_uses_dates_and_footprint(landsat):
    greenland = _region((-40.0, 71.5, -38.0, 72.5), sensors=("landsat",))
    assert [s.id for s in landsat.search(greenland, dt.date(2015, 7, 1), dt.date(2015, 7, 31), "landsat")] == [
        L8_GREENLAND
    ]
    assert landsat.search(greenland, dt.date(2015, 8, 1), dt.date(2015, 8, 31), "landsat") == []
    assert landsat.search(greenland, dt.date(2015, 7, 1), dt.date(2015, 7, 31), "s2") == []
    assert [s.id for s in landsat.search(None, None, None, "landsat8_l2")] == [L8_GREENLAND, L8_TROPICS]


def test_landsat_reads_reflectance_and_integer_qa(landsat, real_data):
    scene = next(s for s in landsat.scenes() if s.id == L8_TROPICS)
    folder = real_data / "landsat-c2-l2" / "LC08_L2SP_008059_20191201"
    red_dn, g = _file_grid(folder / f"{L8_TROPICS}_SR_B4.TIF")
    qa_dn, _ = _file_grid(folder / f"{L8_TROPICS}_QA_PIXEL.TIF")
    r = landsat.read(scene, g).compute()
    assert tuple(r.band.values) == scene.properties["bands"]
    red = r.sel(band="SR_B4").values
    valid = red_dn[0] != 0  # SR nodata is DN 0
    np.testing.assert_allclose(
        red[valid], red_dn[0][valid].astype(np.float32) * np.float32(2.75e-5) - np.float32(0.2), atol=1e-6
    )
    assert np.isnan(red[~valid]).all()
    qa = r.sel(band="QA_PIXEL").values
    np.testing.assert_array_equal(qa, qa_dn[0].astype(np.float32))  # codes stay exact integers
    assert np.array_equal(qa, np.round(qa))

    # a shifted, coarser grid: SR is resampled, QA takes nearest codes only (never an average of bits)
    coarse = Grid(
        g.crs, Affine(g.transform.a * 3, 0, g.transform.c + 1000, 0, g.transform.e * 3, g.transform.f - 1000), 100, 100
    )
    c = landsat.read(scene, coarse, ["QA_PIXEL", "SR_B5"]).values
    assert set(np.unique(c[0])) <= set(np.unique(qa_dn).astype(np.float32))
    assert np.nanmin(c[1]) >= -0.2 and np.nanmax(c[1]) <= 1.7


def test_landsat_qa_outside_footprint_is_fill_code(landsat, real_data):
    scene = next(s for s in landsat.scenes() if s.id == L8_TROPICS)
    _, g = _file_grid(real_data / "landsat-c2-l2" / "LC08_L2SP_008059_20191201" / f"{L8_TROPICS}_QA_PIXEL.TIF")
    beyond = g.window(-10, -10, 20, 20)  # top-left 10x10 outside the scene
    v = landsat.read(scene, beyond, ["SR_B2", "QA_PIXEL"]).values
    assert np.isnan(v[0, :10, :10]).all()
    assert (v[1, :10, :10] == 1).all()  # QA_PIXEL bit 0 = fill, so masks see nodata


# -- layouts written from code ---------------------------------------------------------------------------


def test_sen12mscr_ts_layout(tmp_path):
    crs = "EPSG:32633"  # ROIs1158/106 lies in UTM 33N
    t0 = Affine(10.0, 0, 399960.0, 0, -10.0, 5600040.0)
    dates = {"S1": ["2018-01-03", "2018-01-15", "2018-01-27"], "S2": ["2018-01-02", "2018-01-17", "2018-01-27"]}
    rng = np.random.default_rng(0)
    for t in range(3):
        for patch in (0, 1):
            tr = t0 @ Affine.translation(32 * patch, 0)
            for kind, data in (
                ("S1", rng.normal(-12, 3, (2, 32, 32)).astype(np.float32)),
                ("S2", rng.integers(1, 5000, (13, 32, 32), dtype=np.uint16)),
            ):
                name = f"{kind.lower()}_ROIs1158_106_ImgNo_{t}_{dates[kind][t]}_patch_{patch}.tif"
                _write(tmp_path / "ROIs1158" / "106" / kind / str(t) / name, data, crs, tr)
    src = LocalSource(tmp_path)
    scenes = src.scenes()
    assert len(scenes) == 12 and {s.properties["layout"] for s in scenes} == {"sen12mscr_ts"}
    s2 = src.scenes("s2")
    assert [s.date for s in s2 if s.properties["patch"] == 0] == [
        dt.date(2018, 1, 2),
        dt.date(2018, 1, 17),
        dt.date(2018, 1, 27),
    ]
    first = s2[0]
    assert first.id == "s2_ROIs1158_106_ImgNo_0_2018-01-02_patch_0"
    assert (
        first.properties["time_index"] == 0
        and first.properties["roi"] == "ROIs1158/106"
        and first.properties["date_known"]
    )
    # dated layout: the window applies (and no "ignored" warning)
    w, s, e, n = Grid(crs, t0, 64, 32).bounds_lonlat()
    aoi = _region((w, s, e, n))
    assert len(src.search(aoi, dt.date(2018, 1, 10), dt.date(2018, 1, 20), "s2")) == 2
    assert len(src.search(aoi, dt.date(2018, 1, 10), dt.date(2018, 1, 20), "s1")) == 2
    # read across the two patches: a grid spanning both returns both files' pixels where they lie
    g = Grid(crs, t0, 32, 32)
    with rasterio.open(first.properties["files"][0]) as f:
        np.testing.assert_array_equal(src.read(first, g).values, f.read().astype(np.float32) * np.float32(1e-4))


def test_region_t_layout_and_wuhan_region(tmp_path, caplog):
    crs = "EPSG:32650"
    (x,), (y,) = warp_points("EPSG:4326", crs, [114.3], [30.6])
    tr = Affine(30.0, 0, round(x / 30) * 30, 0, -30.0, round(y / 30) * 30)
    rng = np.random.default_rng(1)
    for patch in (0, 1):
        for t in (1, 2, 3):
            data = rng.uniform(0.0, 0.4, (4, 16, 16)).astype(np.float32)
            _write(
                tmp_path / "wuhan" / f"Wuhan_T{t}_Patch{patch}.tif", data, crs, tr @ Affine.translation(16 * patch, 0)
            )
    src = LocalSource(tmp_path, layout="region_t")
    scenes = src.scenes()
    assert [s.id for s in scenes if s.properties["patch"] == 0] == [
        "Wuhan_T1_Patch0",
        "Wuhan_T2_Patch0",
        "Wuhan_T3_Patch0",
    ]
    assert all(s.sensor == "landsat8_toa" and s.properties["bands"] == ("B2", "B3", "B4", "B5") for s in scenes)
    assert [s.properties["role"] for s in scenes[::2]] == ["cloudy", "cloudy", "cloudfree"]
    with caplog.at_level(logging.WARNING, logger="pipeline.sources.local.source"):
        found = src.search(load_region("wuhan-landsat"), dt.date(2021, 1, 1), dt.date(2021, 12, 31), "landsat")
    assert len(found) == 6 and "region_t carry no acquisition dates" in caplog.text
    t3 = next(s for s in scenes if s.id == "Wuhan_T3_Patch1")
    with rasterio.open(t3.properties["files"][0]) as f:
        expect, g = f.read(), Grid(crs, f.transform, 16, 16)
    np.testing.assert_array_equal(src.read(t3, g).values, expect)  # TOA floats: no scaling


def test_sen12mscr_nested_layout_matches_flat_ids(tmp_path):
    crs, tr = "EPSG:32610", Affine(10.0, 0, 500000.0, 0, -10.0, 4200000.0)
    for kind, data in (
        ("s1", np.full((2, 8, 8), -10.0, np.float32)),
        ("s2", np.full((13, 8, 8), 1500, np.uint16)),
        ("s2_cloudy", np.full((13, 8, 8), 6000, np.uint16)),
    ):
        _write(tmp_path / f"ROIs1158_spring_{kind}" / f"{kind}_1" / f"ROIs1158_spring_{kind}_1_p407.tif", data, crs, tr)
    src = LocalSource(tmp_path)
    by_id = {s.id: s for s in src.scenes()}
    assert set(by_id) == {
        "ROIs1158_spring_1_p407_s1",
        "ROIs1158_spring_1_p407_s2_cloudfree",
        "ROIs1158_spring_1_p407_s2_cloudy",
    }
    assert {s.properties["layout"] for s in by_id.values()} == {"sen12mscr"}
    assert by_id["ROIs1158_spring_1_p407_s2_cloudfree"].properties["role"] == "cloudfree"
    assert by_id["ROIs1158_spring_1_p407_s2_cloudy"].date == dt.date(2017, 4, 15)
    v = src.read(by_id["ROIs1158_spring_1_p407_s2_cloudy"], Grid(crs, tr, 8, 8), ["B2"]).values
    np.testing.assert_allclose(v, 0.6, rtol=1e-6)


def test_get_source_builds_local(real_data):
    src = get_source("local", root=real_data / "sen12mscr", layout="sen12mscr_flat")
    assert isinstance(src, LocalSource) and len(src.scenes()) == 6


# -- clear errors ----------------------------------------------------------------------------------


def test_truncated_geotiff_names_the_file(tmp_path, real_data):
    good = real_data / "sen12mscr" / "s2_cloudy" / f"{FALL}.tif"
    bad = tmp_path / "s2_cloudy" / f"{FALL}.tif"
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # header intact, pixels cut off
    src = LocalSource(tmp_path)
    scene = src.scenes()[0]
    _, g = _file_grid(good)
    lazy = src.read(scene, g)
    with pytest.raises(DataError, match=rf"{bad}: cannot read pixels .*truncated or corrupt - re-download it"):
        lazy.values

    bad.write_bytes(good.read_bytes()[:100])  # even the header is gone: fails while indexing
    with pytest.raises(DataError, match=rf"{bad}: not a readable GeoTIFF"):
        LocalSource(tmp_path)


def test_wrong_band_count_names_file_and_expectation(tmp_path):
    path = _write(
        tmp_path / "s2_cloudfree" / f"{FALL}.tif",
        np.ones((3, 8, 8), np.uint16),
        "EPSG:32650",
        Affine(10, 0, 700000, 0, -10, 3700000),
    )
    with pytest.raises(DataError) as info:
        LocalSource(tmp_path)
    msg = str(info.value)
    assert (
        str(path) in msg
        and "has 3 band(s)" in msg
        and "sen12mscr_flat expects 13 bands (B1, B2" in msg
        and "B8A" in msg
    )


def test_empty_folder_lists_layouts_tried(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError) as info:
        LocalSource(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "found no GeoTIFFs" in msg
    for name in LAYOUTS:
        assert name in msg
    assert "ROIs1158_spring_s1/s1_1/ROIs1158_spring_s1_1_p407.tif" in msg and "_T1_Patch0.tif" in msg

    _write(tmp_path / "random.tif", np.ones((1, 4, 4), np.uint8), "EPSG:32650", Affine(10, 0, 0, 0, -10, 0))
    with pytest.raises(DataError, match="found 1 GeoTIFF\\(s\\) matching none, e.g. random.tif"):
        LocalSource(tmp_path)


def test_bad_root_and_layout(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        LocalSource(tmp_path / "missing")
    with pytest.raises(
        SourceError, match="unknown local layout 'sen12'; use 'auto' or one of: sen12mscr, sen12mscr_flat"
    ):
        LocalSource(tmp_path, layout="sen12")


def test_same_scene_twice_is_an_error(tmp_path, real_data):
    for sub in ("a", "b"):
        dst = tmp_path / sub / "s1"
        dst.mkdir(parents=True)
        shutil.copy(real_data / "sen12mscr" / "s1" / f"{FALL}.tif", dst)
    with pytest.raises(DataError, match=f"scene {FALL}_s1 is also at"):
        LocalSource(tmp_path)


def test_an_unreadable_file_beside_good_ones_is_skipped_with_a_warning(tmp_path, real_data, caplog):
    # One broken download among many (often outside the AOI) must not stop the run: its scene is skipped, named.
    for name in (FALL, WINTER):
        src_file = real_data / "sen12mscr" / "s2_cloudy" / f"{name}.tif"
        (tmp_path / "s2_cloudy").mkdir(exist_ok=True)
        (tmp_path / "s2_cloudy" / f"{name}.tif").write_bytes(src_file.read_bytes())
    bad = tmp_path / "s2_cloudy" / f"{WINTER}.tif"
    bad.write_bytes(b"not a tiff at all")
    with caplog.at_level("WARNING", logger="pipeline.sources.local.source"):
        src = LocalSource(tmp_path)
    assert len(src.scenes()) == 1
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and f"{bad}: not a readable GeoTIFF" in warned[0] and "skipped 1 scene(s)" in warned[0]
