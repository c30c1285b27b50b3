"""The target grid: CRS + affine transform + shape, the one thing every source reads onto.

Earth Engine users hit one-pixel shifts when only ``scale`` is given; every read here is pinned to an
explicit transform instead, and sub-grids (patches, tiles, request blocks) are cut on pixel indices so
they line up exactly with no gap or overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds


@dataclass(frozen=True)
class Grid:
    crs: str
    transform: Affine
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"grid shape must be positive, got width={self.width} height={self.height}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def resolution(self) -> tuple[float, float]:
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        left, top = self.transform.c, self.transform.f
        right = left + self.transform.a * self.width
        bottom = top + self.transform.e * self.height
        return (min(left, right), min(bottom, top), max(left, right), max(bottom, top))

    def bounds_lonlat(self) -> tuple[float, float, float, float]:
        return tuple(transform_bounds(CRS.from_user_input(self.crs), CRS.from_epsg(4326), *self.bounds, densify_pts=21))

    def window(self, row: int, col: int, height: int, width: int) -> "Grid":
        """The sub-grid starting at pixel (row, col); may extend past this grid's edge."""
        return Grid(self.crs, self.transform @ Affine.translation(col, row), width, height)

    def tiles(self, size: int, stride: int | None = None) -> Iterator[tuple[int, int, "Grid"]]:
        """(row, col, sub-grid) of ``size``-pixel tiles every ``stride`` pixels, clipped to this grid."""
        stride = stride or size
        for row in range(0, self.height, stride):
            for col in range(0, self.width, stride):
                h, w = min(size, self.height - row), min(size, self.width - col)
                yield row, col, self.window(row, col, h, w)

    def coords(self) -> dict[str, np.ndarray]:
        """Pixel-centre x/y coordinates, for xarray."""
        t = self.transform
        x = t.c + t.a * (np.arange(self.width) + 0.5)
        y = t.f + t.e * (np.arange(self.height) + 0.5)
        return {"y": y, "x": x}

    def to_dict(self) -> dict:
        return {"crs": self.crs, "transform": list(self.transform)[:6], "width": self.width, "height": self.height}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(d["crs"], Affine(*d["transform"][:6]), int(d["width"]), int(d["height"]))
