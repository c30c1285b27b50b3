"""``build-dataset`` through the Earth Engine source gives the same manifest as the other sources.

The EE client runs for real; the server is emulated from the synthetic archive (``SyntheticEarthEngine``),
so the same scenes come back through listing, request blocks, NPY decoding and DN scaling. The two builds
must agree on the manifest's columns and, since the pixels are the same, on its rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.regions import load_region, parse_region
from tests.sources.ee_offline import SyntheticEarthEngine


@pytest.fixture
def small_region():
    demo = load_region("zhengzhou-demo").model_dump(mode="json", exclude_none=True)
    demo.update(
        name="zhengzhou-tiny",
        bbox=[113.62, 34.72, 113.6475, 34.745],
        sensors=["s1", "s2"],
        patch={"size": 64, "stride": 64},
    )
    demo["splits"] = {"train": 0.5, "val": 0.25, "test": 0.25, "block_size": 1, "seed": 0}
    demo["window"] = {"start": "2021-07-01", "end": "2021-07-31"}
    return parse_region(demo, "tiny")


@pytest.mark.slow
def test_build_dataset_via_earthengine_matches_synthetic(ee_offline, small_region, tmp_path, monkeypatch):
    from pipeline.dataset.build import build_dataset
    from pipeline.dataset.patches import MANIFEST_COLUMNS, read_manifest
    from pipeline.sources.earthengine.source import EarthEngineSource

    build_dataset(small_region, "synthetic", tmp_path / "syn", progress=False, workers=2)
    server = SyntheticEarthEngine(small_region)
    with server.serving(monkeypatch):
        build_dataset(small_region, EarthEngineSource(), tmp_path / "ee", progress=False, workers=2)
    assert server.pixel_requests > 0
    syn, ee_ = read_manifest(tmp_path / "syn"), read_manifest(tmp_path / "ee")
    assert list(ee_.columns) == list(syn.columns) == list(MANIFEST_COLUMNS)
    key = ["patch_id", "role", "sensor", "scene_id"]
    a, b = syn.sort_values(key).reset_index(drop=True), ee_.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["split", "crs"]], b[key + ["split", "crs"]])
    np.testing.assert_allclose(a["cloud_fraction"].fillna(-1), b["cloud_fraction"].fillna(-1), atol=1e-3)
    assert list(map(list, a["bounds"])) == list(map(list, b["bounds"]))
