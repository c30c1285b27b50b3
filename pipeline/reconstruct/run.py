"""``reconstruct``: AOI + date + checkpoint -> cloud-free COG, provenance, source dates, STAC Item, quicklook.

Checkpoint ``composite`` (the default, training-free) fills what the target date does not see clearly from
the most recent clear earlier date, harmonized to the target (``pipeline.harmonize``):

1. ``pipeline.reconstruct.plan.plan_fill`` picks D's scenes and every date of the region's optical family
   within ``config.fill.max_age_days`` before D (one search per AOI).
2. ``pipeline.reconstruct.mosaic.FillLoader`` reads and masks a window's dates, newest first, until every
   hidden pixel has a clear source; ``SampleFits`` fits each date's global harmonization once for the AOI.
3. ``pipeline.reconstruct.tiling.compute_fill_block`` fills block by block (with a halo of context), through
   the same resumable, dask-capable block runner as models, into the COG writers of
   ``pipeline.reconstruct.cog``: the image, provenance (0 observed clear, 1 filled from another date, 3 no
   clear observation, 255 nodata) and the source-date layer (days between D and each pixel's date). The
   fill notes (how each date was harmonized, warnings where no fit was possible) go into the tags and the
   STAC Item. The fixed two-date torch composite of ``models`` is not reachable from here any more (it
   stays a baseline of ``cloudfree evaluate``); a run folder of any model, that one included, still is.

A model checkpoint (a training run folder):

1. ``load_model`` loads it; its ``InputSpec`` says what to read.
2. ``pipeline.reconstruct.plan`` picks the scenes: optical input dates at or before D and the S1 near them.
3. ``pipeline.reconstruct.mosaic.MosaicLoader`` turns any window of the AOI into model inputs, by the same
   rule as training (``pipeline.train.samples.model_arrays``).
4. ``pipeline.reconstruct.tiling`` runs the model over the AOI block by block (resumable, optionally on a dask
   cluster) into the COG writers; provenance 2 (predicted), 0 where ``keep_clear`` keeps the observation.

A checkpoint whose model corrects the fill (``needs_composite``: ``refine``) takes the first path: the fill runs as
above and ``Filler.refine`` applies the model to every block's fill (with ``REFINER_HALO`` more context), on the
pixels the fill took from an earlier date (provenance 2; the source-date layer still names the date).

The STAC Item and the quicklook follow either way. Every option (fill, tiling, output format, masking, input
dates, device, cluster) is a field of ``pipeline.reconstruct.config.ReconstructConfig``.

The output folder: one run at a time (``pipeline.files.OutputLock``: a second run into the same ``--out`` stops with
one line naming the first). Until a run commits, its finished blocks live in hidden, uncompressed intermediates
beside the outputs (``.<output>.partial.tif``, as large as the raw image) and ``.<name>.progress.json``:

- interrupted (Ctrl-C, a kill) or stopped by the source (network, quota: ``SourceError``): they are kept, with a
  warning naming their size, and the same command resumes from them;
- any other error (a full disk, a bug): they are deleted, and so is an output folder the run created and left empty;
- at the start of a run, hidden files no run can resume from (temps, intermediates without a progress file, those of
  this name made with other settings) are deleted; another name's interrupted run is kept and named in a warning.

A full disk anywhere is one ``pipeline.files.DiskFullError`` line: the folder, about how much the outputs need, and
what is free there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

import pipeline.reconstruct.tiling as tiling
from models.spec import InputSpec
from pipeline import __version__
from pipeline.errors import CheckpointError, DataError, SourceError
from pipeline.files import OutputLock, fingerprint, human_bytes, is_disk_full, translating_disk_full
from pipeline.grid import Grid
from pipeline.harmonize import FillConfig, shadow_bands
from pipeline.reconstruct.cog import BlockWriter, RasterSpec, build_vrt, raw_tiled_bytes, validate_cog
from pipeline.reconstruct.config import ReconstructConfig, Unobserved
from pipeline.reconstruct.mosaic import FillLoader, MosaicLoader, SampleFits
from pipeline.reconstruct.plan import COMPOSITE, InputPlan, plan_change_sar, plan_fill, plan_inputs, sar_scenes
from pipeline.reconstruct.styles import style_run
from pipeline.reconstruct.tiling import Filler, Outputs, Progress, TorchPredictor, plan_blocks, run_blocks
from pipeline.regions import Region, load_region
from pipeline.sensors import get_sensor
from pipeline.sources.base import Source

log = logging.getLogger(__name__)

QUICKLOOK_MIN_SIDE = 320
QUICKLOOK_GAIN = 3.5  # reflectance x 3.5 -> display, the usual Sentinel-2 true-colour gain


# --- checkpoint ------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    spec: InputSpec
    checkpoint: str
    sha256: str
    meta: dict[str, Any]


def load_model(checkpoint: str | Path) -> LoadedModel:
    """A training run folder (``model.pt`` + ``model.json``); ``composite`` is no model (``reconstruct`` runs the
    training-free fill for it without loading anything)."""
    if str(checkpoint) == COMPOSITE:
        raise CheckpointError(
            "checkpoint 'composite' is the training-free fill, not a model: pass it to reconstruct() or "
            "`cloudfree reconstruct --checkpoint composite`, or pass a training run folder to load_model")
    from pipeline.files import sha256_file
    from pipeline.train.checkpoint import MODEL_FILE, load_checkpoint, meta_spec

    run = Path(checkpoint)
    model, meta = load_checkpoint(run)
    return LoadedModel(model, str(meta["model"]), meta_spec(meta), str(run), sha256_file(run / MODEL_FILE), meta)


# --- outputs --------------------------------------------------------------------------------------------


@dataclass
class ReconstructResult:
    cog: Path
    provenance: Path
    stac: Path
    quicklook: Path
    uncertainty: Path | None
    blocks_computed: int
    blocks_total: int
    resumed: bool
    plan: InputPlan
    validation: dict[str, Any]
    source_days: Path | None = None  # the fill's source-date layer (checkpoint composite)
    warnings: list[str] = field(default_factory=list)  # also logged: e.g. pixels left without a clear observation
    fill: dict[str, Any] | None = None  # the fill's summary: per-date notes and pixel counts (also in the tags)


@dataclass(frozen=True)
class OutputPaths:
    """The files of one reconstruction, ``{region}_{YYYYMMDD}_{model}`` plus a suffix each, and its sidecars."""

    out_dir: Path
    stem: str

    def _file(self, suffix: str) -> Path:
        return self.out_dir / f"{self.stem}{suffix}"

    @property
    def cog(self) -> Path:
        return self._file(".tif")

    @property
    def provenance(self) -> Path:
        return self._file("_provenance.tif")

    @property
    def uncertainty(self) -> Path:
        return self._file("_uncertainty.tif")

    @property
    def source_days(self) -> Path:
        return self._file("_source_days.tif")

    @property
    def stac(self) -> Path:
        return self._file(".json")

    @property
    def quicklook(self) -> Path:
        return self._file("_quicklook.png")

    @property
    def thumbnail(self) -> Path:
        return self._file("_thumbnail.png")

    @property
    def project(self) -> Path:
        return self._file(".qgs")

    @property
    def progress(self) -> Path:
        return self.out_dir / f".{self.stem}.progress.json"

    @property
    def uncertainty_partial(self) -> Path:
        return self.out_dir / f".{self.uncertainty.name}.partial.tif"

    @property
    def partials(self) -> list[Path]:
        """The hidden intermediates a run of this name may leave for a resume."""
        return [self.out_dir / f".{p.name}.partial.tif" for p in (self.cog, self.provenance, self.uncertainty,
                                                                  self.source_days)]


# what a run leaves only while it runs: temp files (pipeline.files.temp_path, the write probe, the COG temps of
# older versions); and the resumable state of a name: ``.<stem><suffix>.tif.partial.tif`` + ``.<stem>.progress.json``
_TEMP = re.compile(r"^\.(?:.+\.\d+-\d+\.tmp|.+\.cog-tmp\.tif|cloudfree-write-test-.+)$")
_PARTIAL = re.compile(r"^\.(?P<stem>.+?)(?:_provenance|_uncertainty|_source_days)?\.tif\.partial\.tif$")
_PROGRESS = re.compile(r"^\.(?P<stem>.+)\.progress\.json$")


def _size(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def _clean_leftovers(out_dir: Path) -> None:
    """Delete the hidden files of ``out_dir`` no run can use (the caller holds the folder's lock, so no run is
    writing them): temps, and intermediates or progress files without their other half. Another name's resumable
    run is kept and named in a warning (it holds up to the raw image size on disk)."""
    if not out_dir.is_dir():
        return
    partials: dict[str, list[Path]] = {}
    progress: dict[str, Path] = {}
    for p in out_dir.iterdir():
        if _TEMP.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
        elif m := _PARTIAL.match(p.name):
            partials.setdefault(m["stem"], []).append(p)
        elif m := _PROGRESS.match(p.name):
            progress[m["stem"]] = p
    for stem in sorted(set(partials) | set(progress)):
        files = partials.get(stem, [])
        if stem in progress and files:
            log.warning("%s: an interrupted reconstruction (%s) left %s of finished blocks in hidden files "
                        "(.%s*.partial.tif): rerun it to resume, or delete them", out_dir, stem,
                        human_bytes(_size(files)), stem)
            continue
        for f in [*files, *([progress[stem]] if stem in progress else [])]:
            f.unlink(missing_ok=True)


@contextlib.contextmanager
def _output_folder(out_dir: Path) -> Iterator[None]:
    """The run's hold on ``out_dir``: its lock (leftovers cleaned when this thread takes it first) and a full disk
    turned into one line."""
    with OutputLock(out_dir, "reconstruct") as lock:
        if lock.fresh:
            _clean_leftovers(out_dir)
        with translating_disk_full(out_dir):
            yield


def _interrupted(exc: BaseException) -> bool:
    """A rerun can resume after this: the process was stopped (Ctrl-C, a signal turned into an exception) or the
    source failed (network, quota) rather than this run's own work or disk."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return True
    return isinstance(exc, (SourceError, ConnectionError, TimeoutError)) and not is_disk_full(exc)


