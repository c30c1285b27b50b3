"""QGIS-ready outputs: GDAL colour metadata in the rasters, ``.qml`` sidecars and a ``.qgs`` project per run.

Measured with QGIS 3.22 (tests/reconstruct/test_qgis.py runs it where PyQGIS is installed):

* Its default multiband renderer takes bands 1/2/3 (the ``/Raster/defaultRedBand`` settings) with a 2-98 %
  cumulative cut per band, whatever the bands' GDAL colour interpretation says; newer QGIS releases still do. So
  the true-colour view (B4/B3/B2, one fixed 0-0.3 reflectance stretch for all three bands, which keeps grey grey)
  comes from the ``<name>.qml`` sidecar, which QGIS loads as the default style of ``<name>.tif``. The R/G/B
  colour interpretation is still written (``apply_gdal_styling``): other GDAL clients read it, it costs nothing.
* QGIS applies a band's GDAL scale/offset before rendering (a uint16 DN band with scale 1e-4 becomes Float32
  reflectance), so the stretch is given in reflectance for uint16 DN files as well; only an integer file
  without a scale (raw DN) is stretched in DN.
* A paletted band (GDAL colour table) gets QGIS's paletted renderer, and it labels the classes with the band's
  GDAL category names. GeoTIFF keeps the colour table inside the file (it survives the COG copy); the category
  names only in the PAM sidecar ``<name>.tif.aux.xml``, which ``write_category_names`` writes next to the final
  COG (the COG driver does not carry PAM-only metadata, and the copy goes to a temp name anyway).

``apply_gdal_styling`` runs on the GTiff intermediate before its COG copy (``BlockWriter.commit`` calls it, so this
module must not import ``pipeline.reconstruct.cog``: the provenance classes are read from the file's
``PROVENANCE_CODES`` tag instead); ``style_run`` writes the sidecars and the project once a run's rasters are
committed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling

from pipeline.errors import DataError
from pipeline.files import atomic_output
from pipeline.sensors import SENSORS, Sensor

log = logging.getLogger(__name__)

REFLECTANCE = "reflectance"
PROVENANCE = "provenance"
SOURCE_DAYS = "source_days"
UNCERTAINTY = "uncertainty"
KINDS = (REFLECTANCE, PROVENANCE, SOURCE_DAYS, UNCERTAINTY)
# file name suffix of each kind after the run's stem (pipeline.reconstruct.run.OutputPaths)
SUFFIXES = {REFLECTANCE: ".tif", PROVENANCE: "_provenance.tif", SOURCE_DAYS: "_source_days.tif",
            UNCERTAINTY: "_uncertainty.tif"}
# top to bottom in the project's layer tree: the image at the bottom and the only layer switched on (the others are
# opaque: shown over it when switched on)
PROJECT_ORDER = (PROVENANCE, SOURCE_DAYS, UNCERTAINTY, REFLECTANCE)

REFLECTANCE_STRETCH = (0.0, 0.3)  # surface reflectance shown black..white: the usual S2 true-colour range
# Provenance colours: the observed majority recedes (light grey); what was not observed stands out.
PROVENANCE_COLOURS = {
    0: (190, 190, 190),  # observed clear
    1: (31, 120, 180),  # filled from another date: blue
    2: (255, 127, 0),  # predicted by a model: orange
    3: (231, 41, 138),  # no clear observation: magenta
}
# viridis (dark -> light) for source days, magma for uncertainty: perceptually ordered, readable in grey
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
MAGMA = ((0, 0, 4), (81, 18, 124), (183, 55, 121), (252, 137, 97), (252, 253, 191))
UNCERTAINTY_FALLBACK_MAX = 0.05  # reflectance std when the file holds no valid value to scale by
QGIS_VERSION = "3.22.0-Białowieża"  # the release the XML below is written for and tested with
_DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"


class _Spec(Protocol):
    """What ``kind_of`` needs of a ``pipeline.reconstruct.cog.RasterSpec`` (not imported: cog.py calls this module)."""

    @property
    def bands(self) -> tuple[str, ...]: ...


# --- kinds -------------------------------------------------------------------------------------------------------


def kind_of(spec: _Spec) -> str:
    """Which output a ``RasterSpec`` describes (its band names say it)."""
    if spec.bands == ("provenance",):
        return PROVENANCE
    if spec.bands == ("source_days",):
        return SOURCE_DAYS
    if spec.bands and all(b.endswith("_std") for b in spec.bands):
        return UNCERTAINTY
    return REFLECTANCE


def kind_of_path(path: str | Path) -> str:
    """Which output a file of a run is, from its name (``<stem>_provenance.tif`` ...; anything else: the image)."""
    name = Path(path).name
    for kind in (PROVENANCE, SOURCE_DAYS, UNCERTAINTY):
        if name.endswith(SUFFIXES[kind]):
            return kind
    return REFLECTANCE


def _check_kind(kind: str | _Spec) -> str:
    k = kind if isinstance(kind, str) else kind_of(kind)
    if k not in KINDS:
        raise ValueError(f"unknown output kind {k!r}; use one of {KINDS}")
    return k


def _rgb_sensor(descriptions: Sequence[str | None]) -> tuple[Sensor, tuple[int, int, int]] | None:
    names = [d or "" for d in descriptions]
    for sensor in SENSORS.values():
        if sensor.rgb and all(b in names for b in sensor.rgb):
            r, g, b = (names.index(x) + 1 for x in sensor.rgb)
            return sensor, (r, g, b)
    return None


def rgb_bands(descriptions: Sequence[str | None]) -> tuple[int, int, int] | None:
    """1-based (red, green, blue) band numbers of a known sensor's true-colour bands among ``descriptions``."""
    found = _rgb_sensor(descriptions)
    return found[1] if found else None


