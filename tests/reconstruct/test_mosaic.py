"""Inference inputs are training inputs: a mosaic window and a cube sample of the same pixels give the same arrays."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import torch

from models.spec import InputSpec
from pipeline.errors import DataError
from pipeline.masking.codes import MaskClass, to_cube_codes
from pipeline.masking.scene import mask_scene
from pipeline.normalize import optical_to_unit, sar_to_unit
from pipeline.reconstruct.config import ReconstructConfig
from pipeline.reconstruct.mosaic import MosaicLoader
from pipeline.reconstruct.plan import plan_inputs
from pipeline.regions import parse_region
from pipeline.sensors import S2_BANDS
from pipeline.sources.synthetic.source import SyntheticSource
from pipeline.train.samples import assemble_sample, model_arrays

DATE = dt.date(2021, 7, 22)
REGION = parse_region({
    "name": "tiny", "bbox": [113.60, 34.71, 113.6225, 34.7295], "crs": "auto", "resolution": 10,
    "window": {"start": "2021-07-01", "end": "2021-08-31"}, "sensors": ["s1", "s2"],
})
SAR = ("VV", "VH")


def test_cube_sample_and_mosaic_window_give_the_same_model_arrays():
    src = SyntheticSource()
    grid = REGION.grid()
    spec = InputSpec(optical_bands=("B2", "B3", "B4", "B8", "B11"), optical_dates=2, includes_target_date=False,
                     sar_bands=SAR)
    plan = plan_inputs(REGION, DATE, spec, src, "test", ReconstructConfig(aux_dates="latest"))  # 07-17 is cloudy
    r0, r1, c0, c1 = 20, 100, 30, 126
    sub = grid.window(r0, c0, r1 - r0, c1 - c0)
    window = MosaicLoader(src, grid, plan, spec, mask_method="cloudscore")(r0, r1, c0, c1)

    # the same pixels as a cube holds them (pipeline.dataset.cubes): unit reflectance, 0 and NODATA where invalid
    s2, codes, valid = [], [], []
    for scenes in plan.optical_scenes + [plan.target_scenes]:
        (scene,) = scenes
        da = src.read(scene, sub)
        vals = np.asarray(da.sel(band=list(S2_BANDS)).values, dtype=np.float32)
        ok = np.isfinite(vals).all(axis=0)
        code = np.where(ok, to_cube_codes(mask_scene(da, scene, method="cloudscore").values), MaskClass.NODATA)
        ok &= code != MaskClass.NODATA
        s2.append(np.where(ok, optical_to_unit(vals), np.float32(0)))
        codes.append(code.astype(np.uint8))
        valid.append(ok)
    s1 = [sar_to_unit(src.read(near[0], sub, list(SAR)).values, SAR, axis=0) for near in plan.sar_scenes]
    raw = {"s2": np.stack(s2), "s2_mask": np.stack(codes), "valid": np.stack(valid), "s1": np.stack(s1),
           "sample_id": "window"}
    sample = assemble_sample(raw, spec, train=False)

    mask = window.arrays["optical_mask"]
    assert 0.0 < mask.mean() < 1.0  # cloudy and clear pixels both take part
    assert set(window.arrays) == {"optical", "optical_mask", "sar"}
    for key, a in window.arrays.items():
        assert a.dtype == np.float32 and torch.equal(torch.from_numpy(a), sample[key]), key


def test_model_arrays_zero_invalid_optical_flag_not_clear_and_refuse_sar_gaps():
    x = np.full((2, 3, 4), 0.5, np.float32)
    x[0, 1, 1] = np.nan
    codes = np.array([[MaskClass.CLEAR, MaskClass.CLOUD, MaskClass.NODATA, MaskClass.SHADOW]] * 3, np.uint8)
    pasted = np.zeros((3, 4), bool)
    pasted[2, 0] = True
    sar = np.full((2, 3, 4), 0.3, np.float32)
    a = model_arrays([x, x], [codes, codes], [sar, sar, sar], contaminated=[None, pasted])
    assert a["optical"].shape == (2, 2, 3, 4) and a["optical_mask"].shape == (2, 1, 3, 4)
    assert a["sar"].shape == (3, 2, 3, 4)
    assert (a["optical"][:, :, :, 2] == 0).all() and (a["optical"][:, :, 1, 1] == 0).all()  # NODATA and NaN
    assert a["optical"][0, 0, 0, 1] == 0.5  # cloudy values are kept, only flagged
    expect = np.array([[0, 1, 1, 1]] * 3, np.float32)
    expect[1, 1] = 1
    assert np.array_equal(a["optical_mask"][0, 0], expect)
    expect[2, 0] = 1
    assert np.array_equal(a["optical_mask"][1, 0], expect)

    gap = sar.copy()
    gap[:, 0, :2] = np.nan
    with pytest.raises(DataError, match=r"^here: SAR has NaN/inf \(no data\) in D \(16.7% of the pixels\); fix it$"):
        model_arrays([x], [codes], [sar, gap], where="here", sar_labels=["t0", "D"], sar_fix="fix it")