@contextlib.contextmanager
def _resumable(paths: OutputPaths, progress: Progress, needed: int) -> Iterator[None]:
    """Keep the intermediates and the progress file for a resume when the run is interrupted (saying so, with their
    size); delete them after any other failure, so a failed run leaves nothing hidden behind. A full disk is one line
    saying about how much the outputs need (``needed`` bytes)."""
    try:
        with translating_disk_full(paths.out_dir, needed):
            yield
    except BaseException as exc:
        kept = [p for p in paths.partials if p.exists()]
        if _interrupted(exc) and progress.done:
            log.warning("%s: %d finished block(s) kept in hidden files (%s, .%s*.partial.tif): rerun the same command "
                        "to resume, or delete them", paths.out_dir, len(progress.done), human_bytes(_size(kept)),
                        paths.stem)
        else:
            for p in kept:
                p.unlink(missing_ok=True)
            progress.clear()
        raise


def _start(paths: OutputPaths, progress: Progress, *outputs: Path) -> None:
    """Before the writers open: a progress file of other settings, or one whose intermediates are gone, cannot be
    resumed from; its files go (the intermediates are as large as the raw image)."""
    partials = [paths.out_dir / f".{p.name}.partial.tif" for p in outputs]
    if progress.done and not all(p.exists() for p in partials):
        log.warning("%s: the intermediates of an interrupted run are missing; starting %s over", paths.out_dir,
                    paths.stem)
        progress.done.clear()
        progress.info.clear()
        progress.resumed = False
    if not progress.done:
        for p in paths.partials:
            p.unlink(missing_ok=True)
        progress.clear()


