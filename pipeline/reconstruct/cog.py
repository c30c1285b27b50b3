"""Cloud-Optimized GeoTIFF output, written block by block with bounded memory.

GDAL's COG driver can only ``CreateCopy``, never write window by window, so an output is built in two
steps: a tiled, uncompressed, band-interleaved intermediate GTiff (hidden, next to the target) receives
finished blocks one at a time; ``commit`` builds the overviews inside the intermediate and converts it with
``rasterio.shutil.copy(driver="COG", OVERVIEWS="FORCE_USE_EXISTING")`` into a temp name, compressing
once, and renames it onto the target. (GDAL works through its block cache, so memory stays bounded.) GDAL does not
always raise when a write fails (a full disk during the COG copy leaves a truncated file and no exception), so the
temp is verified before the rename (``verify_cog``: a COG of the expected size, every tile inside the file, every
band of every overview level read back) and deleted when anything is wrong. The target path therefore only ever
holds a complete COG. A full disk anywhere in the writing is one ``pipeline.files.DiskFullError`` line.

The intermediate survives an interrupted run so the stitcher can resume by blocks; it is deleted after a successful
commit (and by ``reconstruct`` when a run fails with an error rather than being interrupted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.windows import Window

from pipeline.errors import DataError
from pipeline.files import atomic_output, is_disk_full, temp_path, translating_disk_full
from pipeline.grid import Grid
from pipeline.reconstruct.styles import apply_gdal_styling

log = logging.getLogger(__name__)

COG_BLOCK = 512
# provenance classes (the training-free fill's codes of pipeline.harmonize, plus a model's own)
PROVENANCE_OBSERVED = 0  # observed clear on the target date
PROVENANCE_FILLED = 1  # filled from another (earlier, clear) date
PROVENANCE_PREDICTED = 2  # predicted by a model
PROVENANCE_NO_CLEAR = 3  # no clear observation within the fill's maximum age: nodata (or a marked cloudy value)
PROVENANCE_NODATA = 255
PROVENANCE_CODES = {
    PROVENANCE_OBSERVED: "observed clear",
    PROVENANCE_FILLED: "filled from another date",
    PROVENANCE_PREDICTED: "predicted by a model",
    PROVENANCE_NO_CLEAR: "no clear observation",
    PROVENANCE_NODATA: "nodata",
}
SOURCE_DAYS_NODATA = -1  # source-date layer: pixels that took no date's value
UINT16_DN_SCALE = 1e-4  # S2 convention: reflectance = DN / 10000
GDAL_CACHE_MB = 128
_COMPRESSIONS = ("deflate", "zstd")


@dataclass(frozen=True)
class RasterSpec:
    """What one output file holds: band names, storage type, nodata, scale/offset and metadata."""

    bands: tuple[str, ...]
    dtype: str = "float32"  # float32 reflectance, uint16 DN (with scale/offset), uint8 codes or int16 counts
    nodata: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    descriptions: tuple[str, ...] = ()  # per band; defaults to the band names
    tags: dict[str, str] = field(default_factory=dict)
    band_tags: tuple[dict[str, str], ...] = ()
    resampling: str = "average"  # overview resampling; "nearest" for class codes

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "uint16", "uint8", "int16"):
            raise ValueError(f"unsupported output dtype {self.dtype!r}; use float32, uint16, uint8 or int16")
        if self.descriptions and len(self.descriptions) != len(self.bands):
            raise ValueError(f"{len(self.descriptions)} descriptions for {len(self.bands)} bands")

    @classmethod
    def reflectance(cls, bands: Sequence[str], dtype: str = "float32",
                    tags: dict[str, str] | None = None) -> "RasterSpec":
        """Optical reflectance as float32 (NaN nodata) or uint16 DN = reflectance x 10000 (0 nodata)."""
        if dtype == "uint16":
            return cls(tuple(bands), "uint16", 0, UINT16_DN_SCALE, 0.0, tags=dict(tags or {}))
        if dtype != "float32":
            raise ValueError(f"reflectance output dtype must be float32 or uint16, got {dtype!r}")
        return cls(tuple(bands), "float32", float("nan"), tags=dict(tags or {}))

    @classmethod
    def provenance(cls, tags: dict[str, str] | None = None) -> "RasterSpec":
        codes = ", ".join(f"{k} {v}" for k, v in PROVENANCE_CODES.items())
        return cls(
            ("provenance",),
            "uint8",
            PROVENANCE_NODATA,
            descriptions=(f"provenance: {codes}",),
            tags={**(tags or {}), "PROVENANCE_CODES": ",".join(f"{k}={v}" for k, v in PROVENANCE_CODES.items())},
            resampling="nearest",
        )

    @classmethod
    def source_days(cls, tags: dict[str, str] | None = None) -> "RasterSpec":
        """Days between the target date and the date each pixel's value came from (0 observed on the date)."""
        return cls(
            ("source_days",),
            "int16",
            SOURCE_DAYS_NODATA,
            descriptions=("days between the target date and the date of the pixel's value (0 observed, -1 none)",),
            tags={**(tags or {}), "SOURCE_DAYS": "days before the target date of the acquisition each pixel's value "
                  f"came from; 0 observed on the target date, {SOURCE_DAYS_NODATA} no value"},
            resampling="nearest",
        )

    @classmethod
    def uncertainty(cls, bands: Sequence[str], tags: dict[str, str] | None = None) -> "RasterSpec":
        return cls(
            tuple(f"{b}_std" for b in bands),
            "float32",
            float("nan"),
            tags={**(tags or {}), "UNCERTAINTY": "predictive standard deviation per band, reflectance units "
                  "(sqrt of the model's variance)"},
        )

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Physical values (NaN = nodata) -> stored values of ``dtype``."""
        v = np.asarray(values)
        if self.dtype == "float32":
            return v.astype(np.float32, copy=False)
        if self.dtype in ("uint8", "int16"):
            return v.astype(self.dtype, copy=False)
        info = np.iinfo(np.uint16)
        nan = np.isnan(v)
        dn = np.rint((np.nan_to_num(v, nan=0.0) - self.offset) / self.scale)
        # DN 0 is nodata, so a valid reflectance of exactly 0 is stored as DN 1 (1e-4 reflectance).
        dn = np.clip(dn, 1, info.max)
        dn[nan] = self.nodata
        return dn.astype(np.uint16)


def raw_tiled_bytes(grid: Grid, bands: int, dtype: str) -> int:
    """Uncompressed bytes of a tiled image on ``grid``: GeoTIFF tiles are whole, so a 100 px image takes a 512 px
    tile (overviews add up to a third more)."""
    tiles_x, tiles_y = -(-grid.width // COG_BLOCK), -(-grid.height // COG_BLOCK)
    return tiles_x * tiles_y * COG_BLOCK * COG_BLOCK * bands * np.dtype(dtype).itemsize


def overview_factors(width: int, height: int, block: int = COG_BLOCK) -> list[int]:
    """Decimation factors the COG driver's ``OVERVIEWS=AUTO`` would pick: halve until the image fits one tile."""
    out, f = [], 1
    while max(width, height) // f > block:
        f *= 2
        out.append(f)
    return out


