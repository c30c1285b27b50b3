"""``TrainConfig``: described fields, the one source of the CLI's and the flow's defaults, a torch-free import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.train.config import (
    AugmentConfig,
    ModelDefaults,
    OptimConfig,
    SchedulerConfig,
    TrainConfig,
    load_train_config,
    train_default,
)


@pytest.mark.parametrize("model", [TrainConfig, AugmentConfig, OptimConfig, SchedulerConfig, ModelDefaults])
def test_every_field_is_described(model):
    assert [name for name, f in model.model_fields.items() if not f.description] == []


def test_cli_train_options_show_the_config_defaults_but_only_override_when_given():
    import typer.main

    from pipeline.cli.app import app
    from pipeline.cli.train import train_cmd  # noqa: F401  (registers the command)

    command = typer.main.get_command(app).commands["train"]
    fields = TrainConfig.model_fields
    flag_field = {"epochs": "epochs", "batch_size": "batch_size", "seed": "seed", "precision": "precision",
                  "grad_clip": "grad_clip", "patience": "patience", "monitor": "monitor", "workers": "num_workers",
                  "max_steps": "max_steps_per_epoch", "time_limit": "time_limit_s", "vgg_weights": "vgg_weights"}
    params = {p.name: p for p in command.params}
    for flag, name in flag_field.items():
        param = params[flag]
        assert param.default is None, flag  # None = not given: a --config file's value stays
        default = fields[name].default
        assert param.show_default == (False if default is None else str(default)), flag
        assert param.help, flag
    assert params["config"].default == fields["model_params"].default == "small"


def test_absent_overrides_keep_the_config_file(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("epochs: 7\nseed: 3\n")
    cfg = load_train_config(f, "unet", epochs=None, seed=None, num_workers=1)
    assert (cfg.epochs, cfg.seed, cfg.num_workers) == (7, 3, 1)


def test_flow_parameters_take_the_config_defaults():
    from flows.params import TrainParams

    fields = TrainParams.model_fields
    for name in ("batch_size", "max_steps_per_epoch", "time_limit_s", "seed"):
        assert fields[name].default == train_default(name), name
    assert fields["config"].default == train_default("model_params")
    # the flow's quick-run choices, deliberately not TrainConfig's
    assert (fields["epochs"].default, fields["num_workers"].default) == (4, 0)


def test_config_and_cli_imports_load_no_torch():
    code = ("import sys, pipeline.train.config; light = sorted(m for m in ('torch', 'rasterio', 'xarray', 'zarr') "
            "if m in sys.modules); import pipeline.cli.train; print(light, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] False"


def test_cli_bad_lr_is_one_line(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["cloudfree", "train", "--data", str(tmp_path), "--model", "unet",
                                      "--out", str(tmp_path / "run"), "--lr", "-1"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "--lr -1.0: Input should be greater than 0" in err and "Traceback" not in err


RECIPES = sorted((Path(__file__).resolve().parents[2] / "docs" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_training_recipes_load_and_fit_the_cpu_budget(path):
    import yaml

    cfg = load_train_config(path, yaml.safe_load(path.read_text())["model"])
    assert cfg.time_limit_s is not None and cfg.time_limit_s <= 600  # the README's figures are 10-min CPU runs
    makefile = (path.parents[2] / "Makefile").read_text()
    assert f"docs/recipes/{path.name}" in makefile  # `make refine-demo` runs every shipped recipe


def test_recipes_are_shipped():
    assert {p.stem for p in RECIPES} == {"refine-sar"}
