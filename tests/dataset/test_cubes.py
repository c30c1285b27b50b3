"""Manifest -> Zarr cubes, and CubeDataset's lazy, normalized samples, on tiny hand-written datasets."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from affine import Affine

from pipeline import geotiff
from pipeline.dataset import patches as ex
from pipeline.dataset.cubes import CubeDataset, build_cubes, cube_path, open_cube
from pipeline.errors import DataError
from pipeline.grid import Grid
from pipeline.masking.codes import MaskClass
from pipeline.sensors import S2_BANDS, SENSORS

P = 16
GRID = Grid("EPSG:32649", Affine(10.0, 0.0, 700000.0, 0.0, -10.0, 3850000.0), 64, 64)
LS_BANDS = SENSORS["landsat8_l2"].reflectance_bands


def _write_dataset(root: Path, family: str = "s2", sar: bool = True, n_patches: int = 3) -> pd.DataFrame:
    """Patches p0..pN, each with one sample of two dates (input_1, target) and S1 per date."""
    rng = np.random.default_rng(0)
    bands = S2_BANDS if family == "s2" else LS_BANDS
    sensor = "s2_l1c" if family == "s2" else "landsat8_l2"
    rows = []
    for i in range(n_patches):
        pid = f"r00000c{i * P:05d}"
        g = GRID.window(0, i * P, P, P)
        split = ["train", "train", "val"][i % 3]
        days = ["2021-07-01", "2021-07-06"]
        for role, day in zip(["input_1", "target"], days):
            dn = rng.integers(1, 12000, (len(bands), P, P)).astype(np.uint16)
            mask = np.zeros((P, P), np.uint16)
            if role == "input_1":
                mask[:4] = MaskClass.CLOUD
                mask[4:6] = MaskClass.THIN_CLOUD
                mask[6:8] = MaskClass.SHADOW
                mask[8, :] = MaskClass.NODATA
                dn[:, 8, :] = 0
            rel = f"patches/{pid}/{sensor}_{day.replace('-', '')}.tif"
            sha = geotiff.write_geotiff(
                root / rel, np.concatenate([dn, mask[None]]), g, list(bands) + [geotiff.MASK_BAND]
            )
            rows.append((f"{pid}_20210706", pid, split, role, sensor, f"{sensor}-{day}", day, rel, sha, g))
        if sar:
            for role, day in zip(["sar_input_1", "sar_target"], ["2021-07-02", "2021-07-05"]):
                db = np.stack([rng.uniform(-30, 2, (P, P)), rng.uniform(-40, 2, (P, P))]).astype(np.float32)
                rel = f"patches/{pid}/s1_grd_{day.replace('-', '')}.tif"
                sha = geotiff.write_geotiff(root / rel, db, g, ["VV", "VH"], nodata=float("nan"))
                rows.append((f"{pid}_20210706", pid, split, role, "s1_grd", f"s1-{day}", day, rel, sha, g))
    df = pd.DataFrame(
        {
            "sample_id": [r[0] for r in rows],
            "patch_id": [r[1] for r in rows],
            "split": [r[2] for r in rows],
            "role": [r[3] for r in rows],
            "sensor": [r[4] for r in rows],
            "scene_id": [r[5] for r in rows],
            "datetime": pd.to_datetime([r[6] + "T03:00Z" for r in rows]),
            "crs": GRID.crs,
            "bounds": [list(r[9].bounds) for r in rows],
            "cloud_fraction": 0.0,
            "shadow_fraction": 0.0,
            "valid_fraction": 1.0,
            "path": [r[7] for r in rows],
            "sha256": [r[8] for r in rows],
            "simulated": True,
        }
    )
    ex.write_manifest(df, root / ex.MANIFEST_NAME)
    return df


def test_cube_layout_chunks_and_attrs(tmp_path):
    df = _write_dataset(tmp_path)
    cubes = build_cubes(tmp_path, {"region": "t", "simulated": True}, workers=2, progress=False)
    assert set(cubes) == {"train", "val"}
    ds = xr.open_zarr(cube_path(tmp_path, "train"), consolidated=False)
    assert ds["s2"].dims == ("sample", "date", "band", "y", "x") and ds["s2"].dtype == np.uint16
    assert ds["s2"].shape == (2, 2, 13, P, P)
    assert ds["s1"].dtype == np.float32 and ds["s1"].shape == (2, 2, 2, P, P)
    assert ds["cloud_mask"].dtype == np.uint8 and ds["target"].shape == (2, 13, P, P)
    assert ds["s2"].encoding["chunks"] == (1, 2, 13, P, P)  # one chunk per sample
    assert list(ds["band"].values) == list(S2_BANDS) and list(ds["sar_band"].values) == ["VV", "VH"]
    assert list(ds["sample_id"].values) == ["r00000c00000_20210706", "r00000c00016_20210706"]
    assert ds.attrs["region"] == "t" and ds.attrs["simulated"] is True and ds.attrs["family"] == "s2"
    assert str(ds["dates"].values[0, 1])[:10] == "2021-07-06"
    assert ds["crs"].values[1] == "EPSG:32649"
    assert tuple(ds["transform"].values[1]) == tuple(GRID.window(0, P, P, P).transform)[:6]
    # values as exported: target = the last date; mask folded into cube codes
    tif = geotiff.read_geotiff(
        tmp_path / df[(df.sample_id == "r00000c00016_20210706") & (df.role == "input_1")].path.iloc[0]
    )
    np.testing.assert_array_equal(ds["s2"].values[1, 0], tif.data[:-1])
    np.testing.assert_array_equal(ds["target"].values[1], ds["s2"].values[1, -1])
    m = ds["cloud_mask"].values[1, 0]
    assert set(np.unique(m)) == {0, 1, 2, 3} and (m[4:6] == 1).all()  # thin cloud -> cloud


def test_cube_dataset_normalizes_and_orders_dates(tmp_path):
    _write_dataset(tmp_path)
    build_cubes(tmp_path, workers=1, progress=False)
    dsr = CubeDataset(tmp_path, "train")
    assert len(dsr) == 2
    s = dsr[0]
    assert s["s2"].shape == (2, 13, P, P) and s["s2"].dtype == torch.float32
    assert float(s["s2"].min()) >= 0 and float(s["s2"].max()) <= 1 and float(s["s2"].max()) == 1.0  # DN > 10000 clipped
    raw = open_cube(tmp_path, "train")
    dn = raw["s2"].values[0]
    valid = raw["cloud_mask"].values[0] != 3
    np.testing.assert_allclose(s["s2"].numpy(), np.where(valid[:, None], np.clip(dn / 10000.0, 0, 1), 0), rtol=1e-6)
    assert s["s2_mask"].dtype == torch.uint8 and s["valid"].dtype == torch.bool
    assert not s["valid"][0, 8].any() and s["valid"][1].all()
    db = raw["s1"].values[0]
    np.testing.assert_allclose(s["s1"][:, 0].numpy(), (np.clip(db[:, 0], -25, 0) + 25) / 25, rtol=1e-5)
    np.testing.assert_allclose(s["s1"][:, 1].numpy(), (np.clip(db[:, 1], -32.5, 0) + 32.5) / 32.5, rtol=1e-5)
    assert s["dates"].tolist() == [18809, 18814]  # days since 1970: 2021-07-01, 2021-07-06 (the reference, last)
    assert s["sample_id"] == "r00000c00000_20210706"
    assert s["s2_bands"] == S2_BANDS and s["s1_bands"] == ("VV", "VH")
    with pytest.raises(IndexError):
        dsr[2]


def test_cube_dataset_in_dataloader_workers(tmp_path):
    _write_dataset(tmp_path)
    build_cubes(tmp_path, workers=1, progress=False)
    dsr = CubeDataset(tmp_path, "train")
    dsr[0]  # opens the store in this process ...
    clone = pickle.loads(pickle.dumps(dsr))
    assert clone._ds is None  # ... but never ships it to workers
    loader = torch.utils.data.DataLoader(dsr, batch_size=2, num_workers=2)
    (batch,) = list(loader)
    assert batch["s2"].shape == (2, 2, 13, P, P)
    assert batch["sample_id"] == ["r00000c00000_20210706", "r00000c00016_20210706"]


def test_landsat_cube_uses_collection2_scale(tmp_path):
    _write_dataset(tmp_path, family="landsat", sar=False)
    build_cubes(tmp_path, workers=1, progress=False)
    raw = open_cube(tmp_path, "train")
    assert "landsat" in raw and "s1" not in raw and "s2" not in raw
    s = CubeDataset(tmp_path, "train")[0]
    assert "s1" not in s and s["landsat"].shape == (2, len(LS_BANDS), P, P)
    dn = raw["landsat"].values[0, 1].astype(np.float64)
    np.testing.assert_allclose(s["landsat"][1].numpy(), np.clip(dn * 2.75e-5 - 0.2, 0, 1), atol=1e-6)


def test_rerun_skips_unchanged_cubes_and_rebuilds_changed(tmp_path):
    df = _write_dataset(tmp_path)
    build_cubes(tmp_path, workers=1, progress=False)
    meta = cube_path(tmp_path, "train") / "zarr.json"
    before = meta.stat().st_mtime_ns
    build_cubes(tmp_path, workers=1, progress=False)
    assert meta.stat().st_mtime_ns == before
    ex.write_manifest(df[df.split == "train"], tmp_path / ex.MANIFEST_NAME)  # val disappears
    build_cubes(tmp_path, workers=1, progress=False)
    assert not cube_path(tmp_path, "val").exists()
    assert meta.stat().st_mtime_ns == before  # train rows unchanged


def test_truncated_patch_fails_cleanly_and_leaves_no_partial_cube(tmp_path):
    df = _write_dataset(tmp_path)
    p = tmp_path / df[df.split == "train"].path.iloc[-1]
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataError, match=str(p.name)):
        build_cubes(tmp_path, workers=1, progress=False)
    assert not cube_path(tmp_path, "train").exists()
    assert [q for q in (tmp_path / "cubes").iterdir() if q.name.startswith(".")] == []


def test_missing_split_is_a_clear_error(tmp_path):
    _write_dataset(tmp_path)
    build_cubes(tmp_path, workers=1, progress=False)
    with pytest.raises(DataError, match=r"no cube for split 'test' \(have: \['train', 'val'\]\)"):
        CubeDataset(tmp_path, "test")


def test_corrupt_cube_is_an_error_to_readers_and_rebuilt_by_the_builder(tmp_path):
    _write_dataset(tmp_path)
    build_cubes(tmp_path, workers=1, progress=False)
    meta = cube_path(tmp_path, "train") / "zarr.json"
    meta.write_text("{ not json")
    with pytest.raises(DataError, match="unreadable cube"):
        CubeDataset(tmp_path, "train")
    build_cubes(tmp_path, workers=1, progress=False)
    assert len(CubeDataset(tmp_path, "train")) == 2


def test_samples_feed_the_model_input_assembly(tmp_path):
    """Contract with pipeline.train.samples: a raw CubeDataset sample becomes the tensors of models/spec.py."""
    from models.spec import InputSpec
    from pipeline.train.samples import assemble_sample

    _write_dataset(tmp_path)
    build_cubes(tmp_path, workers=1, progress=False)
    raw = CubeDataset(tmp_path, "train")[0]
    spec = InputSpec(
        optical_sensor="s2", optical_bands=S2_BANDS, optical_dates=1, includes_target_date=False, sar_bands=("VV", "VH")
    )
    out = assemble_sample(raw, spec, train=False)
    assert out["optical"].shape == (1, 13, P, P) and out["sar"].shape == (2, 2, P, P)
    torch.testing.assert_close(out["target"], raw["s2"][-1])  # the last cube date is the target
