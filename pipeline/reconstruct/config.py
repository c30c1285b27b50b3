"""Settings of ``reconstruct``: every option, its default and its rule, written once.

``ReconstructConfig`` is what ``pipeline.reconstruct.run.reconstruct`` takes, what ``cloudfree reconstruct``
builds from its options (their defaults and help come from here) and what the ``reconstruct-aoi`` flow's
parameters fill in. It holds the source (a ``SourceSpec``), the training-free fill of the ``composite``
checkpoint (``fill``: a ``pipeline.harmonize.FillConfig``), the stitching of model tiles into blocks
(``pipeline.reconstruct.tiling``) and the output and run options. Only pydantic, numpy, the standard library and
light ``pipeline`` modules are imported, so the CLI can build it without loading torch or rasterio.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pipeline.errors import CloudfreeError, describe_validation
from pipeline.harmonize import FillConfig
from pipeline.masking.config import METHODS
from pipeline.sources.registry import SourceSpec

MIN_OVERLAP = 32  # narrower overlaps leave visible tile seams
COG_TILE = 512  # output blocks are whole COG tiles, so block writes never share a tile
AUX_MAX_DAYS = 30  # "clearest" auxiliary dates come from this many days before D (TCSEN12's max_gap_days)


class OutType(str, enum.Enum):
    float32 = "float32"
    uint16 = "uint16"


class Compression(str, enum.Enum):
    deflate = "deflate"
    zstd = "zstd"


class AuxDates(str, enum.Enum):
    clearest = "clearest"
    latest = "latest"


class Unobserved(str, enum.Enum):
    nodata = "nodata"
    least_cloudy = "least-cloudy"


class ReconstructConfigError(CloudfreeError):
    """A reconstruct option is invalid; the message names the option, its value and the fix."""


def _default_source() -> SourceSpec:
    # parsed, so ``name`` is the plain value as in every parsed spec (SourceSpec() leaves its default an enum member)
    return SourceSpec.parse(SourceSpec.model_fields["name"].default)


class ReconstructConfig(BaseModel):
    """How ``reconstruct`` reads, stitches and writes; one instance serves every date of a run."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True, validate_default=True)

    source: SourceSpec = Field(
        default_factory=_default_source,
        description="Where the input scenes come from (source name, root folder, options).")
    fill: FillConfig = Field(
        default_factory=FillConfig,
        description="Checkpoint 'composite' (training-free): how hidden pixels are filled from the most recent clear "
        "earlier date, harmonized to the target date (maximum age, fit, mask buffers, feathering).")
    fill_unobserved: Unobserved = Field(
        Unobserved.nodata,
        description="Checkpoint 'composite': pixels with no clear observation within the maximum age stay nodata, "
        "or take the least cloudy value any date has there (thin cloud before shadow before cloud, the most recent "
        "first); either way their provenance is 3.")
    tile: int = Field(256, description="Model tile side in pixels; a positive multiple of 8.")
    overlap: int = Field(
        64, description=f"Overlap between neighbouring tiles in pixels; at least {MIN_OVERLAP} and less than the "
        "tile side.")
    batch_size: int = Field(8, ge=1, description="Tiles per model forward.")
    block: int = Field(
        1024, description=f"Output block side in pixels; a multiple of {COG_TILE} (the COG tile). Bounds memory.")
    keep_clear: bool = Field(
        False, description="Model checkpoints: keep the observed clear pixels of the target date exactly; feather the "
        "seam around them (the composite always keeps them).")
    feather: int = Field(
        16, ge=0, description="Model checkpoints: pixels over which a keep-clear seam is blended on the reconstructed "
        "side.")
    floor: float = Field(
        1e-3, gt=0, lt=1,
        description="Smallest tile blending weight, so tile edges still count where nothing else covers.")
    bf16: bool = Field(True, description="Autocast the model to bfloat16 on CUDA.")
    dtype: OutType = Field(
        OutType.uint16, description="uint16 DN as Sentinel-2 products store them (reflectance = DN x 1e-4, DN 0 "
        "nodata; about half the size of float32, within 1e-4 of it) or float32 reflectance (NaN nodata).")
    compress: Compression = Field(
        Compression.deflate, description="COG compression: deflate (every GeoTIFF reader) or zstd (about 10 % "
        "smaller uint16 files; needs GDAL 2.3 or newer).")
    mask_method: str = Field(
        "auto", description=f"Cloud mask method of the inputs: {', '.join(METHODS)} (cloudscore is fast; the "
        "synthetic and Earth Engine S2 archives carry its cs_cdf band).")
    sar_max_days: int = Field(
        6, ge=0, description="Most days between an optical date (or the target date) and its S1 scene.")
    aux_dates: AuxDates = Field(
        AuxDates.clearest, description=f"Earlier optical dates the model sees: the least cloudy within {AUX_MAX_DAYS} "
        "days before the target date, or the latest ones.")
    device: str | None = Field(None, description="torch device, e.g. cuda:1 (default: cuda if available, else cpu).")
    dask_address: str | None = Field(
        None, description="Address of a running dask.distributed scheduler, e.g. tcp://10.0.0.5:8786 "
        "(default: run in this process).")

    @field_validator("tile")
    @classmethod
    def _tile(cls, v: int) -> int:
        if v <= 0 or v % 8:
            raise ValueError("must be a positive multiple of 8, e.g. 256")
        return v

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, v: int, info: ValidationInfo) -> int:
        tile = info.data.get("tile")
        if tile is None:  # the tile itself is invalid and reported on its own
            return v
        choice = f"pick {MIN_OVERLAP} to {tile - 1}"
        if v < MIN_OVERLAP:
            raise ValueError(f"narrower than {MIN_OVERLAP} px leaves visible tile seams; {choice}")
        if v >= tile:
            raise ValueError(f"must be smaller than the tile ({tile} px); {choice} or a larger tile")
        return v

    @field_validator("block")
    @classmethod
    def _block(cls, v: int) -> int:
        if v <= 0 or v % COG_TILE:
            raise ValueError(f"must be a positive multiple of {COG_TILE} (the COG tile), e.g. {2 * COG_TILE}")
        return v

    @field_validator("mask_method")
    @classmethod
    def _mask_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown mask method; use one of: {', '.join(METHODS)}")
        return v

    @classmethod
    def parse(cls, values: dict[str, Any], *, option: Callable[[str], str] = str) -> "ReconstructConfig":
        """A config from user input, or one ``ReconstructConfigError`` line naming each bad option and its fix.

        ``option`` spells a field name as the user knows it (the CLI passes ``cli_option``: ``--overlap``).
        """
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ReconstructConfigError(describe_validation(exc, option, "reconstruct options")) from None


def config_field(name: str) -> Any:
    """A pydantic ``Field`` with the default and description of ``ReconstructConfig.<name>``, for parameter forms
    that list some options flat (the ``reconstruct-aoi`` flow) without declaring them a second time."""
    info = ReconstructConfig.model_fields[name]
    return Field(info.default, description=info.description)
