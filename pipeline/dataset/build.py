"""``build_dataset``: region + source -> masks -> selection -> patch GeoTIFFs + manifest -> cubes -> report.

Each scene is read ONCE over the whole region grid, masked once, and the mask is cached as
``DATASET/masks/<scene>.tif`` (keyed by mask method and settings), so a rerun never recomputes it. Per-patch
fractions come from that whole-scene mask by summed-area tables; the patch files are then cut from the
same in-memory scene when it is still cached, or from one more whole-scene read otherwise. Every stage
skips work whose output is already on disk and verified (masks by key, patches by sha256, manifest and
cubes by content hash, report/dataset.json by bytes), so a rerun of a finished build writes nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import rasterio
from rasterio.errors import RasterioError
from tqdm.auto import tqdm

from pipeline.dataset import patches as ex
from pipeline.dataset.cubes import build_cubes
from pipeline import __version__
from pipeline.errors import DataError, RegionError, SourceError
from pipeline.files import fingerprint
from pipeline.grid import Grid
from pipeline.masking.codes import MaskClass
from pipeline.masking.scene import METHODS, MaskConfig, mask_scene
from pipeline.regions import Region, load_region
from pipeline.dataset.selection import (
    REASON_MAX_PATCHES,
    REASON_OVERLAP,
    PatchOffset,
    Sample,
    SelectionError,
    assign_splits,
    cap_patches,
    dedupe_dates,
    fraction_rows,
    optical_family,
    patch_offsets,
    select_samples,
    uses_sar,
)
from pipeline.sensors import S1_BANDS, get_sensor, to_dn
from pipeline.sources.base import Scene, Source
from pipeline.sources.registry import get_source

log = logging.getLogger(__name__)

SOFTWARE = f"cloudfree {__version__}"
HIST_BINS = (0.0, 0.05, 0.10, 0.25, 0.50, 0.75, 1.0 + 1e-9)
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_CACHE_BYTES = 2 << 30
MASK_METHODS = ("cheapest",) + tuple(METHODS)  # scenes kept in memory between masking and export (first run only)

# Extra bands a non-default mask method needs beside the reflectance bands.
_METHOD_BANDS = {"cloudscore": ("cs_cdf",), "qa60": ("QA60",), "scl": ("SCL",), "qa_pixel": ("QA_PIXEL",), "spectral": ()}


@dataclass
class BuildReport:
    """What a build did; ``to_markdown`` is ``report.md`` (deterministic: no timings in it)."""

    region: str
    source: str
    out: Path
    rule: str
    mask_method: str
    simulated: bool
    families: list[str] = field(default_factory=list)  # sensor families the rule uses (optical first)
    scenes: dict[str, int] = field(default_factory=dict)  # sensor -> scenes found
    scenes_used: dict[str, int] = field(default_factory=dict)  # sensor -> scenes referenced by the manifest
    patches_total: int = 0
    patches_kept: int = 0
    samples: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> patches
    rejected_candidates: dict[str, int] = field(default_factory=dict)  # reason -> (patch, date) candidates
    split_patches: dict[str, int] = field(default_factory=dict)
    split_samples: dict[str, int] = field(default_factory=dict)
    cloud_histogram: list[tuple[str, int]] = field(default_factory=list)
    max_reference_cover: float = 0.0
    files: int = 0
    files_written: int = 0
    files_skipped: int = 0
    files_repaired: int = 0
    masks_computed: int = 0
    masks_cached: int = 0
    cubes_written: list[str] = field(default_factory=list)
    manifest_sha256: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return sum(self.seconds.values())

    def to_markdown(self) -> str:
        lines = [
            f"# Dataset report: {self.region}",
            "",
            f"- source: `{self.source}`{' (SIMULATED data, synthetic archive)' if self.simulated else ''}",
            f"- selection rule: `{self.rule}` on {' + '.join(self.families)} (other sensors are searched and counted only); "
            f"mask method: `{self.mask_method}`",
            f"- patches on the grid: {self.patches_total}; kept: {self.patches_kept}; samples: {self.samples}",
            f"- largest reference cloud+shadow fraction: {self.max_reference_cover * 100:.2f} %",
            f"- manifest sha256: `{self.manifest_sha256}`",
            "",
            "## Scenes per sensor",
            "",
            "| sensor | found | used |",
            "|---|---:|---:|",
        ]
        lines += [f"| {s} | {n} | {self.scenes_used.get(s, 0)} |" for s, n in sorted(self.scenes.items())]
        lines += ["", "## Splits", "", "| split | patches | samples |", "|---|---:|---:|"]
        lines += [f"| {s} | {self.split_patches.get(s, 0)} | {self.split_samples.get(s, 0)} |" for s in SPLIT_NAMES]
        lines += ["", "## Patches rejected, by reason", ""]
        if self.rejected:
            lines += ["| reason | patches |", "|---|---:|"]
            lines += [f"| {r} | {n} |" for r, n in sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0]))]
        else:
            lines.append("none")
        lines += ["", "## Candidate dates rejected (patch x date), by reason", ""]
        if self.rejected_candidates:
            lines += ["| reason | candidates |", "|---|---:|"]
            lines += [f"| {r} | {n} |" for r, n in sorted(self.rejected_candidates.items(), key=lambda kv: (-kv[1], kv[0]))]
        else:
            lines.append("none")
        lines += ["", "## Cloud+shadow cover of optical patch-dates", "", "```", *histogram_lines(self.cloud_histogram), "```", ""]
        return "\n".join(lines)


def histogram_lines(hist: Sequence[tuple[str, int]], width: int = 40) -> list[str]:
    top = max((n for _, n in hist), default=0) or 1
    return [f"{label:>10} | {'█' * round(width * n / top):<{width}} {n}" for label, n in hist]


def cloud_histogram(cover: np.ndarray) -> list[tuple[str, int]]:
    counts, _ = np.histogram(np.asarray(cover, dtype=float), bins=HIST_BINS)
    labels = [f"{a * 100:g}-{min(b, 1.0) * 100:g}%" for a, b in zip(HIST_BINS[:-1], HIST_BINS[1:])]
    return list(zip(labels, (int(c) for c in counts)))


# --- output folder -----------------------------------------------------------------------------------


def prepare_out(out: str | Path) -> Path:
    """Create the dataset folder and prove it is writable, before any work is done."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-", suffix=ex.TMP_SUFFIX):
            pass
    except OSError as exc:
        raise DataError(f"{out}: cannot write the output folder ({exc.strerror or exc}); choose a writable --out") from None
    return out


