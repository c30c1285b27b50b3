"""geemap helpers and ``notebooks/explore_aoi.ipynb`` executed headless against offline Earth Engine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.regions import load_region

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "explore_aoi.ipynb"


def test_patch_grid_geojson_follows_the_utm_patches():
    from pipeline.sources.earthengine import maps as gh

    region = load_region("zhengzhou-demo")
    fc = gh.patch_grid_geojson(region)
    assert len(fc["features"]) == len(region.patches())
    ring = fc["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    w, s, e, n = region.grid().bounds_lonlat()
    lons = [p[0] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    lats = [p[1] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    # Patches sit inside the region's UTM grid, and reach its north-west corner.
    assert w - 1e-9 <= min(lons) and max(lons) <= e + 1e-9 and s - 1e-9 <= min(lats) and max(lats) <= n + 1e-9
    assert max(lats) > n - 1e-3 and min(lons) < w + 1e-3


def test_cog_overlay_is_a_png_with_lonlat_bounds(tmp_path):
    from pipeline.reconstruct.cog import RasterSpec, write_cog
    from pipeline.sources.earthengine import maps as gh

    region = load_region("zhengzhou-demo")
    grid = region.grid().window(0, 0, 64, 64)
    values = np.random.default_rng(0).uniform(0, 0.3, (3, 64, 64)).astype(np.float32)
    values[:, :8, :8] = np.nan
    path = write_cog(tmp_path / "x.tif", values, grid, RasterSpec.reflectance(["B2", "B3", "B4"]))
    url, ((s, w), (n, e)) = gh.cog_overlay_png(path, bands=(3, 2, 1))
    assert url.startswith("data:image/png;base64,")
    gw, gs, ge, gn = grid.bounds_lonlat()
    assert (s, w, n, e) == pytest.approx((gs, gw, gn, ge), abs=1e-9)


@pytest.mark.slow  # importing geemap alone takes ~10 s here
def test_map_never_initializes_earth_engine(monkeypatch):
    geemap = pytest.importorskip("geemap")
    import ee

    from pipeline.sources.earthengine import maps as gh

    def forbidden(*a, **k):
        raise AssertionError("geemap tried to initialize Earth Engine")

    monkeypatch.setattr(ee, "Initialize", forbidden)
    monkeypatch.setattr(geemap.coreutils, "ee_initialize", forbidden)
    m = gh.make_map(load_region("zhengzhou-demo"))
    gh.add_aoi(m, load_region("zhengzhou-demo"))
    assert {"AOI zhengzhou-demo", "patch grid"} <= {layer.name for layer in m.layers}


@pytest.mark.slow
def test_masked_collection_layers_offline(ee_offline):
    pytest.importorskip("geemap")
    from pipeline.sources.earthengine import maps as gh

    region = load_region("zhengzhou-demo")
    m = gh.make_map(region)
    gh.add_masked_collection(m, region, region.window.start, region.window.start, "s2_l1c")
    assert {"s2_l1c clear median", "s2_l1c mask (first scene)"} <= set(m.ee_layers)


@pytest.mark.slow
def test_explore_aoi_notebook_runs_headless():
    pytest.importorskip("geemap")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_before = os.environ.get("CLOUDFREE_EE_OFFLINE")
    os.environ["CLOUDFREE_EE_OFFLINE"] = "1"  # the kernel inherits the environment
    try:
        client = nbclient.NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        )
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("CLOUDFREE_EE_OFFLINE", None)
        else:
            os.environ["CLOUDFREE_EE_OFFLINE"] = env_before
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for outs in outputs.values() for o in outs
    )
    assert "zhengzhou-demo EPSG:32649" in text
    assert "patch grid" in text and "s2_l1c clear median" in text
    assert not any(o.get("output_type") == "error" for outs in outputs.values() for o in outs)
