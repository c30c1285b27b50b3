"""Cosine learning-rate annealing over a run's budget: its epochs, or its time limit when that ends it first.

``CosineAnnealingLR(T_max=epochs)`` anneals over the epochs asked for. A run that ``time_limit_s`` stops early
(the 10-minute CPU recipes ask for 600 epochs and get about 55) then ends near the starting rate: it never
reaches the low-rate phase where a cosine schedule earns its keep. Here the progress is the larger of the share of
the epochs done and the share of the time used, so a time-limited run anneals towards ``min_lr`` by its last
epoch, and a run without a time limit gets the usual cosine over its epochs.

The rate of an epoch is set from the progress at its start, as ``CosineAnnealingLR`` does: the last epoch trains
just above ``min_lr``. A resumed run goes on from the epochs and seconds its state recorded.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class BudgetCosine:
    """Sets every parameter group's rate to ``min_lr + (base - min_lr) (1 + cos(pi p)) / 2`` at progress ``p``."""

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, time_limit_s: float | None,
                 min_lr: float = 0.0) -> None:
        self.optimizer, self.epochs, self.time_limit_s, self.min_lr = optimizer, epochs, time_limit_s, min_lr
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.progress = 0.0

    def step(self, epochs_done: int, elapsed_s: float) -> None:
        """After an epoch: the rate of the next one."""
        share = epochs_done / self.epochs
        if self.time_limit_s is not None:
            share = max(share, elapsed_s / self.time_limit_s)
        self.progress = min(1.0, share)
        weight = (1.0 + math.cos(math.pi * self.progress)) / 2.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = self.min_lr + (base - self.min_lr) * weight

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the optimiser's own state restores the current rate; the base rates are what the cosine starts from
        base = state["base_lrs"]
        if len(base) != len(self.base_lrs):
            raise ValueError(f"{len(base)} parameter group(s) in the scheduler state, {len(self.base_lrs)} here")
        self.base_lrs, self.progress = [float(b) for b in base], float(state.get("progress", 0.0))
