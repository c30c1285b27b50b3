"""Offline Earth Engine for tests: earthengine-api's own algorithm table, no network, no credentials.

``ee_offline`` initializes the real library against ``ee.apitestcase.GetAlgorithms`` (the wheel's
recorded ``listAlgorithms`` answer), with the discovery fetch and the data-catalog lookup switched off,
so expressions build and serialize exactly as they would against the server. ``mock_http`` helpers
route ``computePixels`` through googleapiclient with a scripted ``httplib2`` transport.

``tests/conftest.py`` registers this module as a plugin: a test asks for ``ee_offline`` by argument name.
"""

from __future__ import annotations

import io
import json
from typing import Iterator, Sequence
from unittest import mock

import numpy as np
import pytest


def _fake_map_id(params: dict) -> dict:
    import ee

    return {
        "mapid": "fakeMapId",
        "token": "fakeToken",
        "tile_fetcher": ee.data.TileFetcher("https://offline.invalid/{z}/{x}/{y}", map_name="fakeMapId"),
    }


def init_offline(patch=None) -> None:
    """Initialize earthengine-api offline. ``patch(obj, name, value)`` records undo (pytest's monkeypatch)."""
    import ee
    from ee import apitestcase

    set_ = patch or setattr
    set_(ee.data, "_install_cloud_api_resource", lambda: None)
    set_(ee.data, "getAlgorithms", apitestcase.GetAlgorithms)
    set_(ee.deprecation, "_FetchDataCatalogStac", lambda: {})
    # Map layers (geemap) ask for a map id; the recorded answer has no tiles behind it, only a URL.
    set_(ee.data, "getMapId", _fake_map_id)
    ee.Reset()
    ee.Initialize(credentials=None, project="test-project")


@pytest.fixture
def ee_offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    import ee
    from ee import _state

    init_offline(monkeypatch.setattr)
    try:
        yield ee
    finally:
        ee.Reset()
        _state.reset_state()


def npy_response(bands: dict[str, np.ndarray]) -> bytes:
    """What computePixels returns for fileFormat NPY: a structured array, one field per band."""
    names = list(bands)
    shape = next(iter(bands.values())).shape
    arr = np.zeros(shape, dtype=[(n, bands[n].dtype) for n in names])
    for n in names:
        arr[n] = bands[n]
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def http_error(status: int, message: str) -> tuple[object, bytes]:
    import httplib2

    body = json.dumps({"error": {"code": status, "message": message, "status": "X"}}).encode()
    return httplib2.Response({"status": status}), body


def http_ok(body: bytes) -> tuple[object, bytes]:
    import httplib2

    return httplib2.Response({"status": 200, "content-type": "application/octet-stream"}), body


def scripted_http(responses: Sequence[tuple[object, bytes]]) -> mock.MagicMock:
    """An ``httplib2.Http`` double answering each request with the next scripted response."""
    import httplib2

    http = mock.MagicMock(httplib2.Http)
    http.request.side_effect = list(responses)
    return http


