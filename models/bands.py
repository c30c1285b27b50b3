"""Band-name tables the models default to (copied from ``pipeline.sensors``: ``models`` imports torch only)."""

from __future__ import annotations

# The 13 Sentinel-2 L1C bands of SEN12MS-CR, in pipeline.sensors.S2_BANDS order.
S2_BANDS: tuple[str, ...] = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_RGB: tuple[str, ...] = ("B4", "B3", "B2")
S1_BANDS: tuple[str, ...] = ("VV", "VH")
# Landsat 8/9 Collection 2 surface reflectance bands (SR_B1 coastal .. SR_B7 SWIR 2).
LANDSAT_SR_BANDS: tuple[str, ...] = ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7")
LANDSAT_RGB: tuple[str, ...] = ("SR_B4", "SR_B3", "SR_B2")

# (red, green, blue) and (nir, red) names per sensor family, for perceptual losses and NDVI.
RGB_NAMES: tuple[tuple[str, str, str], ...] = (
    ("B4", "B3", "B2"),
    ("SR_B4", "SR_B3", "SR_B2"),
    ("SR_B3", "SR_B2", "SR_B1"),
)


def rgb_indices(bands: tuple[str, ...]) -> tuple[int, int, int] | None:
    """Indices of (red, green, blue) in ``bands`` (S2 or Landsat 8/9 names), or None if absent."""
    for names in RGB_NAMES:
        if all(n in bands for n in names):
            return tuple(bands.index(n) for n in names)  # type: ignore[return-value]
    return None
