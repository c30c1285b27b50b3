"""Pixels from Earth Engine with ``ee.data.computePixels`` on an explicit grid.

Every request carries ``crsCode`` + ``affineTransform`` + ``dimensions`` (never ``scale`` alone, which
lets the server pick the pixel origin and shifts results by a pixel). A grid is cut into blocks under
the 48 MiB request limit counting the 1-byte mask the server adds per pixel, and under 32768 px a side.
Blocks become dask chunks fetched on demand, at most ``max_concurrent`` in flight per process however
many dask workers ask, with exponential backoff and jitter on 429 / 5xx / timeouts. Deterministic errors
(memory limit, request size, unknown band) fail at once, naming the request.
"""

from __future__ import annotations

import io
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import dask.array as da
import numpy as np

from pipeline.errors import SourceError
from pipeline.grid import Grid

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 48 * 1024 * 1024
MAX_SIDE = 32768
MASK_BYTES = 1  # computePixels counts one mask byte per pixel on top of the band bytes
VALID_BAND = "_valid_bits"

T = TypeVar("T")

# Transient: quotas, server errors, timeouts. Matched on the HTTP status when earthengine-api kept it
# (it chains the googleapiclient HttpError), else on the message text.
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}
_TRANSIENT_TEXT = ("too many requests", "quota exceeded", "rate limit", "too many concurrent", "service unavailable",
                   "internal error", "backend error", "deadline exceeded", "timed out", "timeout", "try again")
_DETERMINISTIC_TEXT = ("user memory limit exceeded", "total request size", "did not match any bands", "band not found",
                       "computation timed out")


class EarthEngineRequestError(SourceError):
    """A request Earth Engine rejected for a reason that retrying cannot fix (or retries ran out)."""


