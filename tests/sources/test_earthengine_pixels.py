"""computePixels offline: request splitting, grid alignment, retries and the lazy raster contract.

HTTP goes through the real earthengine-api -> googleapiclient stack into a scripted ``httplib2`` double
(``ee.apitestcase.UsingCloudApi(mock_http=...)``), so status codes and error bodies take the same path
as the server's.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import numpy as np
import pytest
from affine import Affine

from pipeline.errors import SourceError
from pipeline.grid import Grid
from pipeline.sources.base import Scene
from pipeline.sources.earthengine import pixels as ee_pixels
from tests.sources.ee_offline import http_error, http_ok, npy_response, scripted_http

MiB = 1024 * 1024
SCENE = Scene(
    "20210720T030549_20210720T031406_T49SGU",
    "s2_l1c",
    dt.datetime(2021, 7, 20, 3, 5, tzinfo=dt.timezone.utc),
    {},
    0.1,
    {},
)


def _grid(w: int, h: int, res: float = 10.0) -> Grid:
    return Grid("EPSG:32649", Affine(res, 0, 737850.0, 0, -res, 3854220.0), w, h)


@pytest.mark.parametrize(
    "w,h,bpp,limit",
    [
        (20000, 15000, 4 * 17, 48 * MiB),
        (1035, 1026, 4 * 17, 1 * MiB),
        (100_000, 3, 4, 48 * MiB),
        (5000, 70000, 2, 48 * MiB),
        (777, 333, 52, 200_000),
    ],
)
def test_request_blocks_tile_exactly_under_limits(w, h, bpp, limit):
    grid = _grid(w, h)
    blocks = ee_pixels.request_grids(grid, bpp, max_bytes=limit)
    cover = np.zeros((h, w), dtype=np.uint8) if w * h <= 5_000_000 else None
    area = 0
    for row, col, sub in blocks:
        # Under the byte limit counting the mask byte, and under the side limit.
        assert sub.width * sub.height * (bpp + 1) < limit
        assert sub.width <= ee_pixels.MAX_SIDE and sub.height <= ee_pixels.MAX_SIDE
        # The block's grid is the parent's, shifted by whole pixels: identical CRS, resolution, origin phase.
        assert sub.crs == grid.crs
        assert sub.transform == grid.transform @ Affine.translation(col, row)
        x0, y0 = grid.transform @ (col, row)
        assert (sub.transform.c, sub.transform.f) == pytest.approx((x0, y0), abs=0)
        area += sub.width * sub.height
        if cover is not None:
            cover[row : row + sub.height, col : col + sub.width] += 1
    assert area == w * h  # no overlap and no gap (with the per-pixel count below when small enough)
    if cover is not None:
        assert cover.min() == 1 and cover.max() == 1


def test_block_shape_refuses_impossible_pixel():
    with pytest.raises(SourceError, match="bytes per pixel"):
        ee_pixels.block_shape(10, 10, bytes_per_pixel=100, max_bytes=50)


def _coded_responder(
    calls: list,
    lock: threading.Lock,
    invalid_band: int | None = None,
    delay: float = 0.0,
    in_flight: list | None = None,
):
    """Answer computePixels with values that encode each pixel's global column/row on the base grid."""

    def respond(uri, method="GET", body=None, headers=None, **kw):
        req = json.loads(body)
        g = req["grid"]
        t, d = g["affineTransform"], g["dimensions"]
        with lock:
            calls.append(req)
            if in_flight is not None:
                in_flight[0] += 1
                in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            if delay:
                time.sleep(delay)
            col0 = round((t["translateX"] - 737850.0) / 10.0)
            row0 = round((3854220.0 - t["translateY"]) / 10.0)
            rows, cols = np.mgrid[row0 : row0 + d["height"], col0 : col0 + d["width"]]
            bands = {}
            names = [b for b in req["bandIds"] if b != ee_pixels.VALID_BAND]
            for i, b in enumerate(names):
                bands[b] = (cols * 10 + rows * 100000 + i).astype(np.float32)
            bits = np.full(rows.shape, 2 ** len(names) - 1, dtype=np.float32)
            if invalid_band is not None:
                bits[(rows + cols) % 2 == 0] -= 2**invalid_band
            bands[ee_pixels.VALID_BAND] = bits
            return http_ok(npy_response(bands))
        finally:
            if in_flight is not None:
                with lock:
                    in_flight[0] -= 1

    return respond


