"""Settings of one dataset build (``pipeline.dataset.build``): the source, the mask method and the work limits.

Every default and every check of a build option lives here once; the ``build-dataset`` command and the
``build-dataset`` flow's parameters read their defaults and help texts from these fields. Kept light
(pydantic, the masking settings and the source registry only) because the CLI imports it at start-up.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import DataError, describe_validation
from pipeline.masking.config import METHODS, MaskConfig
from pipeline.sources.registry import SourceSpec

# "cheapest" is the build's own choice between mask_scene's methods, made per scene from its bands.
MASK_METHODS = ("cheapest",) + METHODS


class BuildConfig(BaseModel):
    """How to build a dataset; the region and the output folder are the build's arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: SourceSpec = Field(
        default_factory=SourceSpec, description="Where pixels come from: the source name, its root and options."
    )
    max_patches: int | None = Field(
        None, ge=1,
        description="Keep at most N patches (dealt round-robin over the splits); unset keeps every passing patch.",
    )
    workers: int | None = Field(None, ge=1, description="Concurrent writer threads (default: min(4, CPUs)).")
    mask_method: str = Field(
        "cheapest",
        description=f"Cloud mask: {', '.join(MASK_METHODS)}. "
        "'cheapest' uses Cloud Score+ cs_cdf where the source has it, else 'auto'.",
    )
    mask_config: MaskConfig = Field(default_factory=MaskConfig, description="Thresholds of the cloud/shadow masking.")
    cache_bytes: int = Field(
        2 << 30, ge=0,
        description="Scene arrays kept in memory between masking and patch export (first run only); "
        "a scene over the budget is read again for export.",
    )
    progress: bool = Field(True, description="Show progress bars.")

    @field_validator("mask_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in MASK_METHODS:
            raise ValueError(f"unknown mask method {v!r}; use one of: {', '.join(MASK_METHODS)}")
        return v

    @property
    def worker_count(self) -> int:
        """``workers``, or min(4, CPUs) when unset."""
        return self.workers or min(4, os.cpu_count() or 1)

    @classmethod
    def parse(cls, option: Callable[[str], str] = str, **fields: Any) -> BuildConfig:
        """A config from keyword options; one ``DataError`` line naming the first bad option when invalid."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise DataError(describe_validation(exc, option, "build options")) from None
