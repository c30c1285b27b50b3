"""The outputs in real QGIS: each raster dropped in as QGIS does (default style = the .qml beside it), the .qgs
project, and renders compared pixel by pixel with the expected true colour / palette.

PyQGIS is a system package (``apt-get install python3-qgis``), not in the venv, so the QGIS side runs in a
subprocess of ``/usr/bin/python3`` with ``QT_QPA_PLATFORM=offscreen``; skipped where it is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from PIL import Image

from pipeline.reconstruct import styles
from pipeline.reconstruct.cog import PROVENANCE_CODES
from tests.reconstruct.test_styles import OLDEST, S2, STEM, make_run

QGIS_PYTHON = os.environ.get("CLOUDFREE_QGIS_PYTHON", "/usr/bin/python3")

# Runs under QGIS's Python: argv[1] is JSON {"rasters": [[path, png or null], ...], "project": path or null}.
# Prints one line "QGIS_JSON {...}": per raster what QGIS's default load made of it, and the project as read.
PROBE = r'''
import json, sys
from qgis.core import QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor

args = json.loads(sys.argv[1])
app = QgsApplication([], False)
app.initQgis()


def describe(layer):
    r, dp = layer.renderer(), layer.dataProvider()
    ext = layer.extent()
    d = {"valid": layer.isValid(), "name": layer.name(), "renderer": r.type() if r else None,
         "crs": layer.crs().authid(), "extent": [ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum()],
         "colorinterp": [dp.colorInterpretationName(i) for i in range(1, dp.bandCount() + 1)],
         "datatype": int(dp.dataType(1)), "source": layer.source()}
    if d["renderer"] == "multibandcolor":
        ces = (r.redContrastEnhancement(), r.greenContrastEnhancement(), r.blueContrastEnhancement())
        d["bands"] = [r.redBand(), r.greenBand(), r.blueBand()]
        d["stretch"] = [[ce.minimumValue(), ce.maximumValue()] for ce in ces]
    elif d["renderer"] == "paletted":
        d["classes"] = [[c.value, c.label, c.color.name(), c.color.alpha()] for c in r.classes()]
    elif d["renderer"] == "singlebandpseudocolor":
        sh = r.shader().rasterShaderFunction()
        d["band"] = r.band()
        d["range"] = [sh.minimumValue(), sh.maximumValue()]
        d["items"] = [[i.value, i.label, i.color.name()] for i in sh.colorRampItemList()]
    return d


def render(layer, png):
    # one output pixel per raster pixel, so a render can be compared with the data
    ms = QgsMapSettings()
    ms.setLayers([layer])
    ms.setDestinationCrs(layer.crs())
    ms.setOutputSize(QSize(layer.width(), layer.height()))
    ms.setExtent(layer.extent())
    ms.setBackgroundColor(QColor(255, 255, 255))
    job = QgsMapRendererParallelJob(ms)
    job.start()
    job.waitForFinished()
    return job.renderedImage().save(png)


def main():
    out = {"layers": {}, "project": None}
    for path, png in args["rasters"]:
        layer = QgsRasterLayer(path, path.rsplit("/", 1)[-1])  # as a drag-and-drop: loads <name>.qml if there
        out["layers"][path] = describe(layer)
        if png:
            out["layers"][path]["rendered"] = render(layer, png)
    if args.get("project"):
        project = QgsProject.instance()
        ok = project.read(args["project"])
        ve = project.viewSettings().defaultViewExtent()
        out["project"] = {
            "read": ok, "crs": project.crs().authid(),
            "view_extent": [ve.xMinimum(), ve.yMinimum(), ve.xMaximum(), ve.yMaximum()],
            "layers": [dict(describe(t.layer()), visible=t.isVisible()) for t in project.layerTreeRoot().findLayers()]}
        project.clear()
    return out


# every layer is gone before exitQgis (PyQGIS 3.22 segfaults when one outlives the application)
print("QGIS_JSON " + json.dumps(main()), flush=True)
app.exitQgis()
'''


@pytest.fixture(scope="module")
def qgis_python() -> str:
    try:
        probe = subprocess.run([QGIS_PYTHON, "-c", "import qgis.core"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"PyQGIS not available: {QGIS_PYTHON} cannot run ({exc}); apt-get install python3-qgis")
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"PyQGIS not available under {QGIS_PYTHON} ({last}); apt-get install python3-qgis")
    return QGIS_PYTHON


def run_qgis(python: str, rasters: list[tuple[Path, Path | None]], project: Path | None = None) -> dict[str, Any]:
    """PROBE under QGIS's Python; its JSON answer."""
    args = {"rasters": [[str(r), str(p) if p else None] for r, p in rasters],
            "project": str(project) if project else None}
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([python, "-c", PROBE, json.dumps(args)], capture_output=True, text=True, timeout=180,
                          env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("QGIS_JSON ")]
    assert proc.returncode == 0 and lines, f"QGIS probe failed ({proc.returncode}): {proc.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1][len("QGIS_JSON "):])
    return result


