"""Scenes of one build on the region grid: read once, masked once, the mask cached on disk.

The mask of a scene is written to ``DATASET/masks/<scene>.tif`` and tagged with a key of everything it
depends on (the source, the scene, the mask method and settings, the grid), so any process that builds a
``SceneMasks`` with the same settings finds it: the Prefect flow masks each scene in its own task, and
``build_dataset`` then loads those masks instead of computing them again.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioError

from pipeline import __version__
from pipeline.dataset import patches as ex
from pipeline.errors import DataError, SourceError
from pipeline.files import fingerprint
from pipeline.geotiff import write_geotiff
from pipeline.grid import Grid
from pipeline.masking.codes import MaskClass
from pipeline.masking.scene import MaskConfig, mask_scene
from pipeline.sensors import S1_BANDS, get_sensor, to_dn
from pipeline.sources.base import Scene, Source
from pipeline.sources.registry import SourceName

log = logging.getLogger(__name__)

SOFTWARE = f"cloudfree {__version__}"
MASK_CODES = "last band cloud_mask: 0 clear, 1 cloud, 2 shadow, 3 nodata, 4 thin cloud, 5 snow"

# Extra bands a non-default mask method needs beside the reflectance bands.
_METHOD_BANDS = {"cloudscore": ("cs_cdf",), "qa60": ("QA60",), "scl": ("SCL",), "qa_pixel": ("QA_PIXEL",),
                 "spectral": ()}


def source_name(source: Source | str) -> str:
    """The name a build records for ``source``: the registry name, or a custom source's ``name``/class."""
    if isinstance(source, str):
        return source.value if isinstance(source, SourceName) else source
    return getattr(source, "name", type(source).__name__)


def source_key(name: str, source: Source) -> str:
    """Fingerprint of the archive the scenes come from, part of every cached mask's and patch's key.

    Synthetic scene ids repeat across seeds (and local ids across folders), so a scene id alone would let
    a rebuild from another archive reuse the wrong files."""
    return fingerprint({"source": name, "seed": getattr(source, "seed", None), "root": str(getattr(source, "root", "")),
                        "version": getattr(source, "version", None)})


def resolve_method(method: str, bands: Sequence[str]) -> str:
    """``cheapest``: Cloud Score+ when the scene carries ``cs_cdf`` (a lookup, ~0.05 s per 1 Mpx scene),
    otherwise ``mask_scene``'s ``auto`` (QA_PIXEL for Landsat, s2cloudless for L1C bands: ~50 s per
    1 Mpx scene on 2 cores). Any other name is passed to ``mask_scene`` as is."""
    if method != "cheapest":
        return method
    return "cloudscore" if "cs_cdf" in bands else "auto"


