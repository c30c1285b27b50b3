"""Cosine annealing over the run's budget: epochs, or the time limit when that ends the run first."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.schedule import BudgetCosine
from tests.train.test_training import _cfg, _final_state, data  # noqa: F401  (data: module fixture)


def _opt(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_without_a_time_limit_it_is_torchs_cosine_over_the_epochs():
    ours, theirs = _opt(), _opt()
    sched = BudgetCosine(ours, epochs=10, time_limit_s=None, min_lr=1e-5)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=10, eta_min=1e-5)
    for epoch in range(10):
        sched.step(epoch + 1, elapsed_s=1e6)  # no limit: time does not count
        theirs.step()  # torch warns of a scheduler stepped before its optimiser
        ref.step()
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
    assert ours.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_a_time_limit_that_ends_the_run_first_sets_the_pace():
    opt = _opt(4e-4)
    sched = BudgetCosine(opt, epochs=600, time_limit_s=100.0)
    sched.step(1, elapsed_s=50.0)  # 1/600 of the epochs, half the time
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)
    sched.step(2, elapsed_s=75.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-4 * (1 + math.cos(math.pi * 0.75)) / 2)
    sched.step(3, elapsed_s=130.0)  # past the limit: the floor, not a rate rising again
    assert opt.param_groups[0]["lr"] == 0.0 and sched.progress == 1.0


def test_the_state_restores_the_base_rates():
    first = BudgetCosine(_opt(3e-4), epochs=10, time_limit_s=None)
    first.step(5, 0.0)
    again = BudgetCosine(_opt(1.0), epochs=10, time_limit_s=None)
    again.load_state_dict(first.state_dict())
    assert again.base_lrs == [3e-4] and again.progress == 0.5
    with pytest.raises(ValueError, match="2 parameter group"):
        again.load_state_dict({"base_lrs": [1.0, 2.0]})


def test_a_time_limited_cosine_run_ends_annealed(tmp_path, data):  # noqa: F811
    from pipeline.train.loop import train

    sched = {"kind": "cosine", "min_lr": 1e-6}
    # 50 epochs asked for, a limit every epoch overruns: the run stops after one epoch, at the floor
    res = train(_cfg(epochs=50, time_limit_s=1e-3, scheduler=sched), None, tmp_path / "limited", train_data=data[0],
                val_data=data[1], progress=False)
    assert res.epochs_run == 1
    assert _final_state(tmp_path / "limited")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-6)
    # without the limit the epochs set the pace: cosine over 50, however many early stopping lets run
    train(_cfg(epochs=50, max_steps_per_epoch=1, scheduler=sched, patience=1), None, tmp_path / "epochs",
          train_data=data[0], val_data=data[1], progress=False)
    state = _final_state(tmp_path / "epochs")
    done = state["loop"]["epoch"]
    want = 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * done / 50)) / 2
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(want)
