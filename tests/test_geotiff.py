"""pipeline.geotiff: band-named GeoTIFFs written atomically and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline import files as pfiles
from pipeline import geotiff
from pipeline.errors import DataError
from pipeline.files import TMP_SUFFIX
from pipeline.grid import Grid


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TMP_SUFFIX)]


GRID = Grid("EPSG:32649", Affine(10.0, 0.0, 700000.0, 0.0, -10.0, 3850000.0), 96, 96)


def test_geotiff_has_bands_crs_transform_deflate_and_is_deterministic(tmp_path):
    data = np.arange(2 * 96 * 96, dtype=np.uint16).reshape(2, 96, 96)
    sha = geotiff.write_geotiff(
        tmp_path / "a.tif", data, GRID, ["B4", "cloud_mask"], tags={"scene_id": "x"}, scales=[1e-4, 1], offsets=[0, 0]
    )
    assert sha == pfiles.sha256_file(tmp_path / "a.tif")
    with rasterio.open(tmp_path / "a.tif") as src:
        assert src.descriptions == ("B4", "cloud_mask")
        assert src.crs.to_epsg() == 32649 and src.transform == GRID.transform
        assert src.compression.name.lower() == "deflate"
        assert src.tags()["scene_id"] == "x" and src.scales == (1e-4, 1.0)
        np.testing.assert_array_equal(src.read(), data)
    again = geotiff.write_geotiff(tmp_path / "b.tif", data, GRID, ["B4", "cloud_mask"], tags={"scene_id": "x"},
                                  scales=[1e-4, 1], offsets=[0, 0])
    assert again == sha
    assert _tmp_files(tmp_path) == []
    with pytest.raises(ValueError, match="does not fit"):
        geotiff.write_geotiff(tmp_path / "c.tif", data[0], GRID, ["B4"])


def test_truncated_geotiff_is_a_clear_error(tmp_path):
    p = tmp_path / "t.tif"
    geotiff.write_geotiff(p, np.ones((3, 96, 96), np.uint16) * np.arange(96, dtype=np.uint16), GRID, ["a", "b", "c"])
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DataError, match=r"t\.tif: unreadable or truncated GeoTIFF"):
        geotiff.read_geotiff(p)
    with pytest.raises(DataError, match="file not found"):
        geotiff.read_geotiff(tmp_path / "missing.tif")


def test_a_file_that_does_not_read_back_never_gets_its_name(tmp_path, monkeypatch):
    # What a full disk does to libtiff: the write "succeeds", the file is cut short.
    real_open = rasterio.open

    def truncating_open(path, mode="r", **kw):
        ds = real_open(path, mode, **kw)
        if mode == "w":
            close = ds.close

            def close_and_cut():
                close()
                Path(path).write_bytes(Path(path).read_bytes()[:2000])
            ds.close = close_and_cut
        return ds

    monkeypatch.setattr(geotiff.rasterio, "open", truncating_open)
    data = np.random.default_rng(0).random((2, 96, 96), dtype=np.float32)
    target = tmp_path / "patch.tif"
    with pytest.raises(DataError, match=r"patch.tif: the GeoTIFF just written does not read back"):
        geotiff.write_geotiff(target, data, GRID, ["B2", "B3"])
    assert not target.exists() and not _tmp_files(tmp_path)
