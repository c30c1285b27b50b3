"""A ``refine`` checkpoint through ``reconstruct``: the harmonized fill runs, the model corrects what it produced.

An untrained refine model is the composite, so its reconstruction must be the fill's, pixel for pixel, with the
produced pixels labelled "predicted by a model"; a checkpoint for another sensor is one clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from pipeline.errors import CheckpointError
from pipeline.files import sha256_file
from pipeline.harmonize import FillConfig
from pipeline.regions import parse_region
from pipeline.train.checkpoint import save_model
from tests.reconstruct.test_reconstruct import DATE, SMALL, fast

SMALL_REFINE = {"base": "small", "base_channels": 8, "depth": 1}
# as ``cloudfree train`` records it: the fill the model learnt to correct, here the product's default
TRAINED_ON = {"composite_fill": FillConfig().model_dump(mode="json")}


@pytest.fixture(scope="module")
def refine_run(tmp_path_factory):
    from models.registry import build_model, resolve_config

    cfg = resolve_config("refine", SMALL_REFINE)
    model = build_model("refine", cfg)
    run = tmp_path_factory.mktemp("refine-run")
    save_model(run, model, {"model": "refine", "config": cfg, "spec": model.spec.to_dict(), "train": TRAINED_ON})
    return run


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.tags()


def test_untrained_refine_reconstructs_the_composite_and_labels_its_fills_predicted(tmp_path, refine_run):
    from pipeline.reconstruct.run import reconstruct

    fill = reconstruct(SMALL, DATE, "composite", tmp_path / "fill", fast(block=512))
    refined = reconstruct(SMALL, DATE, refine_run, tmp_path / "refine", fast(block=512))
    assert refined.cog.name == "tiny_20210722_refine.tif" and refined.source_days is not None
    image_f, _ = _read(fill.cog)
    image_r, tags = _read(refined.cog)
    prov_f, _ = _read(fill.provenance)
    prov_r, _ = _read(refined.provenance)
    assert tags["model"] == "refine" and tags["checkpoint_sha256"] == sha256_file(refine_run / "model.pt")
    filled = prov_f[0] == 1
    assert filled.mean() > 0.05 and (prov_f[0] == 0).any()
    np.testing.assert_array_equal(prov_r[0], np.where(filled, 2, prov_f[0]))
    # pixel for pixel, NaN included: where no date saw the ground the model has only the cloud, so it stays nodata
    np.testing.assert_array_equal(image_r, image_f)
    np.testing.assert_array_equal(_read(refined.source_days)[0], _read(fill.source_days)[0])


def test_a_refine_checkpoint_for_another_sensor_is_one_clear_error(tmp_path, refine_run):
    from pipeline.reconstruct.run import reconstruct

    landsat = parse_region({**SMALL.model_dump(mode="json", exclude_none=True), "sensors": ["landsat"]})
    with pytest.raises(CheckpointError, match=r"refine corrects a s2 composite of bands \['B1', .*but this archive's "
                                              r"fill has landsat\S* bands"):
        reconstruct(landsat, "2021-07-29", refine_run, tmp_path, fast(block=512))


@pytest.fixture(scope="module")
def sar_refine_run(tmp_path_factory):
    from models.registry import build_model, resolve_config

    cfg = resolve_config("refine", {**SMALL_REFINE, "sar_bands": ["VV", "VH"]})
    model = build_model("refine", cfg)
    run = tmp_path_factory.mktemp("sar-refine-run")
    save_model(run, model, {"model": "refine", "config": cfg, "spec": model.spec.to_dict(), "train": TRAINED_ON})
    return run


def test_a_refine_model_with_s1_reads_the_target_dates_s1(tmp_path, sar_refine_run):
    from pipeline.reconstruct.run import reconstruct

    fill = reconstruct(SMALL, DATE, "composite", tmp_path / "fill", fast(block=512))
    refined = reconstruct(SMALL, DATE, sar_refine_run, tmp_path / "refine", fast(block=512))
    assert refined.plan.sar_dates == [DATE, DATE] and refined.plan.sar_scenes[0][0].sensor.startswith("s1")
    image_f, _ = _read(fill.cog)
    image_r, _ = _read(refined.cog)
    np.testing.assert_array_equal(image_r, image_f)


def test_an_s1_refine_checkpoint_on_an_archive_without_s1_is_one_clear_error(tmp_path, sar_refine_run, real_data):
    from pipeline.reconstruct.config import ReconstructConfig
    from pipeline.reconstruct.run import reconstruct
    from pipeline.sources.registry import SourceSpec

    cfg = ReconstructConfig(mask_method="cloudscore", dtype="float32",
                            source=SourceSpec(name="local", root=real_data / "sen12mscr-ts"))
    from pipeline.reconstruct.cases import archive_region

    region = archive_region(cfg.source.build(), "rome")
    with pytest.raises(CheckpointError, match=r"needs S1 \['VV', 'VH'\], but the local source holds no S1 scenes "
                                              r"\(it has: s2_l1c\); use a checkpoint trained without sar_bands"):
        reconstruct(region, "2018-08-09", sar_refine_run, tmp_path, cfg)


def test_a_refine_checkpoint_fills_with_the_fill_it_was_trained_to_correct(tmp_path):
    from models.registry import build_model, resolve_config
    from pipeline.harmonize import FillConfig
    from pipeline.reconstruct.run import reconstruct

    cfg = resolve_config("refine", SMALL_REFINE)
    run = tmp_path / "run"
    save_model(run, build_model("refine", cfg), {"model": "refine", "config": cfg, "spec": build_model(
        "refine", cfg).spec.to_dict(), "train": {"composite_fill": FillConfig(fit="global").model_dump()}})
    default = reconstruct(SMALL, DATE, "composite", tmp_path / "default", fast(block=512))
    short = reconstruct(SMALL, DATE, "composite", tmp_path / "short", fast(block=512, fill={"fit": "global"}))
    assert not np.array_equal(_read(default.cog)[0], _read(short.cog)[0])  # the two fills differ on this date
    # run at the default fill, the checkpoint's own is used: the untrained model gives that fill back
    refined = reconstruct(SMALL, DATE, run, tmp_path / "refine", fast(block=512))
    image, tags = _read(refined.cog)
    assert '"fit": "global"' in tags["fill_config"]
    np.testing.assert_array_equal(image, _read(short.cog)[0])
    with pytest.raises(CheckpointError, match=r"refine was trained to correct the fill with fit global \(this run: "
                                              r"none\); leave the fill options .* at their defaults"):
        reconstruct(SMALL, DATE, run, tmp_path / "other", fast(block=512, fill={"fit": "none"}))
