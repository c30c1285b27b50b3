"""The training loop on in-memory raw samples: learning, exact resume, GAN steps, NaN stops, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import CheckpointError, DataError
from pipeline.train.checkpoint import STATE_FILE, load_checkpoint
from pipeline.train.config import TrainConfig, TrainConfigError, load_train_config
from pipeline.train.loop import TrainingError, train
from tests.train.test_samples import toy_raw_samples

SMALL_UNET = {"base": "small", "optical_bands": ["B2", "B3", "B4", "B8"], "depth": 1}


def _cfg(**kw) -> TrainConfig:
    # the toy samples' clouds are flat 0.8 patches: pasting those donor pixels instead of a simulated cloud would make
    # each epoch's loss depend on which cloud kind was drawn, not on what the loop learned
    base = dict(model="unet", model_params=SMALL_UNET, epochs=2, batch_size=4, num_workers=0, seed=0,
                augment={"donor_pixels_prob": 0.0})
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data():
    return toy_raw_samples(8, size=32, seed=1), toy_raw_samples(4, size=32, seed=2)


def _final_state(run):
    return torch.load(run / STATE_FILE, weights_only=True)


def test_trains_logs_and_checkpoints(tmp_path, data):
    run = tmp_path / "run"
    res = train(_cfg(epochs=3), None, run, train_data=data[0], val_data=data[1], progress=False)
    assert res.epochs_run == 3 and len(res.history) == 3
    losses = [h["train_total"] for h in res.history]
    assert losses[-1] < losses[0]  # it learns something
    model, meta = load_checkpoint(run)
    assert meta["epoch"] == res.best_epoch and meta["monitor"]["name"] == "cloud_psnr"
    assert meta["metrics"]["cloud_psnr"] == pytest.approx(res.best_value)
    assert meta["spec"]["optical_bands"] == ["B2", "B3", "B4", "B8"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert "epoch/cloud_psnr" in acc.Tags()["scalars"]
    assert "val/input_prediction_target" in acc.Tags()["images"]


def test_resume_is_exact(tmp_path, data):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg(epochs=2), None, straight, train_data=data[0], val_data=data[1], progress=False)
    first = train(_cfg(epochs=1), None, split, train_data=data[0], val_data=data[1], progress=False)
    first_elapsed = _final_state(split)["loop"]["elapsed_s"]
    with pytest.raises(CheckpointError, match="--resume"):
        train(_cfg(epochs=2), None, split, train_data=data[0], val_data=data[1], progress=False)
    res = train(_cfg(epochs=2), None, split, resume=True, train_data=data[0], val_data=data[1], progress=False)
    assert res.epochs_run == 1
    # the resumed call reports its own time; the run's total (what --time-limit counts) adds the first session's
    assert res.total_seconds == pytest.approx(res.seconds + first_elapsed, abs=0.5)
    assert first_elapsed <= first.seconds and res.seconds < res.total_seconds
    a, b = _final_state(straight), _final_state(split)
    assert a["loop"]["epoch"] == b["loop"]["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]
    assert a["loop"]["history"][-1]["cloud_psnr"] == pytest.approx(b["loop"]["history"][-1]["cloud_psnr"], rel=1e-5)


def test_resume_refuses_another_model(tmp_path, data):
    run = tmp_path / "run"
    train(_cfg(epochs=1), None, run, train_data=data[0], val_data=data[1], progress=False)
    with pytest.raises(CheckpointError, match="checkpoint of model 'unet', not 'srggan'"):
        train(_cfg(model="srggan", model_params={"base": "small", "loss": {"perceptual": 0, "style": 0}}), None, run,
              resume=True, train_data=data[0], val_data=data[1], progress=False)
    with pytest.raises(CheckpointError, match="input spec differs"):
        train(_cfg(model_params={**SMALL_UNET, "optical_bands": ["B4", "B3", "B2"]}), None, run, resume=True,
              train_data=data[0], val_data=data[1], progress=False)


def test_gan_model_alternates_and_resumes_discriminator(tmp_path, data):
    params = {
        "base": "small",
        "optical_bands": ["B4", "B3", "B2"],
        "loss": {"perceptual": 0, "style": 0, "adversarial": "wgan-gp"},
    }
    run = tmp_path / "gan"
    res = train(_cfg(model="srggan", model_params=params, epochs=1, max_steps_per_epoch=2), None, run,
                train_data=data[0], val_data=data[1], progress=False)
    h = res.history[0]
    assert {"train_d_wgan", "train_d_gp", "train_g_adv", "train_l1"} <= set(h)
    state = _final_state(run)
    assert state["disc"] and state["d_optimizer"]["state"]
    res2 = train(_cfg(model="srggan", model_params=params, epochs=2, max_steps_per_epoch=2), None, run, resume=True,
                 train_data=data[0], val_data=data[1], progress=False)
    assert res2.epochs_run == 1 and _final_state(run)["d_optimizer"]["state"][0]["step"] == 4


def test_nonfinite_loss_names_the_samples(tmp_path):
    raw = toy_raw_samples(4, size=32, seed=5)
    raw[2]["s2"][-1, 3, 5:9, 5:9] = 3e38  # a finite but absurd reflectance: the loss overflows
    with pytest.raises(TrainingError, match=r"non-finite loss .* epoch 1, step 0; batch samples: \[.*'toy_5_2'.*\]"):
        train(_cfg(epochs=1), None, tmp_path / "nan", train_data=raw, val_data=raw[:1], progress=False)


def test_data_folder_without_cubes_names_the_build_command(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match="cloudfree build-dataset"):
        train(_cfg(), tmp_path / "ds", tmp_path / "run", progress=False)


def test_composite_and_bad_settings_are_clear(tmp_path, data):
    with pytest.raises(TrainingError, match="needs no training"):
        train(_cfg(model="composite", model_params="small"), None, tmp_path / "c", train_data=data[0],
              val_data=data[1], progress=False)
    with pytest.raises(TrainConfigError, match="monitor 'psnr_cloud' is not a validation metric"):
        train(_cfg(monitor="psnr_cloud", epochs=1), None, tmp_path / "m", train_data=data[0], val_data=data[1],
              progress=False)
    with pytest.raises(TrainConfigError, match="perceptual"):
        train(_cfg(model="crgennet", model_params="paper"), None, tmp_path / "v", train_data=data[0],
              val_data=data[1], progress=False)


def test_config_file_and_published_defaults(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("model_params: {base: small, depth: 1}\nepochs: 3\noptimizer: {lr: 0.01}\n")
    cfg = load_train_config(f, "unet", epochs=5)
    assert cfg.epochs == 5 and cfg.resolved_optimizer().lr == 0.01 and cfg.model_params == {"base": "small", "depth": 1}
    assert load_train_config("paper", "crgennet").resolved_optimizer().lr == 1e-3
    srg = load_train_config("small", "srggan")
    assert srg.resolved_optimizer().lr == 1e-4 and srg.resolved_batch_size() == 4
    f.write_text("model: crgennet\n")
    with pytest.raises(TrainConfigError, match="for model 'crgennet'"):
        load_train_config(f, "unet")
    f.write_text("epochs: -1\n")
    with pytest.raises(TrainConfigError, match="epochs"):
        load_train_config(f, "unet")
    json_cfg = tmp_path / "c.json"
    json_cfg.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(TrainConfigError, match="bogus"):
        load_train_config(json_cfg, "unet")


def test_a_run_folder_in_use_is_refused_in_one_line(tmp_path, data):
    import threading

    from pipeline.files import OutputInUseError, OutputLock

    run = tmp_path / "run"
    held, done = threading.Event(), threading.Event()

    def other_run():
        with OutputLock(run, "train"):
            held.set()
            done.wait(30)

    t = threading.Thread(target=other_run)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(OutputInUseError, match=rf"{run} is in use by PID \d+"):
            train(_cfg(epochs=1), None, run, train_data=data[0], val_data=data[1], progress=False)
    finally:
        done.set()
        t.join()
    assert not (run / STATE_FILE).exists()


def test_init_from_starts_from_a_finished_runs_weights_and_never_hands_back_worse(tmp_path, data):
    source = tmp_path / "source"
    train(_cfg(epochs=3), None, source, train_data=data[0], val_data=data[1], progress=False)
    _, source_meta = load_checkpoint(source)
    tuned = tmp_path / "tuned"
    res = train(_cfg(epochs=1, init_from=str(source), optimizer={"lr": 1e-2}), None, tuned, train_data=data[0],
                val_data=data[1], progress=False)
    # epoch 0 validates the given weights on the same samples: the source's best score, not an untrained model's
    assert res.history[0]["epoch"] == 0
    assert res.history[0]["cloud_psnr"] == pytest.approx(source_meta["monitor"]["value"], abs=1e-4)
    assert res.best_value >= res.history[0]["cloud_psnr"]
    _, meta = load_checkpoint(tuned)
    assert meta["train"]["init_from"] == str(source)


def test_init_from_another_model_or_no_run_is_one_clear_line(tmp_path, data):
    source = tmp_path / "source"
    train(_cfg(epochs=1), None, source, train_data=data[0], val_data=data[1], progress=False)
    other = {**SMALL_UNET, "optical_bands": ["B2", "B3", "B4"]}
    with pytest.raises(CheckpointError, match="input spec differs.*--init-from a run of 'unet'") as err:
        train(_cfg(model_params=other, init_from=str(source)), None, tmp_path / "a", train_data=data[0],
              val_data=data[1], progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(_cfg(init_from=str(tmp_path / "nowhere")), None, tmp_path / "b", train_data=data[0], val_data=data[1],
              progress=False)
