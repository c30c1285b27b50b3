"""The ``local`` source: a folder of GeoTIFFs/COGs the user already has, indexed by filename patterns.

Layouts are declared in ``pipeline.sources.local.layouts`` (SEN12MS-CR nested and flat, SEN12MS-CR-TS,
``Region_T{n}_Patch{i}``, Landsat C2 L2 scene folders); this module is the one indexer and reader.
Pixels are warped onto the requested grid with GDAL (``rasterio.vrt.WarpedVRT``): bilinear for
continuous bands, nearest for QA/class bands, then turned into physical units with
``pipeline.sensors.to_physical``. Reads are lazy: one ``dask.delayed`` task per file.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import dask
import dask.array as da
import numpy as np
import rasterio
import xarray as xr
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape

from pipeline.errors import DataError, SourceError
from pipeline.grid import Grid
from pipeline.regions import Region
from pipeline.sensors import SENSORS, Sensor, get_sensor, to_physical
from pipeline.sources.base import Scene, raster_attrs
from pipeline.sources.local.layouts import LAYOUTS, Layout, scene_groups

log = logging.getLogger(__name__)

_QA_UNITS = ("bitmask", "class")


@dataclass(frozen=True)
class _BandRef:
    path: Path
    index: int  # 1-based band index inside the file


@dataclass
class _Entry:
    layout: Layout
    scene: Scene
    bands: dict[str, _BandRef]


def _describe(exc: BaseException) -> str:
    # rasterio's "Read failed. See previous exception" hides the GDAL reason in __cause__
    cause = exc.__cause__ or exc.__context__
    return f"{exc}: {cause}" if cause else str(exc)


class UnusableFile(DataError):
    """A file of the archive that cannot be indexed (unreadable, no CRS, wrong band count).

    Indexing skips its scene with a warning: one bad file among thousands outside the AOI must not stop a run.
    """


def _open(path: Path) -> rasterio.io.DatasetReader:
    try:
        return rasterio.open(path)
    except RasterioError as exc:
        raise UnusableFile(
            f"{path}: not a readable GeoTIFF ({_describe(exc)}); re-download or delete the file"
        ) from None


class LocalSource:
    """Index ``root`` once, then answer ``search``/``scenes``/``read`` from the index."""

    name = "local"

    def __init__(self, root: str | Path, layout: str = "auto") -> None:
        self.root = Path(root).expanduser().resolve()
        if layout != "auto" and layout not in LAYOUTS:
            raise SourceError(f"unknown local layout {layout!r}; use 'auto' or one of: {', '.join(LAYOUTS)}")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: local source root is not a folder; pass --root DIR with your GeoTIFFs")
        self.layouts = list(LAYOUTS.values()) if layout == "auto" else [LAYOUTS[layout]]
        self._entries: dict[str, _Entry] = {}
        self._index()

    # -- indexing ---------------------------------------------------------------------------------
    def _index(self) -> None:
        claimed: set[Path] = set()
        skipped: list[str] = []
        for lay in self.layouts:
            groups_by_scene: dict[str, list[tuple[Path, dict[str, str]]]] = defaultdict(list)
            for path in sorted(self.root.glob(lay.filename_glob)):
                if path in claimed or not path.is_file():
                    continue
                m = lay.regex.search(path.relative_to(self.root).as_posix())
                if m is None:
                    continue
                g = scene_groups(lay, m.groupdict())
                groups_by_scene[lay.scene_id.format(**g)].append((path, g))
                claimed.add(path)
            for scene_id, files in groups_by_scene.items():
                if scene_id in self._entries:
                    other = next(iter(self._entries[scene_id].bands.values())).path
                    raise DataError(
                        f"{files[0][0]}: scene {scene_id} is also at {other}; keep one copy under {self.root}"
                    )
                try:
                    self._entries[scene_id] = self._make_entry(lay, scene_id, files)
                except UnusableFile as exc:
                    skipped.append(str(exc))
        if skipped and not self._entries:
            raise UnusableFile(skipped[0] + (f" (and {len(skipped) - 1} more file(s) like it)" if skipped[1:] else ""))
        if not self._entries:
            self._raise_empty()
        if skipped:
            others = [line.split(": ", 1)[0] for line in skipped[1:]]
            more = f"; also {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}" if others else ""
            log.warning("local source %s: skipped %d scene(s) that cannot be used: %s%s", self.root, len(skipped),
                        skipped[0], more)
        log.info(
            "local source %s: %d scenes (%s)",
            self.root,
            len(self._entries),
            ", ".join(sorted({e.layout.name for e in self._entries.values()})),
        )

    def _raise_empty(self) -> None:
        tifs = [p for p in self.root.rglob("*") if p.suffix.lower() in (".tif", ".tiff")]
        found = (
            f"found {len(tifs)} GeoTIFF(s) matching none, e.g. {tifs[0].relative_to(self.root)}"
            if tifs
            else "found no GeoTIFFs"
        )
        tried = "; ".join(lay.expects() for lay in self.layouts)
        raise DataError(
            f"{self.root}: no scenes indexed ({found}). Layouts tried: {tried}. Arrange the files like one of these"
        )

    def _make_entry(self, lay: Layout, scene_id: str, files: list[tuple[Path, dict[str, str]]]) -> _Entry:
        g0 = files[0][1]
        seen: dict[str, Path] = {}
        for path, g in files:
            key = g["band"] if lay.band_per_file else "file"
            if key in seen:
                raise DataError(f"{path}: scene {scene_id} is also at {seen[key]}; keep one copy under {self.root}")
            seen[key] = path
        sensor_key = lay.sensor_of(g0)
        declared = lay.bands[sensor_key]
        bands: dict[str, _BandRef] = {}
        footprint = None
        for path, g in files:
            with _open(path) as src:
                expected = 1 if lay.band_per_file else len(declared)
                if src.count != expected:
                    what = (
                        f"one band ({g['band']})" if lay.band_per_file else f"{expected} bands ({', '.join(declared)})"
                    )
                    raise UnusableFile(
                        f"{path}: has {src.count} band(s) but layout {lay.name} expects {what}; "
                        f"move the file out of {self.root} or pass the right layout"
                    )
                if src.crs is None:
                    raise UnusableFile(
                        f"{path}: GeoTIFF has no CRS; it cannot be placed on a grid - re-export it with its CRS"
                    )
                if footprint is None:
                    footprint = transform_geom(src.crs, CRS.from_epsg(4326), mapping(box(*src.bounds)))
            if lay.band_per_file:
                bands[g["band"]] = _BandRef(path, 1)
            else:
                bands.update({b: _BandRef(path, i + 1) for i, b in enumerate(declared)})
        meta = lay.metadata_of(files[0][0], g0) if lay.metadata_of else {}
        if lay.dated:
            assert lay.date_format is not None  # that is what `dated` means
            when = meta.pop("datetime", None) or dt.datetime.strptime(g0["date"], lay.date_format).replace(
                tzinfo=dt.timezone.utc
            )
        else:
            assert lay.pseudo_datetime is not None, (
                f"layout {lay.name} declares neither date_format nor pseudo_datetime"
            )
            when = lay.pseudo_datetime(g0)
        cloud_cover = meta.pop("cloud_cover", None)
        ordered = tuple(b for b in declared if b in bands)
        props = {
            "layout": lay.name,
            "files": sorted({str(r.path) for r in bands.values()}),
            "bands": ordered,
            "date_known": lay.dated,
            "role": lay.role_of(g0),
            "simulated": False,
            **lay.properties_of(g0),
            **meta,
        }
        assert footprint is not None  # set by the first of the (never empty) files
        scene = Scene(scene_id, sensor_key, when, footprint, cloud_cover, props)
        return _Entry(lay, scene, {b: bands[b] for b in ordered})

    # -- Source protocol --------------------------------------------------------------------------
    def scenes(self, sensor: str | None = None) -> list[Scene]:
        """Every indexed scene (of ``sensor``, a family or a sensor key), sorted by time then id."""
        match = _sensor_matcher(sensor)
        return sorted(
            (e.scene for e in self._entries.values() if match(e.scene.sensor)), key=lambda s: (s.datetime, s.id)
        )

    def search(
        self, region: Region | None, start: dt.date | None, end: dt.date | None, sensor: str | None
    ) -> list[Scene]:
        """Scenes over ``region`` (all when None) within [start, end]; undated layouts ignore the window."""
        out = self.scenes(sensor)
        if region is not None:
            aoi = box(*region.lonlat_bounds())
            out = [s for s in out if shape(s.footprint).intersects(aoi)]
        undated = [s for s in out if not s.properties["date_known"]]
        if undated and (start or end):
            layouts = sorted({s.properties["layout"] for s in undated})
            log.warning(
                "local layout(s) %s carry no acquisition dates in their file names: the window %s..%s is ignored for "
                "%d scene(s) "
                "(their dates are stable pseudo-dates)",
                ", ".join(layouts),
                start,
                end,
                len(undated),
            )
        return [s for s in out if not s.properties["date_known"] or _in_window(s.date, start, end)]

    def read(self, scene: Scene, grid: Grid, bands: Sequence[str] | None = None) -> xr.DataArray:
        entry = self._entries.get(scene.id)
        if entry is None:
            raise SourceError(
                f"scene {scene.id!r} is not in the local index of {self.root}; search this source for it first"
            )
        sensor = get_sensor(entry.scene.sensor)
        names = tuple(entry.bands) if bands is None else tuple(bands)
        missing = [b for b in names if b not in entry.bands]
        if missing:
            raise SourceError(f"scene {scene.id} has no band(s) {missing} on disk; it has: {', '.join(entry.bands)}")

        # one task per (file, resampling): multi-band files are warped once, not once per band
        tasks: dict[tuple[Path, Resampling], list[str]] = defaultdict(list)
        for b in names:
            qa = sensor.band(b).units in _QA_UNITS
            tasks[(entry.bands[b].path, Resampling.nearest if qa else Resampling.bilinear)].append(b)
        pieces: dict[str, da.Array] = {}
        for (path, resampling), group in tasks.items():
            idx = [entry.bands[b].index for b in group]
            fill = [_qa_fill(sensor, b) for b in group]
            block = dask.delayed(_warp)(path, idx, grid, resampling, sensor.key, tuple(group), fill)
            arr = da.from_delayed(block, shape=(len(group), grid.height, grid.width), dtype=np.float32)
            pieces.update({b: arr[i] for i, b in enumerate(group)})
        data = da.stack([pieces[b] for b in names])
        return xr.DataArray(
            data,
            dims=("band", "y", "x"),
            coords={"band": list(names), **grid.coords()},
            attrs=raster_attrs(entry.scene, grid, simulated=False),
            name=entry.scene.id,
        )


def _qa_fill(sensor: Sensor, band: str) -> float:
    b = sensor.band(band)
    if b.units in _QA_UNITS and b.nodata is not None:
        return float(b.nodata)  # e.g. QA_PIXEL fill bit: masking sees "no data" as a code, not NaN
    return float("nan")


def _warp(
    path: Path,
    indexes: list[int],
    grid: Grid,
    resampling: Resampling,
    sensor_key: str,
    names: tuple[str, ...],
    fill: list[float],
) -> np.ndarray:
    sensor = SENSORS[sensor_key]
    try:
        with rasterio.open(path) as src:
            src_nodata = src.nodata
            if src_nodata is None:
                declared = {sensor.band(n).nodata for n in names if sensor.band(n).units not in _QA_UNITS}
                # SEN12MS-CR writes no nodata tag; a declared DN (0 for S2) is still fill, never a reflectance
                src_nodata = declared.pop() if len(declared) == 1 and None not in declared else None
            with WarpedVRT(
                src,
                crs=CRS.from_user_input(grid.crs),
                transform=grid.transform,
                width=grid.width,
                height=grid.height,
                resampling=resampling,
                src_nodata=src_nodata,
                nodata=np.nan,
                dtype="float32",
            ) as vrt:
                dn = vrt.read(indexes)
    except RasterioError as exc:
        raise DataError(
            f"{path}: cannot read pixels ({_describe(exc)}); the file is truncated or corrupt - re-download it"
        ) from None
    out = np.empty_like(dn, dtype=np.float32)
    for i, name in enumerate(names):
        out[i] = to_physical(sensor, name, dn[i])
        if not np.isnan(fill[i]):
            out[i][np.isnan(dn[i])] = fill[i]
    return out


def _sensor_matcher(sensor: str | None):
    if sensor is None:
        return lambda key: True
    if sensor in SENSORS:
        return lambda key: key == sensor
    family = get_sensor(sensor).family  # a family (s1|s2|landsat), or the clear "unknown sensor" error
    return lambda key: SENSORS[key].family == family


def _in_window(day: dt.date, start: dt.date | None, end: dt.date | None) -> bool:
    return (start is None or day >= start) and (end is None or day <= end)
