"""``build_dataset``: region + source -> masks -> selection -> patch GeoTIFFs + manifest -> cubes -> report.

Each scene is read ONCE over the whole region grid, masked once, and the mask is cached as
``DATASET/masks/<scene>.tif`` (keyed by mask method and settings; see ``scene_masks``), so a rerun never
recomputes it. Per-patch fractions come from that whole-scene mask by summed-area tables; the patch files
are then cut from the same in-memory scene when it is still cached, or from one more whole-scene read
otherwise. Every stage skips work whose output is already on disk and verified (masks by key, patches by
sha256, manifest and cubes by content hash, report/dataset.json by bytes), so a rerun of a finished build
writes nothing. The build's options are a ``BuildConfig`` (``pipeline.dataset.config``).

``max_patches`` bounds the work, not only what is written: the scenes are read and masked over a window around the
patches nearest the AOI's centre (plus a halo as wide as a cloud's shadow can reach, so the masks near the patches
see the clouds that shade them), and the window doubles only while fewer patches than asked pass the rule. A capped
build of a huge AOI therefore reads a few megapixels per scene instead of the whole AOI. Its masks are cut from the
whole grid's cached mask when one exists (the ``build-dataset`` flow's mask tasks write those), else computed on the
window (scene-wide statistics then come from the window: a capped build's masks may differ a little from a full
build's). When the window would cover half the grid or more, the build is the plain one.

One build per output folder at a time (``pipeline.files.OutputLock``); a full disk is one
``pipeline.files.DiskFullError`` line; a folder the build created is removed again when an early error leaves it
empty.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.dataset import patches as ex
from pipeline.dataset.config import BuildConfig
from pipeline.dataset.cubes import build_cubes
from pipeline.dataset.scene_masks import SceneMasks, source_name
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
    temporal_holdout,
    uses_sar,
)
from pipeline.errors import DataError, RegionError, SourceError
from pipeline.files import (
    TMP_SUFFIX,
    DiskFullError,
    OutputLock,
    fingerprint,
    remove_stale_temps,
    translating_disk_full,
    write_bytes_atomic,
)
from pipeline.grid import Grid
from pipeline.masking.config import MaskConfig
from pipeline.regions import Region, load_region
from pipeline.sensors import S1_BANDS, get_sensor
from pipeline.sources.base import Scene, Source
from pipeline.sources.registry import SourceSpec, get_source

log = logging.getLogger(__name__)

HIST_BINS = (0.0, 0.05, 0.10, 0.25, 0.50, 0.75, 1.0 + 1e-9)
SPLIT_NAMES = ("train", "val", "test")
NORMALIZATION = ("optical: reflectance clipped to [0, 1] (S2 DN / 10000); "
                 "S1 dB clipped to [-25, 0] VV, [-32.5, 0] VH -> [0, 1]")


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
    patches_examined: int = 0  # patches whose fractions were computed: fewer than patches_total under max_patches
    read_window: str = ""  # the window scenes were read on under max_patches ("" = the whole grid)
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
            (f"- selection rule: `{self.rule}` on {' + '.join(self.families)} "
             f"(other sensors are searched and counted only); mask method: `{self.mask_method}`"),
            f"- patches on the grid: {self.patches_total}; kept: {self.patches_kept}; samples: {self.samples}",
            *([f"- --max-patches: scenes read and masked on {self.read_window} only; {self.patches_examined} "
               f"patches examined"] if self.read_window else []),
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
            by_count = sorted(self.rejected_candidates.items(), key=lambda kv: (-kv[1], kv[0]))
            lines += [f"| {r} | {n} |" for r, n in by_count]
        else:
            lines.append("none")
        lines += ["", "## Cloud+shadow cover of optical patch-dates", ""]
        lines += ["```", *histogram_lines(self.cloud_histogram), "```", ""]
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
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-", suffix=TMP_SUFFIX):
            pass
    except OSError as exc:
        raise DataError(f"{out}: cannot write the output folder ({exc.strerror or exc}); "
                        "choose a writable --out") from None
    return out


# --- the steps of a build ----------------------------------------------------------------------------


@dataclass
class _Found:
    """What the search found: the scenes of every searched sensor and the patches of the region grid."""

    source_name: str
    families: list[str]  # the sensor families the rule uses, optical first; other sensors are counted only
    scenes_by_family: dict[str, list[Scene]]
    grid: Grid
    offsets: list[PatchOffset]

    @property
    def scenes(self) -> list[Scene]:
        """The scenes to mask: those of the families the rule uses."""
        return [s for f in self.families for s in self.scenes_by_family[f]]

    @property
    def offset_of(self) -> dict[str, PatchOffset]:
        return {o.patch_id: o for o in self.offsets}


@dataclass
class _Area:
    """Where scenes are read and masked: the region grid, or under ``max_patches`` a window of it around the
    candidate patches (``offsets``, on the region grid) with a halo of context."""

    grid: Grid  # the grid scenes are read on
    row: int  # its offset on the region grid
    col: int
    offsets: list[PatchOffset]
    whole: bool = True

    def local(self) -> list[PatchOffset]:
        """The candidate patches on the read grid."""
        if self.row == 0 and self.col == 0:
            return self.offsets
        return [PatchOffset(o.patch_id, o.row - self.row, o.col - self.col, o.size) for o in self.offsets]

    def describe(self) -> str:
        return f"{self.grid.width}x{self.grid.height} px at row {self.row}, col {self.col}"


def _sun_elevation(scene: Scene) -> float | None:
    p = scene.properties
    el = p.get("sun_elevation", p.get("SUN_ELEVATION"))
    if el is None and p.get("MEAN_SOLAR_ZENITH_ANGLE") is not None:
        el = 90.0 - float(p["MEAN_SOLAR_ZENITH_ANGLE"])
    return float(el) if el is not None else None


# sun elevation assumed when a scene does not say: lower than most daytime optical acquisitions outside the polar
# winter, so the halo errs on the wide side
_DEFAULT_SUN_ELEVATION = 25.0


def _halo_px(found: _Found, cfg: MaskConfig) -> int:
    """Pixels of context a window's masks need around its patches: as far as a cloud's shadow reaches (cloud height
    over the tangent of the lowest sun among the scenes) plus the masks' buffers and filter radii."""
    els = [_sun_elevation(s) for s in found.scenes if s.family != "s1"]
    known = [e for e in els if e is not None]
    fallback = cfg.sun_elevation or _DEFAULT_SUN_ELEVATION
    el = max(5.0, min(known + ([fallback] if len(known) < len(els) else []), default=fallback))
    reach = max(cfg.shadow_search_m, cfg.cloud_height_max_m / math.tan(math.radians(el)))
    reach += cfg.shadow_buffer_m + cfg.cloud_buffer_m
    grid = found.grid
    metres = min(grid.resolution)
    from rasterio.crs import CRS

    if CRS.from_user_input(grid.crs).is_geographic:
        lat = (grid.bounds[1] + grid.bounds[3]) / 2
        metres *= 111_320.0 * max(0.1, math.cos(math.radians(lat)))
    radii = cfg.s2cloudless_average_over + cfg.s2cloudless_dilation + 2
    return int(math.ceil(reach / metres)) + radii


