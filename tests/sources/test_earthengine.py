"""Earth Engine source, offline: expression graphs, scene listing, server-side fractions, auth, CLI.

Graphs are built by the real earthengine-api against its own recorded algorithm table
(``tests/ee_offline.py``) and compared with reviewed golden files in ``tests/data/ee_graphs``; set
``CLOUDFREE_UPDATE_EE_GRAPHS=1`` to rewrite them after an intended change (then review the diff).
Targeted assertions below pin the recipe facts a golden-file update could silently lose.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from pipeline.errors import SourceError
from pipeline.masking.config import MaskConfig
from pipeline.regions import load_region
from pipeline.sources.base import Scene

GOLDEN = Path(__file__).parents[1] / "data" / "ee_graphs"
START, END = dt.date(2021, 7, 15), dt.date(2021, 7, 25)
S2_INDEX = "20210720T030549_20210720T031406_T49SGU"


def _scene(sensor: str, index: str = S2_INDEX, **props: Any) -> Scene:
    return Scene(
        index, sensor, dt.datetime(2021, 7, 20, 3, 5, tzinfo=dt.timezone.utc), {}, 0.1, {"ee_index": index, **props}
    )


def _encode(obj: Any, compound: bool = True) -> dict:
    """The graph as sent to the server (``compound``: shared sub-expressions as references)."""
    import ee

    return ee.serializer.encode(obj, is_compound=compound, for_cloud_api=True)


def _invocations(graph: Any) -> Iterator[tuple[str, dict]]:
    """(functionName, arguments) of every invocation in an encoded graph, references resolved lazily."""
    if isinstance(graph, dict):
        inv = graph.get("functionInvocationValue")
        if inv:
            yield inv["functionName"], inv.get("arguments", {})
        for v in graph.values():
            yield from _invocations(v)
    elif isinstance(graph, list):
        for v in graph:
            yield from _invocations(v)


def _constants(graph: Any) -> list[Any]:
    out: list[Any] = []
    if isinstance(graph, dict):
        if "constantValue" in graph:
            out.append(graph["constantValue"])
        for v in graph.values():
            out += _constants(v)
    elif isinstance(graph, list):
        for v in graph:
            out += _constants(v)
    return out


def _check_golden(name: str, graph: dict) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(graph, indent=1, sort_keys=True) + "\n"
    if os.environ.get("CLOUDFREE_UPDATE_EE_GRAPHS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden graph {path}; run with CLOUDFREE_UPDATE_EE_GRAPHS=1 and review it"
    assert json.loads(path.read_text()) == graph, (
        f"graph {name} changed; if intended, regenerate with CLOUDFREE_UPDATE_EE_GRAPHS=1"
    )


@pytest.fixture
def demo():
    return load_region("zhengzhou-demo")


@pytest.fixture
def source():
    from pipeline.sources.earthengine.source import EarthEngineSource

    return EarthEngineSource()


COLLECTIONS = ["s2_l1c", "s2_l2a", "landsat8_l2", "landsat9_toa", "landsat5_l2", "s1_grd"]


@pytest.mark.parametrize("sensor", COLLECTIONS)
def test_collection_graph_matches_golden(ee_offline, demo, source, sensor):
    graph = _encode(source.collection(demo, START, END, sensor))
    _check_golden(f"collection_{sensor}", graph)


def test_s2_graph_is_the_official_join_and_link(ee_offline, demo, source):
    graph = _encode(source.collection(demo, START, END, "s2_l1c"))
    names = [n for n, _ in _invocations(graph)]
    consts = _constants(graph)
    assert "Join.saveFirst" in names and "Image.linkCollection" in names
    assert all(
        c in consts
        for c in (
            "COPERNICUS/S2_HARMONIZED",
            "COPERNICUS/S2_CLOUD_PROBABILITY",
            "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED",
        )
    )
    assert ["cs_cdf"] in consts and ["CLOUD_PROB"] in consts
    # Inclusive window: the end date's scenes are kept (filterDate end is exclusive).
    assert "2021-07-26" in consts and "2021-07-15" in consts


def test_s1_filters_and_speckle_options(ee_offline, demo):
    from pipeline.sources.earthengine.catalog import S1Options
    from pipeline.sources.earthengine.source import EarthEngineSource

    plain = _encode(EarthEngineSource().collection(demo, START, END, "s1"))
    c = _constants(plain)
    assert "COPERNICUS/S1_GRD" in c and "IW" in c and "VV" in c and "VH" in c and 10 in c
    assert 30.6 in c and 45.2 in c
    lee = EarthEngineSource(s1=S1Options(orbit_pass="DESCENDING", speckle="refined_lee"))
    graph = _encode(lee.collection(demo, START, END, "s1"))
    _check_golden("collection_s1_grd_refined_lee", graph)
    c = _constants(graph)
    names = [n for n, _ in _invocations(graph)]
    # Filtering averages power: the linear collection, filtered, then converted to dB.
    assert "COPERNICUS/S1_GRD_FLOAT" in c and "DESCENDING" in c
    assert "Image.log10" in names and "Image.neighborhoodToBands" in names and "Kernel.rotate" in names
    box = _encode(EarthEngineSource(s1=S1Options(speckle="boxcar")).collection(demo, START, END, "s1"))
    assert "Image.focalMean" in [n for n, _ in _invocations(box)]


MASKS = [
    ("s2_l1c", "s2cloudless"),
    ("s2_l1c", "cloudscore"),
    ("s2_l1c", "qa60"),
    ("s2_l2a", "scl"),
    ("landsat8_l2", "auto"),
]


@pytest.mark.parametrize("sensor,method", MASKS)
def test_mask_graph_matches_golden(ee_offline, demo, source, sensor, method):
    graph = _encode(source.mask(_scene(sensor), demo.grid(), MaskConfig(), method))
    _check_golden(f"mask_{sensor}_{method}", graph)


def test_mask_thresholds_come_from_maskconfig(ee_offline, demo, source):
    cfg = MaskConfig(
        cloud_prob_threshold=0.35, cs_cdf_clear=0.65, cs_cdf_thin=0.45, shadow_nir_max=0.12, shadow_buffer_m=50,
        cirrus_threshold=0.021, ndsi_snow=0.42, shadow_nir_relative=0.55, cloud_height_max_m=3500,
    )
    s2c = _encode(source.mask(_scene("s2_l1c"), demo.grid(), cfg, "s2cloudless"))
    c = _constants(s2c)
    names = [n for n, _ in _invocations(s2c)]
    assert all(v in c for v in (0.35, 0.12, 50, 0.021, 0.42, 0.55, 3500))
    assert "Image.directionalDistanceTransform" in names and "Image.reproject" in names
    # s2cloudless averaging (4 px) and dilation (2 px) on the 10 m grid, in metres.
    assert 40.0 in c and 20.0 in c
    cs = _constants(_encode(source.mask(_scene("s2_l1c"), demo.grid(), cfg, "cloudscore")))
    assert 0.65 in cs and 0.45 in cs


def test_mask_method_errors(ee_offline, demo, source):
    with pytest.raises(SourceError, match="scl"):
        source.mask(_scene("s2_l1c"), demo.grid(), method="scl")
    gap = Scene("x", "s2_l1c", dt.datetime(2023, 1, 5, tzinfo=dt.timezone.utc), {}, None, {"ee_index": "x"})
    with pytest.raises(SourceError, match="QA60 is not populated"):
        source.mask(gap, demo.grid(), method="qa60")
    with pytest.raises(SourceError, match="SAR"):
        source.mask(_scene("s1_grd"), demo.grid())


def test_search_one_request_parses_scenes(ee_offline, demo, source, monkeypatch):
    import ee

    calls = []
    answer = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[113, 34], [114, 34], [114, 35], [113, 34]]]},
                "properties": {
                    "index": "20210722T030541_20210722T031407_T49SGU",
                    "time_start": 1626923400000,
                    "CLOUDY_PIXEL_PERCENTAGE": 62.5,
                    "MEAN_SOLAR_AZIMUTH_ANGLE": 110.0,
                    "MEAN_SOLAR_ZENITH_ANGLE": 20.0,
                    "SPACECRAFT_NAME": "Sentinel-2B",
                },
            },
            {
                "type": "Feature",
                "geometry": None,
                "properties": {"index": S2_INDEX, "time_start": 1626750349000, "CLOUDY_PIXEL_PERCENTAGE": 3.0},
            },
        ],
    }

    def compute_value(expr):
        calls.append(_encode(expr))
        return answer

    monkeypatch.setattr(ee.data, "computeValue", compute_value)
    scenes = source.search(demo, START, END, "s2")
    assert len(calls) == 1
    assert [s.id for s in scenes] == [S2_INDEX, "20210722T030541_20210722T031407_T49SGU"]
    late = scenes[1]
    assert late.sensor == "s2_l1c" and late.cloud_cover == pytest.approx(0.625)
    assert late.properties["sun_azimuth"] == 110.0 and late.properties["sun_elevation"] == 70.0
    assert late.datetime == dt.datetime(2021, 7, 22, 3, 10, tzinfo=dt.timezone.utc)
    names = [n for n, _ in _invocations(calls[0])]
    assert "Element.toDictionary" in names and "Collection.limit" in names


def test_landsat_family_means_missions_flying(ee_offline):
    from pipeline.sources.earthengine.source import sensor_keys

    assert sensor_keys("landsat", dt.date(2021, 7, 1), dt.date(2021, 8, 31)) == ["landsat8_l2"]
    assert sensor_keys("landsat", dt.date(2022, 7, 1), dt.date(2022, 8, 31)) == ["landsat8_l2", "landsat9_l2"]
    assert sensor_keys("landsat", dt.date(2005, 7, 1), dt.date(2005, 8, 31)) == ["landsat5_l2", "landsat7_l2"]
    assert sensor_keys("s2", START, END) == ["s2_l1c"]


def test_patch_fractions_server_side(ee_offline, demo, source, monkeypatch):
    import ee

    from pipeline.dataset.selection import FRACTION_COLUMNS

    patches = demo.patches()[:3]
    sent = []

    def compute_value(expr):
        sent.append(expr)
        return {
            "type": "FeatureCollection",
            "features": [
                {"properties": {"patch_id": pid, "cloud": 0.25 * i, "shadow": 0.05, "valid": 1.0}}
                for i, (pid, _) in enumerate(patches)
            ],
        }

    monkeypatch.setattr(ee.data, "computeValue", compute_value)
    df = source.patch_fractions(demo, _scene("s2_l1c"), patches)
    assert list(df.columns) == FRACTION_COLUMNS
    assert df["cloud_fraction"].tolist() == [0.0, 0.25, 0.5]
    assert (df["sensor"] == "s2_l1c").all() and (df["family"] == "s2").all()
    g = _encode(sent[0])
    names = [n for n, _ in _invocations(g)]
    assert "Image.reduceRegions" in names and "Reducer.mean" in names
    args = next(a for n, a in _invocations(_encode(sent[0], compound=False)) if n == "Image.reduceRegions")
    assert _constants(args["crs"]) == [demo.grid().crs]
    assert _constants(args["crsTransform"]) == [list(demo.grid().transform)[:6]]
    _check_golden("patch_fractions_s2_l1c", g)


# -- auth -------------------------------------------------------------------------------------------


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    import ee
    from ee import _state

    ee.Reset()
    _state.reset_state()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # google.auth must not probe a metadata server
    for var in ("EE_PROJECT", "EE_SERVICE_ACCOUNT_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))

    def forbidden(*a, **k):
        raise AssertionError("ee.Initialize must not be called without credentials")

    monkeypatch.setattr(ee, "Initialize", forbidden)
    yield
    ee.Reset()


MISSING = (
    "Earth Engine credentials not found: run `earthengine authenticate` "
    "(or set EE_SERVICE_ACCOUNT_KEY to a service-account key file) and set EE_PROJECT to your Cloud project id"
)


def test_missing_credentials_message_is_exact(no_credentials, demo):
    from pipeline.sources.registry import get_source

    with pytest.raises(SourceError) as exc:
        get_source("earthengine").search(demo, START, END, "s2")
    assert str(exc.value) == MISSING


def test_bad_service_account_key_never_echoes_the_secret(no_credentials, monkeypatch, tmp_path):
    from pipeline.sources.earthengine import auth as ee_auth

    monkeypatch.setenv("EE_SERVICE_ACCOUNT_KEY", '{"private_key": "SECRET-VALUE", broken')
    with pytest.raises(SourceError) as exc:
        ee_auth.initialize()
    assert "SECRET" not in str(exc.value) and "EE_SERVICE_ACCOUNT_KEY" in str(exc.value)
    monkeypatch.setenv("EE_SERVICE_ACCOUNT_KEY", str(tmp_path / "nope.json"))
    with pytest.raises(SourceError, match="does not exist"):
        ee_auth.initialize()


def test_cli_scenes_without_credentials_one_line(no_credentials, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["cloudfree", "scenes", "zhengzhou-2021-flood", "--source", "earthengine"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err == f"error: {MISSING}"