def _cog_interleave() -> dict[str, str]:
    # The COG driver takes INTERLEAVE from GDAL 3.11 on (and warns about it before); older ones always write
    # pixel interleaving. Band interleaving is the better layout for a 13-band reflectance COG: each band's tiles
    # compress on their own (uint16 deflate 38 % of the float32 output on real S2 pixels, against 44 % pixel-
    # interleaved; bench/output_size.py) and a true-colour view reads 3 bands' tiles, not all 13.
    if tuple(int(x) for x in rasterio.__gdal_version__.split(".")[:2]) < (3, 11):
        return {}
    return {"INTERLEAVE": "BAND"}


def _profile(grid: Grid, spec: RasterSpec) -> dict[str, Any]:
    return {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": len(spec.bands),
        "dtype": spec.dtype,
        "crs": grid.crs,
        "transform": grid.transform,
        "nodata": spec.nodata,
        "tiled": True,
        "blockxsize": COG_BLOCK,
        "blockysize": COG_BLOCK,
        # Band-interleaved: GDAL builds overviews of such a file band by band, ~20x faster than the
        # multi-band path it takes for pixel interleaving (and the COG driver's own OVERVIEWS=AUTO) on
        # sizes that are not a power of two. The COG itself is written pixel-interleaved.
        "interleave": "band",
        "BIGTIFF": "IF_SAFER",
    }


