"""Quicklooks (stretch, PNG, side-by-side) and the ``cloudfree preview`` command."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from typer.testing import CliRunner

import pipeline.cli.preview  # noqa: F401  (registers the command on the app)
from pipeline.cli.app import app
from pipeline.errors import DataError
from pipeline.reconstruct.quicklook import rgb_quicklook, save_png, side_by_side


def _raster(values: np.ndarray, bands=("B2", "B3", "B4")) -> xr.DataArray:
    return xr.DataArray(values.astype(np.float32), dims=("band", "y", "x"), coords={"band": list(bands)})


def test_percentile_stretch_orders_channels_and_keeps_balance():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.05, 0.3, size=(20, 30)).astype(np.float32)
    da = _raster(np.stack([base * 0.5, base * 0.8, base]))  # B2 < B3 < B4
    img = rgb_quicklook(da)
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    r, g, b = (img[..., i].astype(float).mean() for i in range(3))
    assert r > g > b  # red = B4 is brightest; one stretch for all channels keeps the colour
    assert img.min() == 0 and img.max() == 255


def test_gain_nan_and_array_inputs():
    arr = np.full((3, 4, 5), 0.1, dtype=np.float32)
    arr[:, 0, 0] = np.nan
    img = rgb_quicklook(arr, gain=3.0)
    assert img.shape == (4, 5, 3)
    assert (img[0, 0] == 0).all()
    assert img[1, 1, 0] == 77  # 0.1 x 3 x 255, rounded
    assert rgb_quicklook(np.zeros((4, 5)), gain=1.0).shape == (4, 5, 3)
    with pytest.raises(DataError, match="B8"):
        rgb_quicklook(_raster(arr), bands=("B8", "B3", "B2"))


def test_save_png_atomic_and_side_by_side(tmp_path):
    a = np.zeros((10, 12, 3), np.uint8)
    b = np.full((8, 6, 3), 200, np.uint8)
    panel = side_by_side([a, b], ["input", "output"])
    assert panel.shape == (10 + 16, 12 + 6 + 4, 3)
    out = save_png(tmp_path / "sub" / "x.png", panel)
    assert np.array_equal(np.asarray(Image.open(out)), panel)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]  # no temp file left behind
    with pytest.raises(DataError, match="uint8"):
        save_png(tmp_path / "y.png", panel.astype(np.float32))
    with pytest.raises(DataError, match="labels"):
        side_by_side([a, b], ["one"])


def test_preview_command_writes_a_true_colour_png(tmp_path):
    out = tmp_path / "clear.png"
    res = CliRunner().invoke(app, ["preview", "zhengzhou-demo", "--date", "2021-07-08", "--source", "synthetic",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "T49SGU" in res.output
    img = np.asarray(Image.open(out))
    assert img.shape == (1026, 1035, 3) and img.std() > 10


def test_preview_sar_and_no_scene_error(tmp_path):
    res = CliRunner().invoke(app, ["preview", "zhengzhou-demo", "--date", "2021-07-08", "--sensor", "s1",
                                   "-o", str(tmp_path / "s1.png")])
    assert res.exit_code == 0, res.output
    # Landsat 8 alone every 16 days in July 2021 (06-27, 07-13, ...): nothing within 3 days of 07-09
    res = CliRunner().invoke(app, ["preview", "zhengzhou-demo", "--date", "2021-07-09", "--sensor", "landsat",
                                   "-o", str(tmp_path / "none.png")])
    assert res.exit_code != 0
    msg = str(res.exception)
    assert "nearest dates" in msg and "2021-06-27" in msg and "2021-07-13" in msg
    assert not (tmp_path / "none.png").exists()