@pytest.fixture(scope="module")
def qgis_run(qgis_python, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """Float32 and uint16 runs, a provenance without its .qml, one QGIS session for all of it."""
    root = tmp_path_factory.mktemp("qgis")
    f32, u16, bare = root / "f32", root / "u16", root / "bare"
    make_run(f32)
    make_run(u16, "uint16", uncertainty=False)
    bare.mkdir()
    prov = f32 / f"{STEM}_provenance.tif"
    for f in (prov, prov.with_name(prov.name + ".aux.xml")):  # GDAL styling only: colour table + category names
        shutil.copy(f, bare / f.name)
    renders = root / "renders"
    renders.mkdir()
    rasters: list[tuple[Path, Path | None]] = []
    for run in (f32, u16):
        for tif in styles.run_layers(run, STEM):
            rasters.append((tif, renders / f"{run.name}_{styles.kind_of_path(tif)}.png"))
    rasters.append((bare / prov.name, None))
    result = run_qgis(qgis_python, rasters, project=f32 / f"{STEM}.qgs")
    return root, result


def _layer(result: dict[str, Any], path: Path) -> dict[str, Any]:
    d: dict[str, Any] = result["layers"][str(path)]
    assert d["valid"], f"QGIS cannot open {path}"
    return d


@pytest.mark.parametrize("run", ["f32", "u16"])
def test_qgis_default_style_is_true_colour_with_a_fixed_stretch(qgis_run, run):
    root, result = qgis_run
    tif = root / run / f"{STEM}.tif"
    d = _layer(result, tif)
    assert d["renderer"] == "multibandcolor"
    assert d["bands"] == [S2.index("B4") + 1, S2.index("B3") + 1, S2.index("B2") + 1]
    assert d["stretch"] == [[0.0, 0.3]] * 3  # reflectance for uint16 too: QGIS applies the file's scale
    assert d["colorinterp"][S2.index("B4")] == "Red" and d["colorinterp"][S2.index("B2")] == "Blue"
    # the render, pixel by pixel: R/G/B = B4/B3/B2 stretched 0..0.3 reflectance, nodata transparent (white)
    png = np.asarray(Image.open(root / "renders" / f"{run}_reflectance.png").convert("RGB")).astype(int)
    with rasterio.open(tif) as ds:
        v = ds.read([S2.index(b) + 1 for b in ("B4", "B3", "B2")], masked=True).astype(np.float64)
        if ds.dtypes[0] == "uint16":
            v = v * ds.scales[0] + ds.offsets[0]
    expected = np.clip(np.floor(v / 0.3 * 255), 0, 255).filled(255).transpose(1, 2, 0)
    assert png.shape == expected.shape
    off = np.abs(png - expected).max(axis=2) > 1
    assert off.mean() < 0.005, f"{off.mean():.1%} of the pixels differ from the true-colour stretch"


def test_qgis_provenance_is_paletted_with_named_classes_and_renders_in_them(qgis_run):
    root, result = qgis_run
    d = _layer(result, root / "f32" / f"{STEM}_provenance.tif")
    assert d["renderer"] == "paletted"
    colours = {v: styles._hex(c) for v, c in styles.PROVENANCE_COLOURS.items()}
    assert [(int(v), label, colour) for v, label, colour, _ in d["classes"]] == [
        (v, PROVENANCE_CODES[v], colours[v]) for v in range(4)]
    png = np.asarray(Image.open(root / "renders" / "f32_provenance.png").convert("RGB"))
    seen = {"#{:02x}{:02x}{:02x}".format(*c) for c in np.unique(png.reshape(-1, 3), axis=0)}
    assert seen == set(colours.values()) | {"#ffffff"}  # every class drawn in its colour, nodata transparent


def test_qgis_reads_the_gdal_colour_table_and_category_names_without_a_qml(qgis_run):
    root, result = qgis_run
    d = _layer(result, root / "bare" / f"{STEM}_provenance.tif")
    assert d["renderer"] == "paletted"
    named = {int(v): (label, colour) for v, label, colour, _ in d["classes"] if int(v) < 4}
    assert named == {v: (PROVENANCE_CODES[v], styles._hex(c)) for v, c in styles.PROVENANCE_COLOURS.items()}


def test_qgis_source_days_and_uncertainty_ramps(qgis_run):
    root, result = qgis_run
    days = _layer(result, root / "f32" / f"{STEM}_source_days.tif")
    assert days["renderer"] == "singlebandpseudocolor" and days["range"] == [0.0, float(OLDEST)]
    assert days["items"][0][1] == "0 days (observed on the date)"
    std = _layer(result, root / "f32" / f"{STEM}_uncertainty.tif")
    assert std["renderer"] == "singlebandpseudocolor" and std["band"] == S2.index("B4") + 1
    for kind in ("source_days", "uncertainty"):
        png = np.asarray(Image.open(root / "renders" / f"f32_{kind}.png").convert("RGB"))
        assert len(np.unique(png.reshape(-1, 3), axis=0)) > 3  # a ramp, not one flat colour


def test_qgis_opens_the_project_with_every_layer_styled(qgis_run):
    root, result = qgis_run
    project = result["project"]
    assert project["read"] and project["crs"] == "EPSG:32649"
    with rasterio.open(root / "f32" / f"{STEM}.tif") as ds:
        bounds = list(ds.bounds)
    assert project["view_extent"] == pytest.approx(bounds)
    layers = project["layers"]
    assert [styles.kind_of_path(d["source"]) for d in layers] == ["provenance", "source_days", "uncertainty",
                                                                   "reflectance"]
    for d in layers:
        assert d["valid"] and d["crs"] == "EPSG:32649" and d["extent"] == pytest.approx(bounds)
        assert Path(d["source"]).resolve().parent == (root / "f32").resolve()
    by_kind = {styles.kind_of_path(d["source"]): d for d in layers}
    assert by_kind["reflectance"]["renderer"] == "multibandcolor" and by_kind["reflectance"]["bands"] == [4, 3, 2]
    assert by_kind["reflectance"]["visible"] and not by_kind["provenance"]["visible"]
    assert by_kind["provenance"]["renderer"] == "paletted"
    assert [c[1] for c in by_kind["provenance"]["classes"]] == [PROVENANCE_CODES[v] for v in range(4)]
    assert by_kind["source_days"]["renderer"] == "singlebandpseudocolor"
