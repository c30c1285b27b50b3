"""Settings of the cloud/shadow masking (``pipeline.masking.scene``); every field says what it does.

Distances are in metres and turned into pixels with the raster's transform, so one configuration works
at 10 m (Sentinel-2) and 30 m (Landsat). The s2cloudless window sizes stay in pixels because that is the
package's own unit and the SEN12MS-CR-TS settings (average_over 4, dilation 2) were chosen at 10 m.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

METHODS = ("auto", "s2cloudless", "cloudscore", "qa60", "scl", "qa_pixel", "spectral")


class MaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # s2cloudless (SEN12MS-CR-TS defaults)
    s2cloudless_threshold: float = Field(
        0.4, ge=0, le=1, description="s2cloudless cloud-probability threshold (SEN12MS-CR-TS: 0.4)."
    )
    s2cloudless_average_over: int = Field(
        4, ge=0, description="s2cloudless disk radius (pixels) for averaging probabilities; 0 = off (SEN12MS-CR-TS: 4)."
    )
    s2cloudless_dilation: int = Field(
        2, ge=0, description="s2cloudless disk radius (pixels) for dilating the cloud mask; 0 = off (SEN12MS-CR-TS: 2)."
    )
    cloud_prob_threshold: float = Field(
        0.4,
        ge=0,
        le=1,
        description=(
            "Threshold on a precomputed CLOUD_PROB band (0-100 %, read as 0-1) when the s2cloudless bands are absent."
        ),
    )

    # Cloud Score+
    cs_cdf_clear: float = Field(
        0.6, ge=0, le=1, description="Cloud Score+ cs_cdf at or above this is clear (Google: 0.50-0.65 works)."
    )
    cs_cdf_thin: float = Field(
        0.4, ge=0, le=1, description="cs_cdf between this and cs_cdf_clear is thin cloud/haze; below it is cloud."
    )

    # Spectral rule (visible/NIR/SWIR only); thresholds on reflectance 0..1
    whiteness_core: float = Field(
        0.2, gt=0, description="Core cloud: visible whiteness (sum |band - mean| / mean) below this."
    )
    brightness_core: float = Field(0.2, gt=0, description="Core cloud: mean visible reflectance above this.")
    ndvi_core: float = Field(0.25, description="Core cloud: NDVI below this (vegetation is not cloud).")
    whiteness_grow: float = Field(
        0.25, gt=0, description="Cloud grown from core pixels into connected pixels whiter than this."
    )
    brightness_grow: float = Field(
        0.14, gt=0, description="Cloud grown into connected pixels brighter (mean visible) than this."
    )
    ndvi_grow: float = Field(0.3, description="Cloud grown into connected pixels with NDVI below this.")
    swir2_min: float = Field(
        0.03, ge=0, description="Fmask basic test: cloud has SWIR2 (2.2 um) reflectance above this."
    )
    cirrus_threshold: float | None = Field(
        0.012,
        ge=0,
        description=(
            "TOA cirrus-band (S2 B10, Landsat B9) reflectance above this is thin cloud; None = do not use the cirrus "
            "band."
        ),
    )
    min_cloud_area_m2: float = Field(
        3600.0, ge=0, description="Spectral cloud objects smaller than this are dropped (speckle)."
    )
    max_hole_area_m2: float = Field(
        1_000_000.0,
        ge=0,
        description="Clear holes inside spectral cloud smaller than this are filled (saturated cloud cores).",
    )
    cloud_buffer_m: float = Field(
        30.0, ge=0, description="Spectral cloud mask dilated by this distance (cloud edges are hazy)."
    )

    # Snow and water (NDSI test keeps snow from being called cloud)
    ndsi_snow: float = Field(
        0.4, description="NDSI (green - swir1)/(green + swir1) above this, with bright NIR and green, is snow."
    )
    snow_nir_min: float = Field(0.11, ge=0, description="Snow needs NIR reflectance above this (Fmask).")
    snow_green_min: float = Field(0.1, ge=0, description="Snow needs green reflectance above this (Fmask).")

    # Shadows
    shadow: bool = Field(
        True, description="Detect cloud shadows with the projection step (methods without their own shadow class)."
    )
    shadow_nir_max: float = Field(
        0.15, ge=0, description="Shadow candidates have NIR reflectance below this (Earth Engine s2cloudless recipe)."
    )
    shadow_nir_relative: float = Field(
        0.7,
        gt=0,
        description="...and below this fraction of the scene's median clear-land NIR (adapts to dark scenes).",
    )
    water_swir1_max: float = Field(
        0.03,
        gt=0,
        description=(
            "Water (excluded from shadow candidates) has SWIR1 reflectance below this when a SWIR1 band exists; "
            "shadowed land keeps more."
        ),
    )
    cloud_height_min_m: float = Field(
        200.0, ge=0, description="Lowest cloud height scanned when projecting clouds onto their shadows."
    )
    cloud_height_max_m: float = Field(
        4000.0, gt=0, description="Highest cloud height scanned when projecting clouds onto their shadows."
    )
    shadow_match_min: float = Field(
        0.4,
        ge=0,
        le=1,
        description=(
            "A cloud object gets a shadow only if, at its best-matching height, at least this fraction of its "
            "projected footprint is dark."
        ),
    )
    shadow_match_block_m: float = Field(
        40.0,
        gt=0,
        description=(
            "Block size (m) on which cloud objects are matched to dark footprints (coarser = faster, less precise "
            "height)."
        ),
    )
    shadow_search_m: float = Field(
        1500.0,
        gt=0,
        description="Without sun angles: dark pixels within this distance of a cloud are shadow (no direction known).",
    )
    shadow_buffer_m: float = Field(30.0, ge=0, description="Shadow mask dilated by this distance.")
    sun_azimuth: float | None = Field(
        None,
        ge=0,
        le=360,
        description=(
            "Sun azimuth (degrees clockwise from north) used when neither the scene nor the raster carries one."
        ),
    )
    sun_elevation: float | None = Field(
        None, gt=0, le=90, description="Sun elevation (degrees) used when neither the scene nor the raster carries one."
    )
    pixel_size_m: float | None = Field(
        None, gt=0, description="Pixel size (m) for rasters without a transform attribute (e.g. plain arrays)."
    )