class BlockWriter:
    """Write one output window by window into a hidden intermediate; ``commit`` makes it a COG atomically.

    ``resume=True`` reopens an intermediate left by an interrupted run instead of starting over; the
    caller (the stitcher) knows which blocks it already holds. Each ``write`` opens, writes and closes
    the intermediate so a finished block is on disk before the caller records it as done.
    """

    def __init__(self, path: str | Path, grid: Grid, spec: RasterSpec, *, compress: str = "deflate",
                 resume: bool = False) -> None:
        if compress.lower() not in _COMPRESSIONS:
            raise ValueError(f"compress {compress!r} is not supported; use one of {_COMPRESSIONS}")
        self.path = Path(path)
        self.grid = grid
        self.spec = spec
        self.compress = compress.upper()
        self.partial = self.path.with_name(f".{self.path.name}.partial.tif")
        if resume and self.partial.exists():
            with rasterio.open(self.partial) as ds:
                expected = (grid.width, grid.height, len(spec.bands), spec.dtype)
                if (ds.width, ds.height, ds.count, ds.dtypes[0]) != expected:
                    resume = False
        if not (resume and self.partial.exists()):
            self._create()

    @property
    def raw_bytes(self) -> int:
        """Uncompressed size of the intermediate at full resolution (every band, edge tiles padded to whole tiles)."""
        return raw_tiled_bytes(self.grid, len(self.spec.bands), self.spec.dtype)

    def _create(self) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        # Uncompressed intermediate: blocks can be rewritten in place on resume and writes are cheap;
        # compression happens once, in the COG copy. Filled with nodata so unwritten areas are nodata.
        profile = _profile(self.grid, self.spec)
        with self._disk_full(self.raw_bytes * 4 // 3), rasterio.open(self.partial, "w", **profile) as ds:
            ds.descriptions = self.spec.descriptions or self.spec.bands
            if self.spec.dtype == "uint16":
                ds.scales = (self.spec.scale,) * ds.count
                ds.offsets = (self.spec.offset,) * ds.count
            ds.update_tags(**{k: str(v) for k, v in self.spec.tags.items()})
            for i, bt in enumerate(self.spec.band_tags, start=1):
                ds.update_tags(i, **{k: str(v) for k, v in bt.items()})

    def write(self, values: np.ndarray, row: int, col: int, *, encoded: bool = False) -> None:
        """Write ``values`` (bands, h, w) in physical units at pixel (row, col) of the grid."""
        if values.ndim == 2:
            values = values[None]
        data = values if encoded else self.spec.encode(values)
        with self._disk_full(self.raw_bytes * 4 // 3), rasterio.open(self.partial, "r+") as ds:
            ds.write(data, window=Window(col, row, data.shape[2], data.shape[1]))

    @contextlib.contextmanager
    def _disk_full(self, needed: int) -> Iterator[None]:
        """GDAL writes: a full disk becomes one line, and a failure GDAL only logs becomes an exception (closing a
        dataset whose last blocks could not be flushed does not raise)."""
        with translating_disk_full(self.path.parent, needed, capture=True), _gdal_failures() as failed:
            yield
            _check_failures(failed, self.partial)

    def commit(self, tags: dict[str, str] | None = None) -> Path:
        """Convert the intermediate to a COG at ``path`` (temp name + rename) and delete the intermediate.

        ``tags``: dataset tags known only once every block is written (e.g. a summary of the blocks' notes).
        The temp is verified (``verify_cog``) before the rename; on any failure it is deleted and the intermediate
        kept (a rerun resumes from it). A full disk raises ``DiskFullError``.
        """
        tmp = temp_path(self.path)
        predictor = "YES" if self.spec.dtype != "uint8" else "NO"
        # the overviews (a third of the image) go into the intermediate, the COG is at most that again
        needed = self.raw_bytes * 4 // 3
        factors = overview_factors(self.grid.width, self.grid.height)
        try:
            if tags:
                with self._disk_full(needed), rasterio.open(self.partial, "r+") as ds:
                    ds.update_tags(**{k: str(v) for k, v in tags.items()})
            with self._disk_full(needed):
                apply_gdal_styling(self.partial, self.spec)  # colour table / RGB bands ride along into the COG
            if factors:
                # (re)built on every commit, so blocks rewritten after a failed commit are reflected
                with self._disk_full(needed), rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS", GDAL_CACHEMAX=GDAL_CACHE_MB), \
                        rasterio.open(self.partial, "r+") as ds:
                    ds.build_overviews(factors, Resampling[self.spec.resampling])
            # a bounded block cache: GDAL's default (5 % of RAM) would grow with the AOI during the copy
            with translating_disk_full(self.path.parent, needed, capture=True), _gdal_failures() as failed, \
                    rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS", GDAL_CACHEMAX=GDAL_CACHE_MB):
                rasterio.shutil.copy(
                    self.partial,
                    tmp,
                    driver="COG",
                    COMPRESS=self.compress,
                    PREDICTOR=predictor,
                    # the highest level: the COG is compressed once and read many times; deflate 9 is 4 % smaller
                    # than 6 on the demo's uint16 for ~1 s more (bench/output_size.py)
                    LEVEL=9,
                    BLOCKSIZE=COG_BLOCK,
                    **_cog_interleave(),
                    OVERVIEWS="FORCE_USE_EXISTING" if factors else "NONE",
                    NUM_THREADS="ALL_CPUS",
                    BIGTIFF="IF_SAFER",
                )
                _check_failures(failed, tmp)
                verify_cog(tmp, self.grid, self.spec, overviews=len(factors))
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.partial.unlink(missing_ok=True)
        return self.path

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)


def write_cog(path: str | Path, values: np.ndarray, grid: Grid, spec: RasterSpec, *, compress: str = "deflate") -> Path:
    """Write a small in-memory array (bands, h, w) as a COG; large outputs go through ``BlockWriter``."""
    w = BlockWriter(path, grid, spec, compress=compress)
    try:
        for row, col, sub in grid.tiles(2048):
            w.write(values[..., row : row + sub.height, col : col + sub.width], row, col)
        return w.commit()
    except BaseException:
        w.discard()
        raise


class _Failures:
    """What GDAL signalled in this thread while a block of writes ran: its failures (CE_Failure, which rasterio only
    logs at INFO and carries on after) and its warnings, held back until the block is known to have succeeded."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.warnings: list[logging.LogRecord] = []
        self.thread = threading.get_ident()  # the writes happen in the writing thread; others are not ours


class _Collector(logging.Filter):
    """On rasterio's logger while any ``_gdal_failures`` block runs: hands a thread's GDAL messages to its innermost
    block. Records of other threads pass as before."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[_Failures] = []
        self.shown = logging.WARNING  # the level the logger let through before

    def filter(self, record: logging.LogRecord) -> bool:
        mine = [f for f in self.active if f.thread == record.thread]
        if not mine:
            return record.levelno >= self.shown
        if record.levelno <= logging.INFO:
            msg = record.getMessage()
            if "GDAL signalled an error" in msg:
                mine[-1].messages.append(msg)
        elif record.levelno >= self.shown:
            mine[-1].warnings.append(record)
        return False


_collector = _Collector()
_collector_lock = threading.Lock()
_collector_level: list[int] = []  # the logger's own level, restored after the last block


@contextlib.contextmanager
def _gdal_failures() -> Iterator[_Failures]:
    """Collect the GDAL errors rasterio only logs (a COG copy onto a full disk can end without an exception), and
    hold back GDAL's warnings meanwhile: they reach the log when the block succeeds, and are dropped when it raises
    (a write that failed warns about its own consequences; the exception says what happened).

    rasterio's logger is set to INFO once for all nested and concurrent uses, and restored when the last one ends."""
    logger = logging.getLogger("rasterio._env")
    failures = _Failures()
    with _collector_lock:
        if not _collector.active:
            _collector_level[:] = [logger.level]
            _collector.shown = logger.getEffectiveLevel()
            logger.setLevel(min(logging.INFO, _collector.shown))
            logger.addFilter(_collector)
        _collector.active.append(failures)
    ok = False
    try:
        yield failures
        ok = True
    finally:
        with _collector_lock:
            _collector.active.remove(failures)
            outer = [f for f in _collector.active if f.thread == failures.thread]
            if ok and outer:
                outer[-1].warnings += failures.warnings
            if not _collector.active:
                logger.removeFilter(_collector)
                logger.setLevel(_collector_level[0])
        if ok and not outer:
            for record in failures.warnings:
                logger.callHandlers(record)


def _check_failures(failed: _Failures, path: Path) -> None:
    if failed.messages:
        text = "; ".join(failed.messages)
        if is_disk_full(None, text):
            raise OSError(28, "No space left on device", str(path))  # turned into one line by translating_disk_full
        raise DataError(f"{path}: GDAL reported a failure while writing it ({failed.messages[-1]}); the file was not "
                        "kept, rerun to write it again")


def _tiles_end(ds: Any) -> int:
    """Where the last tile of any band and overview level ends in the file, by the TIFF's own offsets."""
    bands = [1] if ds.count == 1 or ds.interleaving is None or ds.interleaving.value == "PIXEL" else range(
        1, ds.count + 1)
    end = 0
    for level in [None, *range(len(ds.overviews(1)))]:
        if level is None:
            width, height = ds.width, ds.height
        else:
            factor = ds.overviews(1)[level]
            width, height = -(-ds.width // factor), -(-ds.height // factor)
        bw, bh = ds.block_shapes[0][1], ds.block_shapes[0][0]
        for b in bands:
            for y in range(-(-height // bh)):
                for x in range(-(-width // bw)):
                    off = ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=b, ovr=level)
                    size = ds.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=b, ovr=level)
                    if off and size:
                        end = max(end, int(off) + int(size))
    return end


def verify_cog(path: str | Path, grid: Grid, spec: RasterSpec, *, overviews: int | None = None) -> None:
    """Raise ``DataError`` unless ``path`` is a complete COG of ``grid`` and ``spec``: the COG layout, the expected
    size, band count and type (and ``overviews`` levels), every tile inside the file, and every band of every
    overview level readable, block by block (memory stays bounded)."""
    path = Path(path)
    report = validate_cog(path, raise_on_error=False)
    if report.problems:
        raise DataError(f"{path}: not a valid COG after writing it: " + "; ".join(report.problems))
    try:
        with rasterio.open(path) as ds:
            got = (ds.width, ds.height, ds.count, ds.dtypes[0])
            want = (grid.width, grid.height, len(spec.bands), spec.dtype)
            if got != want:
                raise DataError(f"{path}: written as {got} (width, height, bands, type), expected {want}")
            levels = len(ds.overviews(1))
            if overviews is not None and levels != overviews:
                raise DataError(f"{path}: {levels} overview levels written, expected {overviews}")
            size, end = path.stat().st_size, _tiles_end(ds)
            if end > size:
                raise DataError(f"{path}: truncated: {size} bytes, but its tiles end at byte {end}")
        for level in [None, *range(levels)]:
            with rasterio.open(path, overview_level=level) as ds:
                for _, window in ds.block_windows(1):
                    ds.read(window=window)
    except rasterio.errors.RasterioError as exc:
        raise DataError(f"{path}: unreadable after writing it ({exc})") from exc


@dataclass
class COGReport:
    path: Path
    layout: str | None
    compression: str | None
    block_shapes: list[tuple[int, int]]
    overviews: list[int]
    descriptions: tuple[str | None, ...]
    crs: str | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_cog(path: str | Path, *, raise_on_error: bool = True) -> COGReport:
    """Check a file is a COG as GDAL sees it: LAYOUT=COG (ghost header, IFDs before data), 512 tiles,
    internal overviews when larger than one tile, deflate/zstd, a CRS and band descriptions."""
    path = Path(path)
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise DataError(f"{path}: not a readable GeoTIFF ({exc})") from None
    with ds:
        struct = ds.tags(ns="IMAGE_STRUCTURE")
        problems = []
        layout = struct.get("LAYOUT")
        if ds.driver != "GTiff":
            problems.append(f"driver is {ds.driver}, not GTiff")
        if layout != "COG":
            problems.append(f"IMAGE_STRUCTURE LAYOUT is {layout!r}, not 'COG' "
                            "(file not written by the COG driver or edited afterwards)")
        compression = struct.get("COMPRESSION")
        if compression not in ("DEFLATE", "ZSTD"):
            problems.append(f"compression is {compression!r}, not DEFLATE or ZSTD")
        blocks = list(ds.block_shapes)
        if any(b != (COG_BLOCK, COG_BLOCK) for b in blocks):
            problems.append(f"block shapes {blocks} are not {COG_BLOCK}x{COG_BLOCK} tiles")
        overviews = ds.overviews(1)
        if max(ds.width, ds.height) > COG_BLOCK and not overviews:
            problems.append("no internal overviews although the image is larger than one tile")
        for i in range(1, ds.count + 1):
            if ds.overviews(i) != overviews:
                problems.append(f"band {i} overviews {ds.overviews(i)} differ from band 1 {overviews}")
        descriptions = ds.descriptions
        if any(not d for d in descriptions):
            problems.append(f"band descriptions missing: {descriptions}")
        if ds.crs is None:
            problems.append("no CRS")
        crs = ds.crs.to_string() if ds.crs else None
        report = COGReport(path, layout, compression, blocks, overviews, descriptions, crs, problems)
    if problems and raise_on_error:
        raise DataError(f"{path}: not a valid COG: " + "; ".join(problems))
    return report


def build_vrt(sources: Sequence[str | Path], dst: str | Path, *, separate: bool = False,
              labels: Sequence[str] | None = None) -> Path:
    """A GDAL VRT over ``sources`` (all on the same CRS and pixel size): a mosaic of pieces, or with
    ``separate=True`` a band stack (e.g. one output per date, bands labelled ``label band``).

    Written as XML because neither rasterio nor the GDAL build here exposes gdalbuildvrt (no ``osgeo``
    bindings, no CLI); the result is re-opened with rasterio to prove GDAL accepts it.
    """
    dst = Path(dst)
    if not sources:
        raise DataError(f"{dst}: no sources to build a VRT from")
    infos = []
    for s in sources:
        with rasterio.open(s) as ds:
            infos.append((Path(s), ds.profile, ds.bounds, ds.res, ds.descriptions, ds.scales, ds.offsets))
    crs0, res0, dtype0 = infos[0][1]["crs"], infos[0][3], infos[0][1]["dtype"]
    for p, prof, _, res, *_ in infos:
        if prof["crs"] != crs0 or not np.allclose(res, res0) or prof["dtype"] != dtype0:
            raise DataError(f"{p}: CRS/pixel size/dtype differ from {infos[0][0]}; a VRT needs them equal")
    left = min(i[2].left for i in infos)
    top = max(i[2].top for i in infos)
    right = max(i[2].right for i in infos)
    bottom = min(i[2].bottom for i in infos)
    width, height = int(round((right - left) / res0[0])), int(round((top - bottom) / res0[1]))
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = crs0.to_wkt()
    geo_transform = (left, res0[0], 0.0, top, 0.0, -res0[1])
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in geo_transform)
    gdal_type = {"float32": "Float32", "uint16": "UInt16", "uint8": "Byte", "int16": "Int16"}[dtype0]

    def add_band(n: int, description: str, nodata: Any, scale: float, offset: float) -> ET.Element:
        band = ET.SubElement(root, "VRTRasterBand", dataType=gdal_type, band=str(n))
        ET.SubElement(band, "Description").text = description
        if nodata is not None:
            is_nan = isinstance(nodata, float) and np.isnan(nodata)
            ET.SubElement(band, "NoDataValue").text = "nan" if is_nan else repr(nodata)
        if scale != 1.0 or offset != 0.0:
            ET.SubElement(band, "Offset").text = repr(offset)
            ET.SubElement(band, "Scale").text = repr(scale)
        return band

    def add_source(band: ET.Element, path: Path, src_band: int, prof: dict, bounds: Any) -> None:
        src = ET.SubElement(band, "ComplexSource")
        relative = os.path.relpath(path.resolve(), dst.resolve().parent)
        ET.SubElement(src, "SourceFilename", relativeToVRT="1").text = relative
        ET.SubElement(src, "SourceBand").text = str(src_band)
        w, h = prof["width"], prof["height"]
        ET.SubElement(src, "SrcRect", xOff="0", yOff="0", xSize=str(w), ySize=str(h))
        x = int(round((bounds.left - left) / res0[0]))
        y = int(round((top - bounds.top) / res0[1]))
        ET.SubElement(src, "DstRect", xOff=str(x), yOff=str(y), xSize=str(w), ySize=str(h))
        if prof["nodata"] is not None:
            nd = prof["nodata"]
            ET.SubElement(src, "NODATA").text = "nan" if isinstance(nd, float) and np.isnan(nd) else repr(nd)

    if separate:
        n = 0
        for k, (p, prof, bounds, _, desc, scales, offsets) in enumerate(infos):
            label = labels[k] if labels else p.stem
            for b in range(1, prof["count"] + 1):
                n += 1
                band = add_band(n, f"{label} {desc[b - 1] or b}", prof["nodata"], scales[b - 1], offsets[b - 1])
                add_source(band, p, b, prof, bounds)
    else:
        count = infos[0][1]["count"]
        if any(i[1]["count"] != count for i in infos):
            raise DataError(f"{dst}: mosaic sources have different band counts; use separate=True to stack them")
        _, prof0, _, _, desc0, scales0, offsets0 = infos[0]
        for b in range(1, count + 1):
            band = add_band(b, desc0[b - 1] or f"band {b}", prof0["nodata"], scales0[b - 1], offsets0[b - 1])
            for p, prof, bounds, *_ in infos:
                add_source(band, p, b, prof, bounds)
    with atomic_output(dst) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=False)
        with rasterio.open(tmp) as check:  # a VRT GDAL cannot open never gets the final name
            check.read(1, window=Window(0, 0, 1, 1))
    return dst
