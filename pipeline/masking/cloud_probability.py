"""s2cloudless (Sentinel Hub's LightGBM pixel classifier) on Sentinel-2 L1C TOA reflectance."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from s2cloudless import S2PixelCloudDetector

# The classifier's 10 input bands, in its order (s2cloudless.utils.MODEL_BAND_IDS of the 13 L1C bands).
S2CLOUDLESS_BANDS = ("B1", "B2", "B4", "B5", "B8", "B8A", "B9", "B10", "B11", "B12")


@lru_cache(maxsize=8)
def detector(threshold: float, average_over: int, dilation: int) -> S2PixelCloudDetector:
    """One detector per setting: the LightGBM model is loaded lazily once and reused."""
    return S2PixelCloudDetector(
        threshold=threshold, all_bands=False, average_over=average_over or None, dilation_size=dilation or None
    )


def s2cloudless_probability(bands_hwc: np.ndarray, det: S2PixelCloudDetector) -> np.ndarray:
    """Cloud probability (H, W) from an (H, W, 10) reflectance stack in ``S2CLOUDLESS_BANDS`` order.

    NaN is replaced by 0 for the classifier; the caller marks those pixels nodata.
    """
    data = np.nan_to_num(bands_hwc, nan=0.0)
    # SEN12MS-CR-TS clips to [0, 10000] DN before /10000; reflectance above 1 is saturation noise.
    np.clip(data, 0.0, 1.0, out=data)
    return det.get_cloud_probability_maps(data[np.newaxis])[0]


def mask_from_probability(prob: np.ndarray, det: S2PixelCloudDetector, threshold: float | None = None) -> np.ndarray:
    """Averaging + threshold + dilation exactly as s2cloudless does it."""
    return det.get_mask_from_prob(prob[np.newaxis].astype(np.float32), threshold=threshold)[0].astype(bool)
