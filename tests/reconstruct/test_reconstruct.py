"""``reconstruct`` end to end on the synthetic archive: grid, COG, keep-clear, STAC, dask, resume, errors.

Checkpoint ``composite`` is the training-free fill (its own tests: test_fill.py); the model path runs the torch
composite saved as a training run folder (``composite_run``), a pixel-wise model whose output is known.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from pipeline.errors import CheckpointError, DataError, SourceError
from pipeline.files import sha256_file
from pipeline.masking.codes import MaskClass, to_cube_codes
from pipeline.masking.scene import mask_scene
from pipeline.normalize import optical_to_unit
from pipeline.reconstruct.cog import validate_cog
from pipeline.reconstruct.config import ReconstructConfig, ReconstructConfigError
from pipeline.reconstruct.mosaic import MosaicLoader
from pipeline.reconstruct.plan import plan_inputs
from pipeline.reconstruct.run import load_model, reconstruct
from pipeline.reconstruct.stac import validate_item
from pipeline.regions import parse_region
from pipeline.sensors import S2_BANDS
from pipeline.sources.synthetic.source import SyntheticSource
from pipeline.train.checkpoint import save_model

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "data" / "real"
DATE = dt.date(2021, 7, 22)  # a partly cloudy synthetic S2 date over Zhengzhou (clear dates 07-07, 07-12 before it)


def fast(**options) -> ReconstructConfig:
    """s2cloudless takes ~20 s per 512^2 on this machine; masking is tested elsewhere. float32 so pixels compare
    exactly (the uint16 default's rounding is tested in test_config)."""
    return ReconstructConfig(**{"mask_method": "cloudscore", "dtype": "float32", **options})


def _region(name: str, east: float, north: float):
    return parse_region({
        "name": name, "bbox": [113.60, 34.71, east, north], "crs": "auto", "resolution": 10,
        "event_date": "2021-07-20", "window": {"start": "2021-07-01", "end": "2021-08-31"},
        "sensors": ["s1", "s2", "landsat"],
    })


SMALL = _region("tiny", 113.6225, 34.7295)  # ~210 x 215 px
WIDE = _region("strip", 113.6775, 34.7185)  # ~715 x 95 px: two output blocks of 512


@pytest.fixture(scope="module")
def composite_run(tmp_path_factory) -> Path:
    """The fixed-window torch composite (a ``models`` baseline) saved as a training run folder: a model checkpoint
    whose output is known (the last clear observation of its input dates, pixel by pixel)."""
    from models.registry import build_model, resolve_config

    cfg = resolve_config("composite", "small")
    model = build_model("composite", cfg)
    run = tmp_path_factory.mktemp("composite-run")
    save_model(run, model, {"model": "composite", "config": cfg, "spec": model.spec.to_dict()})
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, composite_run):
    out = tmp_path_factory.mktemp("tiny")
    return reconstruct(SMALL, DATE, composite_run, out, fast(keep_clear=True, block=512))


@pytest.fixture(scope="module")
def tiny_fill(tmp_path_factory):
    return reconstruct(SMALL, DATE, "composite", tmp_path_factory.mktemp("tiny-fill"), fast(block=512))


def test_outputs_on_region_grid_valid_cogs_with_metadata(tiny_run, tiny_fill):
    grid = SMALL.grid()
    for path in (tiny_run.cog, tiny_run.provenance, tiny_fill.cog, tiny_fill.provenance, tiny_fill.source_days):
        rep = validate_cog(path)
        assert rep.ok and rep.layout == "COG"
        with rasterio.open(path) as ds:
            assert ds.crs == rasterio.crs.CRS.from_user_input(grid.crs)
            assert ds.transform == grid.transform and (ds.width, ds.height) == (grid.width, grid.height)
    with rasterio.open(tiny_run.cog) as ds:
        assert ds.descriptions == S2_BANDS
        assert np.isnan(ds.nodata)
        tags = ds.tags()
    assert tags["model"] == "composite" and tags["target_date"] == "2021-07-22" and tags["simulated"] == "true"
    # the model's input dates: the two clearest within 30 days (07-17 is cloudy), then D
    assert tags["optical_dates"] == "2021-07-07,2021-07-12,2021-07-22"
    assert all(s.id in tags["source_scene_ids"] for group in tiny_run.plan.optical_scenes for s in group)
    assert tags["cloudfree_version"] and tags["checkpoint_sha256"]
    assert tiny_run.uncertainty is None and tiny_run.source_days is None  # the torch composite has no variance
    with rasterio.open(tiny_fill.cog) as ds:
        assert ds.descriptions == S2_BANDS
        fill_tags = ds.tags()
    # the fill: every date within the maximum age (90 days) before D, D last; its config and notes in the tags
    dates = fill_tags["optical_dates"].split(",")
    assert dates[-1] == "2021-07-22" and dates[0] == "2021-04-23" and "2021-07-17" in dates
    assert fill_tags["checkpoint"] == "composite" and json.loads(fill_tags["fill_config"])["max_age_days"] == 90
    notes = json.loads(fill_tags["fill_notes"])
    assert notes and all({"date", "age_days", "harmonization", "filled_pixels", "gain", "offset"} <= set(n)
                         for n in notes)
    # the dates fitted directly carry their spectral classes' offsets (the fill's class_offsets)
    direct = [n for n in notes if "class_offsets" in n]
    assert direct and all(n["class_offsets"]["classes"] >= 1 and "via_date" not in n for n in direct)
    for run in (tiny_run, tiny_fill):
        out_dir = run.cog.parent
        assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]  # no partials, no progress file