def test_read_assembles_blocks_on_the_exact_grid(ee_offline):
    from ee import apitestcase

    from pipeline.sources.earthengine.source import EarthEngineSource

    grid = _grid(70, 50)
    calls: list = []
    http = scripted_http([])
    http.request.side_effect = _coded_responder(calls, threading.Lock(), invalid_band=1)
    # 3 bands -> 16 B/px + 1 mask byte; 20 000 B per request forces several blocks.
    src = EarthEngineSource(max_request_bytes=20_000)
    with apitestcase.UsingCloudApi(mock_http=http):
        da = src.read(SCENE, grid, ["B2", "B4", "QA60"])
        assert not calls, "read must be lazy: no request before compute"
        assert da.chunks is not None and len(da.chunks[1]) * len(da.chunks[2]) > 1
        values = da.values
    assert len(calls) == len(da.chunks[1]) * len(da.chunks[2])
    for req in calls:
        g = req["grid"]
        assert (
            set(g) == {"crsCode", "affineTransform", "dimensions"} and g["crsCode"] == "EPSG:32649"
        )  # never scale alone
        assert g["affineTransform"]["scaleX"] == 10.0 and g["affineTransform"]["scaleY"] == -10.0
        assert req["fileFormat"] == "NPY"
        assert g["dimensions"]["width"] * g["dimensions"]["height"] * 17 < 20_000
    rows, cols = np.mgrid[0:50, 0:70]
    dn_b2 = cols * 10 + rows * 100000
    np.testing.assert_allclose(values[0], (dn_b2 * 1e-4).astype(np.float32), rtol=1e-6)  # DN -> reflectance
    b4 = values[1]
    assert np.isnan(b4[(rows + cols) % 2 == 0]).all()  # band-1 validity bit cleared there
    np.testing.assert_allclose(b4[(rows + cols) % 2 == 1], ((dn_b2 + 1) * 1e-4)[(rows + cols) % 2 == 1], rtol=1e-6)
    np.testing.assert_array_equal(values[2], dn_b2 + 2)  # QA codes stay integers
    assert da.dtype == np.float32 and da.dims == ("band", "y", "x")
    np.testing.assert_array_equal(da["x"].values, grid.coords()["x"])
    np.testing.assert_array_equal(da["y"].values, grid.coords()["y"])
    assert da.attrs["crs"] == "EPSG:32649" and da.attrs["simulated"] is False
    assert da.attrs["transform"] == list(grid.transform)[:6] and da.attrs["scene_id"] == SCENE.id


def test_concurrency_is_bounded_across_dask_threads(ee_offline):
    import dask
    from ee import apitestcase

    from pipeline.sources.earthengine.source import EarthEngineSource

    calls: list = []
    in_flight = [0, 0]
    http = scripted_http([])
    http.request.side_effect = _coded_responder(calls, threading.Lock(), delay=0.02, in_flight=in_flight)
    src = EarthEngineSource(max_request_bytes=4_000, max_concurrent=2)
    with apitestcase.UsingCloudApi(mock_http=http), dask.config.set(scheduler="threads", num_workers=8):
        src.read(SCENE, _grid(60, 40), ["B2"]).values
    assert len(calls) > 4
    assert in_flight[1] <= 2


def _npy_one() -> bytes:
    return npy_response({"B2": np.full((2, 3), 1000, np.float32), ee_pixels.VALID_BAND: np.ones((2, 3), np.float32)})


def test_429_then_5xx_then_success_retries_with_growing_delays(ee_offline):
    from ee import apitestcase

    from pipeline.sources.earthengine.source import EarthEngineSource

    sleeps: list[float] = []
    http = scripted_http(
        [
            http_error(429, "Too many concurrent aggregations."),
            http_error(503, "Service unavailable"),
            http_ok(_npy_one()),
        ]
    )
    src = EarthEngineSource(retry=ee_pixels.RetryPolicy(base_delay_s=1.0, sleep=sleeps.append))
    with apitestcase.UsingCloudApi(mock_http=http):
        values = src.read(SCENE, _grid(3, 2), ["B2"]).values
    assert http.request.call_count == 3
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] > 0
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0  # equal jitter inside [b*2^n/2, b*2^n]
    np.testing.assert_allclose(values, 0.1)


def test_timeouts_are_retried(ee_offline):
    from ee import apitestcase

    from pipeline.sources.earthengine.source import EarthEngineSource

    sleeps: list[float] = []
    http = scripted_http([TimeoutError("read timed out"), http_ok(_npy_one())])
    src = EarthEngineSource(retry=ee_pixels.RetryPolicy(sleep=sleeps.append))
    with apitestcase.UsingCloudApi(mock_http=http):
        src.read(SCENE, _grid(3, 2), ["B2"]).values
    assert http.request.call_count == 2 and len(sleeps) == 1


@pytest.mark.parametrize(
    "message",
    [
        "User memory limit exceeded.",
        "Total request size (52428800 bytes) must be less than or equal to 50331648 bytes.",
        "Image.select: Pattern 'B99' did not match any bands.",
    ],
)
def test_deterministic_errors_fail_at_once_naming_the_request(ee_offline, message):
    from ee import apitestcase

    from pipeline.sources.earthengine.source import EarthEngineSource

    sleeps: list[float] = []
    http = scripted_http([http_error(400, message), http_ok(_npy_one())])
    src = EarthEngineSource(retry=ee_pixels.RetryPolicy(sleep=sleeps.append))
    with apitestcase.UsingCloudApi(mock_http=http):
        with pytest.raises(ee_pixels.EarthEngineRequestError) as exc:
            src.read(SCENE, _grid(3, 2), ["B2"]).values
    assert http.request.call_count == 1 and sleeps == []
    text = str(exc.value)
    assert f"s2_l1c:{SCENE.id} rows 0:2 cols 0:3" in text and message.rstrip(".") in text


def test_retries_run_out_with_a_clear_error(ee_offline):
    from ee import apitestcase

    from pipeline.sources.earthengine.source import EarthEngineSource

    http = scripted_http([http_error(429, "Quota exceeded")] * 3)
    src = EarthEngineSource(retry=ee_pixels.RetryPolicy(max_attempts=3, sleep=lambda s: None))
    with apitestcase.UsingCloudApi(mock_http=http):
        with pytest.raises(ee_pixels.EarthEngineRequestError, match="after 3 attempts"):
            src.read(SCENE, _grid(3, 2), ["B2"]).values
    assert http.request.call_count == 3


def test_unknown_band_is_refused_before_any_request(ee_offline):
    from pipeline.sources.earthengine.source import EarthEngineSource

    with pytest.raises(SourceError, match="no band"):
        EarthEngineSource().read(SCENE, _grid(3, 2), ["B99"])