def _status(exc: BaseException) -> int | None:
    for e in (exc, exc.__cause__, exc.__context__):
        resp = getattr(e, "resp", None)
        status = getattr(resp, "status", None) or getattr(e, "status_code", None)
        if status is not None:
            try:
                return int(status)
            except (TypeError, ValueError):
                return None
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: HTTP 429/5xx, timeouts, dropped connections."""
    text = str(exc).lower()
    # "Computation timed out." is the server's deterministic limit on one computation; retrying repeats it.
    if any(t in text for t in _DETERMINISTIC_TEXT):
        return False
    if isinstance(exc, (TimeoutError, socket.timeout, ConnectionError)):
        return True
    status = _status(exc)
    if status is not None:
        return status in _TRANSIENT_STATUS
    return any(t in text for t in _TRANSIENT_TEXT)


@dataclass
class RetryPolicy:
    """Exponential backoff with 'equal jitter': delay n lies in [b*2^n / 2, b*2^n], capped, so delays grow."""

    max_attempts: int = 6
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_delay_s, self.base_delay_s * 2**attempt)
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)


def with_retries(call: Callable[[], T], what: str, policy: RetryPolicy | None = None) -> T:
    """Run ``call``; retry transient failures with backoff, fail at once on deterministic ones."""
    import ee

    policy = policy or RetryPolicy()
    for attempt in range(policy.max_attempts):
        try:
            return call()
        except (ee.EEException, OSError) as exc:  # OSError covers socket timeouts and connection resets
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not is_transient(exc):
                hint = ""
                low = first_line.lower()
                if "memory limit" in low or "request size" in low:
                    hint = "; use smaller blocks (max_request_bytes) or fewer bands"
                raise EarthEngineRequestError(f"Earth Engine rejected {what}: {first_line}{hint}") from exc
            if attempt == policy.max_attempts - 1:
                raise EarthEngineRequestError(
                    f"Earth Engine kept failing on {what} after {policy.max_attempts} attempts: {first_line}"
                ) from exc
            delay = policy.delay(attempt)
            log.warning(
                "Earth Engine %s on %s; retry %d/%d in %.1f s",
                first_line,
                what,
                attempt + 1,
                policy.max_attempts - 1,
                delay,
            )
            policy.sleep(delay)
    raise AssertionError("unreachable")


# -- request planning ------------------------------------------------------------------------------


def block_shape(
    width: int, height: int, bytes_per_pixel: int, max_bytes: int = MAX_REQUEST_BYTES, max_side: int = MAX_SIDE
) -> tuple[int, int]:
    """(block_height, block_width) whose request (band bytes + mask byte per pixel) stays under ``max_bytes``."""
    per_px = bytes_per_pixel + MASK_BYTES
    budget = (max_bytes - 1) // per_px  # strictly under the limit
    if budget < 1:
        raise SourceError(
            f"{bytes_per_pixel} bytes per pixel cannot fit in a {max_bytes}-byte request; request fewer bands"
        )
    side = max(1, min(max_side, int(budget**0.5)))
    bw = min(width, max_side, side if width > side else width)
    bh = min(height, max_side, budget // bw)
    return bh, bw


def plan_blocks(
    grid: Grid, bytes_per_pixel: int, max_bytes: int = MAX_REQUEST_BYTES, max_side: int = MAX_SIDE
) -> tuple[list[int], list[int]]:
    """Row and column chunk sizes tiling ``grid`` exactly (dask ``chunks`` for y and x)."""
    bh, bw = block_shape(grid.width, grid.height, bytes_per_pixel, max_bytes, max_side)
    rows = [bh] * (grid.height // bh) + ([grid.height % bh] if grid.height % bh else [])
    cols = [bw] * (grid.width // bw) + ([grid.width % bw] if grid.width % bw else [])
    return rows, cols


def request_grids(
    grid: Grid, bytes_per_pixel: int, max_bytes: int = MAX_REQUEST_BYTES, max_side: int = MAX_SIDE
) -> list[tuple[int, int, Grid]]:
    """(row, col, sub-grid) of every request block, cut on pixel indices of ``grid``."""
    rows, cols = plan_blocks(grid, bytes_per_pixel, max_bytes, max_side)
    out = []
    r0 = 0
    for h in rows:
        c0 = 0
        for w in cols:
            out.append((r0, c0, grid.window(r0, c0, h, w)))
            c0 += w
        r0 += h
    return out


def grid_params(grid: Grid) -> dict[str, Any]:
    """The computePixels ``grid`` body: explicit CRS, affine transform and dimensions."""
    t = grid.transform
    return {
        "dimensions": {"width": int(grid.width), "height": int(grid.height)},
        "affineTransform": {
            "scaleX": t.a,
            "shearX": t.b,
            "translateX": t.c,
            "shearY": t.d,
            "scaleY": t.e,
            "translateY": t.f,
        },
        "crsCode": grid.crs,
    }


# -- fetching --------------------------------------------------------------------------------------

_LIMITERS: dict[int, threading.BoundedSemaphore] = {}
_LIMITERS_LOCK = threading.Lock()


def _limiter(n: int) -> threading.BoundedSemaphore:
    # One semaphore per limit per process: every dask thread of this process shares it, so a thread pool
    # does not multiply the request rate beyond ``n``.
    with _LIMITERS_LOCK:
        if n not in _LIMITERS:
            _LIMITERS[n] = threading.BoundedSemaphore(n)
        return _LIMITERS[n]


def with_valid_bits(image: Any, bands: Sequence[str]) -> Any:
    """``image`` as float32 ``bands`` plus one band packing each band's validity as bit i.

    NPY output fills masked pixels with 0, which is a legal value; the packed mask keeps NaN exact per
    band for 4 bytes per pixel instead of one extra band per band. Up to 24 bands stay exact in float32.
    """
    import ee

    if len(bands) > 24:
        raise SourceError(f"{len(bands)} bands in one request; at most 24 (split the band list)")
    img = ee.Image(image).select(list(bands))
    bits = img.mask().gt(0).multiply(ee.Image.constant([2**i for i in range(len(bands))])).reduce(ee.Reducer.sum())
    return img.toFloat().unmask(0, False).addBands(bits.toFloat().rename(VALID_BAND))


def fetch_block(
    image: Any, bands: Sequence[str], grid: Grid, what: str, policy: RetryPolicy | None = None, max_concurrent: int = 8
) -> np.ndarray:
    """(band, y, x) float32 of one block, NaN where a band is masked. ``image`` from ``with_valid_bits``."""
    import ee

    params = {"expression": image, "fileFormat": "NPY", "grid": grid_params(grid), "bandIds": [*bands, VALID_BAND]}
    with _limiter(max_concurrent):
        raw = with_retries(lambda: ee.data.computePixels(params), what, policy)
    arr = np.load(io.BytesIO(raw)) if isinstance(raw, (bytes, bytearray)) else raw
    if arr.shape != (grid.height, grid.width):
        raise EarthEngineRequestError(
            f"Earth Engine returned {arr.shape} pixels for {what}, expected {(grid.height, grid.width)}"
        )
    bits = arr[VALID_BAND].astype(np.uint32)
    out = np.empty((len(bands), grid.height, grid.width), dtype=np.float32)
    for i, b in enumerate(bands):
        values = arr[b].astype(np.float32)
        out[i] = np.where((bits >> i) & 1 == 1, values, np.float32(np.nan))
    return out


def lazy_pixels(
    image: Any,
    bands: Sequence[str],
    grid: Grid,
    label: str,
    bytes_per_pixel: int | None = None,
    max_bytes: int = MAX_REQUEST_BYTES,
    max_side: int = MAX_SIDE,
    policy: RetryPolicy | None = None,
    max_concurrent: int = 8,
) -> da.Array:
    """A dask array (band, y, x) on ``grid``: one computePixels request per chunk, nothing fetched yet."""
    import dask
    import ee
    from dask.base import tokenize

    bands = list(bands)
    bpp = bytes_per_pixel if bytes_per_pixel is not None else 4 * (len(bands) + 1)
    rows, cols = plan_blocks(grid, bpp, max_bytes, max_side)
    packed = with_valid_bits(image, bands)
    # Keys from the expression itself: the same scene/grid/bands read twice shares chunks, others never collide.
    token = tokenize(label, bands, grid.to_dict(), ee.serializer.toJSON(packed))
    blocks = []
    r0 = 0
    for h in rows:
        row_blocks = []
        c0 = 0
        for w in cols:
            sub = grid.window(r0, c0, h, w)
            what = f"{label} rows {r0}:{r0 + h} cols {c0}:{c0 + w}"
            task = dask.delayed(fetch_block, pure=True)(
                packed, bands, sub, what, policy, max_concurrent, dask_key_name=f"ee-pixels-{token}-{r0}-{c0}"
            )
            row_blocks.append(da.from_delayed(task, shape=(len(bands), h, w), dtype=np.float32))
            c0 += w
        blocks.append(row_blocks)
        r0 += h
    return da.block(blocks)