def test_keep_clear_preserves_observed_clear_pixels_bit_exactly(tiny_run):
    grid = SMALL.grid()
    src = SyntheticSource()
    (scene,) = tiny_run.plan.target_scenes
    raw = src.read(scene, grid)
    codes = to_cube_codes(mask_scene(raw, scene, method="cloudscore").values)
    observed = optical_to_unit(raw.sel(band=list(S2_BANDS)).values)
    clear = codes == MaskClass.CLEAR
    assert 0.05 < clear.mean() < 0.95  # the date is partly cloudy, so both sides are tested
    with rasterio.open(tiny_run.cog) as ds:
        out = ds.read()
    with rasterio.open(tiny_run.provenance) as ds:
        prov = ds.read(1)
    assert np.array_equal(out[:, clear].view(np.uint32), observed[:, clear].view(np.uint32))
    assert (prov[clear] == 0).all() and (prov[~clear] == 2).all()  # 2: predicted by a model
    assert np.isfinite(out).all()


def test_stac_item_validates_and_points_at_the_files(tiny_run, tiny_fill):
    grid = SMALL.grid()
    for run in (tiny_run, tiny_fill):
        d = json.loads(run.stac.read_text())
        assert validate_item(d).core
        assert d["properties"]["proj:code"] == grid.crs and d["properties"]["proj:shape"] == [grid.height, grid.width]
        assert d["properties"]["simulated"] is True
        for asset in d["assets"].values():
            assert (run.stac.parent / asset["href"]).is_file()
        assert {"data", "provenance", "overview"} <= set(d["assets"])
        assert "2 predicted by a model" in d["assets"]["provenance"]["title"]
    d = json.loads(tiny_fill.stac.read_text())
    assert d["assets"]["source_days"]["roles"] == ["metadata"]
    assert d["assets"]["source_days"]["href"] == tiny_fill.source_days.name
    props = d["properties"]
    assert props["cloudfree:fill_config"]["fit"] == "local" and props["cloudfree:fill_notes"]
    assert props["cloudfree:fill_pixels"]["filled"] > 0 and props["cloudfree:warnings"] == []


def test_quicklook_is_input_beside_output(tiny_run):
    from PIL import Image

    img = Image.open(tiny_run.quicklook)
    grid = SMALL.grid()
    assert img.format == "PNG" and img.width >= 2 * grid.width and img.height >= grid.height
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    panel = (img.width - 4) // 2  # side_by_side puts a 4-px gap between the panels
    left, right = a[16:, :panel], a[16:, -panel:]
    assert np.abs(left - right).mean() > 1.0  # clouds on the left, none on the right


def test_stitched_mosaic_equals_untiled_model_no_seams(tmp_path, composite_run):
    """The composite returns its input on clear pixels and works pixel by pixel: tiled + blended output must
    equal one forward over the whole AOI, so any seam at a tile border would show up as a difference."""
    res = reconstruct(SMALL, DATE, composite_run, tmp_path, fast(tile=64, overlap=32, block=512))
    lm = load_model(composite_run)
    grid = SMALL.grid()
    loader = MosaicLoader(SyntheticSource(), grid, res.plan, lm.spec, mask_method="cloudscore")
    inputs = loader(0, grid.height, 0, grid.width)
    with torch.no_grad():
        whole = lm.model({k: torch.from_numpy(v[None]) for k, v in inputs.arrays.items()}).mean[0].numpy()
    with rasterio.open(res.cog) as ds:
        tiled = ds.read()
    assert np.abs(tiled - whole).max() < 1e-6


