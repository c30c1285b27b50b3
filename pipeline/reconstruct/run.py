"""``reconstruct``: AOI + date + checkpoint -> cloud-free COG, provenance, uncertainty, STAC Item, quicklook.

1. The checkpoint's ``InputSpec`` says what to fetch: ``optical_dates`` optical dates at or before D (D
   itself only for ``includes_target_date`` models), and the S1 nearest to each of them and to D. The
   auxiliary (earlier) dates are by default the least cloudy of those within ``AUX_MAX_DAYS`` before D
   (``aux_dates="clearest"``: what an analyst picks as the prior reference, and the training samples'
   auxiliary dates lie within the same 30-day gap of TCSEN12); ``"latest"`` takes the most recent ones.
2. ``MosaicLoader`` is the lazy mosaic: it holds only scene references and, asked for a window of the
   AOI grid, reads that window of every scene (the source's own laziness applies), masks it with
   ``mask_scene``, mosaics scenes of the same date (first clear, then first valid) and normalizes exactly as
   training does (``pipeline.train.samples``: invalid optical -> 0 and flagged, cloudy values kept and flagged).
3. ``pipeline.reconstruct.tiling`` runs the model over the AOI block by block and writes the COGs (``pipeline.reconstruct.cog``).
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from shapely.geometry import box, shape

from models.spec import InputSpec
from pipeline import __version__
from pipeline.errors import CheckpointError, DataError, SourceError
from pipeline.files import fingerprint
from pipeline.reconstruct.cog import BlockWriter, RasterSpec, build_vrt, validate_cog
from pipeline.grid import Grid
from pipeline.masking.codes import MaskClass, to_cube_codes
from pipeline.normalize import optical_to_unit, sar_to_unit
from pipeline.regions import Region, load_region
from pipeline.sensors import get_sensor
from pipeline.sources.base import Scene, Source
from pipeline.sources.registry import get_source
from pipeline.reconstruct.tiling import BlockInputs, Outputs, Progress, StitchConfig, TorchPredictor, run_blocks

log = logging.getLogger(__name__)

COMPOSITE = "composite"
LOOKBACK_DAYS = 120  # how far before D optical input dates are searched
AUX_MAX_DAYS = 30  # "clearest" auxiliary dates come from this many days before D (TCSEN12's max_gap_days)
AUX_DATE_CHOICES = ("clearest", "latest")
NEAREST_SHOWN = 6
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
    """``composite`` (the training-free baseline) or a training run folder (``model.pt`` + ``model.json``)."""
    if str(checkpoint) == COMPOSITE:
        from models.registry import build_model, resolve_config

        cfg = resolve_config(COMPOSITE, "small")
        model = build_model(COMPOSITE, cfg).eval()
        return LoadedModel(model, COMPOSITE, model.spec, COMPOSITE, "none (training-free baseline)", {"model": COMPOSITE, "config": cfg})
    from pipeline.files import sha256_file
    from pipeline.train.checkpoint import MODEL_FILE, load_checkpoint, meta_spec

    run = Path(checkpoint)
    model, meta = load_checkpoint(run)
    return LoadedModel(model, str(meta["model"]), meta_spec(meta), str(run), sha256_file(run / MODEL_FILE), meta)


# --- which scenes -----------------------------------------------------------------------------------------


@dataclass
class InputPlan:
    """Scenes per role. Dates are oldest first; each SAR entry lists scenes nearest first."""

    target_date: dt.date
    optical_sensor: str  # sensor key of the optical scenes
    optical_dates: list[dt.date]
    optical_scenes: list[list[Scene]]
    sar_dates: list[dt.date] = field(default_factory=list)  # the date each SAR slot stands for
    sar_scenes: list[list[Scene]] = field(default_factory=list)
    target_scenes: list[Scene] = field(default_factory=list)  # optical scenes on D (observed pixels)

    def scene_ids(self) -> list[str]:
        ids = [s.id for group in self.optical_scenes + self.sar_scenes + [self.target_scenes] for s in group]
        return sorted(dict.fromkeys(ids))


def _by_date(scenes: Sequence[Scene]) -> dict[dt.date, list[Scene]]:
    out: dict[dt.date, list[Scene]] = {}
    for s in sorted(scenes, key=lambda s: (s.datetime, s.id)):
        out.setdefault(s.date, []).append(s)
    return out


def _nearest(dates: Sequence[dt.date], day: dt.date, n: int = NEAREST_SHOWN) -> str:
    near = sorted(set(dates), key=lambda d: (abs((d - day).days), d))[:n]
    return ", ".join(d.isoformat() for d in sorted(near)) or "none"


def _aoi_polygon(grid: Grid):
    return box(*grid.bounds_lonlat())


def _check_coverage(scenes: Sequence[Scene], grid: Grid, source_name: str, what: str) -> list[Scene]:
    aoi = _aoi_polygon(grid)
    covering = [s for s in scenes if not s.footprint or shape(s.footprint).intersects(aoi)]
    if scenes and not covering:
        w, s_, e, n = (round(v, 4) for v in grid.bounds_lonlat())
        raise SourceError(
            f"the AOI [{w}, {s_}, {e}, {n}] lies outside the {source_name} source's coverage: none of its {len(scenes)} {what} "
            "scene footprints intersect it; pick a region the source covers (or another --source)")
    return covering


def _raise_family_missing(source: Source, family: str, src_name: str, checkpoint: str) -> None:
    """A source that lists its archive and holds no scene of the family cannot satisfy the checkpoint at all."""
    listing = getattr(source, "scenes", None)
    if not callable(listing) or listing(family):
        return
    held = sorted({s.sensor for s in listing(None)})
    raise CheckpointError(
        f"checkpoint {checkpoint or 'requested'} needs {family} optical input, but the {src_name} source holds no {family} scenes "
        f"(it has: {', '.join(held) or 'nothing'}); use a checkpoint trained on {', '.join(held) or 'its'} data or another --source")


def _raise_outside_coverage(source: Source, family: str, grid: Grid, src_name: str) -> None:
    """Sources that can list their whole archive (``local``) tell 'outside coverage' from 'no dates'."""
    listing = getattr(source, "scenes", None)
    if not callable(listing):
        return
    everything = [s for s in listing(family) if s.footprint]
    if not everything:
        return
    aoi = _aoi_polygon(grid)
    if any(shape(s.footprint).intersects(aoi) for s in everything):
        return
    from shapely.ops import unary_union

    cover = [round(v, 3) for v in unary_union([shape(s.footprint) for s in everything]).bounds]
    w, s_, e, n = (round(v, 3) for v in grid.bounds_lonlat())
    raise SourceError(
        f"the AOI [{w}, {s_}, {e}, {n}] lies outside the {src_name} source's coverage: its {len(everything)} {family} scene(s) "
        f"cover lon/lat {cover}; pick a region inside it or another --source")


def _check_bands(spec: InputSpec, scenes: Sequence[Scene], source_name: str, checkpoint: str) -> str:
    sensors = sorted({s.sensor for s in scenes})
    for key in sensors:
        have = get_sensor(key).band_names
        missing = [b for b in dict.fromkeys(spec.optical_bands + spec.out_bands) if b not in have]
        if missing:
            raise CheckpointError(
                f"checkpoint {checkpoint} needs {spec.optical_sensor} band(s) {missing}, but the {source_name} source's "
                f"{key} scenes have {list(get_sensor(key).reflectance_bands)}; use a checkpoint trained on {key} bands or another --source")
    return sensors[0]


def _aux_dates(earlier: list[dt.date], days: dict[dt.date, list[Scene]], n: int, date: dt.date, how: str) -> list[dt.date]:
    """The ``n`` auxiliary dates (oldest first) out of ``earlier`` (sorted), chosen by ``how`` (see the module docstring)."""
    if how not in AUX_DATE_CHOICES:
        raise DataError(f"aux_dates={how!r}: use one of {', '.join(AUX_DATE_CHOICES)}")
    if n == 0:
        return []
    if how == "latest":
        return earlier[-n:]
    pool = [d for d in earlier if (date - d).days <= AUX_MAX_DAYS]
    if len(pool) <= n:  # no choice to make within the gap: the most recent ones
        return earlier[-n:]

    def cover(d: dt.date) -> float:  # the provider's scene cloud cover; unknown ranks as fully cloudy
        return float(np.mean([1.0 if s.cloud_cover is None else s.cloud_cover for s in days[d]]))

    # least cloudy first, the more recent one on ties (less change on the ground)
    return sorted(sorted(pool, key=lambda d: (cover(d), -d.toordinal()))[:n])


def plan_inputs(region: Region, date: dt.date, spec: InputSpec, source: Source, checkpoint: str = "", *, sar_max_days: int = 6,
                aux_dates: str = "clearest") -> InputPlan:
    """Pick the scenes the spec asks for; every impossibility is a ``SourceError``/``CheckpointError`` naming the fix."""
    grid = region.grid()
    family = spec.optical_sensor
    src_name = getattr(source, "name", type(source).__name__)
    try:
        found = source.search(region, date - dt.timedelta(days=LOOKBACK_DAYS), date + dt.timedelta(days=60), family)
    except SourceError as exc:
        raise CheckpointError(f"checkpoint {checkpoint} needs {family} optical input, which the {src_name} source cannot provide ({exc})") from None
    if not found:
        _raise_family_missing(source, family, src_name, checkpoint)
        _raise_outside_coverage(source, family, grid, src_name)
        raise SourceError(
            f"the {src_name} source has no {family} scenes over region {region.name} between "
            f"{date - dt.timedelta(days=LOOKBACK_DAYS)} and {date + dt.timedelta(days=60)}; check --date and the region's location")
    found = _check_coverage(found, grid, src_name, family)
    sensor_key = _check_bands(spec, found, src_name, checkpoint)
    found = [s for s in found if s.sensor == sensor_key]
    days = _by_date(found)
    earlier = [d for d in sorted(days) if d < date]
    n_earlier = spec.optical_dates - 1 if spec.includes_target_date else spec.optical_dates
    if spec.includes_target_date and date not in days:
        raise SourceError(
            f"no {family} scene on {date} over region {region.name} (the model {checkpoint or 'requested'} reconstructs an acquisition of that day); "
            f"nearest dates with scenes: {_nearest(list(days), date)}; pass one of them as --date")
    if len(earlier) < n_earlier:
        raise SourceError(
            f"the model needs {n_earlier} {family} date(s) before {date} but the {src_name} source has {len(earlier)} within "
            f"{LOOKBACK_DAYS} days ({', '.join(d.isoformat() for d in earlier) or 'none'}); pick a later --date")
    opt_dates = _aux_dates(earlier, days, n_earlier, date, aux_dates)
    if spec.includes_target_date:
        opt_dates.append(date)
    plan = InputPlan(date, sensor_key, opt_dates, [days[d] for d in opt_dates], target_scenes=days.get(date, []))

    if spec.sar_bands:
        first = min(opt_dates + [date]) - dt.timedelta(days=sar_max_days)
        try:
            s1 = source.search(region, first, date + dt.timedelta(days=sar_max_days), "s1")
        except SourceError as exc:
            raise CheckpointError(f"checkpoint {checkpoint} needs S1 {list(spec.sar_bands)}, which the {src_name} source cannot provide ({exc})") from None
        s1 = _check_coverage(s1, grid, src_name, "s1")
        for key in sorted({s.sensor for s in s1}):
            missing = [b for b in spec.sar_bands if b not in get_sensor(key).band_names]
            if missing:
                raise CheckpointError(f"checkpoint {checkpoint} needs SAR band(s) {missing}; the {src_name} source's {key} scenes have {list(get_sensor(key).band_names)}")
        for d in opt_dates + [date]:
            near = sorted((s for s in s1 if abs((s.date - d).days) <= sar_max_days), key=lambda s: (abs((s.datetime.date() - d).days), s.datetime, s.id))
            if not near:
                raise SourceError(
                    f"no S1 scene within {sar_max_days} days of {d} over region {region.name} (the model needs S1 near every input date and D); "
                    f"S1 dates nearby: {_nearest([s.date for s in s1], d)}; pick another --date or raise --sar-max-days")
            plan.sar_dates.append(d)
            plan.sar_scenes.append(near)
    return plan


# --- the lazy mosaic --------------------------------------------------------------------------------------


class MosaicLoader:
    """Windows of the AOI grid as model inputs (picklable: dask workers call it on their blocks)."""

    def __init__(self, source: Source, grid: Grid, plan: InputPlan, spec: InputSpec, *, mask_method: str = "auto",
                 need_observed: bool = False) -> None:
        self.source, self.grid, self.plan, self.spec = source, grid, plan, spec
        self.mask_method = mask_method
        self.need_observed = need_observed

    def _optical(self, scenes: Sequence[Scene], sub: Grid, bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Mosaic of one date: (reflectance (C, h, w) NaN nodata, cube mask codes (h, w))."""
        from pipeline.masking.scene import mask_scene

        refl = np.full((len(bands), sub.height, sub.width), np.nan, np.float32)
        codes = np.full((sub.height, sub.width), MaskClass.NODATA, np.uint8)
        for sc in scenes:
            da = self.source.read(sc, sub, None)
            m = to_cube_codes(np.asarray(mask_scene(da, sc, method=self.mask_method).values))
            vals = np.asarray(da.sel(band=list(bands)).values, dtype=np.float32)
            m = np.where(np.isfinite(vals).all(axis=0), m, MaskClass.NODATA).astype(np.uint8)
            # first clear observation wins; a cloudy one only fills pixels no scene has seen yet
            take = ((m == MaskClass.CLEAR) & (codes != MaskClass.CLEAR)) | ((codes == MaskClass.NODATA) & (m != MaskClass.NODATA))
            refl[:, take] = vals[:, take]
            codes[take] = m[take]
        return refl, codes

    def _sar(self, scenes: Sequence[Scene], sub: Grid) -> np.ndarray:
        out = np.full((len(self.spec.sar_bands), sub.height, sub.width), np.nan, np.float32)
        for sc in scenes:  # nearest in time first
            missing = ~np.isfinite(out).all(axis=0)
            if not missing.any():
                break
            vals = np.asarray(self.source.read(sc, sub, list(self.spec.sar_bands)).values, dtype=np.float32)
            out[:, missing] = vals[:, missing]
        return out

    def __call__(self, r0: int, r1: int, c0: int, c1: int) -> BlockInputs:
        sub = self.grid.window(r0, c0, r1 - r0, c1 - c0)
        spec, plan = self.spec, self.plan
        optical, masks, any_valid = [], [], np.zeros(sub.shape, bool)
        observed = observed_clear = None
        for d, scenes in zip(plan.optical_dates, plan.optical_scenes):
            bands = tuple(dict.fromkeys(spec.optical_bands + spec.out_bands))
            refl, codes = self._optical(scenes, sub, bands)
            valid = codes != MaskClass.NODATA
            any_valid |= valid
            # fancy indexing already copied, so NaN can be zeroed in place
            x = optical_to_unit(np.nan_to_num(refl[[bands.index(b) for b in spec.optical_bands]], copy=False, nan=0.0))
            x[:, ~valid] = 0.0
            optical.append(x)
            masks.append((codes != MaskClass.CLEAR)[None].astype(np.float32))
            if d == plan.target_date:
                observed = optical_to_unit(refl[[bands.index(b) for b in spec.out_bands]])
                observed[:, ~valid] = np.nan
                observed_clear = codes == MaskClass.CLEAR
        if observed is None and self.need_observed and plan.target_scenes:
            refl, codes = self._optical(plan.target_scenes, sub, spec.out_bands)
            observed, observed_clear = optical_to_unit(refl), codes == MaskClass.CLEAR
            observed[:, codes == MaskClass.NODATA] = np.nan
        arrays: dict[str, np.ndarray] = {}
        if optical:
            arrays["optical"] = np.stack(optical)
            arrays["optical_mask"] = np.stack(masks)
        nodata = ~any_valid
        if spec.sar_bands:
            # Slots standing for the same date usually share their scenes (an optical date that is D): read once.
            cache: dict[tuple[str, ...], np.ndarray] = {}
            sar = []
            for scenes in plan.sar_scenes:
                key = tuple(sc.id for sc in scenes)
                if key not in cache:
                    cache[key] = self._sar(scenes, sub)
                sar.append(cache[key])
            for d, scenes, s in zip(plan.sar_dates, plan.sar_scenes, sar):
                bad = ~np.isfinite(s).all(axis=0)
                if bad.any():
                    raise DataError(
                        f"S1 for {d} ({', '.join(sc.id for sc in scenes)}) has no data on {bad.mean():.1%} of AOI rows {r0}-{r1}, cols {c0}-{c1}; "
                        "the model cannot run without SAR there - raise --sar-max-days or use a smaller AOI inside the S1 swath")
            unit = {id(s): sar_to_unit(s, spec.sar_bands, axis=0) for s in sar}
            arrays["sar"] = np.stack([unit[id(s)] for s in sar]).astype(np.float32, copy=False)
            nodata = np.zeros(sub.shape, bool)  # SAR sees through clouds: every pixel has an input
        return BlockInputs(arrays, nodata, observed, observed_clear)


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


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".cloudfree-write-test-"):
            pass
    except OSError as exc:
        raise DataError(f"output folder {out_dir} cannot be written ({exc.strerror or exc}); pass a writable --out folder") from None


