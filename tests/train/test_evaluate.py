"""End to end on a real tiny cube: train -> evaluate next to composite -> CLI errors (build_dataset + CubeDataset)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

import pipeline.cli.train  # noqa: F401  (registers train / evaluate / export-model on the app)
from models.registry import build_model, resolve_config
from pipeline.cli.app import main
from pipeline.errors import DataError
from pipeline.train.checkpoint import MODEL_FILE, save_model
from pipeline.train.config import TrainConfig
from pipeline.train.evaluate import band_groups, evaluate, markdown_table
from pipeline.train.loop import train
from tests.regions_fixtures import tiny_region

TINY = tiny_region("tiny-train")

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pipeline.dataset.build import build_dataset

    base = tmp_path_factory.mktemp("tiny")
    region = base / "tiny-train.yaml"
    region.write_text(yaml.safe_dump(TINY))
    build_dataset(region, "synthetic", base / "ds", workers=2, progress=False)
    return base / "ds"


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "unet"
    cfg = TrainConfig(model="unet", model_params={"base": "small", "depth": 1}, epochs=1, batch_size=4, num_workers=0,
                      max_steps_per_epoch=3)
    train(cfg, dataset, out, progress=False)
    return out


@pytest.mark.slow
def test_trained_on_cubes_records_the_manifest(run, dataset):
    meta = json.loads((run / "model.json").read_text())
    from pipeline.files import sha256_file

    assert meta["manifest_sha256"] == sha256_file(dataset / "manifest.parquet")
    assert meta["metrics"]["n_images"] > 0


@pytest.mark.slow
def test_evaluate_scores_model_and_composite_on_the_same_pixels(run, dataset, tmp_path):
    res = evaluate(run, dataset, "test", tmp_path / "ev")
    m, c = res["results"]["model"], res["results"]["composite"]
    assert m["all"]["n_images"] == c["all"]["n_images"] == res["n_samples"] > 0
    assert m["all"]["n_images_cloud"] == c["all"]["n_images_cloud"] > 0
    for who in (m, c):
        assert set(who) == {"all", "visible", "nir", "swir"}
        assert 0 < who["all"]["cloud_psnr"] < 80 and 0 < who["all"]["psnr"] < 80
        assert who["all"]["cloud_psnr"] != who["all"]["psnr"]
    assert res["band_groups"]["swir"] == ["B10", "B11", "B12"]
    assert res["band_groups"]["visible"] == ["B1", "B2", "B3", "B4"]
    md = (tmp_path / "ev" / "metrics.md").read_text()
    assert "| unet |" in md and "| last clear (not harmonized) |" in md and "PSNR cloud" in md
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["split"] == "test"
    assert md == markdown_table(res)
    # a refine run is scored against the harmonized fill it corrects, and its tables say so
    refine_like = {**res, "model": "refine",
                   "composite": {"method": "harmonized fill (pipeline.harmonize, the refine model's input)"}}
    md_refine = markdown_table(refine_like)
    assert "| harmonized fill |" in md_refine and "last clear" not in md_refine


def test_image_without_cloud_pixels_is_left_out_not_infinite():
    from pipeline.train.evaluate import image_scores, mean_scores

    t = torch.rand(2, 3, 16, 16)
    p = (t + 0.05).clamp(0, 1)
    cloud = torch.zeros(2, 16, 16)
    cloud[0, :4] = 1
    rows = image_scores(p, t, torch.ones(2, 16, 16), cloud)
    assert rows[1]["cloud_psnr"] != rows[1]["cloud_psnr"]  # NaN
    m = mean_scores(rows)
    assert m["cloud_psnr"] == pytest.approx(rows[0]["cloud_psnr"]) and m["n_images_cloud"] == 1


def test_band_groups_follow_wavelengths():
    assert band_groups("landsat", ("SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7")) == {
        "visible": [0, 1, 2], "nir": [3], "swir": [4, 5]}


@pytest.mark.slow
def test_checkpoint_for_another_sensor_is_a_clear_error(dataset, tmp_path):
    cfg = resolve_config("cmsn", "small")
    model = build_model("cmsn", cfg)
    save_model(tmp_path, model, {"model": "cmsn", "config": cfg, "spec": model.spec.to_dict(), "metrics": {}})
    with pytest.raises(DataError, match="needs 'landsat'"):
        evaluate(tmp_path, dataset, "test")


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["cloudfree", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr()


@pytest.mark.slow
def test_cli_errors_are_one_line(run, dataset, tmp_path, monkeypatch, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / MODEL_FILE).write_bytes(b"PK\x03\x04 truncated zip")
    code, out = _cli(monkeypatch, capsys, "evaluate", "--checkpoint", str(broken), "--data", str(dataset))
    assert code == 2 and "not a readable model state dict" in out.err and "Traceback" not in out.err
    code, out = _cli(
        monkeypatch, capsys, "train", "--data", str(tmp_path / "empty"), "--model", "unet", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "cloudfree build-dataset" in out.err
    code, out = _cli(
        monkeypatch, capsys, "evaluate", "--checkpoint", str(run), "--data", str(dataset), "--split", "nope"
    )
    assert code == 2 and "no cube for split 'nope'" in out.err
    code, out = _cli(
        monkeypatch, capsys, "train", "--data", str(dataset), "--model", "cmsn", "--out", str(tmp_path / "ft"),
        "--init-from", str(run), "--epochs", "1"
    )
    assert code == 2 and "is a checkpoint of model 'unet', not 'cmsn'" in out.err and "--init-from a run" in out.err
    assert len(out.err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_train_then_export(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli-run"
    monkeypatch.setattr(sys, "argv", ["cloudfree", "train", "--data", str(dataset), "--model", "unet", "--out",
                                      str(out), "--epochs", "1", "--batch-size", "4", "--max-steps-per-epoch", "1",
                                      "--workers", "0"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    assert "trained unet for 1 epoch(s)" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["cloudfree", "export-model", str(out), "--format", "onnx", "--size", "32"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    assert (out / "model.onnx").is_file()
    assert torch.load(out / MODEL_FILE, weights_only=True)