def test_checkpoint_run_folder_is_loaded_with_its_sha(tmp_path):
    from models.registry import build_model, resolve_config

    cfg = resolve_config("composite", {"base": "small", "method": "median"})
    model = build_model("composite", cfg)
    run = tmp_path / "run"
    save_model(run, model, {"model": "composite", "config": cfg, "spec": model.spec.to_dict()})
    lm = load_model(run)
    assert lm.sha256 == sha256_file(run / "model.pt") and lm.model.method == "median" and lm.checkpoint == str(run)
    (run / "model.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_model(run)


def test_checkpoint_the_source_cannot_satisfy():
    """A Landsat model (cmsn) on a folder that holds only Sentinel-1/-2 (real SEN12MS-CR samples)."""
    root = REAL / "sen12mscr"
    if not root.exists():
        pytest.skip(f"real samples not found at {root}")
    from models.registry import model_spec
    from pipeline.sources.local.source import LocalSource

    with pytest.raises(CheckpointError, match=r"needs landsat optical input.*holds no landsat scenes.*s1_grd, s2_l1c"):
        plan_inputs(SMALL, DATE, model_spec("cmsn"), LocalSource(root), "runs/cmsn")


def test_date_without_scenes_lists_nearest_dates():
    from models.registry import model_spec

    needle = r"no s2 scene on 2021-07-20 .*nearest dates with scenes: .*2021-07-17.*2021-07-22"
    with pytest.raises(SourceError, match=needle):
        plan_inputs(SMALL, dt.date(2021, 7, 20), model_spec("composite"), SyntheticSource(), "composite")


def test_composite_is_no_model_to_load():
    with pytest.raises(CheckpointError, match="training-free fill, not a model"):
        load_model("composite")


def test_auxiliary_dates_are_the_clearest_within_the_gap_or_the_latest():
    from models.registry import model_spec

    src = SyntheticSource()
    spec = model_spec("unet")  # the previous optical date + D
    cover = {s.date: s.cloud_cover for s in src.search(SMALL, dt.date(2021, 6, 22), DATE, "s2")}
    earlier = sorted(d for d in cover if d < DATE and (DATE - d).days <= 30)
    best = min(cover[d] for d in earlier)
    clearest = plan_inputs(SMALL, DATE, spec, src, "unet")
    (aux,) = clearest.optical_dates[:-1]
    assert clearest.optical_dates[-1] == DATE and cover[aux] == best
    assert aux == max(d for d in earlier if cover[d] == best)  # ties go to the more recent date
    latest = plan_inputs(SMALL, DATE, spec, src, "unet", ReconstructConfig(aux_dates="latest"))
    assert latest.optical_dates == [earlier[-1], DATE]
    assert cover[earlier[-1]] > best  # on this date the two choices differ: the day before is cloudier
    with pytest.raises(ReconstructConfigError, match="aux_dates 'newest': Input should be 'clearest' or 'latest'"):
        ReconstructConfig.parse({"aux_dates": "newest"})


def test_aoi_outside_local_source_coverage():
    root = REAL / "landsat-c2-l2"
    if not root.exists():
        pytest.skip(f"real samples not found at {root}")
    from models.registry import model_spec
    from pipeline.sources.local.source import LocalSource

    with pytest.raises(SourceError, match="outside the local source's coverage"):
        plan_inputs(SMALL, DATE, model_spec("cmsn"), LocalSource(root), "cmsn")


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="cannot be written"):
        reconstruct(SMALL, DATE, "composite", blocker / "out", fast())