def _safe_name(scene_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", scene_id)


def resolve_method(method: str, bands: Sequence[str]) -> str:
    """``cheapest``: Cloud Score+ when the scene carries ``cs_cdf`` (a lookup, ~0.05 s per 1 Mpx scene),
    otherwise ``mask_scene``'s ``auto`` (QA_PIXEL for Landsat, s2cloudless for L1C bands: ~50 s per
    1 Mpx scene on 2 cores). Any other name is passed to ``mask_scene`` as is."""
    if method != "cheapest":
        return method
    return "cloudscore" if "cs_cdf" in bands else "auto"


# --- scenes: read once, mask once, cache -------------------------------------------------------------


class _SceneCache:
    """Scene arrays kept between masking and export, up to a byte budget (first come, first kept)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used, self.items = budget, 0, {}
        self.lock = threading.Lock()

    def put(self, scene_id: str, arrays: ex.SceneArrays) -> None:
        size = arrays.data.nbytes + (arrays.mask.nbytes if arrays.mask is not None else 0)
        with self.lock:
            if self.used + size <= self.budget:
                self.items[scene_id] = arrays
                self.used += size

    def pop(self, scene_id: str) -> ex.SceneArrays | None:
        with self.lock:
            a = self.items.pop(scene_id, None)
            if a is not None:
                self.used -= a.data.nbytes + (a.mask.nbytes if a.mask is not None else 0)
            return a


class _Scenes:
    """Reads, masks and caches the scenes of one build on the region grid."""

    def __init__(self, source: Source, source_key: str, grid: Grid, out: Path, mask_method: str, mask_config: MaskConfig,
                 simulated_default: bool, cache_bytes: int) -> None:
        self.source, self.source_key, self.grid, self.out = source, source_key, grid, out
        self.method, self.config = mask_method, mask_config
        self.simulated_default = simulated_default
        self.cache = _SceneCache(cache_bytes)
        self.by_id: dict[str, Scene] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.mask_methods: dict[str, str] = {}
        self.computed = 0
        self.cached = 0
        self._lock = threading.Lock()  # scans run on two threads

    def mask_key(self, scene: Scene) -> str:
        method = "sar-valid" if scene.family == "s1" else self.method
        cfg = None if scene.family == "s1" else self.config.model_dump()
        return fingerprint({"v": 1, "source": self.source_key, "scene": scene.id, "sensor": scene.sensor, "method": method, "config": cfg, "grid": self.grid.to_dict()})

    def mask_path(self, scene: Scene) -> Path:
        return self.out / "masks" / f"{_safe_name(scene.id)}.tif"

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
            raise DataError(f"scene {scene.id}: source returned shape {tuple(raster.shape[-2:])}, expected the region grid {self.grid.shape}")
        raster = raster.load()
        sensor = get_sensor(scene.sensor)
        simulated = bool(raster.attrs.get("simulated", scene.properties.get("simulated", self.simulated_default)))
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
                raise DataError(f"scene {scene.id}: S1 raster lacks band(s) {missing}; the source must provide VV and VH")
            data = np.stack([raster.sel(band=b).values.astype(np.float32) for b in S1_BANDS])
            arrays = ex.SceneArrays(data, S1_BANDS, self.grid, None, {**tags, "units": "dB"}, nodata=float("nan"))
            return arrays, raster, np.isnan(data).any(axis=0)
        bands = tuple(sensor.reflectance_bands)
        missing = [b for b in bands if b not in names]
        if missing:
            raise DataError(f"scene {scene.id}: raster lacks optical band(s) {missing} of {scene.sensor}; the source must provide them")
        values = np.stack([raster.sel(band=b).values for b in bands])
        data = np.stack([to_dn(sensor, b, v) for b, v in zip(bands, values)])
        nan = np.isnan(values).any(axis=0)
        data[:, nan] = 0  # DN 0 is the optical nodata; the mask says NODATA there
        scales = tuple(sensor.band(b).scale for b in bands)
        offsets = tuple(sensor.band(b).offset for b in bands)
        arrays = ex.SceneArrays(data, bands, self.grid, None, {**tags, "mask_codes": _MASK_CODES}, scales=scales, offsets=offsets)
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
        ex.write_geotiff(
            self.mask_path(scene), mask[None], self.grid, ["mask"],
            tags={"cloudfree_mask_key": self.mask_key(scene), "mask_method": method, "scene_id": scene.id, "mask_codes": _MASK_CODES},
        )
        with self._lock:
            self.computed += 1
            self.masks[scene.id], self.mask_methods[scene.id] = mask, method
        self.cache.put(scene.id, arrays)
        return mask

    def load_for_export(self, scene_id: str) -> ex.SceneArrays:
        arrays = self.cache.pop(scene_id)
        if arrays is None:
            arrays, _, _ = self.read(self.by_id[scene_id])
        if self.by_id[scene_id].family != "s1":
            arrays.mask = self.masks[scene_id]
            arrays.tags["mask_method"] = self.mask_methods[scene_id]
        return arrays


_MASK_CODES = "last band cloud_mask: 0 clear, 1 cloud, 2 shadow, 3 nodata, 4 thin cloud, 5 snow"


# --- the build ---------------------------------------------------------------------------------------


def _search(source: Source, region: Region, families: Sequence[str]) -> dict[str, list[Scene]]:
    found = {}
    for fam in families:
        scenes = source.search(region, region.window.start, region.window.end, fam)
        found[fam] = sorted(scenes, key=lambda s: (s.datetime, s.id))
    return found


def _manifest(samples: Sequence[Sample], split_of: dict[str, str], table: pd.DataFrame, offsets: dict[str, PatchOffset],
              grid: Grid, paths: dict[tuple[str, str], str], shas: dict[str, str], simulated: dict[str, bool]) -> pd.DataFrame:
    fr = table.set_index(["patch_id", "scene_id"])
    rows = []
    for s in samples:
        o = offsets[s.patch_id]
        pg = grid.window(o.row, o.col, o.size, o.size)
        for m in s.members:
            f = fr.loc[(s.patch_id, m.scene_id)]
            rel = paths[(s.patch_id, m.scene_id)]
            rows.append(
                {
                    "sample_id": s.sample_id,
                    "patch_id": s.patch_id,
                    "split": split_of[s.patch_id],
                    "role": m.role,
                    "sensor": m.sensor,
                    "scene_id": m.scene_id,
                    "datetime": m.datetime,
                    "crs": grid.crs,
                    "bounds": list(pg.bounds),
                    "cloud_fraction": float(f["cloud_fraction"]),
                    "shadow_fraction": float(f["shadow_fraction"]),
                    "valid_fraction": float(f["valid_fraction"]),
                    "path": rel,
                    "sha256": shas[rel],
                    "simulated": simulated[m.scene_id],
                }
            )
    return pd.DataFrame(rows, columns=ex.MANIFEST_COLUMNS)


def build_dataset(
    region: Region | str | Path,
    source: Source | str = "synthetic",
    out: str | Path = "data/dataset",
    *,
    max_patches: int | None = None,
    workers: int | None = None,
    mask_method: str = "cheapest",
    mask_config: MaskConfig | None = None,
    source_options: dict[str, Any] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: bool = True,
) -> BuildReport:
    """Build (or resume, or verify) the dataset of ``region`` in ``out``; see the module docstring.

    Raises ``SourceError`` when a needed sensor has no scenes, ``SelectionError`` (naming each rule's
    rejection counts) when no patch passes, ``DataError`` for unreadable inputs or an unwritable ``out``.
    """
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    if max_patches is not None and max_patches < 1:
        raise DataError(f"--max-patches must be at least 1 (got {max_patches})")
    workers = workers or min(4, os.cpu_count() or 1)
    if mask_method not in MASK_METHODS:
        raise DataError(f"unknown mask method {mask_method!r}; use one of: {', '.join(MASK_METHODS)}")
    reg = region if isinstance(region, Region) else load_region(region)
    out = prepare_out(out)
    ex.remove_stale_temps(out)
    src = source if not isinstance(source, str) else get_source(source, **(source_options or {}))
    source_name = source if isinstance(source, str) else getattr(source, "name", type(source).__name__)

    fam = optical_family(reg)
    sar_on = uses_sar(reg)
    needed = [fam] + (["s1"] if sar_on else [])
    found = _search(src, reg, reg.sensors)
    for f in needed:
        if not found.get(f):
            raise SourceError(
                f"no {f} scenes found for region {reg.name} between {reg.window.start} and {reg.window.end} in source "
                f"{source_name!r}; widen the region's window, check the bbox, or use another --source"
            )
    grid = reg.grid()
    offsets = patch_offsets(reg)
    if not offsets:
        raise RegionError(f"region {reg.name}: its grid ({grid.width}x{grid.height} px) is smaller than one patch of {reg.patch.size} px; enlarge the bbox or shrink patch.size")
    scenes = [s for f in needed for s in found[f]]
    simulated_default = source_name == "synthetic"
    seconds["search"] = time.perf_counter() - t0

    # 1. masks + per-patch fractions, each scene read once over the whole grid
    t = time.perf_counter()
    # Synthetic scene ids repeat across seeds, so cached masks and patches are keyed by the source too.
    source_key = fingerprint({"source": source_name, "seed": getattr(src, "seed", None), "root": str(getattr(src, "root", "")),
                       "version": getattr(src, "version", None)})
    sc = _Scenes(src, source_key, grid, out, mask_method, mask_config or MaskConfig(), simulated_default, cache_bytes)
    bar = tqdm(total=len(scenes), desc="mask scenes", unit="scene", disable=not progress, leave=False)

    def scan(scene: Scene) -> pd.DataFrame:
        mask = sc.scan(scene)
        bar.update()
        return fraction_rows(mask, offsets, family=scene.family, sensor=scene.sensor, scene_id=scene.id, datetime=scene.datetime)

    # Masking is CPU-heavy numpy/LightGBM that releases the GIL; two scenes at a time bound the memory.
    with bar, ThreadPoolExecutor(max(1, min(workers, 2))) as pool:
        parts = list(pool.map(scan, scenes))
    table = dedupe_dates(pd.concat(parts, ignore_index=True))
    seconds["mask"] = time.perf_counter() - t

    # 2. selection, splits, cap
    t = time.perf_counter()
    sel = select_samples(table, reg, [o.patch_id for o in offsets])
    rejected = Counter(sel.rejected_patches)
    if not sel.samples:
        raise SelectionError(
            f"no patch of region {reg.name} passes the {sel.rule} rule ({len(offsets)} patches, {len(scenes)} scenes): {sel.explain()}; "
            "relax the region's selection settings or widen its window"
        )
    by_id = {o.patch_id: o for o in offsets}
    split_of, dropped = assign_splits([by_id[p] for p in sel.patch_ids], reg.splits, reg.patch.stride or reg.patch.size)
    if dropped:
        rejected[REASON_OVERLAP] += len(dropped)
    split_of, capped = cap_patches(split_of, max_patches)
    if capped:
        rejected[REASON_MAX_PATCHES] += len(capped)
    samples = [s for s in sel.samples if s.patch_id in split_of]
    seconds["select"] = time.perf_counter() - t

    # 3. patch files
    t = time.perf_counter()
    paths: dict[tuple[str, str], str] = {}
    files: dict[str, ex.PatchFile] = {}
    for s in samples:
        for m in s.members:
            rel = f"patches/{s.patch_id}/{m.sensor}_{m.datetime:%Y%m%d}.tif"
            paths[(s.patch_id, m.scene_id)] = rel
            if rel in files:
                continue
            o = by_id[s.patch_id]
            scene = sc.by_id[m.scene_id]
            sensor = get_sensor(scene.sensor)
            bands = S1_BANDS if scene.family == "s1" else sensor.reflectance_bands
            key = fingerprint({"v": ex.FORMAT_VERSION, "source": source_key, "scene": scene.id, "sensor": scene.sensor, "datetime": scene.datetime,
                        "window": [o.row, o.col, o.size], "grid": grid.to_dict(), "bands": bands,
                        "mask": sc.mask_key(scene) if scene.family != "s1" else None})
            files[rel] = ex.PatchFile(rel, scene.id, o.row, o.col, o.size, key)
    result = ex.export_patches(out, sorted(files.values(), key=lambda f: f.rel_path), sc.load_for_export, workers=workers, progress=progress)
    seconds["export"] = time.perf_counter() - t

    # 4. manifest
    t = time.perf_counter()
    simulated = {sid: bool(s.properties.get("simulated", simulated_default)) for sid, s in sc.by_id.items()}
    manifest = _manifest(samples, split_of, table, by_id, grid, paths, result.sha256, simulated)
    manifest_sha = ex.write_manifest(manifest, out / ex.MANIFEST_NAME)
    is_sim = bool(manifest["simulated"].any())
    seconds["manifest"] = time.perf_counter() - t

    # 5. cubes
    t = time.perf_counter()
    before = {p: (p / "zarr.json").stat().st_mtime_ns for p in (out / "cubes").glob("*.zarr") if (p / "zarr.json").exists()}
    cube_attrs = {"region": reg.name, "rule": sel.rule, "manifest_sha256": manifest_sha, "simulated": is_sim, "source": source_name}
    cubes = build_cubes(out, cube_attrs, workers=workers, progress=progress)
    written_cubes = [s for s, p in cubes.items() if before.get(p) != (p / "zarr.json").stat().st_mtime_ns]
    seconds["cubes"] = time.perf_counter() - t

    # 6. dataset.json + report
    t = time.perf_counter()
    opt_rows = table[table["family"] == fam]
    ref_rows = manifest[manifest["role"] == "target"]
    used = manifest.drop_duplicates("scene_id")["sensor"].value_counts().to_dict()
    report = BuildReport(
        region=reg.name, source=source_name, out=out, rule=sel.rule,
        mask_method=", ".join(sorted(set(sc.mask_methods[s.id] for s in scenes if s.family != "s1"))) or mask_method,
        simulated=is_sim, families=needed,
        scenes=dict(Counter(s.sensor for f in reg.sensors for s in found.get(f, []))),
        scenes_used={k: int(v) for k, v in used.items()},
        patches_total=len(offsets), patches_kept=len(split_of), samples=len(samples),
        rejected=dict(rejected), rejected_candidates=dict(sel.rejected_candidates),
        split_patches=dict(Counter(split_of.values())),
        split_samples={k: int(v) for k, v in manifest.drop_duplicates("sample_id")["split"].value_counts().items()},
        cloud_histogram=cloud_histogram((opt_rows["cloud_fraction"] + opt_rows["shadow_fraction"]).to_numpy()),
        max_reference_cover=float((ref_rows["cloud_fraction"] + ref_rows["shadow_fraction"]).max()),
        files=len(files), files_written=result.written, files_skipped=result.skipped, files_repaired=result.repaired,
        masks_computed=sc.computed, masks_cached=sc.cached, cubes_written=written_cubes, manifest_sha256=manifest_sha,
    )
    first = samples[0]
    info = {
        "region": reg.name,
        "source": source_name,
        "simulated": is_sim,
        "rule": reg.selection.model_dump(mode="json"),
        "sensors": {"optical": fam, "optical_sensors": sorted({m.sensor for s in samples for m in s.optical}),
                    "sar": "s1" if sar_on else None},
        "bands": {fam: list(get_sensor(first.optical[0].sensor).reflectance_bands), "s1": list(S1_BANDS) if sar_on else []},
        "dates_per_sample": len(first.optical),
        "patch": {"size": reg.patch.size, "stride": reg.patch.stride or reg.patch.size},
        "grid": grid.to_dict(),
        "mask_method": report.mask_method,
        "counts": {"samples": report.samples, "patches": report.patches_kept, "files": report.files,
                   "split_samples": report.split_samples, "split_patches": report.split_patches},
        "manifest_sha256": manifest_sha,
        "normalization": "optical: reflectance clipped to [0, 1] (S2 DN / 10000); S1 dB clipped to [-25, 0] VV, [-32.5, 0] VH -> [0, 1]",
    }
    ex.write_bytes_atomic(out / "dataset.json", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    ex.write_bytes_atomic(out / "report.md", report.to_markdown().encode())
    seconds["report"] = time.perf_counter() - t
    report.seconds = seconds
    log.info("built %s: %d samples, %d files written, %d skipped in %.1f s", out, report.samples, result.written, result.skipped, report.elapsed)
    return report