def provenance_codes(ds: rasterio.io.DatasetReader) -> dict[int, str]:
    """The classes a provenance raster declares in its ``PROVENANCE_CODES`` tag (``0=observed clear,...``), nodata
    left out. Read from the file so the legend says what the writer meant (pipeline.reconstruct.cog owns the codes)."""
    tag = ds.tags().get("PROVENANCE_CODES")
    if not tag:
        raise DataError(f"{ds.name}: no PROVENANCE_CODES tag, so not a cloudfree provenance raster; "
                        "style it as another kind or rewrite it with cloudfree reconstruct")
    codes = {}
    for item in tag.split(","):
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise DataError(f"{ds.name}: PROVENANCE_CODES item {item!r} is not 'value=name'; "
                            "rewrite the file with cloudfree reconstruct")
        codes[int(value)] = name.strip()
    return {k: v for k, v in sorted(codes.items()) if ds.nodata is None or k != int(ds.nodata)}


def _provenance_colour(value: int) -> tuple[int, int, int]:
    if value not in PROVENANCE_COLOURS:
        log.warning("provenance class %d has no colour in pipeline.reconstruct.styles; drawn dark grey", value)
    return PROVENANCE_COLOURS.get(value, (64, 64, 64))


# --- GDAL metadata -------------------------------------------------------------------------------------------------


