"""QGIS-ready outputs at the GDAL/XML level: colour metadata surviving the COG copy, .qml sidecars, the .qgs project.

``make_run`` writes a run folder the way the intended integration does (``apply_gdal_styling`` on the intermediate
before ``BlockWriter.commit``, ``style_run`` after it); tests/reconstruct/test_qgis.py opens the same folder in QGIS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp

from pipeline.errors import DataError
from pipeline.grid import Grid
from pipeline.reconstruct import styles
from pipeline.reconstruct.cog import PROVENANCE_CODES, PROVENANCE_NODATA, BlockWriter, RasterSpec, validate_cog
from pipeline.sensors import get_sensor

GRID = Grid("EPSG:32649", Affine(10.0, 0.0, 750_000.0, 0.0, -10.0, 3_850_000.0), 240, 200)
STEM = "aoi_20210722_composite"
S2 = get_sensor("s2_l2a").reflectance_bands
OLDEST = 37  # source days: the oldest source date in the test run


def _write(path: Path, values: np.ndarray, spec: RasterSpec, grid: Grid = GRID) -> Path:
    """BlockWriter with the styling call the COG writer is to make before its COG copy."""
    w = BlockWriter(path, grid, spec)
    w.write(values, 0, 0, encoded=spec.dtype in ("uint8", "int16"))
    styles.apply_gdal_styling(w.partial, spec)
    return w.commit()


def run_values(grid: Grid = GRID, bands: int = len(S2)) -> dict[str, np.ndarray]:
    """Physical values of a run: independent random bands (a wrong band mapping shows), every provenance class."""
    rng = np.random.default_rng(7)
    h, w = grid.height, grid.width
    refl = rng.uniform(0.0, 0.35, (bands, h, w)).astype(np.float32)
    refl[:, :10, :12] = np.nan
    prov = rng.integers(0, 4, (h, w)).astype(np.uint8)
    prov[:10, :12] = 255
    days = np.where(prov == 1, rng.integers(1, OLDEST + 1, (h, w)), 0).astype(np.int16)
    days[prov == 3] = -1
    days[prov == 255] = -1
    days[0, -1] = OLDEST  # prov there is random: make sure the maximum is present
    std = rng.gamma(2.0, 0.01, (bands, h, w)).astype(np.float32)
    return {"refl": refl, "prov": prov, "days": days, "std": std}


def make_run(out: Path, dtype: str = "float32", *, uncertainty: bool = True, style: bool = True) -> dict[str, Path]:
    """A run folder like ``reconstruct`` writes (image, provenance, source days, optionally uncertainty)."""
    v = run_values()
    paths = {
        "reflectance": _write(out / f"{STEM}.tif", v["refl"], RasterSpec.reflectance(S2, dtype=dtype)),
        "provenance": _write(out / f"{STEM}_provenance.tif", v["prov"][None], RasterSpec.provenance()),
        "source_days": _write(out / f"{STEM}_source_days.tif", v["days"][None], RasterSpec.source_days()),
    }
    if uncertainty:
        paths["uncertainty"] = _write(out / f"{STEM}_uncertainty.tif", v["std"], RasterSpec.uncertainty(S2))
    if style:
        styles.style_run(out, STEM)
    return paths


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    make_run(out)
    return out


def _gdal_category_names(path: Path) -> list[str]:
    """GDALGetRasterCategoryNames through the libgdal rasterio loaded (no osgeo bindings here)."""
    wheel = glob.glob(os.path.join(os.path.dirname(rasterio.__file__), os.pardir, "rasterio.libs", "libgdal*.so*"))
    name = wheel[0] if wheel else ctypes.util.find_library("gdal")
    if not name:
        pytest.skip("no libgdal to load through ctypes (rasterio built against a libgdal not found by name)")
    lib = ctypes.CDLL(name)
    lib.GDALAllRegister()
    lib.GDALOpen.restype, lib.GDALOpen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    lib.GDALGetRasterBand.restype, lib.GDALGetRasterBand.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]
    lib.GDALGetMetadata.restype, lib.GDALGetMetadata.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
    lib.GDALGetRasterCategoryNames.restype = ctypes.POINTER(ctypes.c_char_p)
    lib.GDALGetRasterCategoryNames.argtypes = [ctypes.c_void_p]
    lib.GDALClose.argtypes = [ctypes.c_void_p]
    ds = lib.GDALOpen(str(path).encode(), 0)
    assert ds, f"GDAL cannot open {path}"
    try:
        band = lib.GDALGetRasterBand(ds, 1)
        # GDAL 3.10's GTiff reads the PAM sidecar lazily, on metadata access; QGIS asks for metadata first too
        lib.GDALGetMetadata(band, None)
        names = lib.GDALGetRasterCategoryNames(band)
        out: list[str] = []
        while names and names[len(out)] is not None:
            out.append(names[len(out)].decode())
        return out
    finally:
        lib.GDALClose(ds)


# --- GDAL metadata through the COG copy ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_reflectance_colour_interpretation_survives_the_cog_copy(tmp_path, dtype):
    paths = make_run(tmp_path, dtype, uncertainty=False, style=False)
    with rasterio.open(paths["reflectance"]) as ds:
        expected = [ColorInterp.undefined] * len(S2)
        expected[S2.index("B4")] = ColorInterp.red
        expected[S2.index("B3")] = ColorInterp.green
        expected[S2.index("B2")] = ColorInterp.blue
        assert list(ds.colorinterp) == expected
        assert ds.descriptions == S2
        if dtype == "uint16":
            assert ds.scales == (1e-4,) * len(S2) and ds.offsets == (0.0,) * len(S2)
    for p in paths.values():
        assert validate_cog(p).ok  # in-file metadata only: still a COG
    # no PAM sidecar or temp left behind by the styling: GDAL keeps it all inside the GeoTIFF
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


def test_provenance_colour_table_survives_the_cog_copy(tmp_path):
    paths = make_run(tmp_path, uncertainty=False, style=False)
    with rasterio.open(paths["provenance"]) as ds:
        assert ds.colorinterp == (ColorInterp.palette,)
        cmap = ds.colormap(1)
        for value, rgb in styles.PROVENANCE_COLOURS.items():
            assert cmap[value] == (*rgb, 255)
        assert ds.nodata == 255
    with rasterio.open(paths["source_days"]) as ds:
        assert ds.colorinterp == (ColorInterp.gray,)  # plain values: no palette


def test_provenance_category_names_are_read_by_gdal(run_dir):
    prov = run_dir / f"{STEM}_provenance.tif"
    names = _gdal_category_names(prov)
    assert names == [PROVENANCE_CODES[v] for v in range(4)]


def test_category_names_replace_a_stale_sidecar(tmp_path):
    paths = make_run(tmp_path, uncertainty=False, style=False)
    aux = paths["provenance"].with_name(paths["provenance"].name + ".aux.xml")
    aux.write_text('<PAMDataset><PAMRasterBand band="1"><Metadata><MDI key="STATISTICS_MAXIMUM">9</MDI>'
                   "</Metadata></PAMRasterBand></PAMDataset>")
    styles.write_category_names(paths["provenance"])
    with rasterio.open(paths["provenance"]) as ds:
        assert "STATISTICS_MAXIMUM" not in ds.tags(1)
    assert _gdal_category_names(paths["provenance"])[1] == "filled from another date"


def test_every_provenance_class_of_the_writer_has_a_colour():
    assert set(styles.PROVENANCE_COLOURS) == set(PROVENANCE_CODES) - {PROVENANCE_NODATA}
    colours = list(styles.PROVENANCE_COLOURS.values())
    assert len(set(colours)) == len(colours)


def test_a_provenance_raster_without_its_codes_tag_gets_no_palette_and_no_style(tmp_path, caplog):
    spec = RasterSpec(("provenance",), "uint8", 255, resampling="nearest")  # no PROVENANCE_CODES tag
    path = _write(tmp_path / "p_provenance.tif", np.zeros((1, GRID.height, GRID.width), np.uint8), spec)
    assert "no PROVENANCE_CODES tag" in caplog.text  # the commit went through
    with rasterio.open(path) as ds:
        assert ds.colorinterp == (ColorInterp.gray,)
    with pytest.raises(DataError, match="no PROVENANCE_CODES tag"):
        styles.write_qml(path)


def test_styling_other_outputs_is_a_no_op_and_unknown_kinds_fail(tmp_path):
    paths = make_run(tmp_path, uncertainty=True, style=False)
    with rasterio.open(paths["uncertainty"]) as ds:
        assert set(ds.colorinterp) <= {ColorInterp.gray, ColorInterp.undefined}
    with pytest.raises(ValueError, match="unknown output kind"):
        styles.apply_gdal_styling(paths["reflectance"], "rgb")


def test_kinds_from_specs_and_file_names():
    assert styles.kind_of(RasterSpec.reflectance(S2)) == "reflectance"
    assert styles.kind_of(RasterSpec.provenance()) == "provenance"
    assert styles.kind_of(RasterSpec.source_days()) == "source_days"
    assert styles.kind_of(RasterSpec.uncertainty(S2)) == "uncertainty"
    assert styles.kind_of_path(f"x/{STEM}_provenance.tif") == "provenance"
    assert styles.kind_of_path(f"x/{STEM}_uncertainty.tif") == "uncertainty"
    assert styles.kind_of_path(f"x/{STEM}.tif") == "reflectance"
    assert styles.rgb_bands(get_sensor("landsat").reflectance_bands) == (4, 3, 2)
    assert styles.rgb_bands(("SR_B2", "SR_B4", "SR_B3")) == (2, 3, 1)
    assert styles.rgb_bands(("VV", "VH")) is None


# --- .qml sidecars -------------------------------------------------------------------------------------------------


def _renderer(qml: Path) -> ET.Element:
    root = ET.parse(qml).getroot()
    assert root.tag == "qgis" and root.get("version", "").startswith("3.")
    r = root.find("pipe/rasterrenderer")
    assert r is not None
    return r


def _stretch(r: ET.Element, colour: str) -> tuple[float, float]:
    ce = r.find(f"{colour}ContrastEnhancement")
    assert ce is not None and ce.findtext("algorithm") == "StretchToMinimumMaximum"
    return float(ce.findtext("minValue", "nan")), float(ce.findtext("maxValue", "nan"))


def test_every_raster_gets_a_qml_named_as_qgis_looks_for_it(run_dir):
    tifs = sorted(p.name for p in run_dir.glob("*.tif"))
    qmls = sorted(p.name for p in run_dir.glob("*.qml"))
    assert qmls == sorted(t[: -len(".tif")] + ".qml" for t in tifs)


def test_reflectance_qml_is_true_colour_with_a_fixed_reflectance_stretch(run_dir):
    r = _renderer(run_dir / f"{STEM}.qml")
    assert r.get("type") == "multibandcolor"
    assert [int(r.get(k, 0)) for k in ("redBand", "greenBand", "blueBand")] == [4, 3, 2]
    assert r.findtext("minMaxOrigin/limits") == "None"  # QGIS keeps the stretch instead of recomputing a cut
    for colour in ("red", "green", "blue"):
        assert _stretch(r, colour) == (0.0, 0.3)


def test_uint16_stretch_is_in_reflectance_when_scaled_and_in_dn_when_not(tmp_path):
    v = run_values()["refl"][:3]
    scaled = _write(tmp_path / "scaled.tif", v, RasterSpec.reflectance(["B4", "B3", "B2"], dtype="uint16"))
    raw_spec = RasterSpec(("B2", "B3", "B4"), "uint16", 0)  # DN without scale/offset, bands in another order
    raw = _write(tmp_path / "raw.tif", np.nan_to_num(v * 1e4).astype(np.uint16), raw_spec)
    with rasterio.open(raw) as ds:
        assert list(ds.colorinterp) == [ColorInterp.blue, ColorInterp.green, ColorInterp.red]
    landsat = _write(tmp_path / "landsat.tif", np.full((3, GRID.height, GRID.width), 9000, np.uint16),
                     RasterSpec(("SR_B4", "SR_B3", "SR_B2"), "uint16", 0))
    r_scaled = _renderer(styles.write_qml(scaled, "reflectance"))
    r_raw = _renderer(styles.write_qml(raw, "reflectance"))
    assert _stretch(r_scaled, "red") == (0.0, 0.3)  # QGIS applies the file's scale before the stretch
    assert _stretch(r_raw, "red") == (0.0, 3000.0)  # S2 DN = reflectance x 10000
    assert [int(r_raw.get(k, 0)) for k in ("redBand", "greenBand", "blueBand")] == [3, 2, 1]
    # Landsat C2 L2 DN = (reflectance + 0.2) / 2.75e-5
    assert _stretch(_renderer(styles.write_qml(landsat, "reflectance")), "red") == pytest.approx((7272.73, 18181.82))


def test_provenance_qml_is_paletted_with_the_class_names(run_dir):
    r = _renderer(run_dir / f"{STEM}_provenance.qml")
    assert r.get("type") == "paletted" and r.get("band") == "1"
    entries = r.findall("colorPalette/paletteEntry")
    assert [(int(e.get("value", -1)), e.get("label")) for e in entries] == [(v, PROVENANCE_CODES[v]) for v in range(4)]
    assert [e.get("color") for e in entries] == [styles._hex(c) for c in styles.PROVENANCE_COLOURS.values()]
    assert len({e.get("color") for e in entries}) == 4


def test_source_days_qml_ramps_from_zero_to_the_oldest_source(run_dir):
    r = _renderer(run_dir / f"{STEM}_source_days.qml")
    assert r.get("type") == "singlebandpseudocolor"
    shader = r.find("rastershader/colorrampshader")
    assert shader is not None and shader.get("colorRampType") == "INTERPOLATED"
    items = shader.findall("item")
    values = [float(i.get("value", "nan")) for i in items]
    assert values[0] == 0 and values[-1] == OLDEST and values == sorted(values)
    assert all(v.is_integer() for v in values)
    assert items[-1].get("label") == f"{OLDEST} days before"
    # dark to light: luminance rises along the ramp
    lum = [np.dot([int(c[i : i + 2], 16) for i in (1, 3, 5)], [0.299, 0.587, 0.114]) for c in
           (i.get("color", "#000000") for i in items)]
    assert lum == sorted(lum)


def test_uncertainty_qml_shows_the_red_bands_std_up_to_its_98th_percentile(run_dir):
    r = _renderer(run_dir / f"{STEM}_uncertainty.qml")
    assert r.get("type") == "singlebandpseudocolor"
    assert int(r.get("band", 0)) == S2.index("B4") + 1
    with rasterio.open(run_dir / f"{STEM}_uncertainty.tif") as ds:
        p98 = float(np.percentile(ds.read(S2.index("B4") + 1, masked=True).compressed(), 98))
    top = float(r.get("classificationMax", "nan"))
    assert p98 <= top <= p98 * 1.15  # rounded up to two significant digits


def test_write_qml_of_a_missing_raster_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such raster"):
        styles.write_qml(tmp_path / "nope.tif")


# --- .qgs project --------------------------------------------------------------------------------------------------


def test_project_opens_every_raster_with_its_style_crs_and_extent(run_dir):
    qgs = run_dir / f"{STEM}.qgs"
    root = ET.parse(qgs).getroot()
    assert root.tag == "qgis"
    assert root.findtext("properties/Paths/Absolute") == "false"
    layers = root.findall("projectlayers/maplayer")
    kinds = {styles.kind_of_path(ml.findtext("datasource", "")): ml for ml in layers}
    assert set(kinds) == {"reflectance", "provenance", "source_days", "uncertainty"}
    for ml in kinds.values():
        source = ml.findtext("datasource", "")
        assert source.startswith("./")  # relative: the run folder can move
        raster = run_dir / source
        assert raster.exists()
        with rasterio.open(raster) as ds:
            assert ml.findtext("srs/spatialrefsys/authid") == f"EPSG:{ds.crs.to_epsg()}"
            assert ml.findtext("srs/spatialrefsys/wkt")
            extent = [float(ml.findtext(f"extent/{k}", "nan")) for k in ("xmin", "ymin", "xmax", "ymax")]
            assert extent == pytest.approx(list(ds.bounds))
        assert ml.findtext("provider") == "gdal"
        # the same renderer as the .qml sidecar
        qml_pipe = ET.parse(raster.with_suffix(".qml")).getroot().find("pipe")
        assert qml_pipe is not None
        pipe = ml.find("pipe")
        assert pipe is not None
        assert ET.canonicalize(ET.tostring(pipe), strip_text=True) == ET.canonicalize(ET.tostring(qml_pipe),
                                                                                      strip_text=True)
    tree = root.findall("layer-tree-group/layer-tree-layer")
    by_id = {ml.findtext("id"): styles.kind_of_path(ml.findtext("datasource", "")) for ml in layers}
    # top of the tree first: the overlays above the image, only the image switched on
    assert [by_id[t.get("id")] for t in tree] == ["provenance", "source_days", "uncertainty", "reflectance"]
    assert {by_id[t.get("id")]: t.get("checked") for t in tree}["reflectance"] == "Qt::Checked"
    assert sum(t.get("checked") == "Qt::Checked" for t in tree) == 1
    assert [by_id[e.get("id")] for e in root.findall("layerorder/layer")] == list(styles.PROJECT_ORDER)
    assert root.find("layer-tree-group/custom-order[@enabled='0']") is not None  # the tree's order draws
    view = root.find("ProjectViewSettings/DefaultViewExtent")
    assert view is not None
    assert [float(view.get(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")] == pytest.approx(list(GRID.bounds))
    assert root.findtext("projectCrs/spatialrefsys/authid") == "EPSG:32649"


def test_project_of_a_run_without_uncertainty_and_after_a_move(tmp_path):
    make_run(tmp_path / "a", uncertainty=False)
    shutil.move(tmp_path / "a", tmp_path / "b")
    root = ET.parse(tmp_path / "b" / f"{STEM}.qgs").getroot()
    sources = [ml.findtext("datasource", "") for ml in root.findall("projectlayers/maplayer")]
    assert len(sources) == 3 and all((tmp_path / "b" / s).exists() for s in sources)


def test_project_of_a_run_in_a_relative_folder(tmp_path, monkeypatch):
    """``make demo`` writes to ``out/demo``, relative to the checkout: the rasters are not looked for in
    ``out/demo/out/demo``, and the project points at its neighbours."""
    monkeypatch.chdir(tmp_path)
    make_run(Path("out") / "demo", uncertainty=False)
    root = ET.parse(tmp_path / "out" / "demo" / f"{STEM}.qgs").getroot()
    sources = [ml.findtext("datasource", "") for ml in root.findall("projectlayers/maplayer")]
    assert sorted(sources) == sorted(f"./{STEM}{k}.tif" for k in ("", "_provenance", "_source_days"))


def test_project_needs_rasters(tmp_path):
    with pytest.raises(DataError, match="no rasters of run"):
        styles.write_project(tmp_path, STEM)
    with pytest.raises(DataError, match="do not exist"):
        styles.write_project(tmp_path, STEM, [tmp_path / f"{STEM}.tif"])