def _needed(grid: Grid, bands: int, dtype: str) -> int:
    """About the bytes the outputs need at most while committing: the uncompressed intermediates with overviews plus
    the COGs (no larger than them), for the image, provenance and source-date layers."""
    raw = raw_tiled_bytes(grid, bands, dtype) + raw_tiled_bytes(grid, 1, "uint8") + raw_tiled_bytes(grid, 1, "int16")
    return 2 * raw * 4 // 3


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".cloudfree-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise DataError(f"output folder {out_dir} cannot be written ({reason}); pass a writable --out folder") from None


def _client(dask_address: str | None) -> Any:
    if not dask_address:
        return None
    from distributed import Client

    try:
        return Client(dask_address, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise SourceError(f"cannot connect to the dask scheduler at {dask_address} ({exc}); "
                          "start it or drop --dask-address") from None


def _tags(region: Region, date: dt.date, lm: LoadedModel, plan: InputPlan, source_name: str,
          config: ReconstructConfig) -> dict[str, str]:
    """Provenance written into every raster and the STAC Item (and, with the grid, the resume fingerprint)."""
    return {
        "cloudfree_version": __version__,
        "model": lm.name,
        "checkpoint": lm.checkpoint,
        "checkpoint_sha256": lm.sha256,
        "source": source_name,
        "simulated": str(source_name == "synthetic").lower(),
        "target_date": date.isoformat(),
        "optical_dates": ",".join(d.isoformat() for d in plan.optical_dates),
        "sar_dates": ",".join(sorted({s.date.isoformat() for g in plan.sar_scenes for s in g})),
        "source_scene_ids": ",".join(plan.scene_ids()),
        "region": region.name,
        "tile": str(config.tile),
        "overlap": str(config.overlap),
        "keep_clear": str(config.keep_clear).lower(),
        "normalization": "optical reflectance clipped to [0,1]; S1 dB VV [-25,0], VH [-32.5,0] -> [0,1]",
        "mask_method": config.mask_method,
    }


def _open_outputs(paths: OutputPaths, grid: Grid, spec: InputSpec, tags: dict[str, str], config: ReconstructConfig,
                  progress: Progress) -> Outputs:
    """COG writers; on resume they reopen the partial files of the interrupted run."""
    resume = bool(progress.done)  # without it, _start has removed every intermediate of this name

    def writer(path: Path, raster: RasterSpec, again: bool) -> BlockWriter:
        return BlockWriter(path, grid, raster, compress=config.compress, resume=again)

    return Outputs(
        writer(paths.cog, RasterSpec.reflectance(spec.out_bands, dtype=config.dtype, tags=tags), resume),
        writer(paths.provenance, RasterSpec.provenance(tags), resume),
        lambda again: writer(paths.uncertainty, RasterSpec.uncertainty(spec.out_bands, tags), again),
        resume,
    )


def _compute(grid: Grid, loader: Any, predictor: Any, config: ReconstructConfig, outputs: Outputs,
             progress: Progress, client: Any, compute: tiling.BlockCompute | None = None) -> int:
    """Every block not yet done, locally or on the dask cluster (``client``, else ``config.dask_address``)."""
    own_client = client is None and config.dask_address is not None
    client = client or _client(config.dask_address)
    try:
        return run_blocks(grid.height, grid.width, loader, predictor, config, outputs, progress, client=client,
                          compute=compute)
    finally:
        if own_client:
            client.close()


def _commit(outputs: Outputs, progress: Progress, paths: OutputPaths,
            tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Finish the rasters (COG conversion, ``tags`` added to each), drop the progress file; COG validation per file
    name."""
    if outputs.resume and outputs.std is None and outputs.std_factory and paths.uncertainty_partial.exists():
        outputs.std = outputs.std_factory(True)  # every block with a variance was written before the interruption
    for w in outputs.all():
        w.commit(tags)
    progress.clear()
    rasters = [w.path for w in outputs.all()]
    validation = {p.name: validate_cog(p).ok for p in rasters}
    style_run(paths.out_dir, paths.stem)  # .qml per raster + the .qgs project: opens styled by drag-and-drop
    return validation


def _write_stac(paths: OutputPaths, grid: Grid, date: dt.date, bands: Sequence[str], plan: InputPlan,
                tags: dict[str, str], *, with_uncertainty: bool = False, with_source_days: bool = False,
                properties: dict[str, Any] | None = None) -> dict[str, Any]:
    """The STAC Item beside the files; returns its core/extension validation."""
    from pipeline.reconstruct.stac import StacAssets, build_item, validate_item, write_item
    from pipeline.reconstruct.thumbnail import write_thumbnail

    sensor = get_sensor(plan.optical_sensor)
    rgb = sensor.rgb if sensor.rgb and all(b in bands for b in sensor.rgb) else tuple(bands[:3])
    thumbnail = write_thumbnail(paths.cog, paths.thumbnail, rgb=rgb)
    assets = StacAssets(paths.cog, paths.provenance, paths.uncertainty if with_uncertainty else None, paths.quicklook,
                        source_days=paths.source_days if with_source_days else None, thumbnail=thumbnail)
    props: dict[str, Any] = {f"cloudfree:{k}": v for k, v in tags.items() if k != "simulated"}
    props.update(properties or {})
    item = build_item(
        paths.stem, grid, date, assets, bands, sensor=plan.optical_sensor,
        input_dates=plan.optical_dates + plan.sar_dates, properties=props, simulated=tags["simulated"] == "true",
    )
    result = validate_item(item)
    write_item(item, paths.stac)
    return {"stac_core": result.core, "stac_extensions": result.extensions}


def reconstruct(
    region: str | Region,
    date: dt.date | str,
    checkpoint: str | Path,
    out: str | Path = "out",
    config: ReconstructConfig | None = None,
    *,
    source: Source | None = None,
    client: Any = None,
) -> ReconstructResult:
    """Reconstruct the cloud-free image of ``region`` on ``date`` into the folder ``out``; see the module docstring.

    ``checkpoint``: ``composite`` (the training-free fill, ``config.fill``) or a training run folder.
    ``source``: a source object to read instead of building ``config.source`` (a wrapper or a test double);
    ``client``: a connected ``dask.distributed`` client to run the blocks on instead of ``config.dask_address``.
    """
    config = config or ReconstructConfig()
    region = load_region(region) if isinstance(region, (str, Path)) else region
    date = dt.date.fromisoformat(date) if isinstance(date, str) else date
    out_dir = Path(out)
    with _output_folder(out_dir):
        _check_writable(out_dir)
        src = source if source is not None else config.source.build()
        if str(checkpoint) == COMPOSITE:
            return _reconstruct_fill(region, date, out_dir, config, src, client)
        lm = load_model(checkpoint)
        if lm.spec.needs_composite:  # a correction of the fill: the fill runs, the model corrects what it produced
            return _reconstruct_fill(region, date, out_dir, _refiner_config(lm, config), src, client, refiner=lm)
        return _reconstruct_model(region, date, lm, out_dir, config, src, client)


def _reconstruct_model(region: Region, date: dt.date, lm: LoadedModel, out_dir: Path, config: ReconstructConfig,
                       src: Source, client: Any) -> ReconstructResult:
    """A training run folder's model, block by block; see the module docstring."""
    src_name = getattr(src, "name", type(src).__name__)
    grid = region.grid()
    plan = plan_inputs(region, date, lm.spec, src, lm.checkpoint, config)
    log.info("reconstruct %s %s with %s: optical %s, S1 %s", region.name, date, lm.name, plan.optical_dates,
             plan.sar_dates)

    paths = OutputPaths(out_dir, f"{region.name}_{date:%Y%m%d}_{lm.name}")
    tags = _tags(region, date, lm, plan, src_name, config)
    run_key = {**tags, "grid": grid.to_dict(), "block": config.block, "dtype": config.dtype, "feather": config.feather}
    progress = Progress(paths.progress, fingerprint(run_key, 16))
    _start(paths, progress, paths.cog, paths.provenance)
    # the uncertainty layer, when the model has one, is as large as the image
    with _resumable(paths, progress, _needed(grid, 2 * len(lm.spec.out_bands), config.dtype)):
        outputs = _open_outputs(paths, grid, lm.spec, tags, config, progress)
        loader = MosaicLoader(src, grid, plan, lm.spec, mask_method=config.mask_method,
                              need_observed=config.keep_clear)
        predictor = TorchPredictor(lm.model, device=config.device, bf16=config.bf16)
        computed = _compute(grid, loader, predictor, config, outputs, progress, client)
        validation = _commit(outputs, progress, paths)
    with_var = outputs.std is not None

    _write_quicklook(paths.quicklook, paths.cog, src, plan, lm.spec.out_bands, grid)
    validation.update(_write_stac(paths, grid, date, lm.spec.out_bands, plan, tags, with_uncertainty=with_var))
    return ReconstructResult(paths.cog, paths.provenance, paths.stac, paths.quicklook,
                             paths.uncertainty if with_var else None, computed,
                             len(plan_blocks(grid.height, grid.width, config.block)), outputs.resume, plan, validation)


# --- the training-free fill -------------------------------------------------------------------------------------


def _fill_tags(region: Region, date: dt.date, plan: InputPlan, source_name: str,
               config: ReconstructConfig, shadow_check: str) -> dict[str, str]:
    """Provenance of a fill, written into every raster and the STAC Item (and, with the grid, the resume key:
    a changed fill config starts over)."""
    return {
        "cloudfree_version": __version__,
        "model": COMPOSITE,
        "checkpoint": COMPOSITE,
        "checkpoint_sha256": "none (training-free)",
        "method": "most recent clear date within fill max_age_days, harmonized to the target date "
                  "(pipeline.harmonize)",
        "source": source_name,
        "simulated": str(source_name == "synthetic").lower(),
        "target_date": date.isoformat(),
        "optical_dates": ",".join(d.isoformat() for d in plan.optical_dates),
        "source_scene_ids": ",".join(plan.scene_ids()),
        "region": region.name,
        "normalization": "optical reflectance clipped to [0,1]",
        "mask_method": config.mask_method,
        "fill_config": json.dumps(config.fill.model_dump(), sort_keys=True),
        "fill_unobserved": str(config.fill_unobserved),
        "shadow_check": shadow_check,
    }


def shadow_check_status(plan: InputPlan, config: ReconstructConfig) -> str:
    """How the fill's missed-shadow check runs for this plan (after ``plan_change_sar``): one line for the
    metadata (``shadow_check`` tag, STAC ``cloudfree:shadow_check``)."""
    fill = config.fill
    if not fill.shadow_check_px:
        return "off (shadow_check_px 0)"
    if shadow_bands(plan.optical_sensor, get_sensor(plan.optical_sensor).reflectance_bands) is None:
        return f"off ({plan.optical_sensor} lacks one of blue, green, red, NIR, SWIR1)"
    if fill.shadow_sar_change_db is None:
        return f"on within {fill.shadow_check_px} px, optical test only (shadow_sar_change_db none)"
    near = [d for d, _ in plan.change_sar if abs((d - plan.target_date).days) <= config.sar_max_days]
    # S1 from before D cannot see a flood that arrived since: without one on or after D the test could pass a flood
    if not any(d >= plan.target_date for d in near):
        return (f"off: no S1 on {plan.target_date} or within {config.sar_max_days} days after it to tell a flood "
                "from a shadow the mask missed (--shadow-sar-change-db none runs the check on optical alone)")
    return (f"on within {fill.shadow_check_px} px, flagged pixels whose S1 {'/'.join(plan.change_sar_bands)} "
            f"changed by more than {fill.shadow_sar_change_db:g} dB stay observed (S1 {', '.join(map(str, near))})")


def _fill_summary(info: dict[str, Any], date: dt.date) -> dict[str, Any]:
    """The blocks' fill notes and pixel counts for the whole AOI: per fill date (newest first) how it was
    harmonized and how many pixels it filled, with any warning."""
    counts = {"observed": 0, "filled": 0, "no_clear": 0, "nodata": 0}
    dates: dict[float, dict[str, Any]] = {}
    dates_read = 0
    for key in sorted(info):
        block = info[key]
        dates_read = max(dates_read, int(block.get("dates_read", 0)))
        for k, v in block["counts"].items():
            counts[k] = counts.get(k, 0) + int(v)
        for note in block["notes"]:
            age = float(note["age_days"])
            agg = dates.setdefault(age, {
                "date": (date - dt.timedelta(days=int(age))).isoformat(), "age_days": int(age),
                "harmonization": [], "filled_pixels": 0, "gain": note["gain"], "offset": note["offset"]})
            if note["harmonization"] not in agg["harmonization"]:
                agg["harmonization"] = sorted([*agg["harmonization"], note["harmonization"]])
            agg["filled_pixels"] += int(note["filled_pixels"])
            if "via_age_days" in note:
                agg["via_date"] = (date - dt.timedelta(days=int(note["via_age_days"]))).isoformat()
            # AOI-wide (``fit_date``), so every block's note says the same: the first one speaks for the date
            for key in ("class_offsets", "not_fitted_directly", "warning"):
                if key in note:
                    agg.setdefault(key, note[key])
    # dates_read: the most history dates a block had to read (and mask) before every hidden pixel had a source
    return {"counts": counts, "dates": [dates[a] for a in sorted(dates)], "dates_read": dates_read}


def _percent(part: int, whole: int) -> str:
    share = 100 * part / max(1, whole)
    return f"{share:.1f} %" if share >= 1 or share == 0 else f"{share:.2g} %"


def _fill_warnings(summary: dict[str, Any], config: ReconstructConfig) -> list[str]:
    c = summary["counts"]
    total = c["observed"] + c["filled"] + c["no_clear"] + c["nodata"]  # "predicted", "missed_shadow" are in "filled"
    hidden = c["filled"] + c["no_clear"]
    out = []
    if c["no_clear"]:
        share = f"{c['no_clear']} px, {_percent(c['no_clear'], total)} of the AOI"
        kept = ("the least cloudy value any date has, still provenance 3"
                if config.fill_unobserved == Unobserved.least_cloudy else "nodata, provenance 3")
        if not c["filled"]:
            out.append(f"nothing could be filled: every hidden pixel ({share}) has no clear observation within "
                       f"{config.fill.max_age_days} days before the date (all history cloudy there); they are {kept}")
        else:
            out.append(f"{share} ({_percent(c['no_clear'], hidden)} of the hidden pixels) has no clear observation "
                       f"within {config.fill.max_age_days} days before the date; those pixels are {kept}")
    for d in summary["dates"]:
        if "warning" in d:
            out.append(f"fill date {d['date']}: {d['warning']}")
    return out


def _reconstruct_fill(region: Region, date: dt.date, out_dir: Path, config: ReconstructConfig, src: Source,
                      client: Any, refiner: LoadedModel | None = None) -> ReconstructResult:
    """Checkpoint ``composite``: the harmonized fill, block by block; see the module docstring. With ``refiner`` (a
    ``needs_composite`` model, ``models/refine.py``) the model corrects the pixels the fill took from an earlier date
    (provenance ``predicted``; the source-date layer still names that date)."""
    src_name = getattr(src, "name", type(src).__name__)
    grid = region.grid()
    plan = plan_fill(region, date, src, config)
    if config.fill.shadow_check_px and config.fill.shadow_sar_change_db is not None:
        plan_change_sar(region, plan, src, config.sar_max_days)
    shadow_check = shadow_check_status(plan, config)
    # without its check when it cannot run, so the fill's reach and halo do not read dates for a ring no one checks
    fill = config.fill.model_copy(update={"shadow_check_px": 0}) if shadow_check.startswith("off") else config.fill
    if refiner is not None:
        _check_refiner(refiner, plan)
        if refiner.spec.sar_bands:
            plan.sar_dates = [date, date]
            plan.sar_scenes = sar_scenes(region, [date], refiner.spec, src, refiner.checkpoint, src_name,
                                         config.sar_max_days) * 2
    log.info("reconstruct %s %s with the harmonized fill%s: %d earlier %s date(s) within %d days (%s .. %s)",
             region.name, date, f" corrected by {refiner.name}" if refiner else "", len(plan.optical_dates) - 1,
             plan.optical_sensor, config.fill.max_age_days, plan.optical_dates[0], plan.optical_dates[-2])
    log.info("missed-shadow check: %s", shadow_check)
    paths = OutputPaths(out_dir, f"{region.name}_{date:%Y%m%d}_{refiner.name if refiner else COMPOSITE}")
    tags = _fill_tags(region, date, plan, src_name, config, shadow_check)
    if refiner is not None:
        tags.update(model=refiner.name, checkpoint=refiner.checkpoint, checkpoint_sha256=refiner.sha256,
                    method=tags["method"] + f"; the filled pixels corrected by the trained {refiner.name} model")
    run_key = {**tags, "grid": grid.to_dict(), "block": config.block, "dtype": config.dtype}
    progress = Progress(paths.progress, fingerprint(run_key, 16))
    bands = get_sensor(plan.optical_sensor).reflectance_bands
    _start(paths, progress, paths.cog, paths.provenance, paths.source_days)
    resume = bool(progress.done)

    def writer(path: Path, raster: RasterSpec) -> BlockWriter:
        return BlockWriter(path, grid, raster, compress=config.compress, resume=resume)

    with _resumable(paths, progress, _needed(grid, len(bands), config.dtype)):
        outputs = Outputs(writer(paths.cog, RasterSpec.reflectance(bands, dtype=config.dtype, tags=tags)),
                          writer(paths.provenance, RasterSpec.provenance(tags)), None, resume,
                          source_days=writer(paths.source_days, RasterSpec.source_days(tags)))
        loader = FillLoader(src, grid, plan, mask_method=config.mask_method, fill=fill,
                            sar_max_days=config.sar_max_days,
                            least_cloudy=config.fill_unobserved == Unobserved.least_cloudy,
                            sar_bands=refiner.spec.sar_bands if refiner else ())
        predictor = None if refiner is None else TorchPredictor(refiner.model, device=config.device, bf16=config.bf16)
        filler = Filler(fill, SampleFits(loader), refiner=predictor,
                        shadow_bands=shadow_bands(plan.optical_sensor, loader.bands))
        computed = _compute(grid, loader, filler, config, outputs, progress, client,
                            compute=tiling.compute_fill_block)
        summary = _fill_summary(progress.info, date)
        warnings = _fill_warnings(summary, config)
        for w in warnings:
            log.warning("%s %s: %s", region.name, date, w)
        notes = {"fill_notes": json.dumps(summary["dates"]), "fill_pixels": json.dumps(summary["counts"])}
        validation = _commit(outputs, progress, paths, notes)

    _write_quicklook(paths.quicklook, paths.cog, src, plan, bands, grid)
    props = {"cloudfree:fill_config": config.fill.model_dump(), "cloudfree:shadow_check": tags["shadow_check"],
             "cloudfree:fill_notes": summary["dates"],
             "cloudfree:fill_pixels": summary["counts"], "cloudfree:warnings": warnings}
    validation.update(_write_stac(paths, grid, date, bands, plan, tags, with_source_days=True, properties=props))
    return ReconstructResult(
        paths.cog, paths.provenance, paths.stac, paths.quicklook, None, computed,
        len(plan_blocks(grid.height, grid.width, config.block)), outputs.resume, plan, validation,
        source_days=paths.source_days, warnings=warnings, fill=summary)


def _refiner_config(lm: LoadedModel, config: ReconstructConfig) -> ReconstructConfig:
    """A refine model learnt to correct one fill (``TrainConfig.composite_fill``, in its model.json): a run left at the
    default fill takes the checkpoint's, a run that sets another one is refused before anything is read."""
    from pipeline.train.checkpoint import meta_fill

    trained = meta_fill(lm.meta)
    if config.fill == trained:
        return config
    if config.fill == FillConfig():
        log.info("%s: filling with the checkpoint's fill settings (%s)", lm.checkpoint,
                 FillConfig().differences(trained, "checkpoint"))
        return config.model_copy(update={"fill": trained})
    raise CheckpointError(
        f"checkpoint {lm.checkpoint}: {lm.name} was trained to correct the fill with "
        f"{trained.differences(config.fill, 'this run')}; "
        "leave the fill options (--max-age-days, --fit, --class-offsets, --shadow-check-px, --shadow-sar-change-db) "
        "at their defaults to use the checkpoint's, or retrain with composite_fill set to this run's")


def _check_refiner(lm: LoadedModel, plan: InputPlan) -> None:
    """A refine checkpoint whose inputs this fill cannot give is one clear error, before any pixel is read."""
    bands = get_sensor(plan.optical_sensor).reflectance_bands
    if lm.spec.optical_sensor != get_sensor(plan.optical_sensor).family or tuple(lm.spec.optical_bands) != bands:
        raise CheckpointError(
            f"checkpoint {lm.checkpoint}: {lm.name} corrects a {lm.spec.optical_sensor} composite of bands "
            f"{list(lm.spec.optical_bands)}, but this archive's fill has {plan.optical_sensor} bands {list(bands)}; "
            "train it on a dataset of this sensor")


def reconstruct_dates(region: str | Region, dates: Sequence[dt.date | str], checkpoint: str | Path,
                      out: str | Path = "out", config: ReconstructConfig | None = None, *, source: Source | None = None,
                      client: Any = None) -> tuple[list[ReconstructResult], Path | None]:
    """Several dates of one AOI; with more than one, a VRT stacks them (bands labelled by date). The output folder
    stays locked from the first date to the VRT."""
    with _output_folder(Path(out)):
        results = [reconstruct(region, d, checkpoint, out, config, source=source, client=client) for d in dates]
        if len(results) < 2:
            return results, None
        name = results[0].cog.name.split("_")[0]
        model = results[0].cog.stem.rsplit("_", 1)[-1]
        vrt = build_vrt([r.cog for r in results], Path(out) / f"{name}_{model}_dates.vrt", separate=True,
                        labels=[r.plan.target_date.isoformat() for r in results])
    return results, vrt


def _write_quicklook(path: Path, cog: Path, source: Source, plan: InputPlan, bands: Sequence[str], grid: Grid,
                     max_side: int = 768) -> None:
    """PNG: the latest optical input as observed (left) | the reconstruction (right), same stretch."""
    import rasterio
    from rasterio.enums import Resampling

    from pipeline.reconstruct.quicklook import rgb_quicklook, save_png, side_by_side

    factor = max(1, int(np.ceil(max(grid.width, grid.height) / max_side)))
    h, w = int(np.ceil(grid.height / factor)), int(np.ceil(grid.width / factor))
    coarse = Grid(grid.crs, grid.transform @ grid.transform.scale(factor), w, h)
    sensor = get_sensor(plan.optical_sensor)
    rgb = list(sensor.rgb or bands[:3])
    scenes = plan.target_scenes or (plan.optical_scenes[-1] if plan.optical_scenes else [])
    before = np.full((3, h, w), np.nan, np.float32)
    for sc in scenes:  # decimated read of the observed RGB; first valid scene wins
        vals = np.asarray(source.read(sc, coarse, rgb).values, dtype=np.float32)
        before = np.where(np.isnan(before), vals, before)
    idx = [list(bands).index(b) + 1 for b in rgb] if all(b in bands for b in rgb) else [1, 2, 3]
    with rasterio.open(cog) as ds:  # served by the COG's overviews
        after = ds.read(idx, out_shape=(3, h, w), resampling=Resampling.average, masked=True)
        after = after.astype(np.float32).filled(np.nan)
        if ds.dtypes[0] == "uint16":
            after = after * np.float32(ds.scales[0]) + np.float32(ds.offsets[0])
    left = f"observed {scenes[0].date}" if scenes else "no observation"
    # one fixed gain for both panels, so brightness differences are real, not a stretch artefact
    panels = [rgb_quicklook(before, gain=QUICKLOOK_GAIN), rgb_quicklook(after, gain=QUICKLOOK_GAIN)]
    up = -(-QUICKLOOK_MIN_SIDE // max(h, w))  # small AOIs are enlarged (nearest) so labels and pixels stay readable
    if up > 1:
        panels = [p.repeat(up, axis=0).repeat(up, axis=1) for p in panels]
    save_png(path, side_by_side(panels, labels=[left, f"reconstructed {plan.target_date}"]))
