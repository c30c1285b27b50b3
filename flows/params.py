"""Flow parameters as pydantic models: what the Prefect UI shows as a form and validates before a run starts.

Every check that can fail without doing work (unknown region, malformed GeoJSON, a date outside the
region's window, a missing checkpoint or dataset, an unknown model) runs in a validator, so a bad
``prefect deployment run`` fails within a second with ``Flow run received invalid parameters: ...`` and
the one-line reason from ``pipeline``'s ``CloudfreeError`` messages, before any task is submitted.
Relative paths are relative to the flow run's working directory (the repo root for the process worker).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.dataset.config import BuildConfig
from pipeline.errors import CloudfreeError, RegionError
from pipeline.harmonize import FillConfig
from pipeline.reconstruct.config import AuxDates, ReconstructConfig, Unobserved, config_field
from pipeline.regions import Region, geojson_bounds, list_regions, load_region, parse_region
from pipeline.sources.registry import SourceName, SourceSpec
from pipeline.train.config import train_default


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_enum_values=True, validate_default=True)


def region_from_geojson(
    geometry: dict[str, Any] | str,
    name: str,
    start: dt.date | str,
    end: dt.date | str,
    **fields: Any,
) -> Region:
    """A ``Region`` from an inline GeoJSON Polygon/MultiPolygon (bare, Feature or FeatureCollection).

    The region grid is the geometry's lon/lat bounding box (what ``Region.grid`` uses for a GeoJSON file
    too). ``fields`` are any other region keys (``event_date``, ``sensors``, ``resolution``, ``patch``,
    ``selection``, ``splits``, ``crs``). Raises ``RegionError`` naming the problem and the fix.
    """
    where = f"inline GeoJSON of AOI {name!r}"
    if isinstance(geometry, str):
        try:
            geometry = json.loads(geometry)
        except json.JSONDecodeError as exc:
            raise RegionError(
                f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                "paste a GeoJSON Polygon"
            ) from None
    bounds = list(geojson_bounds(geometry, where))
    data = {"name": name, "bbox": bounds, "window": {"start": str(start), "end": str(end)}, **fields}
    return parse_region(data, where)


class InlineAOI(_Params):
    """An AOI drawn elsewhere (geojson.io, QGIS) and pasted as GeoJSON, instead of a region file."""

    name: str = Field(description="Lower-case slug naming the outputs, e.g. 'flood-north'.")
    geometry: dict[str, Any] | str = Field(
        description="GeoJSON Polygon/MultiPolygon in EPSG:4326 (bare, Feature or FeatureCollection), "
        "as an object or a JSON string."
    )
    start: dt.date = Field(description="First acquisition date searched (YYYY-MM-DD).")
    end: dt.date = Field(description="Last acquisition date searched (YYYY-MM-DD).")
    event_date: dt.date | None = Field(None, description="Date of the disaster, inside start..end.")
    sensors: list[Literal["s1", "s2", "landsat"]] = Field(["s1", "s2"], description="Sensor families to search.")
    resolution: float = Field(10.0, description="Pixel size in metres.")
    patch_size: int = Field(256, description="Dataset patch side in pixels (multiple of 8).")
    patch_stride: int | None = Field(None, description="Step between patches in pixels (default: patch_size).")

    def to_region(self) -> Region:
        extra: dict[str, Any] = {"sensors": list(self.sensors), "resolution": self.resolution,
                                 "patch": {"size": self.patch_size, "stride": self.patch_stride}}
        if self.event_date is not None:
            extra["event_date"] = str(self.event_date)
        return region_from_geojson(self.geometry, self.name, self.start, self.end, **extra)


def resolve_region(region: str | InlineAOI) -> Region:
    """A region name (``regions/NAME.yaml``), a path to a region YAML, or an inline AOI -> ``Region``."""
    return region.to_region() if isinstance(region, InlineAOI) else load_region(region)


def _as_value_error(fn: Any, *args: Any) -> Any:
    """pydantic collects ValueErrors into one report; CloudfreeError would escape as a bare exception."""
    try:
        return fn(*args)
    except CloudfreeError as exc:
        raise ValueError(str(exc)) from None


class _RegionParams(_Params):
    region: str | InlineAOI = Field(
        description="Region name (regions/NAME.yaml), path to a region YAML, or an inline GeoJSON AOI."
    )
    source: SourceName = Field(
        SourceName.synthetic,
        description="Scene archive: synthetic (offline simulation), local (GeoTIFF folder) or earthengine.",
    )
    source_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Source keyword arguments, e.g. {'root': '/data/sen12'} for local, "
        "{'project': 'my-gcp-project'} for earthengine.",
    )

    def resolved_region(self) -> Region:
        return resolve_region(self.region)

    @model_validator(mode="after")
    def _region_exists(self) -> "_RegionParams":
        _as_value_error(self.resolved_region)
        _as_value_error(SourceSpec.parse, self.source, None, self.source_options)
        return self


class ReconstructParams(_RegionParams):
    """Parameters of ``reconstruct-aoi``; its reconstruct options are fields of ``ReconstructConfig`` (``config()``)."""

    date: dt.date = Field(description="Target date YYYY-MM-DD; must lie inside the region's window.")
    checkpoint: str = Field(
        "composite", description="Training run folder (model.pt + model.json) or 'composite' (no training).")
    out: str = Field(
        "out/reconstruct-aoi", description="Output folder for the COG, provenance, STAC item and quicklook.")
    # reconstruct options: default, description and rule come from ReconstructConfig (see config())
    tile: int = config_field("tile")
    overlap: int = config_field("overlap")
    block: int = config_field("block")
    keep_clear: bool = config_field("keep_clear")
    mask_method: str = config_field("mask_method")
    aux_dates: AuxDates = config_field("aux_dates")
    max_age_days: int = Field(
        FillConfig.model_fields["max_age_days"].default,
        description=f"Checkpoint composite: {FillConfig.model_fields['max_age_days'].description}")
    fill_unobserved: Unobserved = config_field("fill_unobserved")
    score_truth: bool = Field(
        False, description="Synthetic source only: score the COG against the simulator's true clear scene "
        "(slow on large AOIs: full-image SSIM).")

    def config(self) -> ReconstructConfig:
        """The ``reconstruct`` settings of these parameters; one ``CloudfreeError`` line when one is invalid."""
        return ReconstructConfig.parse({
            "source": SourceSpec.parse(self.source, None, self.source_options), "tile": self.tile,
            "overlap": self.overlap, "block": self.block, "keep_clear": self.keep_clear,
            "mask_method": self.mask_method, "aux_dates": self.aux_dates,
            "fill": {"max_age_days": self.max_age_days}, "fill_unobserved": self.fill_unobserved,
        }, option=lambda field: field.removeprefix("fill."))  # fill.max_age_days is the parameter max_age_days

    @model_validator(mode="after")
    def _checks(self) -> "ReconstructParams":
        _as_value_error(self.config)
        region = self.resolved_region()
        w = region.window
        if not w.start <= self.date <= w.end:
            raise ValueError(
                f"date {self.date} is outside region {region.name}'s window {w.start}..{w.end}; "
                "pick a date inside it or widen the region's window"
            )
        if self.score_truth and self.source != "synthetic":
            raise ValueError("score_truth needs the synthetic source (only the simulator knows the true clear scene); "
                             f"got source {self.source!r}")
        if self.checkpoint != "composite":
            run = Path(self.checkpoint)
            if not (run / "model.pt").is_file() or not (run / "model.json").is_file():
                raise ValueError(
                    f"checkpoint {self.checkpoint!r}: no model.pt + model.json in {run.resolve()}; "
                    "pass a folder written by train-model (or `cloudfree train`) or 'composite'"
                )
        return self


_BUILD = BuildConfig.model_fields


class BuildDatasetParams(_Params):
    """Parameters of ``build-dataset``.

    ``region`` empty: every region file marked ``active: true`` without a dataset."""

    region: str | InlineAOI | None = Field(
        None, description="Region name/path/inline AOI; empty: all active regions that have no dataset yet."
    )
    source: SourceName = Field(SourceName.synthetic, description="Scene archive: synthetic, local or earthengine.")
    source_options: dict[str, Any] = Field(
        default_factory=dict, description="Source keyword arguments (root for local, project for earthengine)."
    )
    out_root: str = Field("data", description="Datasets go to OUT_ROOT/<region name>.")
    # default and description from the build's own config; BuildConfig validates them (see _checks)
    max_patches: int | None = Field(_BUILD["max_patches"].default, description=_BUILD["max_patches"].description)
    mask_method: str = Field(_BUILD["mask_method"].default, description=_BUILD["mask_method"].description)
    allow_large: bool = Field(
        False, description="Build regions over the size limit (CLOUDFREE_MAX_MEGAPIXELS) anyway, like the CLI's --yes.")

    @model_validator(mode="after")
    def _checks(self) -> "BuildDatasetParams":
        if self.region is not None:
            _as_value_error(resolve_region, self.region)
        _as_value_error(self.build_config)
        return self

    def build_config(self) -> BuildConfig:
        """The build's settings from these parameters (one ``CloudfreeError`` line when one is invalid)."""
        source = SourceSpec.parse(self.source, None, self.source_options)
        return BuildConfig.parse(source=source, max_patches=self.max_patches, mask_method=self.mask_method)

    def targets(self) -> list[Region]:
        """The regions this run builds: the given one, or each active region without ``dataset.json``."""
        if self.region is not None:
            return [resolve_region(self.region)]
        regions = [load_region(n) for n in list_regions()]
        return [r for r in regions if r.active and not (Path(self.out_root) / r.name / "dataset.json").exists()]


