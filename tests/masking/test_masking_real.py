"""Masking on real pixels nobody in this project made (../shared/data/real)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr

from pipeline.masking.codes import MaskClass
from pipeline.masking.scene import mask_fractions, mask_scene
from pipeline.sensors import S2_BANDS, get_sensor, to_physical


def kappa(pred: np.ndarray, ref: np.ndarray) -> float:
    """Cohen's kappa of two boolean maps."""
    a, b = pred.ravel().astype(bool), ref.ravel().astype(bool)
    po = np.mean(a == b)
    pe = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
    return float((po - pe) / (1 - pe))


def _npz_raster(path: Path) -> tuple[xr.DataArray, np.ndarray]:
    d = np.load(path)
    img = np.moveaxis(d["img"], -1, 0)
    raster = xr.DataArray(
        img, dims=("band", "y", "x"), coords={"band": ["blue", "green", "red", "nir", "swir1", "swir2"]},
        attrs={"transform": [30.0, 0.0, 0.0, 0.0, -30.0, 0.0]},  # ~30 m, no CRS in the file
    )
    return raster, d["msk"][..., 0]


# One threshold set for all three; measured: cloud 0.854 / 0.756 / 0.801, shadow 0.784 / 0.688 / 0.779.
@pytest.mark.parametrize(
    "name,min_cloud,min_shadow", [("sentinel2", 0.84, 0.70), ("landsat7", 0.72, 0.60), ("landsat5", 0.75, 0.65)]
)
def test_spectral_rule_kappa_on_reference_labels(
    real_data: Path, name: str, min_cloud: float, min_shadow: float
) -> None:
    raster, ref = _npz_raster(real_data / "cloudmask-reference" / f"{name}.npz")
    mask = mask_scene(raster, method="spectral").values  # sun unknown: dark pixels near clouds are shadow
    assert kappa(np.isin(mask, [MaskClass.CLOUD, MaskClass.THIN_CLOUD]), ref == 4) >= min_cloud
    assert kappa(mask == MaskClass.SHADOW, ref == 0) >= min_shadow


def _landsat(folder: Path) -> tuple[xr.DataArray, np.ndarray, dict]:
    sensor = get_sensor("landsat8_l2")
    names = ["SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7", "QA_PIXEL"]
    arrays = []
    for b in names:
        with rasterio.open(next(folder.glob(f"*_{b}.TIF"))) as ds:
            dn, transform, crs = ds.read(1), list(ds.transform)[:6], str(ds.crs)
        if b == "QA_PIXEL":
            qa = dn
            arrays.append(dn.astype(np.float32))
        else:
            x = to_physical(sensor, b, dn)
            x[dn == 0] = np.nan
            arrays.append(x)
    mtl = {}
    for line in next(folder.glob("*_MTL.txt")).read_text().splitlines():
        if "=" in line:
            k, v = (s.strip() for s in line.split("=", 1))
            mtl[k] = v
    attrs = {
        "sensor": "landsat8_l2",
        "transform": transform,
        "crs": crs,
        "datetime": mtl["DATE_ACQUIRED"] + "T00:00:00+00:00",
        "sun_azimuth": float(mtl["SUN_AZIMUTH"]),
        "sun_elevation": float(mtl["SUN_ELEVATION"]),
    }
    return xr.DataArray(np.stack(arrays), dims=("band", "y", "x"), coords={"band": names}, attrs=attrs), qa, mtl