def _safe_name(scene_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", scene_id)


def _nbytes(arrays: ex.SceneArrays) -> int:
    return arrays.data.nbytes + (arrays.mask.nbytes if arrays.mask is not None else 0)


class SceneCache:
    """Scene arrays kept between masking and export, up to a byte budget (first come, first kept)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.items: dict[str, ex.SceneArrays] = {}
        self.lock = threading.Lock()

    def put(self, scene_id: str, arrays: ex.SceneArrays) -> None:
        size = _nbytes(arrays)
        with self.lock:
            if self.used + size <= self.budget:
                self.items[scene_id] = arrays
                self.used += size

    def pop(self, scene_id: str) -> ex.SceneArrays | None:
        with self.lock:
            a = self.items.pop(scene_id, None)
            if a is not None:
                self.used -= _nbytes(a)
            return a


class SceneMasks:
    """Reads, masks and caches the scenes of one build on the region grid.

    ``cache_bytes`` bounds the scene arrays kept in memory for ``load_for_export``; 0 keeps none (a
    caller that only fills the mask cache)."""

    def __init__(self, source: Source, name: str, grid: Grid, out: Path, mask_method: str, mask_config: MaskConfig,
                 cache_bytes: int = 0) -> None:
        self.source, self.grid, self.out = source, grid, out
        self.source_key = source_key(name, source)
        self.method, self.config = mask_method, mask_config
        # Only the simulator's scenes are simulated unless a scene or raster says otherwise.
        self.simulated_default = name == SourceName.synthetic.value
        self.cache = SceneCache(cache_bytes)
        self.by_id: dict[str, Scene] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.mask_methods: dict[str, str] = {}
        self.computed = 0
        self.cached = 0
        self._lock = threading.Lock()  # scans run on two threads

    def mask_key(self, scene: Scene) -> str:
        method = "sar-valid" if scene.family == "s1" else self.method
        cfg = None if scene.family == "s1" else self.config.model_dump()
        return fingerprint({"v": 1, "source": self.source_key, "scene": scene.id, "sensor": scene.sensor,
                            "method": method, "config": cfg, "grid": self.grid.to_dict()})

    def mask_path(self, scene: Scene) -> Path:
        return self.out / "masks" / f"{_safe_name(scene.id)}.tif"

    def is_simulated(self, scene: Scene) -> bool:
        return bool(scene.properties.get("simulated", self.simulated_default))

    def _load_cached_mask(self, scene: Scene) -> tuple[np.ndarray, str] | None:
        path = self.mask_path(scene)
        if not path.exists():
            return None
        try:
            with rasterio.open(path) as src:
                tags = src.tags()
                if tags.get("cloudfree_mask_key") != self.mask_key(scene) or (src.height, src.width) != self.grid.shape:
                    log.info("%s: mask cache is for other settings; recomputing", path)
                    return None
                return src.read(1), tags.get("mask_method", self.method)
        except RasterioError as exc:
            log.warning("%s: unreadable mask cache (%s); recomputing it", path, exc)
            return None

    def bands_to_read(self, scene: Scene) -> list[str] | None:
        sensor = get_sensor(scene.sensor)
        if scene.family == "s1":
            return list(S1_BANDS)
        if self.method in ("cheapest", "auto", "s2cloudless"):
            return None  # every band: the method is chosen from the evidence present
        extra = [b for b in _METHOD_BANDS[self.method] if b in sensor.band_names]
        return list(sensor.reflectance_bands) + [b for b in extra if b not in sensor.reflectance_bands]

    def read(self, scene: Scene) -> tuple[ex.SceneArrays, Any, np.ndarray]:
        """(arrays to cut patches from, the raw raster for masking, where any band is NaN)."""
        try:
            raster = self.source.read(scene, self.grid, self.bands_to_read(scene))
        except SourceError as exc:
            raise SourceError(f"scene {scene.id}: {exc}") from None
        if tuple(raster.shape[-2:]) != self.grid.shape:
            raise DataError(f"scene {scene.id}: source returned shape {tuple(raster.shape[-2:])}, "
                            f"expected the region grid {self.grid.shape}")
        raster = raster.load()
        sensor = get_sensor(scene.sensor)
        simulated = bool(raster.attrs.get("simulated", self.is_simulated(scene)))
        names = [str(b) for b in raster["band"].values]
        tags = {
            "scene_id": scene.id,
            "sensor": scene.sensor,
            "datetime": scene.datetime.astimezone(dt.timezone.utc).isoformat(),
            "simulated": str(simulated),
            "software": SOFTWARE,
        }
        if scene.family == "s1":
            missing = [b for b in S1_BANDS if b not in names]
            if missing:
                raise DataError(f"scene {scene.id}: S1 raster lacks band(s) {missing}; "
                                "the source must provide VV and VH")
            data = np.stack([raster.sel(band=b).values.astype(np.float32) for b in S1_BANDS])
            arrays = ex.SceneArrays(data, S1_BANDS, self.grid, None, {**tags, "units": "dB"}, nodata=float("nan"))
            return arrays, raster, np.asarray(np.isnan(data).any(axis=0))
        bands = tuple(sensor.reflectance_bands)
        missing = [b for b in bands if b not in names]
        if missing:
            raise DataError(f"scene {scene.id}: raster lacks optical band(s) {missing} of {scene.sensor}; "
                            "the source must provide them")
        values = np.stack([raster.sel(band=b).values for b in bands])
        data = np.stack([to_dn(sensor, b, v) for b, v in zip(bands, values)])
        nan = np.isnan(values).any(axis=0)
        data[:, nan] = 0  # DN 0 is the optical nodata; the mask says NODATA there
        scales = tuple(sensor.band(b).scale for b in bands)
        offsets = tuple(sensor.band(b).offset for b in bands)
        arrays = ex.SceneArrays(data, bands, self.grid, None, {**tags, "mask_codes": MASK_CODES}, scales=scales,
                                offsets=offsets)
        return arrays, raster, nan

    def scan(self, scene: Scene) -> np.ndarray:
        """The scene's MaskClass mask on the region grid: from the cache, or read + mask + cache it."""
        with self._lock:
            self.by_id[scene.id] = scene
        hit = self._load_cached_mask(scene)
        if hit is not None:
            with self._lock:
                self.cached += 1
                self.masks[scene.id], self.mask_methods[scene.id] = hit
            return hit[0]
        arrays, raster, nan = self.read(scene)
        if scene.family == "s1":
            mask = np.where(nan, MaskClass.NODATA, MaskClass.CLEAR).astype(np.uint8)
            method = "sar-valid"
        else:
            method = resolve_method(self.method, [str(b) for b in raster["band"].values])
            try:
                m = mask_scene(raster, scene, self.config, method=method)
            except DataError as exc:
                raise DataError(f"scene {scene.id} ({scene.sensor}): {exc}") from None
            mask = np.asarray(m.values, dtype=np.uint8)
            mask[nan] = MaskClass.NODATA
            method = str(m.attrs.get("mask_method", self.method))
            arrays.mask = mask
            arrays.tags["mask_method"] = method
        write_geotiff(
            self.mask_path(scene), mask[None], self.grid, ["mask"],
            tags={"cloudfree_mask_key": self.mask_key(scene), "mask_method": method, "scene_id": scene.id,
                  "mask_codes": MASK_CODES},
        )
        with self._lock:
            self.computed += 1
            self.masks[scene.id], self.mask_methods[scene.id] = mask, method
        self.cache.put(scene.id, arrays)
        return mask

    def load_for_export(self, scene_id: str) -> ex.SceneArrays:
        """The scene's arrays with its mask: from memory when still cached, else read once more."""
        arrays = self.cache.pop(scene_id)
        if arrays is None:
            arrays, _, _ = self.read(self.by_id[scene_id])
        if self.by_id[scene_id].family != "s1":
            arrays.mask = self.masks[scene_id]
            arrays.tags["mask_method"] = self.mask_methods[scene_id]
        return arrays