def apply_gdal_styling(path: str | Path, kind: str | _Spec) -> None:
    """Colour metadata GDAL keeps inside the GeoTIFF (and the COG copy carries over): R/G/B colour interpretation
    of the true-colour bands of an image, the colour table of provenance. Idempotent; a no-op for source days and
    uncertainty (plain single-value bands). Meant for the GTiff intermediate before its COG copy."""
    kind = _check_kind(kind)
    if kind not in (REFLECTANCE, PROVENANCE):
        return
    with rasterio.open(path, "r+") as ds:
        if kind == PROVENANCE:
            if "PROVENANCE_CODES" not in ds.tags():
                # cosmetic: never fail a commit for it (write_qml of such a file does fail, naming the tag)
                log.warning("%s: no PROVENANCE_CODES tag; no colour table written", path)
                return
            ds.write_colormap(1, provenance_colormap(provenance_codes(ds), ds.nodata))
            return
        rgb = rgb_bands(ds.descriptions)
        if rgb is None:
            log.info("%s: no known sensor's red/green/blue bands among %s; colour interpretation left as is",
                     path, ds.descriptions)
            return
        interp = [ColorInterp.undefined] * ds.count
        for band, ci in zip(rgb, (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
            interp[band - 1] = ci
        ds.colorinterp = interp


def provenance_colormap(codes: Iterable[int], nodata: float | None) -> dict[int, tuple[int, int, int, int]]:
    """GDAL colour table of the provenance band: the classes' colours, nodata transparent."""
    table: dict[int, tuple[int, int, int, int]] = {k: (*_provenance_colour(k), 255) for k in codes}
    if nodata is not None:
        table[int(nodata)] = (0, 0, 0, 0)
    return table


def write_category_names(path: str | Path) -> Path:
    """The provenance classes' names as GDAL category names, in the PAM sidecar ``<path>.aux.xml`` (GeoTIFF has no
    tag for them). QGIS labels the colour table's classes with them.

    The sidecar is written whole: the raster beside it was just replaced, so anything an older sidecar held
    (statistics, say) described another file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such raster to name the provenance classes of; write it first")
    with rasterio.open(path) as ds:
        codes = provenance_codes(ds)
    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    names = ET.SubElement(band, "CategoryNames")
    # GDAL's category list is indexed by pixel value; values without a class get an empty name
    for value in range(max(codes, default=-1) + 1):
        ET.SubElement(names, "Category").text = codes.get(value, "")
    aux = path.with_name(path.name + ".aux.xml")
    _write_xml(aux, root)
    return aux


# --- .qml styles ---------------------------------------------------------------------------------------------------


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _num(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def _min_max_origin(parent: ET.Element) -> None:
    # limits None: QGIS keeps the given min/max instead of recomputing a cumulative cut on load
    mmo = ET.SubElement(parent, "minMaxOrigin")
    for tag, text in (("limits", "None"), ("extent", "WholeRaster"), ("statAccuracy", "Estimated"),
                      ("cumulativeCutLower", "0.02"), ("cumulativeCutUpper", "0.98"), ("stdDevFactor", "2")):
        ET.SubElement(mmo, tag).text = text


def _contrast(parent: ET.Element, tag: str, lo: float, hi: float) -> None:
    ce = ET.SubElement(parent, tag)
    ET.SubElement(ce, "minValue").text = _num(lo)
    ET.SubElement(ce, "maxValue").text = _num(hi)
    ET.SubElement(ce, "algorithm").text = "StretchToMinimumMaximum"


def _renderer(pipe: ET.Element, type_: str, **attrs: str) -> ET.Element:
    r = ET.SubElement(pipe, "rasterrenderer", {"type": type_, "opacity": "1", "alphaBand": "-1", "nodataColor": "",
                                               **attrs})
    ET.SubElement(r, "rasterTransparency")
    _min_max_origin(r)
    return r


def _ramp_items(shader: ET.Element, stops: Sequence[float], colours: Sequence[Sequence[int]],
                labels: Sequence[str]) -> None:
    for v, c, label in zip(stops, colours, labels):
        ET.SubElement(shader, "item", value=_num(v), color=_hex(c), alpha="255", label=label)


def _pseudocolour(pipe: ET.Element, band: int, stops: Sequence[float], ramp: Sequence[Sequence[int]],
                  labels: Sequence[str], precision: int) -> ET.Element:
    lo, hi = stops[0], stops[-1]
    r = _renderer(pipe, "singlebandpseudocolor", band=str(band), classificationMin=_num(lo),
                  classificationMax=_num(hi))
    shader = ET.SubElement(ET.SubElement(r, "rastershader"), "colorrampshader", colorRampType="INTERPOLATED",
                           classificationMode="1", clip="0", minimumValue=_num(lo), maximumValue=_num(hi),
                           labelPrecision=str(precision))
    _ramp_items(shader, stops, ramp, labels)
    return r


def reflectance_stretch(ds: rasterio.io.DatasetReader, band: int) -> tuple[float, float]:
    """``REFLECTANCE_STRETCH`` in the values QGIS shows for ``band``: reflectance where the band is float or carries
    a scale/offset (QGIS applies it); for an integer band without one, the sensor's DN (S2: reflectance x 10000)."""
    scale, offset = ds.scales[band - 1], ds.offsets[band - 1]
    lo, hi = REFLECTANCE_STRETCH
    unscaled = math.isclose(scale, 1.0) and math.isclose(offset, 0.0)
    found = _rgb_sensor(ds.descriptions)
    name = ds.descriptions[band - 1] or ""
    if unscaled and found and name in found[0].band_names and np.issubdtype(np.dtype(ds.dtypes[band - 1]), np.integer):
        b = found[0].band(name)
        return round((lo - b.offset) / b.scale, 6), round((hi - b.offset) / b.scale, 6)
    return lo, hi


def _band_max(ds: rasterio.io.DatasetReader, band: int) -> float | None:
    """Largest valid value of a band, block by block (bounded memory)."""
    best: float | None = None
    for _, window in ds.block_windows(band):
        v = ds.read(band, window=window, masked=True)
        if v.count():
            m = float(v.max())
            best = m if best is None else max(best, m)
    return best


def _decimated_percentile(ds: rasterio.io.DatasetReader, band: int, q: float, side: int = 1024) -> float | None:
    """Percentile ``q`` of a band read at most ``side`` pixels across (through the COG's overviews)."""
    f = max(1, math.ceil(max(ds.width, ds.height) / side))
    shape = (max(1, ds.height // f), max(1, ds.width // f))
    v = ds.read(band, out_shape=shape, resampling=Resampling.nearest, masked=True).astype(np.float64)
    valid = v.compressed()
    valid = valid[np.isfinite(valid)]
    return float(np.percentile(valid, q)) if valid.size else None


def _nice_ceil(v: float) -> float:
    """``v`` rounded up to two significant digits (a legend reads 0.034, not 0.03371)."""
    if v <= 0:
        return v
    step = 10 ** (math.floor(math.log10(v)) - 1)
    return round(math.ceil(v / step - 1e-9) * step, 12)


def _pipe(path: Path, kind: str) -> tuple[ET.Element, str]:
    """The ``<pipe>`` (renderer) of one output and the layer name it should get."""
    st = path.stat()
    xml, name = _pipe_xml(str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size, kind)
    return ET.fromstring(xml), name


@functools.lru_cache(maxsize=32)
def _pipe_xml(path_str: str, inode: int, mtime_ns: int, size: int, kind: str) -> tuple[str, str]:
    # keyed on the file's identity: the .qml and the .qgs of a run share one scan of each raster
    pipe, name = _build_pipe(Path(path_str), kind)
    return ET.tostring(pipe, encoding="unicode"), name


def _build_pipe(path: Path, kind: str) -> tuple[ET.Element, str]:
    pipe = ET.Element("pipe")
    provider = ET.SubElement(pipe, "provider")
    ET.SubElement(provider, "resampling", enabled="false", maxOversampling="2",
                  zoomedInResamplingMethod="nearestNeighbour", zoomedOutResamplingMethod="nearestNeighbour")
    with rasterio.open(path) as ds:
        if kind == REFLECTANCE:
            rgb = rgb_bands(ds.descriptions)
            if rgb is None:
                if ds.count < 3:
                    raise DataError(f"{path}: {ds.count} band(s) and no known red/green/blue bands among "
                                    f"{ds.descriptions}; a reflectance output needs them for a colour view")
                log.warning("%s: no known red/green/blue bands among %s; styling bands 1/2/3", path, ds.descriptions)
                rgb = (1, 2, 3)
            r = _renderer(pipe, "multibandcolor", redBand=str(rgb[0]), greenBand=str(rgb[1]), blueBand=str(rgb[2]))
            for band, tag in zip(rgb, ("red", "green", "blue")):
                _contrast(r, f"{tag}ContrastEnhancement", *reflectance_stretch(ds, band))
            names = [ds.descriptions[b - 1] or str(b) for b in rgb]
            name = f"{path.stem} true colour ({'/'.join(names)})"
        elif kind == PROVENANCE:
            r = _renderer(pipe, "paletted", band="1")
            palette = ET.SubElement(r, "colorPalette")
            for value, label in provenance_codes(ds).items():
                ET.SubElement(palette, "paletteEntry", value=str(value), color=_hex(_provenance_colour(value)),
                              alpha="255", label=label)
            name = path.stem
        elif kind == SOURCE_DAYS:
            oldest = max(1, int(_band_max(ds, 1) or 0))
            # whole days: a stop's label is its value (few stops when the oldest source is only days old)
            days = np.unique(np.round(np.linspace(0, oldest, len(VIRIDIS)))).astype(int).tolist()
            ramp = [VIRIDIS[round(i)] for i in np.linspace(0, len(VIRIDIS) - 1, len(days))]
            labels = ["0 days (observed on the date)"] + [f"{d} day{'s' if d > 1 else ''} before" for d in days[1:]]
            _pseudocolour(pipe, 1, days, ramp, labels, 0)
            name = f"{path.stem} (days before the date)"
        else:
            names = [d or "" for d in ds.descriptions]
            red = rgb_bands([n.removesuffix("_std") for n in names])
            band = red[0] if red else 1
            p98 = _decimated_percentile(ds, band, 98.0)
            top = _nice_ceil(p98) if p98 and p98 > 0 else UNCERTAINTY_FALLBACK_MAX
            stops = np.linspace(0.0, top, len(MAGMA)).tolist()
            _pseudocolour(pipe, band, stops, MAGMA, [f"{s:.3g}" for s in stops], 4)
            name = f"{path.stem} ({names[band - 1] or f'band {band}'}, reflectance std)"
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0", invertColors="0", colorizeOn="0",
                  colorizeRed="255", colorizeGreen="128", colorizeBlue="128", colorizeStrength="100")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(pipe, "resamplingStage").text = "resamplingFilter"
    return pipe, name


def qml_element(path: str | Path, kind: str | None = None) -> ET.Element:
    """The QGIS 3 layer style (``<qgis>`` root) of one output raster; ``kind`` defaults to the file name's."""
    path = Path(path)
    kind = _check_kind(kind or kind_of_path(path))
    root = ET.Element("qgis", version=QGIS_VERSION, styleCategories="AllStyleCategories",
                      hasScaleBasedVisibilityFlag="0", maxScale="0", minScale="1e+08")
    pipe, _ = _pipe(path, kind)
    root.append(pipe)
    ET.SubElement(root, "blendMode").text = "0"
    return root


def qml_path(path: str | Path) -> Path:
    """Where QGIS looks for a raster's default style: ``<name>.qml`` beside ``<name>.tif``."""
    path = Path(path)
    return path.with_suffix(".qml")


def write_qml(path: str | Path, kind: str | None = None) -> Path:
    """Write the ``.qml`` default style beside ``path`` (and, for provenance, the category names' PAM sidecar)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such raster to style; run reconstruct first or check the path")
    kind = _check_kind(kind or kind_of_path(path))
    out = qml_path(path)
    _write_xml(out, qml_element(path, kind), doctype=True)
    if kind == PROVENANCE:
        write_category_names(path)
    return out


# --- .qgs project --------------------------------------------------------------------------------------------------


def _spatialrefsys(parent: ET.Element, crs: rasterio.crs.CRS) -> None:
    srs = ET.SubElement(parent, "spatialrefsys")
    # QGIS reads the WKT when no internal srsid is given: lossless, unlike proj4
    ET.SubElement(srs, "wkt").text = crs.to_wkt(version="WKT2_2019")
    ET.SubElement(srs, "proj4").text = crs.to_proj4()
    epsg = crs.to_epsg()
    ET.SubElement(srs, "srid").text = str(epsg or 0)
    ET.SubElement(srs, "authid").text = f"EPSG:{epsg}" if epsg else ""
    ET.SubElement(srs, "description").text = crs.to_dict(projjson=True).get("name", "") if epsg else ""
    ET.SubElement(srs, "geographicflag").text = str(bool(crs.is_geographic)).lower()


def _rect(parent: ET.Element, tag: str, bounds: Sequence[float]) -> ET.Element:
    e = ET.SubElement(parent, tag)
    for k, v in zip(("xmin", "ymin", "xmax", "ymax"), bounds):
        ET.SubElement(e, k).text = repr(float(v))
    return e


def _layer_id(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", path.stem)


def run_layers(out_dir: str | Path, stem: str) -> list[Path]:
    """The rasters of run ``stem`` that exist in ``out_dir``, top to bottom of the project's layer tree, as absolute
    paths (a relative ``out_dir`` such as the demo's ``out/demo`` must not be joined onto itself again)."""
    out_dir = Path(out_dir).absolute()
    files = [out_dir / f"{stem}{SUFFIXES[k]}" for k in PROJECT_ORDER]
    return [f for f in files if f.exists()]


def write_project(out_dir: str | Path, stem: str, layers: Iterable[str | Path] | None = None) -> Path:
    """``<out_dir>/<stem>.qgs``: a QGIS project with every raster of the run (``layers``, default all that exist),
    each with its style, CRS and extent from the raster, paths relative to the project (the folder can move).
    Only the image is switched on; provenance, source days and uncertainty sit above it, off. A relative path in
    ``layers`` is relative to ``out_dir``."""
    out_dir = Path(out_dir).absolute()
    given = run_layers(out_dir, stem) if layers is None else [Path(p) for p in layers]
    paths = [p if p.is_absolute() else out_dir / p for p in given]
    if not paths:
        raise DataError(f"{out_dir}: no rasters of run {stem!r} to put in a QGIS project; run reconstruct first")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"QGIS project {stem}: raster(s) {', '.join(missing)} do not exist; write them first")
    order = {k: i for i, k in enumerate(PROJECT_ORDER)}
    paths = sorted(paths, key=lambda p: order[kind_of_path(p)])
    infos = []
    for p in paths:
        with rasterio.open(p) as ds:
            if ds.crs is None:
                raise DataError(f"{p}: no CRS; a QGIS project needs georeferenced rasters (rewrite it with a CRS)")
            infos.append((p, kind_of_path(p), ds.crs, tuple(ds.bounds), ds.count))
    crs0 = infos[0][2]
    bounds = np.array([b for *_, b, _ in infos])
    full = (bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max())

    root = ET.Element("qgis", version=QGIS_VERSION, projectname=stem, saveUser="cloudfree", saveUserFull="cloudfree")
    ET.SubElement(root, "homePath", path="")
    ET.SubElement(root, "title").text = stem
    _spatialrefsys(ET.SubElement(root, "projectCrs"), crs0)
    tree = ET.SubElement(root, "layer-tree-group")
    ET.SubElement(tree, "customproperties")
    project_layers = ET.Element("projectlayers")
    for p, kind, crs, b, count in infos:  # top layer first, as QGIS lists a layer tree
        rel = "./" + os.path.relpath(p.resolve(), out_dir.resolve()).replace(os.sep, "/")
        lid = _layer_id(p)
        pipe, name = _pipe(p, kind)
        node = ET.SubElement(tree, "layer-tree-layer", id=lid, name=name, source=rel, providerKey="gdal",
                             checked="Qt::Checked" if kind == REFLECTANCE else "Qt::Unchecked",
                             expanded="1" if kind == PROVENANCE else "0", legend_exp="", patch_size="-1,-1",
                             legend_split_behavior="0")
        ET.SubElement(node, "customproperties")
        ml = ET.SubElement(project_layers, "maplayer", type="raster", styleCategories="AllStyleCategories",
                           hasScaleBasedVisibilityFlag="0", maxScale="0", minScale="1e+08", autoRefreshEnabled="0",
                           autoRefreshTime="0", refreshOnNotifyEnabled="0", refreshOnNotifyMessage="",
                           legendPlaceholderImage="")
        _rect(ml, "extent", b)
        ET.SubElement(ml, "id").text = lid
        ET.SubElement(ml, "datasource").text = rel
        ET.SubElement(ET.SubElement(ml, "keywordList"), "value")
        ET.SubElement(ml, "layername").text = name
        _spatialrefsys(ET.SubElement(ml, "srs"), crs)
        ET.SubElement(ml, "provider").text = "gdal"
        nodata = ET.SubElement(ml, "noData")
        for band in range(1, count + 1):
            ET.SubElement(nodata, "noDataList", bandNo=str(band), useSrcNoData="1")
        style_manager = ET.SubElement(ml, "map-layer-style-manager", current="default")
        ET.SubElement(style_manager, "map-layer-style", name="default")
        ml.append(pipe)
        ET.SubElement(ml, "blendMode").text = "0"
    order_el = ET.SubElement(tree, "custom-order", enabled="0")
    for p, *_ in infos:
        ET.SubElement(order_el, "item").text = _layer_id(p)
    root.append(project_layers)
    layer_order = ET.SubElement(root, "layerorder")
    for p, *_ in infos:
        ET.SubElement(layer_order, "layer", id=_layer_id(p))

    canvas = ET.SubElement(root, "mapcanvas", name="theMapCanvas", annotationsVisible="1")
    ET.SubElement(canvas, "units").text = "degrees" if crs0.is_geographic else "meters"
    _rect(canvas, "extent", full)
    ET.SubElement(canvas, "rotation").text = "0"
    _spatialrefsys(ET.SubElement(canvas, "destinationsrs"), crs0)
    ET.SubElement(canvas, "rendermaptile").text = "0"
    props = ET.SubElement(root, "properties")
    ET.SubElement(ET.SubElement(props, "Paths"), "Absolute", type="bool").text = "false"
    ET.SubElement(ET.SubElement(props, "SpatialRefSys"), "ProjectionsEnabled", type="int").text = "1"
    view = ET.SubElement(root, "ProjectViewSettings", UseProjectScales="0", rotation="0")
    ET.SubElement(view, "Scales")
    extent = ET.SubElement(view, "DefaultViewExtent", xmin=repr(float(full[0])), ymin=repr(float(full[1])),
                           xmax=repr(float(full[2])), ymax=repr(float(full[3])))
    _spatialrefsys(extent, crs0)

    out = out_dir / f"{stem}.qgs"
    _write_xml(out, root, doctype=True)
    return out


def style_run(out_dir: str | Path, stem: str) -> list[Path]:
    """Every sidecar of a committed run: a ``.qml`` per raster (plus provenance's category names) and the
    ``<stem>.qgs`` project. Returns the files written."""
    rasters = run_layers(out_dir, stem)
    if not rasters:
        raise DataError(f"{out_dir}: no rasters of run {stem!r} to style; run reconstruct first")
    written = []
    for r in rasters:
        written.append(write_qml(r))
        if kind_of_path(r) == PROVENANCE:
            written.append(r.with_name(r.name + ".aux.xml"))
    written.append(write_project(out_dir, stem, rasters))
    return written


def _write_xml(path: Path, root: ET.Element, *, doctype: bool = False) -> None:
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode")
    with atomic_output(path) as tmp:
        tmp.write_text((_DOCTYPE if doctype else "") + text + "\n", encoding="utf-8")