# a window over this share of the grid saves little; the whole grid keeps the masks those of a full build (and cached)
WHOLE_GRID_SHARE = 0.5


def _areas(found: _Found, cfg: MaskConfig, max_patches: int | None, stride: int) -> Iterator[_Area]:
    """The areas a build reads, in order: the whole grid without ``max_patches``; with it, windows of k x k patch
    positions around the grid's centre (k doubling) plus the halo, until one would cover half the grid or more (then
    the whole grid)."""
    grid = found.grid
    whole = _Area(grid, 0, 0, found.offsets)
    if max_patches is None:
        yield whole
        return
    halo = _halo_px(found, cfg)
    rows = sorted({o.row for o in found.offsets})
    cols = sorted({o.col for o in found.offsets})
    size = max(o.size for o in found.offsets)
    # room for the splits' round-robin and the patches the overlap rule drops
    k = max(2, math.ceil(math.sqrt(4 * max_patches)))
    while True:
        r_lo, r_hi = _span(len(rows), k)
        c_lo, c_hi = _span(len(cols), k)
        top, left = rows[r_lo], cols[c_lo]
        bottom, right = rows[r_hi] + size, cols[c_hi] + size
        # start on the patch lattice, so the fractions keep their fast block sums
        r0 = max(0, (top - halo) // stride * stride)
        c0 = max(0, (left - halo) // stride * stride)
        r1, c1 = min(grid.height, bottom + halo), min(grid.width, right + halo)
        if (r1 - r0) * (c1 - c0) >= WHOLE_GRID_SHARE * grid.width * grid.height:
            yield whole
            return
        inside = [o for o in found.offsets if top <= o.row <= rows[r_hi] and left <= o.col <= cols[c_hi]]
        yield _Area(grid.window(r0, c0, r1 - r0, c1 - c0), r0, c0, inside, whole=False)
        k *= 2


def _span(n: int, k: int) -> tuple[int, int]:
    """First and last index of ``k`` consecutive positions of ``n`` around the middle (all when k >= n)."""
    if k >= n:
        return 0, n - 1
    lo = (n - k) // 2
    return lo, lo + k - 1


class _WindowMasks(SceneMasks):
    """``SceneMasks`` on a window of the region grid. A whole-grid mask already cached for the scene (a full build,
    or the flow's mask tasks) is cut to the window instead of masking the window anew: it saw the whole scene."""

    def __init__(self, source: Source, name: str, area: _Area, region_grid: Grid, out: Path, config: BuildConfig):
        super().__init__(source, name, area.grid, out, config.mask_method, config.mask_config,
                         cache_bytes=config.cache_bytes)
        self.area = area
        self.whole = SceneMasks(source, name, region_grid, out, config.mask_method, config.mask_config)

    def _load_cached_mask(self, scene: Scene) -> tuple[np.ndarray, str] | None:
        hit = super()._load_cached_mask(scene)
        if hit is not None:
            return hit
        import rasterio
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        path = self.mask_path(scene)
        if not path.exists():
            return None
        try:
            with rasterio.open(path) as src:
                tags = src.tags()
                if (tags.get("cloudfree_mask_key") != self.whole.mask_key(scene)
                        or (src.height, src.width) != self.whole.grid.shape):
                    return None
                a = self.area
                window = Window(a.col, a.row, a.grid.width, a.grid.height)
                return src.read(1, window=window), tags.get("mask_method", self.method)
        except RasterioError:
            return None


@dataclass
class _Picked:
    """The samples kept after selection, the split cut and the ``max_patches`` cap."""

    rule: str
    samples: list[Sample]
    split_of: dict[str, str]  # kept patch -> split
    rejected: Counter  # reason -> patches
    rejected_candidates: Counter  # reason -> (patch, date) candidates


@dataclass
class _Written:
    """What the export, manifest and cube steps wrote."""

    files: int
    exported: ex.ExportResult
    manifest: pd.DataFrame
    manifest_sha: str
    cubes_written: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:  # summed: a capped build may mask and select on several windows
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - t


def _open_source(config: BuildConfig, source: Source | None) -> tuple[Source, str]:
    """(the source to read, the name the build records): ``source`` when given, else the config's."""
    if source is not None:
        return source, source_name(source)
    # source_name, not str(): a default SourceSpec keeps its name as the enum member
    name = source_name(config.source.name)
    return get_source(name, **config.source.kwargs()), name


def _search(source: Source, name: str, region: Region) -> _Found:
    """Every sensor's scenes in the region's window; a clear error when a needed family has none."""
    found: dict[str, list[Scene]] = {}
    for fam in region.sensors:
        scenes = source.search(region, region.window.start, region.window.end, fam)
        found[fam] = sorted(scenes, key=lambda s: (s.datetime, s.id))
    needed = [optical_family(region)] + (["s1"] if uses_sar(region) else [])
    for f in needed:
        if not found.get(f):
            raise SourceError(
                f"no {f} scenes found for region {region.name} between {region.window.start} and {region.window.end} "
                f"in source {name!r}; widen the region's window, check the bbox, or use another --source"
            )
    grid = region.grid()
    offsets = patch_offsets(region)
    if not offsets:
        raise RegionError(f"region {region.name}: its grid ({grid.width}x{grid.height} px) is smaller than one "
                          f"patch of {region.patch.size} px; enlarge the bbox or shrink patch.size")
    return _Found(name, needed, found, grid, offsets)


def _scan_masks(masks: SceneMasks, found: _Found, area: _Area, config: BuildConfig) -> pd.DataFrame:
    """Mask every scene the rule uses (each read once over the area) -> the per-patch fraction table."""
    bar = tqdm(total=len(found.scenes), desc="mask scenes", unit="scene", disable=not config.progress, leave=False)
    local = area.local()

    def scan(scene: Scene) -> pd.DataFrame:
        mask = masks.scan(scene)
        bar.update()
        return fraction_rows(mask, local, family=scene.family, sensor=scene.sensor, scene_id=scene.id,
                             datetime=scene.datetime)

    # Masking is CPU-heavy numpy/LightGBM that releases the GIL; two scenes at a time bound the memory.
    with bar, ThreadPoolExecutor(max(1, min(config.worker_count, 2))) as pool:
        parts = list(pool.map(scan, found.scenes))
    return dedupe_dates(pd.concat(parts, ignore_index=True))


def _select(table: pd.DataFrame, region: Region, found: _Found, area: _Area, max_patches: int | None) -> _Picked:
    """The selection rule's samples, split by spatial blocks (overlaps across splits dropped), then capped."""
    sel = select_samples(table, region, [o.patch_id for o in area.offsets])
    rejected = Counter(sel.rejected_patches)
    if not sel.samples:
        raise SelectionError(
            f"no patch of region {region.name} passes the {sel.rule} rule ({len(area.offsets)} patches, "
            f"{len(found.scenes)} scenes): {sel.explain()}; relax the region's selection settings or widen its window"
        )
    offset_of = found.offset_of
    stride = region.patch.stride or region.patch.size
    split_of, dropped = assign_splits([offset_of[p] for p in sel.patch_ids], region.splits, stride)
    if dropped:
        rejected[REASON_OVERLAP] += len(dropped)
    split_of, capped = cap_patches(split_of, max_patches)
    if capped:
        rejected[REASON_MAX_PATCHES] += len(capped)
    samples = [s for s in sel.samples if s.patch_id in split_of]
    candidates = Counter(sel.rejected_candidates)
    holdout = getattr(region.selection, "holdout_from", None)
    samples = temporal_holdout(samples, split_of, holdout, candidates)
    if not samples:
        raise SelectionError(
            f"region {region.name}: no sample is left after the temporal hold-out from {holdout} (train/val need "
            f"targets before it, test targets on or after it): {dict(candidates)}; move selection.holdout_from "
            "between the archive's clear dates or unset it")
    kept = {x.patch_id for x in samples}
    split_of = {p: s for p, s in split_of.items() if p in kept}
    return _Picked(sel.rule, samples, split_of, rejected, candidates)


def _patch_files(samples: Sequence[Sample], found: _Found, masks: SceneMasks,
                 area: _Area) -> tuple[dict[tuple[str, str], str], list[ex.PatchFile]]:
    """((patch, scene) -> file path, the files to export in path order), each keyed by all it depends on. The files
    are cut from the area's arrays (``PatchFile`` offsets on the read grid); the key names the patch's window on the
    region grid, and the read window when it is not the whole grid."""
    offset_of = found.offset_of
    read = {} if area.whole else {"read": area.grid.to_dict()}
    paths: dict[tuple[str, str], str] = {}
    files: dict[str, ex.PatchFile] = {}
    for s in samples:
        for m in s.members:
            rel = f"patches/{s.patch_id}/{m.sensor}_{m.datetime:%Y%m%d}.tif"
            paths[(s.patch_id, m.scene_id)] = rel
            if rel in files:
                continue
            o = offset_of[s.patch_id]
            scene = masks.by_id[m.scene_id]
            sar = scene.family == "s1"
            bands = S1_BANDS if sar else get_sensor(scene.sensor).reflectance_bands
            key = fingerprint({"v": ex.FORMAT_VERSION, "source": masks.source_key, "scene": scene.id,
                               "sensor": scene.sensor, "datetime": scene.datetime, "window": [o.row, o.col, o.size],
                               "grid": found.grid.to_dict(), "bands": bands,
                               "mask": None if sar else masks.mask_key(scene), **read})
            files[rel] = ex.PatchFile(rel, scene.id, o.row - area.row, o.col - area.col, o.size, key)
    return paths, sorted(files.values(), key=lambda f: f.rel_path)


def _manifest(picked: _Picked, table: pd.DataFrame, found: _Found, paths: dict[tuple[str, str], str],
              shas: dict[str, str], masks: SceneMasks) -> pd.DataFrame:
    """One row per (sample, member): where its file is, its split and role, and its patch's fractions."""
    fr = table.set_index(["patch_id", "scene_id"])
    offset_of = found.offset_of
    rows = []
    for s in picked.samples:
        o = offset_of[s.patch_id]
        pg = found.grid.window(o.row, o.col, o.size, o.size)
        for m in s.members:
            f = fr.loc[(s.patch_id, m.scene_id)]
            rel = paths[(s.patch_id, m.scene_id)]
            rows.append(
                {
                    "sample_id": s.sample_id,
                    "patch_id": s.patch_id,
                    "split": picked.split_of[s.patch_id],
                    "role": m.role,
                    "sensor": m.sensor,
                    "scene_id": m.scene_id,
                    "datetime": m.datetime,
                    "crs": found.grid.crs,
                    "bounds": list(pg.bounds),
                    "cloud_fraction": float(f["cloud_fraction"]),
                    "shadow_fraction": float(f["shadow_fraction"]),
                    "valid_fraction": float(f["valid_fraction"]),
                    "path": rel,
                    "sha256": shas[rel],
                    "simulated": masks.is_simulated(masks.by_id[m.scene_id]),
                }
            )
    return pd.DataFrame(rows, columns=ex.MANIFEST_COLUMNS)


def _write_cubes(out: Path, attrs: dict[str, Any], config: BuildConfig) -> list[str]:
    """Build the split cubes; the splits whose cube was rewritten (an unchanged manifest rewrites none)."""
    before = {p: (p / "zarr.json").stat().st_mtime_ns for p in (out / "cubes").glob("*.zarr")
              if (p / "zarr.json").exists()}
    cubes = build_cubes(out, attrs, workers=config.worker_count, progress=config.progress)
    return [s for s, p in cubes.items() if before.get(p) != (p / "zarr.json").stat().st_mtime_ns]


def _report(region: Region, out: Path, found: _Found, area: _Area, masks: SceneMasks, table: pd.DataFrame,
            picked: _Picked, written: _Written) -> BuildReport:
    """The report of what was found, kept, rejected and written (no timings: ``report.md`` is deterministic)."""
    manifest = written.manifest
    opt_rows = table[table["family"] == found.families[0]]
    ref_rows = manifest[manifest["role"] == "target"]
    used = manifest.drop_duplicates("scene_id")["sensor"].value_counts().to_dict()
    methods = sorted({masks.mask_methods[s.id] for s in found.scenes if s.family != "s1"})
    split_samples = manifest.drop_duplicates("sample_id")["split"].value_counts().items()
    return BuildReport(
        region=region.name, source=found.source_name, out=out, rule=picked.rule,
        mask_method=", ".join(methods) or masks.method,
        simulated=bool(manifest["simulated"].any()), families=found.families,
        scenes=dict(Counter(s.sensor for f in region.sensors for s in found.scenes_by_family.get(f, []))),
        scenes_used={k: int(v) for k, v in used.items()},
        patches_total=len(found.offsets), patches_kept=len(picked.split_of), samples=len(picked.samples),
        rejected=dict(picked.rejected), rejected_candidates=dict(picked.rejected_candidates),
        split_patches=dict(Counter(picked.split_of.values())),
        split_samples={k: int(v) for k, v in split_samples},
        cloud_histogram=cloud_histogram((opt_rows["cloud_fraction"] + opt_rows["shadow_fraction"]).to_numpy()),
        max_reference_cover=float((ref_rows["cloud_fraction"] + ref_rows["shadow_fraction"]).max()),
        files=written.files, files_written=written.exported.written, files_skipped=written.exported.skipped,
        files_repaired=written.exported.repaired, masks_computed=masks.computed, masks_cached=masks.cached,
        cubes_written=written.cubes_written, manifest_sha256=written.manifest_sha,
        patches_examined=len(area.offsets), read_window="" if area.whole else area.describe(),
    )


def _dataset_info(region: Region, found: _Found, picked: _Picked, report: BuildReport) -> dict[str, Any]:
    """``dataset.json``: what a training run needs to know about the dataset (deterministic: no timings)."""
    fam = found.families[0]
    sar_on = "s1" in found.families
    first = picked.samples[0]
    return {
        "region": region.name,
        "source": found.source_name,
        "simulated": report.simulated,
        "rule": region.selection.model_dump(mode="json"),
        "sensors": {"optical": fam, "optical_sensors": sorted({m.sensor for s in picked.samples for m in s.optical}),
                    "sar": "s1" if sar_on else None},
        "bands": {fam: list(get_sensor(first.optical[0].sensor).reflectance_bands),
                  "s1": list(S1_BANDS) if sar_on else []},
        "dates_per_sample": len(first.optical),
        "patch": {"size": region.patch.size, "stride": region.patch.stride or region.patch.size},
        "grid": found.grid.to_dict(),
        "mask_method": report.mask_method,
        "counts": {"samples": report.samples, "patches": report.patches_kept, "files": report.files,
                   "split_samples": report.split_samples, "split_patches": report.split_patches},
        "manifest_sha256": report.manifest_sha256,
        "normalization": NORMALIZATION,
    }


# --- the build ---------------------------------------------------------------------------------------


def run_build(region: Region | str | Path, out: str | Path, config: BuildConfig,
              source: Source | None = None) -> BuildReport:
    """Build (or resume, or verify) the dataset of ``region`` in ``out``; see the module docstring.

    ``source`` is an already-built source (a custom archive, a test double) used instead of
    ``config.source``. Raises ``SourceError`` when a needed sensor has no scenes, ``SelectionError``
    (naming each rule's rejection counts) when no patch passes, ``DataError`` for unreadable inputs or an
    unwritable ``out``, ``DiskFullError`` when the disk fills, ``OutputInUseError`` when another build writes there.
    """
    reg = region if isinstance(region, Region) else load_region(region)
    out = Path(out)
    needed: dict[str, int] = {}
    with OutputLock(out, "build-dataset", unwritable="{folder}: cannot write the output folder ({reason}); "
                    "choose a writable --out"):
        with translating_disk_full(out, lambda: sum(needed.values()) or None):
            return _build(reg, out, config, source, needed)


def _build(reg: Region, out: Path, config: BuildConfig, source: Source | None, needed: dict[str, int]) -> BuildReport:
    seconds: dict[str, float] = {}
    with _timed(seconds, "search"):
        out = prepare_out(out)
        remove_stale_temps(out)
        src, name = _open_source(config, source)
        found = _search(src, name, reg)
    stride = reg.patch.stride or reg.patch.size
    for area in _areas(found, config.mask_config, config.max_patches, stride):
        # masks: one byte per pixel and scene, before compression
        needed["masks"] = len(found.scenes) * area.grid.width * area.grid.height
        with _timed(seconds, "mask"):
            masks: SceneMasks = (SceneMasks(src, found.source_name, found.grid, out, config.mask_method,
                                            config.mask_config, cache_bytes=config.cache_bytes)
                                 if area.whole else _WindowMasks(src, found.source_name, area, found.grid, out, config))
            with _gdal_writes(out, needed):
                table = _scan_masks(masks, found, area, config)
        with _timed(seconds, "select"):
            try:
                picked = _select(table, reg, found, area, config.max_patches)
            except SelectionError:
                if area.whole:
                    raise
                continue
        if area.whole or len(picked.split_of) >= (config.max_patches or 0):
            break
        log.info("--max-patches %s: %d patches pass in %s; reading a larger window", config.max_patches,
                 len(picked.split_of), area.describe())
    with _timed(seconds, "export"):
        paths, files = _patch_files(picked.samples, found, masks, area)
        # patch files and their cubes, before compression: at most 32 bytes a pixel (16 uint16 bands with the mask
        # band, or 2 float32 SAR bands)
        needed["patches"] = 2 * sum(f.size * f.size * 32 for f in files)
        with _gdal_writes(out, needed):
            exported = ex.export_patches(out, files, masks.load_for_export, workers=config.worker_count,
                                         progress=config.progress)
    with _timed(seconds, "manifest"):
        manifest = _manifest(picked, table, found, paths, exported.sha256, masks)
        written = _Written(len(files), exported, manifest, ex.write_manifest(manifest, out / ex.MANIFEST_NAME))
    with _timed(seconds, "cubes"):
        attrs = {"region": reg.name, "rule": picked.rule, "manifest_sha256": written.manifest_sha,
                 "simulated": bool(manifest["simulated"].any()), "source": found.source_name}
        written.cubes_written = _write_cubes(out, attrs, config)
    with _timed(seconds, "report"):
        report = _report(reg, out, found, area, masks, table, picked, written)
        info = _dataset_info(reg, found, picked, report)
        write_bytes_atomic(out / "dataset.json", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        write_bytes_atomic(out / "report.md", report.to_markdown().encode())
    report.seconds = seconds
    log.info("built %s: %d samples, %d files written, %d skipped in %.1f s", out, report.samples, exported.written,
             exported.skipped, report.elapsed)
    return report


@contextlib.contextmanager
def _gdal_writes(out: Path, needed: dict[str, int]) -> Iterator[None]:
    """GDAL writes (masks, patch files): a full disk is one line, and libtiff's own "No space left on device" lines
    stay off the terminal (see ``pipeline.files.capture_c_stderr``).

    On a full disk GDAL may close a GeoTIFF whose last blocks it could not write without raising, and the writer
    then renames it into place (and journals its checksum, which a rerun would trust): the files this step wrote
    are read back and the unreadable ones deleted, so the rerun writes them again."""
    since = time.time_ns() - 2_000_000_000  # file systems with coarse timestamps
    try:
        with translating_disk_full(out, lambda: sum(needed.values()) or None, capture=True):
            yield
    except DiskFullError:
        _drop_unreadable(out, since)
        raise


def _drop_unreadable(out: Path, since_ns: int) -> None:
    import rasterio
    from rasterio.errors import RasterioError

    for folder in (out / "patches", out / "masks"):
        if not folder.is_dir():
            continue
        for p in folder.rglob("*.tif"):
            try:
                if p.stat().st_mtime_ns < since_ns:
                    continue
                with rasterio.open(p) as ds:
                    ds.read()
            except FileNotFoundError:
                continue
            except (RasterioError, OSError):
                log.info("%s: unreadable after the disk filled up; deleted", p)
                p.unlink(missing_ok=True)


def build_dataset(region: Region | str | Path, source: Source | str, out: str | Path, *,
                  source_options: dict[str, Any] | None = None, **options: Any) -> BuildReport:
    """Keyword form of ``run_build``: ``source`` is a registry name (with ``source_options``) or a built
    ``Source``; ``options`` are ``BuildConfig`` fields (``max_patches``, ``workers``, ``mask_method``,
    ``mask_config``, ``cache_bytes``, ``progress``). A bad option is one ``DataError`` line."""
    if isinstance(source, str):
        config = BuildConfig.parse(source=SourceSpec.parse(source, None, source_options), **options)
        return run_build(region, out, config)
    if source_options:
        raise DataError(f"source_options only apply to a source given by name, not to the built source "
                        f"{source_name(source)!r}; pass its options to its constructor")
    return run_build(region, out, BuildConfig.parse(**options), source=source)