@pytest.mark.parametrize(
    "scene,cloud,shadow,snow",
    [("LC08_L2SP_008059_20191201", 0.81, 0.06, 0.0), ("LC08_L2SP_005009_20150710", 0.55, None, 0.40)],
)
def test_qa_pixel_matches_hand_decoded_bits(
    real_data: Path, scene: str, cloud: float, shadow: float | None, snow: float
) -> None:
    raster, qa, _ = _landsat(real_data / "landsat-c2-l2" / scene)
    mask = mask_scene(raster).values
    assert mask_scene(raster).attrs["mask_method"] == "qa_pixel"
    bit = lambda i: ((qa >> i) & 1) == 1  # noqa: E731
    valid = ~bit(0)
    np.testing.assert_array_equal(mask == MaskClass.NODATA, bit(0))
    np.testing.assert_array_equal(mask == MaskClass.CLOUD, valid & (bit(3) | bit(1)))
    np.testing.assert_array_equal(mask == MaskClass.THIN_CLOUD, valid & bit(2) & ~bit(3) & ~bit(1))
    np.testing.assert_array_equal(mask == MaskClass.SHADOW, valid & bit(4) & ~bit(3) & ~bit(1) & ~bit(2))
    np.testing.assert_array_equal(mask == MaskClass.SNOW, valid & bit(5) & ~bit(4) & ~bit(3) & ~bit(2) & ~bit(1))
    # The README's scene figures are fractions of valid pixels with the high-confidence cloud bit.
    assert bit(3)[valid].mean() == pytest.approx(cloud, abs=0.02)
    assert bit(5)[valid].mean() == pytest.approx(snow, abs=0.02)
    if shadow is not None:
        assert bit(4)[valid].mean() == pytest.approx(shadow, abs=0.01)
    # QA snow is never called cloud where QA says snow and no cloud bit
    assert not np.isin(
        mask[valid & bit(5) & ~bit(3) & ~bit(1) & ~bit(2)], [MaskClass.CLOUD, MaskClass.THIN_CLOUD]
    ).any()


def test_spectral_rule_does_not_call_greenland_snow_cloud(real_data: Path) -> None:
    raster, qa, _ = _landsat(real_data / "landsat-c2-l2" / "LC08_L2SP_005009_20150710")
    mask = mask_scene(raster.drop_sel(band="QA_PIXEL"), method="spectral").values
    qa_snow = (((qa >> 5) & 1) == 1) & (((qa >> 0) & 1) == 0)
    called_cloud = np.isin(mask[qa_snow], [MaskClass.CLOUD, MaskClass.THIN_CLOUD]).mean()
    assert called_cloud <= 0.05  # measured 0.000
    assert (mask[qa_snow] == MaskClass.SNOW).mean() >= 0.9  # measured 1.000


def _sen12(real_data: Path, kind: str, roi: str) -> xr.DataArray:
    with rasterio.open(real_data / "sen12mscr" / kind / f"{roi}.tif") as ds:
        dn, transform, crs = ds.read(), list(ds.transform)[:6], str(ds.crs)
    return xr.DataArray(
        np.clip(dn, 0, 10000).astype(np.float32) / 10000, dims=("band", "y", "x"), coords={"band": list(S2_BANDS)},
        attrs={"sensor": "s2_l1c", "transform": transform, "crs": crs},
    )


@pytest.mark.parametrize(
    "roi,kind,lo,hi",
    [
        ("ROIs1970_fall_139_p839", "s2_cloudy", 0.25, 1.0),  # measured 0.972
        ("ROIs1970_fall_139_p839", "s2_cloudfree", 0.0, 0.05),  # measured 0.000
        ("ROIs2017_winter_112_p797", "s2_cloudy", 0.0, 0.05),  # measured 0.000: hazy/dark, not bright cloud
        ("ROIs2017_winter_112_p797", "s2_cloudfree", 0.0, 0.05),  # measured 0.000
    ],
)
def test_s2cloudless_on_sen12mscr(real_data: Path, roi: str, kind: str, lo: float, hi: float) -> None:
    mask = mask_scene(_sen12(real_data, kind, roi))
    assert mask.attrs["mask_method"] == "s2cloudless"
    assert lo <= mask_fractions(mask)["cloud_fraction"] <= hi


def test_geographic_grid_buffers_in_metres_not_degrees(real_data):
    """SEN12MS-CR-TS ships EPSG:4326 (~9e-5 deg pixels): read as metres, a 30 m buffer was ~300 000 px and a
    clear date came out 99.96 % shadow. On its native grid the clear date must stay clear."""
    import glob

    from pipeline.grid import Grid
    from pipeline.masking.scene import mask_fractions, mask_scene
    from pipeline.sources.registry import get_source

    root = real_data / "sen12mscr-ts"
    src = get_source("local", root=root)
    scene = next(s for s in src.scenes() if s.date.isoformat() == "2018-06-10")
    with rasterio.open(sorted(glob.glob(str(root / "ROIs2017/146/S2/13/*.tif")))[0]) as ds:
        grid = Grid(ds.crs.to_string(), ds.transform, ds.width, ds.height)
    assert grid.crs == "EPSG:4326"
    fr = mask_fractions(mask_scene(src.read(scene, grid), scene))
    assert fr["cloud_fraction"] + fr["shadow_fraction"] < 0.05, fr
