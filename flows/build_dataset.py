"""``build-dataset``: region(s) -> per-scene mask tasks -> ``pipeline.dataset.build.run_build``.

Each scene is one task (source read + cloud mask, retried on transient source errors, tagged for the Earth
Engine concurrency limit, cached by inputs). The per-scene tasks fill the dataset's own mask cache
(``DATASET/masks/<scene>.tif``, through ``pipeline.dataset.scene_masks.SceneMasks`` with the build's
settings), so the build task that follows only selects, exports patches, writes cubes and the report;
the build itself skips every verified file, so a rerun after a crash resumes. With no region given, the
flow builds every region file marked ``active: true`` that has no dataset yet (the nightly
``build-dataset/new-aoi`` deployment).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.futures import wait

from flows.artifacts import build_summary_markdown, library_logs_to_runs, publish_markdown, publish_table
from flows.common import CACHED, SOURCE_TASK, run_cached, source_tags, task_runner
from flows.params import BuildDatasetParams
from pipeline.dataset.config import BuildConfig
from pipeline.errors import RegionError
from pipeline.masking.config import MaskConfig
from pipeline.regions import Region, check_size
from pipeline.sources.base import Scene
from pipeline.sources.registry import SourceSpec, get_source


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
def mask_scene_task(region: Region, source: SourceSpec, scene: Scene, out: str, mask_method: str,
                    mask_config: MaskConfig) -> dict[str, Any]:
    """Read one scene over the region grid, mask it, write it to the dataset's mask cache; cloud statistics."""
    import numpy as np

    from pipeline.dataset.build import prepare_out
    from pipeline.dataset.scene_masks import SceneMasks, source_name
    from pipeline.masking.codes import MaskClass

    # The build's own reader/masker with the build's settings writes exactly the cache entry the build
    # task looks up (tests/flows/test_flows.py checks that the build recomputes none). cache_bytes=0: the
    # scene array is not kept in memory, the build task runs in another call.
    name = source_name(source.name)
    src = get_source(name, **source.kwargs())
    scenes = SceneMasks(src, name, region.grid(), prepare_out(out), mask_method, mask_config, cache_bytes=0)
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
    get_run_logger().info("%s: cloud %.1f %%, shadow %.1f %%, valid %.1f %% (%s)", scene.id,
                          100 * stats["cloud_fraction"], 100 * stats["shadow_fraction"], 100 * stats["valid_fraction"],
                          stats["mask_method"])
    return stats


@task(name="build-patches-and-cubes", **SOURCE_TASK, **CACHED)
def build_task(region: Region, config: BuildConfig, out: str) -> dict[str, Any]:
    """Selection, patch export, manifest, cubes, report (masks come from the per-scene tasks' cache)."""
    from pipeline.dataset.build import run_build

    # progress bars only on a terminal; decided here so it is no part of the task's cache key
    rep = run_build(region, out, config.model_copy(update={"progress": sys.stderr.isatty()}))
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
    config = params.build_config()
    tags = source_tags(params.source)
    scenes = search_scenes.with_options(tags=tags)(region, params.source, params.source_options)
    masker = mask_scene_task.with_options(tags=tags)
    futures = [masker.submit(region, config.source, s, out, config.mask_method, config.mask_config) for s in scenes]
    wait(futures)
    stats = [f.result() for f in futures]
    logger.info("%s: %d scenes masked; building patches and cubes in %s", region.name, len(stats), out)
    summary = run_cached(build_task.with_options(tags=tags), _dataset_files, region, config, out)
    key = region.name
    publish_markdown(f"dataset-{key}", build_summary_markdown(summary, stats),
                     f"Dataset {region.name}: scenes, cloud statistics, rejected patches")
    publish_table(f"scenes-{key}", stats, f"Per-scene cloud statistics of {region.name}")
    summary["scenes_masked"] = stats
    return summary


@flow(name="build-dataset", task_runner=task_runner())
def build_dataset_flow(params: BuildDatasetParams = BuildDatasetParams()) -> list[dict[str, Any]]:
    """Build training datasets: one region, or every active region without one (scheduled)."""
    library_logs_to_runs()
    logger = get_run_logger()
    targets = params.targets()
    if not targets:
        logger.info("nothing to build: every region file marked active: true already has a dataset under %s",
                    params.out_root)
        publish_markdown("dataset-none",
                         f"No new datasets: every active region already has one under `{params.out_root}`.",
                         "build-dataset: nothing to do")
        return []
    logger.info("building %d dataset(s): %s", len(targets), ", ".join(r.name for r in targets))
    built = []
    for region in targets:
        try:
            check_size(region, yes=params.allow_large)
        except RegionError as exc:
            if params.region is not None:  # asked for by name: the run fails with the reason
                raise
            # the nightly run: one oversized region file must not stop the others
            logger.warning("skipping %s: %s (or set allow_large)", region.name, exc)
            continue
        built.append(build_region(region, params))
    return built


# the name prefect.yaml's entrypoint uses
build_dataset = build_dataset_flow
