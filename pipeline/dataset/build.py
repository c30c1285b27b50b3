"""``build_dataset``: region + source -> masks -> selection -> patch GeoTIFFs + manifest -> cubes -> report.

Each scene is read ONCE over the whole region grid, masked once, and the mask is cached as
``DATASET/masks/<scene>.tif`` (keyed by mask method and settings; see ``scene_masks``), so a rerun never
recomputes it. Per-patch fractions come from that whole-scene mask by summed-area tables; the patch files
are then cut from the same in-memory scene when it is still cached, or from one more whole-scene read
otherwise. Every stage skips work whose output is already on disk and verified (masks by key, patches by
sha256, manifest and cubes by content hash, report/dataset.json by bytes), so a rerun of a finished build
writes nothing. The build's options are a ``BuildConfig`` (``pipeline.dataset.config``).
"""

from __future__ import annotations

import contextlib
import json
import logging
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
    uses_sar,
)
from pipeline.errors import DataError, RegionError, SourceError
from pipeline.files import TMP_SUFFIX, fingerprint, remove_stale_temps, write_bytes_atomic
from pipeline.grid import Grid
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
    finally:
        seconds[step] = time.perf_counter() - t


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


def _scan_masks(masks: SceneMasks, found: _Found, config: BuildConfig) -> pd.DataFrame:
    """Mask every scene the rule uses (each read once over the whole grid) -> the per-patch fraction table."""
    bar = tqdm(total=len(found.scenes), desc="mask scenes", unit="scene", disable=not config.progress, leave=False)

    def scan(scene: Scene) -> pd.DataFrame:
        mask = masks.scan(scene)
        bar.update()
        return fraction_rows(mask, found.offsets, family=scene.family, sensor=scene.sensor, scene_id=scene.id,
                             datetime=scene.datetime)

    # Masking is CPU-heavy numpy/LightGBM that releases the GIL; two scenes at a time bound the memory.
    with bar, ThreadPoolExecutor(max(1, min(config.worker_count, 2))) as pool:
        parts = list(pool.map(scan, found.scenes))
    return dedupe_dates(pd.concat(parts, ignore_index=True))


def _select(table: pd.DataFrame, region: Region, found: _Found, max_patches: int | None) -> _Picked:
    """The selection rule's samples, split by spatial blocks (overlaps across splits dropped), then capped."""
    sel = select_samples(table, region, [o.patch_id for o in found.offsets])
    rejected = Counter(sel.rejected_patches)
    if not sel.samples:
        raise SelectionError(
            f"no patch of region {region.name} passes the {sel.rule} rule ({len(found.offsets)} patches, "
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
    return _Picked(sel.rule, samples, split_of, rejected, sel.rejected_candidates)


def _patch_files(samples: Sequence[Sample], found: _Found,
                 masks: SceneMasks) -> tuple[dict[tuple[str, str], str], list[ex.PatchFile]]:
    """((patch, scene) -> file path, the files to export in path order), each keyed by all it depends on."""
    offset_of = found.offset_of
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
                               "mask": None if sar else masks.mask_key(scene)})
            files[rel] = ex.PatchFile(rel, scene.id, o.row, o.col, o.size, key)
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


def _report(region: Region, out: Path, found: _Found, masks: SceneMasks, table: pd.DataFrame, picked: _Picked,
            written: _Written) -> BuildReport:
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
    unwritable ``out``.
    """
    seconds: dict[str, float] = {}
    with _timed(seconds, "search"):
        reg = region if isinstance(region, Region) else load_region(region)
        out = prepare_out(out)
        remove_stale_temps(out)
        src, name = _open_source(config, source)
        found = _search(src, name, reg)
    with _timed(seconds, "mask"):
        masks = SceneMasks(src, found.source_name, found.grid, out, config.mask_method, config.mask_config,
                           cache_bytes=config.cache_bytes)
        table = _scan_masks(masks, found, config)
    with _timed(seconds, "select"):
        picked = _select(table, reg, found, config.max_patches)
    with _timed(seconds, "export"):
        paths, files = _patch_files(picked.samples, found, masks)
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
        report = _report(reg, out, found, masks, table, picked, written)
        info = _dataset_info(reg, found, picked, report)
        write_bytes_atomic(out / "dataset.json", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        write_bytes_atomic(out / "report.md", report.to_markdown().encode())
    report.seconds = seconds
    log.info("built %s: %d samples, %d files written, %d skipped in %.1f s", out, report.samples, exported.written,
             exported.skipped, report.elapsed)
    return report


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