def test_cli_prints_one_line_error_and_exit_code_2(tmp_path, monkeypatch, capsys):
    import pipeline.cli.reconstruct  # noqa: F401  (registers the command)
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["cloudfree", "reconstruct", "zhengzhou-demo", "--date", "2021-07-20",
                                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nearest dates with scenes" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_two_dates_write_cogs_and_a_date_vrt(tmp_path, monkeypatch):
    import yaml

    import pipeline.cli.reconstruct  # noqa: F401  (registers the command)
    from pipeline.cli import main

    region = tmp_path / "mini.yaml"
    region.write_text(yaml.safe_dump({
        "name": "mini", "bbox": [113.60, 34.71, 113.611, 34.7192], "crs": "auto", "resolution": 10,
        "window": {"start": "2021-07-01", "end": "2021-08-31"}, "sensors": ["s1", "s2"]}))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["cloudfree", "reconstruct", str(region), "--date", "2021-07-17",
                                      "--date", "2021-07-22", "--out", str(out), "--mask-method", "cloudscore",
                                      "--dtype", "uint16", "--compress", "zstd"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    vrt = out / "mini_composite_dates.vrt"
    with rasterio.open(vrt) as ds:
        assert ds.count == 26 and ds.descriptions[0] == "2021-07-17 B1" and ds.descriptions[13] == "2021-07-22 B1"
        assert ds.dtypes[0] == "uint16" and ds.scales[0] == pytest.approx(1e-4)
    for day in ("20210717", "20210722"):
        rep = validate_cog(out / f"mini_{day}_composite.tif")
        assert rep.compression == "ZSTD"


@pytest.fixture(scope="module")
def wide_single(tmp_path_factory):
    return reconstruct(WIDE, DATE, "composite", tmp_path_factory.mktemp("single"), fast(block=512))


@pytest.mark.slow
def test_dask_cluster_gives_the_same_file(tmp_path, wide_single):
    import dask
    from distributed import LocalCluster

    assert wide_single.blocks_total == 2
    # The nanny pins workers' BLAS to 1 thread by default; the synthetic renderer's matmul then differs from a
    # 2-thread client by 1 ulp. Same BLAS threads on both sides isolates what this test is about: the pipeline.
    pre_spawn = dask.config.get("distributed.nanny.pre-spawn-environ")
    environ = {k: v for k, v in pre_spawn.items() if not k.endswith("_NUM_THREADS")}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster:
            multi = reconstruct(WIDE, DATE, "composite", tmp_path,
                                fast(block=512, dask_address=cluster.scheduler_address))
    with rasterio.open(wide_single.provenance) as a, rasterio.open(multi.provenance) as b:
        assert np.array_equal(a.read(), b.read()) and a.tags() == b.tags()
    with rasterio.open(wide_single.cog) as a, rasterio.open(multi.cog) as b:
        assert a.tags() == b.tags()
        pa, pb = dict(a.profile), dict(b.profile)
        assert np.isnan(pa.pop("nodata")) and np.isnan(pb.pop("nodata"))  # NaN != NaN, so compared apart
        assert pa == pb
        # bit-identical in nearly every run; once in a loaded full-suite run the synthetic renderer's
        # OpenBLAS matmul differed by 1 ulp between processes, which the stitcher then carries through
        assert np.abs(a.read() - b.read()).max() <= 2.5e-7


def test_interrupted_run_leaves_no_cog_and_resumes_by_blocks(tmp_path, wide_single, monkeypatch):
    import pipeline.reconstruct.tiling as stitch

    real = stitch.compute_fill_block
    calls = {"n": 0}

    def dies_on_second_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C (or the node died) mid-run
        return real(*a, **k)

    monkeypatch.setattr(stitch, "compute_fill_block", dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(WIDE, DATE, "composite", tmp_path, fast(block=512))
    names = {p.name for p in tmp_path.iterdir()}
    for done in (wide_single.cog, wide_single.provenance, wide_single.source_days):
        assert done.name not in names
    assert any(n.endswith(".progress.json") for n in names)
    monkeypatch.setattr(stitch, "compute_fill_block", real)
    again = reconstruct(WIDE, DATE, "composite", tmp_path, fast(block=512))
    assert again.resumed and again.blocks_computed == 1
    for a_path, b_path in ((wide_single.cog, again.cog), (wide_single.provenance, again.provenance),
                           (wide_single.source_days, again.source_days)):
        with rasterio.open(a_path) as a, rasterio.open(b_path) as b:
            assert np.array_equal(a.read(), b.read(), equal_nan=True)
            assert a.tags() == b.tags()  # the fill notes of the block computed before the interruption count too
    assert again.fill == wide_single.fill
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_changed_fill_config_does_not_resume(tmp_path, monkeypatch):
    import pipeline.reconstruct.tiling as stitch
    from pipeline.harmonize import FillConfig

    real = stitch.compute_fill_block
    calls = {"n": 0}

    def dies_on_second_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(stitch, "compute_fill_block", dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(WIDE, DATE, "composite", tmp_path, fast(block=512))
    monkeypatch.setattr(stitch, "compute_fill_block", real)
    again = reconstruct(WIDE, DATE, "composite", tmp_path, fast(block=512, fill=FillConfig(fit="none")))
    assert not again.resumed and again.blocks_computed == again.blocks_total == 2


@pytest.mark.slow
def test_variance_model_writes_uncertainty(tmp_path):
    from models.registry import build_model, resolve_config

    torch.manual_seed(0)
    cfg = resolve_config("uncrtaints", "small")
    model = build_model("uncrtaints", cfg)
    run = tmp_path / "run"
    save_model(run, model, {"model": "uncrtaints", "config": cfg, "spec": model.spec.to_dict()})
    res = reconstruct(SMALL, DATE, run, tmp_path / "out", fast(tile=128, overlap=32))
    assert res.uncertainty is not None and validate_cog(res.uncertainty).ok
    assert len(res.plan.sar_scenes) == res.plan.optical_dates.__len__() + 1
    with rasterio.open(res.uncertainty) as ds:
        std = ds.read()
        assert ds.descriptions[0] == "B1_std" and "standard deviation" in ds.tags()["UNCERTAINTY"]
    assert np.isfinite(std).all() and (std >= 0).all() and std.max() > 0
    d = json.loads(res.stac.read_text())
    assert "uncertainty" in d["assets"]
