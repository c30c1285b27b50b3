"""Mask class codes shared by masking, the sources' truth, cubes and inference.

The cube contract (docs/architecture.md) stores the first four codes (0 clear, 1 cloud, 2 shadow, 3 nodata);
``to_cube_codes`` folds the finer classes into them (thin cloud -> cloud, snow/water -> clear).
"""

from enum import IntEnum

import numpy as np


class MaskClass(IntEnum):
    CLEAR = 0
    CLOUD = 1
    SHADOW = 2
    NODATA = 3
    THIN_CLOUD = 4  # cirrus / haze: the ground is partly visible
    SNOW = 5


_TO_CUBE = np.array([0, 1, 2, 3, 1, 0], dtype=np.uint8)


def to_cube_codes(mask: np.ndarray) -> np.ndarray:
    """Fold fine classes into the cube's 0 clear / 1 cloud / 2 shadow / 3 nodata codes."""
    return _TO_CUBE[np.asarray(mask, dtype=np.uint8)]


def is_contaminated(mask: np.ndarray) -> np.ndarray:
    """True where the ground is not seen cleanly (cloud, thin cloud, shadow, nodata)."""
    m = np.asarray(mask)
    return (m == MaskClass.CLOUD) | (m == MaskClass.THIN_CLOUD) | (m == MaskClass.SHADOW) | (m == MaskClass.NODATA)