def _client(dask_address: str | None) -> Any:
    if not dask_address:
        return None
    from distributed import Client

    try:
        return Client(dask_address, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise SourceError(f"cannot connect to the dask scheduler at {dask_address} ({exc}); start it or drop --dask-address") from None


def reconstruct(
    region: str | Region,
    date: dt.date | str,
    checkpoint: str | Path,
    source: str | Source = "synthetic",
    out_dir: str | Path = "out",
    *,
    keep_clear: bool = False,
    tile: int = 256,
    overlap: int = 64,
    batch_size: int = 8,
    block: int = 1024,
    dtype: str = "float32",
    compress: str = "deflate",
    dask_address: str | None = None,
    client: Any = None,
    mask_method: str = "auto",
    sar_max_days: int = 6,
    aux_dates: str = "clearest",
    device: str | None = None,
    source_options: dict[str, Any] | None = None,
) -> ReconstructResult:
    """Reconstruct the cloud-free image of ``region`` on ``date``; see the module docstring."""
    region = load_region(region) if isinstance(region, (str, Path)) else region
    date = dt.date.fromisoformat(date) if isinstance(date, str) else date
    out_dir = Path(out_dir)
    _check_writable(out_dir)
    try:
        cfg = StitchConfig(tile=tile, overlap=overlap, batch_size=batch_size, block=block, keep_clear=keep_clear)
    except ValueError as exc:
        raise DataError(f"invalid tiling option: {exc}") from None
    src = get_source(source, **(source_options or {})) if isinstance(source, str) else source
    src_name = getattr(src, "name", str(source))
    lm = load_model(checkpoint)
    grid = region.grid()
    plan = plan_inputs(region, date, lm.spec, src, lm.checkpoint, sar_max_days=sar_max_days, aux_dates=aux_dates)
    simulated = src_name == "synthetic"
    log.info("reconstruct %s %s with %s: optical %s, S1 %s", region.name, date, lm.name, plan.optical_dates, plan.sar_dates)

    stem = f"{region.name}_{date:%Y%m%d}_{lm.name}"
    paths = {k: out_dir / f"{stem}{suffix}" for k, suffix in
             (("cog", ".tif"), ("provenance", "_provenance.tif"), ("uncertainty", "_uncertainty.tif"), ("stac", ".json"), ("quicklook", "_quicklook.png"))}
    predictor = TorchPredictor(lm.model, device=device, bf16=cfg.bf16)
    tags = {
        "cloudfree_version": __version__,
        "model": lm.name,
        "checkpoint": lm.checkpoint,
        "checkpoint_sha256": lm.sha256,
        "source": src_name,
        "simulated": str(simulated).lower(),
        "target_date": date.isoformat(),
        "optical_dates": ",".join(d.isoformat() for d in plan.optical_dates),
        "sar_dates": ",".join(sorted({s.date.isoformat() for g in plan.sar_scenes for s in g})),
        "source_scene_ids": ",".join(plan.scene_ids()),
        "region": region.name,
        "tile": str(cfg.tile),
        "overlap": str(cfg.overlap),
        "keep_clear": str(keep_clear).lower(),
        "normalization": "optical reflectance clipped to [0,1]; S1 dB VV [-25,0], VH [-32.5,0] -> [0,1]",
        "mask_method": mask_method,
    }
    fp = fingerprint({**tags, "grid": grid.to_dict(), "block": cfg.block, "dtype": dtype, "feather": cfg.feather}, 16)
    progress = Progress(out_dir / f".{stem}.progress.json", fp)
    resume = bool(progress.done)
    std_partial = out_dir / f".{paths['uncertainty'].name}.partial.tif"
    if not resume:
        std_partial.unlink(missing_ok=True)  # left by another run: this one starts from scratch
    outputs = Outputs(
        BlockWriter(paths["cog"], grid, RasterSpec.reflectance(lm.spec.out_bands, dtype=dtype, tags=tags), compress=compress, resume=resume),
        BlockWriter(paths["provenance"], grid, RasterSpec.provenance(tags), compress=compress, resume=resume),
        lambda again: BlockWriter(paths["uncertainty"], grid, RasterSpec.uncertainty(lm.spec.out_bands, tags), compress=compress, resume=again),
        resume,
    )
    loader = MosaicLoader(src, grid, plan, lm.spec, mask_method=mask_method, need_observed=keep_clear)
    own_client = client is None and dask_address is not None
    client = client or _client(dask_address)
    from pipeline.reconstruct.tiling import plan_blocks

    total = len(plan_blocks(grid.height, grid.width, cfg.block))
    try:
        computed = run_blocks(grid.height, grid.width, loader, predictor, cfg, outputs, progress, client=client)
    finally:
        if own_client:
            client.close()
    with_var = outputs.std is not None
    if resume and not with_var and std_partial.exists():
        outputs.std = outputs.std_factory(True)  # every block with a variance was written before the interruption
        with_var = True
    for w in outputs.all():
        w.commit()
    progress.clear()
    validation = {str(p.name): validate_cog(p).ok for p in (paths["cog"], paths["provenance"]) + ((paths["uncertainty"],) if with_var else ())}

    _write_quicklook(paths["quicklook"], paths["cog"], src, plan, lm.spec, grid)
    from pipeline.reconstruct.stac import StacAssets, build_item, validate_item, write_item

    item = build_item(
        stem, grid, date,
        StacAssets(paths["cog"], paths["provenance"], paths["uncertainty"] if with_var else None, paths["quicklook"]),
        lm.spec.out_bands, sensor=plan.optical_sensor, input_dates=plan.optical_dates + plan.sar_dates,
        properties={f"cloudfree:{k}": v for k, v in tags.items() if k != "simulated"}, simulated=simulated,
    )
    stac_result = validate_item(item)
    write_item(item, paths["stac"])
    validation["stac_core"] = stac_result.core
    validation["stac_extensions"] = stac_result.extensions
    return ReconstructResult(paths["cog"], paths["provenance"], paths["stac"], paths["quicklook"],
                             paths["uncertainty"] if with_var else None, computed, total, resume, plan, validation)


def reconstruct_dates(region: str | Region, dates: Sequence[dt.date | str], checkpoint: str | Path, source: str | Source = "synthetic",
                      out_dir: str | Path = "out", **kw: Any) -> tuple[list[ReconstructResult], Path | None]:
    """Several dates of one AOI; with more than one, a VRT stacks them (bands labelled by date)."""
    results = [reconstruct(region, d, checkpoint, source, out_dir, **kw) for d in dates]
    if len(results) < 2:
        return results, None
    name = results[0].cog.name.split("_")[0]
    model = results[0].cog.stem.rsplit("_", 1)[-1]
    vrt = build_vrt([r.cog for r in results], Path(out_dir) / f"{name}_{model}_dates.vrt", separate=True,
                    labels=[r.plan.target_date.isoformat() for r in results])
    return results, vrt


def _write_quicklook(path: Path, cog: Path, source: Source, plan: InputPlan, spec: InputSpec, grid: Grid, max_side: int = 768) -> None:
    """PNG: the latest optical input as observed (left) | the reconstruction (right), same stretch."""
    import rasterio
    from rasterio.enums import Resampling

    from pipeline.reconstruct.quicklook import rgb_quicklook, save_png, side_by_side

    factor = max(1, int(np.ceil(max(grid.width, grid.height) / max_side)))
    h, w = int(np.ceil(grid.height / factor)), int(np.ceil(grid.width / factor))
    coarse = Grid(grid.crs, grid.transform @ grid.transform.scale(factor), w, h)
    sensor = get_sensor(plan.optical_sensor)
    rgb = list(sensor.rgb or spec.out_bands[:3])
    scenes = plan.target_scenes or (plan.optical_scenes[-1] if plan.optical_scenes else [])
    before = np.full((3, h, w), np.nan, np.float32)
    for sc in scenes:  # decimated read of the observed RGB; first valid scene wins
        vals = np.asarray(source.read(sc, coarse, rgb).values, dtype=np.float32)
        before = np.where(np.isnan(before), vals, before)
    idx = [spec.out_bands.index(b) + 1 for b in rgb] if all(b in spec.out_bands for b in rgb) else [1, 2, 3]
    with rasterio.open(cog) as ds:  # served by the COG's overviews
        after = ds.read(idx, out_shape=(3, h, w), resampling=Resampling.average, masked=True).astype(np.float32).filled(np.nan)
        if ds.dtypes[0] == "uint16":
            after = after * np.float32(ds.scales[0]) + np.float32(ds.offsets[0])
    left = f"observed {scenes[0].date}" if scenes else "no observation"
    # one fixed gain for both panels, so brightness differences are real, not a stretch artefact
    panels = [rgb_quicklook(before, gain=QUICKLOOK_GAIN), rgb_quicklook(after, gain=QUICKLOOK_GAIN)]
    up = -(-QUICKLOOK_MIN_SIDE // max(h, w))  # small AOIs are enlarged (nearest) so labels and pixels stay readable
    if up > 1:
        panels = [p.repeat(up, axis=0).repeat(up, axis=1) for p in panels]
    save_png(path, side_by_side(panels, labels=[left, f"reconstructed {plan.target_date}"]))
