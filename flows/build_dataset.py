"""``build-dataset``: region(s) -> per-scene mask tasks -> ``pipeline.dataset.build.build_dataset``.

Each scene is one task (source read + cloud mask, retried on transient source errors, tagged for the Earth
Engine concurrency limit, cached by inputs). The per-scene tasks fill the dataset's own mask cache
(``DATASET/masks/<scene>.tif``), so the build task that follows only selects, exports patches, writes
cubes and the report; ``build_dataset`` itself skips every verified file, so a rerun after a crash
resumes. With no region given, the flow builds every region file marked ``active: true`` that has no
dataset yet (the nightly ``build-dataset/new-aoi`` deployment).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.futures import wait

from flows.artifacts import build_summary_markdown, publish_markdown, publish_table
from flows.common import CACHED, SOURCE_TASK, run_cached, source_tags, task_runner
from flows.params import BuildDatasetParams
from pipeline.regions import Region
from pipeline.sources.base import Scene
from pipeline.sources.registry import get_source


def _needed_families(region: Region) -> list[str]:
    from pipeline.dataset.selection import optical_family, uses_sar

    return [optical_family(region)] + (["s1"] if uses_sar(region) else [])


@task(name="search-scenes", **SOURCE_TASK, **CACHED)
def search_scenes(region: Region, source: str, source_options: dict[str, Any]) -> list[Scene]:
    """Every scene of the families the region's selection rule needs, oldest first."""
    src = get_source(source, **source_options)
    found: list[Scene] = []
    for fam in _needed_families(region):
        found += src.search(region, region.window.start, region.window.end, fam)
    get_run_logger().info("%s: %d scenes (%s)", region.name, len(found),
                          ", ".join(f"{f}: {sum(s.family == f for s in found)}" for f in _needed_families(region)))
    return sorted(found, key=lambda s: (s.datetime, s.id))


@task(name="mask-scene", task_run_name="mask-{scene.id}", **SOURCE_TASK, **CACHED)
def mask_scene_task(region: Region, source: str, source_options: dict[str, Any], scene: Scene, out: str, mask_method: str) -> dict[str, Any]:
    """Read one scene over the region grid, mask it, write it to the dataset's mask cache; cloud statistics."""
    import numpy as np

    # _Scenes is build_dataset's reader/masker; using it writes exactly the cache entry the build looks up.
    from pipeline.dataset.build import _key, _Scenes, prepare_out
    from pipeline.masking.codes import MaskClass
    from pipeline.masking.scene import MaskConfig

    src = get_source(source, **source_options)
    # The same source key and settings as build_dataset, so the build task finds this mask in its cache
    # (tests/flows/test_flows.py checks that the build recomputes none).
    source_key = _key({"source": source, "seed": getattr(src, "seed", None), "root": str(getattr(src, "root", "")),
                       "version": getattr(src, "version", None)})
    # cache_bytes=0: the scene array is not kept in memory, the build task runs in another call
    scenes = _Scenes(src, source_key, region.grid(), prepare_out(out), mask_method, MaskConfig(), source == "synthetic", cache_bytes=0)
    mask = scenes.scan(scene)
    n = mask.size
    valid = mask != MaskClass.NODATA
    stats = {
        "scene_id": scene.id,
        "sensor": scene.sensor,
        "date": scene.date.isoformat(),
        "cloud_fraction": float(np.isin(mask, (MaskClass.CLOUD, MaskClass.THIN_CLOUD)).sum() / max(1, valid.sum())),
        "shadow_fraction": float((mask == MaskClass.SHADOW).sum() / max(1, valid.sum())),
        "valid_fraction": float(valid.sum() / n),
        "mask_method": scenes.mask_methods.get(scene.id, "sar-valid"),
        "provider_cloud_cover": scene.cloud_cover,
    }
    get_run_logger().info("%s: cloud %.1f %%, shadow %.1f %%, valid %.1f %% (%s)", scene.id, 100 * stats["cloud_fraction"],
                          100 * stats["shadow_fraction"], 100 * stats["valid_fraction"], stats["mask_method"])
    return stats


@task(name="build-patches-and-cubes", **SOURCE_TASK, **CACHED)
def build_task(region: Region, source: str, source_options: dict[str, Any], out: str, max_patches: int | None, mask_method: str) -> dict[str, Any]:
    """Selection, patch export, manifest, cubes, report (masks come from the per-scene tasks' cache)."""
    from pipeline.dataset.build import build_dataset

    rep = build_dataset(region, source, out, max_patches=max_patches, mask_method=mask_method,
                        source_options=source_options, progress=sys.stderr.isatty())
    get_run_logger().info("%s: %d samples in %d patches (%d files written, %d skipped, %d masks cached)",
                          out, rep.samples, rep.patches_kept, rep.files_written, rep.files_skipped, rep.masks_cached)
    summary = asdict(rep)
    summary["out"] = str(rep.out)
    summary["markdown"] = rep.to_markdown()
    return summary


def _dataset_files(summary: dict[str, Any]) -> list[Path]:
    out = Path(summary["out"])
    return [out / "manifest.parquet", out / "dataset.json", out / "report.md", out / "cubes"]


def build_region(region: Region, params: BuildDatasetParams, out: str | None = None) -> dict[str, Any]:
    """One region's dataset (the body of the flow, callable from other flows)."""
    logger = get_run_logger()
    out = out or str(Path(params.out_root) / region.name)
    tags = source_tags(params.source)
    scenes = search_scenes.with_options(tags=tags)(region, params.source, params.source_options)
    masker = mask_scene_task.with_options(tags=tags)
    futures = [masker.submit(region, params.source, params.source_options, s, out, params.mask_method) for s in scenes]
    wait(futures)
    stats = [f.result() for f in futures]
    logger.info("%s: %d scenes masked; building patches and cubes in %s", region.name, len(stats), out)
    summary = run_cached(build_task.with_options(tags=tags), _dataset_files,
                         region, params.source, params.source_options, out, params.max_patches, params.mask_method)
    key = region.name
    publish_markdown(f"dataset-{key}", build_summary_markdown(summary, stats), f"Dataset {region.name}: scenes, cloud statistics, rejected patches")
    publish_table(f"scenes-{key}", stats, f"Per-scene cloud statistics of {region.name}")
    summary["scenes_masked"] = stats
    return summary


@flow(name="build-dataset", task_runner=task_runner())
def build_dataset_flow(params: BuildDatasetParams = BuildDatasetParams()) -> list[dict[str, Any]]:
    """Build training datasets: one region, or every active region without one (scheduled)."""
    logger = get_run_logger()
    targets = params.targets()
    if not targets:
        logger.info("nothing to build: every region file marked active: true already has a dataset under %s", params.out_root)
        publish_markdown("dataset-none", f"No new datasets: every active region already has one under `{params.out_root}`.", "build-dataset: nothing to do")
        return []
    logger.info("building %d dataset(s): %s", len(targets), ", ".join(r.name for r in targets))
    return [build_region(r, params) for r in targets]


# the name prefect.yaml's entrypoint uses
build_dataset = build_dataset_flow
