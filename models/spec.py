"""What a model consumes and returns: the contract between models, training and inference.

A sample covers dates ``t_1 .. t_T`` (optical inputs, oldest first) and ``t_target``. Batches are dicts
of float32 tensors, all normalized per docs/architecture.md (S2/Landsat reflectance clipped to [0, 1]; S1 dB
clipped to [-25, 0] for VV and [-32.5, 0] for VH, then scaled to [0, 1]):

- ``optical``       (B, T, C, H, W): the optical inputs; for ``includes_target_date`` models the last one
                    is the cloudy acquisition of the target date itself (mono-temporal SEN12MS-CR setting);
- ``optical_mask``  (B, T, 1, H, W): 1 where cloud / shadow / nodata, 0 clear;
- ``sar``           (B, T + 1, S, H, W): S1 nearest to each of ``t_1 .. t_T, t_target`` (S = len(sar_bands));
                    absent (or ignored) when ``sar_bands`` is empty;
- ``target``        (B, C, H, W): the clear optical image at ``t_target`` (training / evaluation only);
- ``target_valid``  (B, 1, H, W): 1 where the target is a valid, clear observation;
- ``composite``, ``composite_info`` (``needs_composite`` models, ``models/refine.py``): the harmonized training-free
                    fill of the target date (B, C, H, W) and where it came from (B, 3, H, W: filled, unobserved,
                    source age / 100).

Invalid input pixels are zero in ``optical`` and flagged in ``optical_mask``; they are never silently
treated as observations. Models return ``ModelOutput`` with ``mean`` in [0, 1] reflectance and, for
variance models, ``var`` (same shape). Models that work in tanh range map to [-1, 1] and back inside
their own forward, never in the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch


@dataclass(frozen=True)
class InputSpec:
    optical_sensor: Literal["s2", "landsat"] = "s2"
    optical_bands: tuple[str, ...] = ()
    optical_dates: int = 1
    includes_target_date: bool = True
    sar_bands: tuple[str, ...] = ()
    needs_mask: bool = False
    needs_composite: bool = False  # the model corrects the harmonized fill: batches carry composite(_info)
    output_bands: tuple[str, ...] = field(default=())  # defaults to optical_bands

    @property
    def out_bands(self) -> tuple[str, ...]:
        return self.output_bands or self.optical_bands

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        d = dict(d)
        for k in ("optical_bands", "sar_bands", "output_bands"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)


@dataclass
class ModelOutput:
    mean: torch.Tensor  # (B, C, H, W) reflectance in [0, 1]
    var: torch.Tensor | None = None  # (B, C, H, W) predictive variance, for variance models
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. CRGenNet's coarse image