class TrainParams(_Params):
    """Parameters of ``train-model``."""

    data: str = Field("data/zhengzhou-demo", description="Dataset folder written by build-dataset (holds cubes/).")
    model: str = Field("unet", description="Registry name: unet, crgennet, srggan, cmsn, uncrtaints, cafusion.")
    config: str = Field(
        train_default("model_params"), description="small | paper | a YAML/JSON file of training settings.")
    # epochs and num_workers are the flow's own quick-run defaults (a laptop demo), not TrainConfig's
    epochs: int = Field(4, ge=1, description="Total epochs.")
    batch_size: int | None = Field(
        train_default("batch_size"), ge=1, description="Global batch; default: the model's published one.")
    max_steps_per_epoch: int | None = Field(
        train_default("max_steps_per_epoch"), ge=1, description="Cap on optimiser steps per epoch (quick runs).")
    time_limit_s: float | None = Field(
        train_default("time_limit_s"), gt=0,
        description="Stop after the epoch during which this many seconds passed (the best checkpoint so far is kept).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    seed: int = Field(
        train_default("seed"), description="Seeds weights, shuffling and augmentation (same seed: same run).")
    out: str = Field("runs/zhengzhou-demo-unet", description="Run folder: model.pt, model.json, train_state.pt, tb/.")
    resume: bool = Field(False, description="Continue the run in `out` where it stopped.")
    init_from: str | None = Field(
        None, description="Fine-tune: a finished run folder (same model and config) whose weights start this run, "
        "e.g. a model trained on another AOI.")
    evaluate_split: str | None = Field(
        "test", description="Split scored against the composite baseline after training (empty: skip).")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from models.registry import MODELS

        if v not in MODELS or v == "composite":
            raise ValueError(f"unknown model {v!r}; use one of: {', '.join(m for m in MODELS if m != 'composite')}")
        return v

    @model_validator(mode="after")
    def _checks(self) -> "TrainParams":
        data = Path(self.data)
        if not (data / "cubes").is_dir():
            raise ValueError(
                f"data {self.data!r}: no cubes/ folder in {data.resolve()}; run build-dataset first or fix the path")
        return self