class SyntheticEarthEngine:
    """Earth Engine's answers emulated from the synthetic archive, for end-to-end runs of the EE source.

    The client side is entirely real (expressions, listing, request splitting, NPY decoding, DN scaling);
    this double only plays the server: it answers the scene listing (``computeValue``) with the synthetic
    scenes and each ``computePixels`` with the synthetic pixels of the requested scene, grid and bands,
    as stored DN the way Earth Engine holds them. Use ``with server.serving(monkeypatch): ...``.
    """

    COLLECTIONS = {
        "COPERNICUS/S2_HARMONIZED": "s2_l1c",
        "COPERNICUS/S2_SR_HARMONIZED": "s2_l2a",
        "LANDSAT/LC08/C02/T1_L2": "landsat8_l2",
        "LANDSAT/LC09/C02/T1_L2": "landsat9_l2",
        "COPERNICUS/S1_GRD": "s1_grd",
    }

    def __init__(self, region, seed: int = 0) -> None:
        from pipeline.sources.synthetic.source import SyntheticSource

        self.region = region
        self.synthetic = SyntheticSource(seed=seed)
        self.scenes: dict[str, object] = {}
        self.pixel_requests = 0

    @staticmethod
    def _constants(graph) -> list:
        out: list = []
        if isinstance(graph, dict):
            if "constantValue" in graph:
                out.append(graph["constantValue"])
            for v in graph.values():
                out += SyntheticEarthEngine._constants(v)
        elif isinstance(graph, list):
            for v in graph:
                out += SyntheticEarthEngine._constants(v)
        return out

    def _sensor(self, consts: list) -> str:
        found = [self.COLLECTIONS[c] for c in consts if isinstance(c, str) and c in self.COLLECTIONS]
        if not found:
            raise AssertionError(
                f"request names no emulated collection: {[c for c in consts if isinstance(c, str)][:8]}"
            )
        return found[0]

    def compute_value(self, expr) -> dict:
        import datetime as dt

        import ee

        consts = self._constants(ee.serializer.encode(expr, for_cloud_api=True))
        sensor = self._sensor(consts)
        dates = sorted(dt.date.fromisoformat(c) for c in consts if isinstance(c, str) and len(c) == 10 and c[4] == "-")
        start, end = dates[0], dates[-1] - dt.timedelta(days=1)
        feats = []
        for sc in self.synthetic.search(self.region, start, end, sensor):
            self.scenes[sc.id] = sc
            p = sc.properties
            props = {"index": sc.id, "time_start": int(sc.datetime.timestamp() * 1000)}
            if sensor.startswith("s2"):
                props.update(
                    CLOUDY_PIXEL_PERCENTAGE=100 * (sc.cloud_cover or 0),
                    MEAN_SOLAR_AZIMUTH_ANGLE=p["sun_azimuth"],
                    MEAN_SOLAR_ZENITH_ANGLE=90 - p["sun_elevation"],
                )
            elif sensor.startswith("landsat"):
                props.update(
                    CLOUD_COVER=100 * (sc.cloud_cover or 0),
                    SUN_AZIMUTH=p["sun_azimuth"],
                    SUN_ELEVATION=p["sun_elevation"],
                )
            feats.append({"type": "Feature", "geometry": sc.footprint, "properties": props})
        return {"type": "FeatureCollection", "features": feats}

    def http(self, uri, method="GET", body=None, headers=None, **kw):
        from affine import Affine

        from pipeline.grid import Grid
        from pipeline.sensors import get_sensor

        req = json.loads(body)
        consts = self._constants(req["expression"])
        scene = next(self.scenes[c] for c in consts if isinstance(c, str) and c in self.scenes)
        g, t = req["grid"], req["grid"]["affineTransform"]
        grid = Grid(
            g["crsCode"],
            Affine(t["scaleX"], t["shearX"], t["translateX"], t["shearY"], t["scaleY"], t["translateY"]),
            g["dimensions"]["width"],
            g["dimensions"]["height"],
        )
        names = [b for b in req["bandIds"] if b != "_valid_bits"]
        raster = self.synthetic.read(scene, grid, names).values.astype(np.float64)
        sensor = get_sensor(scene.sensor)
        bands = {}
        bits = np.zeros(grid.shape, dtype=np.float32)
        for i, n in enumerate(names):
            b = sensor.band(n)
            v = raster[i]
            ok = np.isfinite(v)
            bands[n] = np.where(ok, (v - b.offset) / b.scale, 0).astype(np.float32)
            bits += ok.astype(np.float32) * 2**i
        bands["_valid_bits"] = bits
        self.pixel_requests += 1
        return http_ok(npy_response(bands))

    def serving(self, monkeypatch):
        import ee
        from ee import apitestcase

        monkeypatch.setattr(ee.data, "computeValue", self.compute_value)
        http = scripted_http([])
        http.request.side_effect = self.http
        return apitestcase.UsingCloudApi(mock_http=http)
