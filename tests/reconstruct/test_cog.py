"""COG output: layout as GDAL sees it, metadata, uint16 DN encoding, atomic writes, VRTs."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine

from pipeline.errors import DataError
from pipeline.grid import Grid
from pipeline.reconstruct.cog import BlockWriter, RasterSpec, build_vrt, validate_cog, write_cog

GRID = Grid("EPSG:32649", Affine(10.0, 0.0, 750_000.0, 0.0, -10.0, 3_850_000.0), 1100, 900)


def _values(bands: int = 3, grid: Grid = GRID) -> np.ndarray:
    rng = np.random.default_rng(1)
    v = rng.uniform(0.0, 0.6, (bands, grid.height, grid.width)).astype(np.float32)
    v[:, :7, :9] = np.nan
    return v


def test_float_cog_is_valid_and_carries_grid_and_metadata(tmp_path):
    v = _values()
    spec = RasterSpec.reflectance(["B4", "B3", "B2"], tags={"model": "composite", "checkpoint_sha256": "abc"})
    path = write_cog(tmp_path / "out.tif", v, GRID, spec, compress="zstd")
    rep = validate_cog(path)
    assert rep.ok and rep.layout == "COG" and rep.compression == "ZSTD"
    assert rep.overviews == [2, 4]
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 32649
        assert ds.transform == GRID.transform and (ds.width, ds.height) == (GRID.width, GRID.height)
        assert ds.descriptions == ("B4", "B3", "B2")
        assert np.isnan(ds.nodata)
        assert ds.tags()["model"] == "composite" and ds.tags()["checkpoint_sha256"] == "abc"
        np.testing.assert_array_equal(ds.read(), v)
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]  # intermediate and temp removed


def test_uint16_dn_with_scale_offset(tmp_path):
    v = _values(2)
    v[0, 100, 100] = 0.0
    path = write_cog(tmp_path / "dn.tif", v, GRID, RasterSpec.reflectance(["B2", "B3"], dtype="uint16"))
    validate_cog(path)
    with rasterio.open(path) as ds:
        assert ds.dtypes[0] == "uint16" and ds.nodata == 0 and ds.scales == (1e-4, 1e-4) and ds.offsets == (0.0, 0.0)
        dn = ds.read()
    assert (dn[:, :7, :9] == 0).all()  # NaN -> nodata
    assert dn[0, 100, 100] == 1  # a valid zero reflectance must not become nodata
    expected = np.where(v < 0.5e-4, 1e-4, v)  # reflectance that would round to DN 0 is stored as DN 1
    np.testing.assert_allclose(dn[:, 50:, 50:] * 1e-4, expected[:, 50:, 50:], atol=0.5e-4 + 1e-7)


def test_validate_cog_rejects_plain_striped_geotiff(tmp_path):
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=600, height=600, count=1, dtype="uint8", crs="EPSG:32649",
                       transform=GRID.transform) as ds:
        ds.write(np.zeros((1, 600, 600), np.uint8))
    rep = validate_cog(path, raise_on_error=False)
    assert not rep.ok
    joined = " ".join(rep.problems)
    assert "LAYOUT" in joined and "overviews" in joined and "descriptions" in joined
    with pytest.raises(DataError, match="not a valid COG"):
        validate_cog(path)


def test_no_partial_cog_after_failure_and_block_writes(tmp_path, monkeypatch):
    target = tmp_path / "x.tif"
    w = BlockWriter(target, GRID, RasterSpec.reflectance(["B2"]))
    w.write(np.ones((1, 512, 512), np.float32), 0, 0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rasterio.shutil, "copy", boom)
    with pytest.raises(OSError):
        w.commit()
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [w.partial.name]  # no COG temp left
    assert w.partial.exists()  # kept so the run can resume by blocks
    monkeypatch.undo()
    w2 = BlockWriter(target, GRID, RasterSpec.reflectance(["B2"]), resume=True)
    w2.write(np.full((1, 388, 512), 2.0, np.float32), 512, 512)
    w2.commit()
    with rasterio.open(target) as ds:
        a = ds.read(1)
    assert (a[:512, :512] == 1).all() and (a[512:, 512:1024] == 2).all() and np.isnan(a[0, 600])


def test_provenance_companion(tmp_path):
    codes = np.ones((1, GRID.height, GRID.width), np.uint8)
    codes[0, :100] = 0
    codes[0, 100:200] = 2
    codes[0, 200:300] = 3
    codes[0, -5:] = 255
    path = write_cog(tmp_path / "p.tif", codes, GRID, RasterSpec.provenance())
    validate_cog(path)
    with rasterio.open(path) as ds:
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255
        assert ds.descriptions[0] == ("provenance: 0 observed clear, 1 filled from another date, 2 predicted by a "
                                      "model, 3 no clear observation, 255 nodata")
        assert ds.tags()["PROVENANCE_CODES"].startswith("0=observed clear,1=filled from another date,2=")
        np.testing.assert_array_equal(ds.read(), codes)


def test_provenance_codes_are_the_fills_codes():
    from pipeline import harmonize
    from pipeline.reconstruct import cog

    for name in ("OBSERVED", "FILLED", "NO_CLEAR", "NODATA"):
        assert getattr(cog, f"PROVENANCE_{name}") == getattr(harmonize, f"PROVENANCE_{name}"), name
    assert cog.SOURCE_DAYS_NODATA == harmonize.AGE_NONE


def test_source_days_layer_is_int16_with_nodata_minus_one(tmp_path):
    days = np.full((1, GRID.height, GRID.width), 12, np.int16)
    days[0, :50] = 0
    days[0, -5:] = -1
    path = write_cog(tmp_path / "d.tif", days, GRID, RasterSpec.source_days())
    assert validate_cog(path).ok
    with rasterio.open(path) as ds:
        assert ds.dtypes[0] == "int16" and ds.nodata == -1 and "SOURCE_DAYS" in ds.tags()
        np.testing.assert_array_equal(ds.read(), days)
        assert ds.overviews(1)  # nearest overviews: ages stay ages
        assert set(np.unique(ds.read(1, out_shape=(ds.height // 4, ds.width // 4)))) <= {-1, 0, 12}


def test_vrt_mosaic_and_date_stack(tmp_path):
    left = GRID.window(0, 0, 900, 600)
    right = GRID.window(0, 600, 900, 500)
    v = _values()
    a = write_cog(tmp_path / "a.tif", v[:, :, :600], left, RasterSpec.reflectance(["B4", "B3", "B2"]))
    b = write_cog(tmp_path / "b.tif", v[:, :, 600:], right, RasterSpec.reflectance(["B4", "B3", "B2"]))
    vrt = build_vrt([a, b], tmp_path / "mosaic.vrt")
    with rasterio.open(vrt) as ds:
        assert ds.transform == GRID.transform and ds.shape == GRID.shape
        assert ds.descriptions == ("B4", "B3", "B2")
        np.testing.assert_array_equal(ds.read(), v)
    stack = build_vrt([a, a], tmp_path / "dates.vrt", separate=True, labels=["2021-07-20", "2021-07-25"])
    with rasterio.open(stack) as ds:
        assert ds.count == 6 and ds.descriptions[3] == "2021-07-25 B4"


def test_vrt_refuses_mixed_dtypes(tmp_path):
    a = write_cog(tmp_path / "a.tif", _values(1), GRID, RasterSpec.reflectance(["B2"]))
    b = write_cog(tmp_path / "b.tif", _values(1), GRID, RasterSpec.reflectance(["B2"], dtype="uint16"))
    with pytest.raises(DataError, match="a VRT needs them equal"):
        build_vrt([a, b], tmp_path / "bad.vrt")
    assert not (tmp_path / "bad.vrt").exists()


@pytest.mark.parametrize("cut", [0.6, 0.98])
def test_a_cog_copy_that_ends_short_without_an_error_never_gets_the_final_name(tmp_path, monkeypatch, cut):
    """GDAL's COG copy onto a full disk can return normally and leave a truncated file (its header and overview
    directory intact, tiles missing): commit must verify the temp, delete it and raise."""
    target = tmp_path / "x.tif"
    w = BlockWriter(target, GRID, RasterSpec.reflectance(["B2", "B3"]))
    w.write(_values(2), 0, 0)
    real = rasterio.shutil.copy

    def copy_then_truncate(src, dst, **options):
        real(src, dst, **options)
        size = dst.stat().st_size
        with open(dst, "r+b") as f:
            f.truncate(int(size * cut))

    monkeypatch.setattr(rasterio.shutil, "copy", copy_then_truncate)
    with pytest.raises(DataError, match=r"truncated|unreadable|not a valid COG"):
        w.commit()
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [w.partial.name]  # the temp is gone, the blocks kept
    monkeypatch.undo()
    assert w.commit() == target and validate_cog(target).ok  # the same intermediate commits once the copy works


def test_verify_cog_reads_every_overview_level(tmp_path):
    """A file whose full resolution reads but an overview tile is damaged fails verification."""
    from pipeline.reconstruct.cog import verify_cog

    spec = RasterSpec.reflectance(["B2"])
    path = write_cog(tmp_path / "v.tif", _values(1), GRID, spec)
    verify_cog(path, GRID, spec, overviews=2)
    with rasterio.open(path) as ds:
        off = int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1, ovr=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_0_0", "TIFF", bidx=1, ovr=1))
    with open(path, "r+b") as f:  # scribble over the smallest overview's only tile
        f.seek(off)
        f.write(b"\xff" * size)
    with pytest.raises(DataError, match="unreadable"):
        verify_cog(path, GRID, spec)
    with pytest.raises(DataError, match="expected"):
        verify_cog(path, Grid(GRID.crs, GRID.transform, 1000, 900), spec)
