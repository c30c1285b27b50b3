"""Sliding-window inference over an AOI, block by block, with bounded memory and resume.

Tiles lie on one global lattice over the AOI (start ``-overlap``, stride ``tile - overlap``), the part of
a tile beyond the AOI edge being reflect-padded AOI data. Each tile's prediction is weighted by a 2-D
raised-cosine (Hann) window with a small floor and the weighted sum is divided by the summed weight.

The AOI is cut into output blocks (multiples of the 512-px COG tile). A block reads only the input
window that the lattice tiles touching it need, predicts those tiles in batches, accumulates them in
global lattice order and writes the finished block. Memory is therefore bounded by the block size, not
the AOI size, and a pixel's value does not depend on how the AOI was cut into blocks: the same tiles
contribute in the same order. Finished blocks are recorded in a sidecar progress file, so an interrupted
run resumes where it stopped; with a ``dask.distributed`` client the blocks run on the workers and the
client writes them, producing the same file as one process.

The training-free fill (checkpoint ``composite``) runs on the same blocks, resume and dask machinery with
``compute_fill_block`` in place of ``compute_block``: each block is filled (``harmonize.fill_gaps``) on a window
that extends it by a halo wider than the fill's reach (local-fit window, mask buffers, feathering), with global
fits shared by the whole AOI, then cropped to the block, so block borders do not show.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Protocol, Sequence

import numpy as np
import torch
from scipy import ndimage

from pipeline.files import write_text_atomic
from pipeline.harmonize import DateFit, FillConfig, GroundChange, fill_gaps
from pipeline.masking.codes import MaskClass
from pipeline.reconstruct.cog import (
    PROVENANCE_FILLED,
    PROVENANCE_NO_CLEAR,
    PROVENANCE_NODATA,
    PROVENANCE_OBSERVED,
    PROVENANCE_PREDICTED,
    SOURCE_DAYS_NODATA,
    BlockWriter,
)
from pipeline.reconstruct.config import ReconstructConfig
from pipeline.train.samples import composite_arrays, model_arrays

log = logging.getLogger(__name__)


def hann_weights(tile: int, floor: float = 1e-3) -> np.ndarray:
    """2-D raised-cosine window (tile, tile), symmetric, peak 1, > 0 everywhere.

    The floor is applied per axis before the outer product: a tile's edge row then weighs
    ``floor x hann(other axis)``, far below a neighbour's interior, instead of a flat ``floor`` that would
    let the (least reliable) tile edges leak into overlaps of only 32 px.
    """
    i = np.arange(tile, dtype=np.float64)
    w1 = np.maximum(np.sin(np.pi * (i + 0.5) / tile) ** 2, floor)
    return np.outer(w1, w1).astype(np.float32)


def lattice(length: int, tile: int, overlap: int) -> np.ndarray:
    """Tile starts along one axis: from ``-overlap`` every ``tile - overlap`` until ``length + overlap`` is covered."""
    stride = tile - overlap
    n = max(1, math.ceil((length + 2 * overlap - tile) / stride) + 1)
    return -overlap + stride * np.arange(n)


@dataclass(frozen=True)
class Block:
    """One output block: rows [r0, r1) x cols [c0, c1) of the AOI, and the input window its tiles need."""

    index: int
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def key(self) -> str:
        return f"{self.r0}_{self.c0}"


def _edges(length: int, block: int) -> list[int]:
    edges = list(range(0, length, block))
    # A sliver of under a quarter block joins the previous block: a separate block would need a whole
    # tile-wide input window for a few output pixels.
    if len(edges) > 1 and length - edges[-1] < block // 4:
        edges.pop()
    return edges + [length]


def plan_blocks(height: int, width: int, block: int) -> list[Block]:
    """Output blocks row-major; starts on multiples of ``block`` (so of the 512-px COG tile)."""
    rows, cols = _edges(height, block), _edges(width, block)
    out: list[Block] = []
    for r0, r1 in zip(rows[:-1], rows[1:]):
        for c0, c1 in zip(cols[:-1], cols[1:]):
            out.append(Block(len(out), r0, r1, c0, c1))
    return out


def _touching(starts: np.ndarray, tile: int, lo: int, hi: int) -> np.ndarray:
    return starts[(starts < hi) & (starts + tile > lo)]


@dataclass
class BlockInputs:
    """What a loader returns for an AOI window (rows r0:r1, cols c0:c1, all inside the AOI).

    ``arrays``: model inputs without the batch axis, spatial axes last (e.g. ``optical`` (T, C, h, w),
    ``optical_mask`` (T, 1, h, w), ``sar`` (T + 1, S, h, w)), already normalized as in training.
    ``observed`` (C_out, h, w) and ``observed_clear`` (h, w): the target date's own observation, for
    ``keep_clear``; ``nodata`` (h, w): pixels with no usable input at all.
    """

    arrays: dict[str, np.ndarray]
    nodata: np.ndarray
    observed: np.ndarray | None = None
    observed_clear: np.ndarray | None = None


@dataclass
class FillInputs:
    """What a fill loader returns for an AOI window: the target date (reflectance (C, h, w) in [0, 1], NaN
    nodata, and its clear mask), the history dates a pixel may take its value from (``(age_days, reflectance,
    clear)``), where any date read has data (``seen``), how many history dates were read, and, for
    ``fill_unobserved="least-cloudy"``, the least cloudy value of every pixel and its age (-1 none)."""

    target: np.ndarray
    clear: np.ndarray
    history: list[tuple[float, np.ndarray, np.ndarray]]
    seen: np.ndarray
    dates_read: int = 0
    least_cloudy: tuple[np.ndarray, np.ndarray] | None = None
    sar: np.ndarray | None = None  # S1 of the target date (S, h, w) in [0, 1], for a refine model that reads it
    ground_change: GroundChange | None = None  # S1 for the missed-shadow check's test of a changed ground


class Loader(Protocol):
    def __call__(self, r0: int, r1: int, c0: int, c1: int) -> BlockInputs: ...


class Predictor(Protocol):
    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass
class BlockResult:
    block: Block
    mean: np.ndarray  # (C, h, w) float32 reflectance, NaN nodata
    provenance: np.ndarray  # (h, w) uint8
    std: np.ndarray | None = None  # (C, h, w) predictive standard deviation
    source_days: np.ndarray | None = None  # (h, w) int16 days before the target of each pixel's date, -1 none
    info: dict[str, Any] | None = None  # JSON-able block summary kept in the progress file (fill notes, counts)


class TorchPredictor:
    """Runs a ``models`` network on a batch dict; bf16 autocast on CUDA; returns (mean, var) as float32 numpy."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = None, bf16: bool = True) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.bf16 = bf16 and self.device.type == "cuda"

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(batch)
        mean = out.mean.float().cpu().numpy()
        var = None if out.var is None else out.var.float().cpu().numpy()
        return mean, var


def pad_index(n: int, before: int, after: int, mode: Literal["reflect", "edge"]) -> np.ndarray:
    """Source index of every position of an axis of length ``n`` padded by ``np.pad(mode=...)``.

    Padding is a per-axis remapping of indices, so gathering tiles through these indices gives exactly
    the values of a padded copy of the input window without ever materializing that copy.
    """
    return np.pad(np.arange(n), (before, after), mode=mode)


def _take(a: np.ndarray, ri: np.ndarray, ci: np.ndarray) -> np.ndarray:
    # steps of a reflect/edge index are -1, 0 or +1: a span of len-1 means a plain increasing run (a view)
    rows = slice(ri[0], ri[0] + len(ri)) if ri[-1] - ri[0] == len(ri) - 1 else ri
    cols = slice(ci[0], ci[0] + len(ci)) if ci[-1] - ci[0] == len(ci) - 1 else ci
    a = a[..., rows, :]
    return a[..., cols]


def assemble_batch(arrays: Mapping[str, np.ndarray], row_index: np.ndarray, col_index: np.ndarray,
                   starts: Sequence[tuple[int, int]], tile: int) -> dict[str, torch.Tensor]:
    """The batch of tiles at ``starts`` (positions in the padded input window) of every input array,
    each written once into a preallocated buffer (no per-tile intermediate arrays)."""
    batch = {}
    for k, v in arrays.items():
        buf = np.empty((len(starts),) + v.shape[:-2] + (tile, tile), dtype=v.dtype)
        for n, (r, c) in enumerate(starts):
            buf[n] = _take(v, row_index[r : r + tile], col_index[c : c + tile])
        batch[k] = torch.from_numpy(buf)
    return batch


def compute_block(block: Block, height: int, width: int, loader: Loader, predictor: Predictor,
                  cfg: ReconstructConfig) -> BlockResult:
    """Predict one output block from the lattice tiles that touch it (plus the feather margin)."""
    f = cfg.feather if cfg.keep_clear else 0
    # The compute region extends the block by the feather width so the keep-clear blend sees its neighbours.
    q0, q1 = max(0, block.r0 - f), min(height, block.r1 + f)
    p0, p1 = max(0, block.c0 - f), min(width, block.c1 + f)
    rows = _touching(lattice(height, cfg.tile, cfg.overlap), cfg.tile, q0, q1)
    cols = _touching(lattice(width, cfg.tile, cfg.overlap), cfg.tile, p0, p1)
    i0, i1 = int(rows[0]), int(rows[-1]) + cfg.tile  # input window (may extend past the AOI)
    j0, j1 = int(cols[0]), int(cols[-1]) + cfg.tile
    a0, a1, b0, b1 = max(0, i0), min(height, i1), max(0, j0), min(width, j1)
    inputs = loader(a0, a1, b0, b1)
    mode: Literal["reflect", "edge"] = "reflect" if min(a1 - a0, b1 - b0) > 1 else "edge"
    row_index = pad_index(a1 - a0, a0 - i0, i1 - a1, mode)  # input window padded to the tiles' extent
    col_index = pad_index(b1 - b0, b0 - j0, j1 - b1, mode)

    weights = hann_weights(cfg.tile, cfg.floor)
    h, w = q1 - q0, p1 - p0
    acc: np.ndarray | None = None
    acc_var: np.ndarray | None = None
    wsum = np.zeros((h, w), dtype=np.float32)
    tiles = [(int(r), int(c)) for r in rows for c in cols]  # global row-major lattice order
    for s in range(0, len(tiles), cfg.batch_size):
        chunk = tiles[s : s + cfg.batch_size]
        batch = assemble_batch(inputs.arrays, row_index, col_index, [(r - i0, c - j0) for r, c in chunk], cfg.tile)
        mean, var = predictor(batch)
        if acc is None:
            acc = np.zeros((mean.shape[1], h, w), dtype=np.float32)
            acc_var = np.zeros_like(acc) if var is not None else None
        for n, (r, c) in enumerate(chunk):
            # intersection of the tile with the compute region, in compute-region and tile coordinates
            y0, y1, x0, x1 = max(r, q0), min(r + cfg.tile, q1), max(c, p0), min(c + cfg.tile, p1)
            if y0 >= y1 or x0 >= x1:
                continue
            wt = weights[y0 - r : y1 - r, x0 - c : x1 - c]
            dst = (slice(None), slice(y0 - q0, y1 - q0), slice(x0 - p0, x1 - p0))
            acc[dst] += wt * mean[n, :, y0 - r : y1 - r, x0 - c : x1 - c]
            if acc_var is not None and var is not None:
                acc_var[dst] += wt * var[n, :, y0 - r : y1 - r, x0 - c : x1 - c]
            wsum[dst[1:]] += wt
    assert acc is not None
    pred = acc / wsum
    var_out = acc_var / wsum if acc_var is not None else None

    def crop_in(a: np.ndarray) -> np.ndarray:  # AOI window a0:a1, b0:b1 -> compute region
        return a[..., q0 - a0 : q1 - a0, p0 - b0 : p1 - b0]

    nodata = crop_in(inputs.nodata)
    prov = np.full((h, w), PROVENANCE_PREDICTED, dtype=np.uint8)
    if cfg.keep_clear and inputs.observed is not None and inputs.observed_clear is not None:
        observed = crop_in(inputs.observed).astype(np.float32)
        clear = crop_in(inputs.observed_clear) & ~nodata & np.isfinite(observed).all(axis=0)
        pred = keep_clear_blend(pred, observed, clear, cfg.feather)
        prov[clear] = PROVENANCE_OBSERVED
        if var_out is not None:
            var_out[:, clear] = 0.0
    pred[:, nodata] = np.nan
    prov[nodata] = PROVENANCE_NODATA
    std = None
    if var_out is not None:
        std = np.sqrt(np.maximum(var_out, 0.0))
        std[:, nodata] = np.nan

    def crop_out(a: np.ndarray) -> np.ndarray:  # compute region -> output block
        return np.ascontiguousarray(a[..., block.r0 - q0 : block.r1 - q0, block.c0 - p0 : block.c1 - p0])

    return BlockResult(block, crop_out(pred), crop_out(prov), None if std is None else crop_out(std))


def keep_clear_blend(pred: np.ndarray, observed: np.ndarray, clear: np.ndarray, feather: int) -> np.ndarray:
    """Observed clear pixels exactly; on the reconstructed side within ``feather`` px of them, the
    prediction is shifted by the (observed - predicted) offset of the nearest clear pixel, fading linearly
    to zero with distance, so the seam at the mask border disappears without touching observed pixels."""
    out = pred.copy()
    if not clear.any():
        return out
    out[:, clear] = observed[:, clear]
    if feather <= 0 or clear.all():
        return out
    dist, (iy, ix) = ndimage.distance_transform_edt(~clear, return_indices=True)
    ramp = np.clip(1.0 - dist / (feather + 1), 0.0, 1.0).astype(np.float32)
    near = (ramp > 0) & ~clear
    if near.any():
        offset = observed[:, iy[near], ix[near]] - pred[:, iy[near], ix[near]]
        out[:, near] = pred[:, near] + ramp[near] * offset
    return out


# --- the training-free fill ----------------------------------------------------------------------------------

# context a refine model reads beyond a block (its output there blends the block's fill with the halo's, which is
# exact up to the fill's own halo); ~ the receptive field of the small config's U-Net
REFINER_HALO = 32
FILL_MASK_HALO = 16  # beyond the fill's own reach: the masks' morphology (cloud dilation) near a window edge


class FillLoader(Protocol):
    def __call__(self, r0: int, r1: int, c0: int, c1: int) -> FillInputs: ...


@dataclass
class Filler:
    """The training-free fill as ``compute_fill_block`` runs it (it takes a model's place in ``run_blocks``): the
    fill's settings and the global fit of every history date for the whole AOI, by age in days
    (``pipeline.reconstruct.mosaic.SampleFits``; None: each block fits its own)."""

    fill: FillConfig
    fits: Mapping[float, DateFit] | None = None
    # a ``needs_composite`` model (``models/refine.py``) that corrects the fill's pixels, and the context it reads
    # around a block on top of the fill's own
    refiner: Predictor | None = None
    refiner_halo: int = REFINER_HALO
    # indices of blue, green, red, NIR and SWIR1 for the fill's missed-shadow check (None: no check)
    shadow_bands: tuple[int, ...] | None = None

    @property
    def halo(self) -> int:
        """Context read around a block: more than a fill reaches (local-fit window, buffers, feather, the
        missed-shadow check's ring)."""
        f = self.fill
        shadow = f.shadow_check_px if self.shadow_bands is not None else 0
        # the local fit's coarse grid (cells of up to 5 px) reaches a cell beyond the window
        return f.window_px + 5 + f.buffer_px + f.history_buffer_px + f.feather_px + 1 + shadow + FILL_MASK_HALO

    def refine(self, res: Any, inputs: FillInputs) -> np.ndarray:
        """The refiner's image of a filled window (C, h, w): it corrects the pixels the fill took from an earlier
        date, whose provenance becomes ``predicted`` (pixels no date saw stay provenance 3). Inputs by the training
        rule (``pipeline.train.samples.model_arrays`` and ``composite_arrays``)."""
        assert self.refiner is not None
        codes = np.where(inputs.clear, MaskClass.CLEAR, MaskClass.CLOUD).astype(np.uint8)
        codes[~np.isfinite(inputs.target).all(axis=0)] = MaskClass.NODATA
        sar = [] if inputs.sar is None else [inputs.sar, inputs.sar]  # the target date's slot, as in training
        arrays = model_arrays([inputs.target], [codes], sar, where="the target date",
                              sar_labels=["S1 of the target date"] * len(sar),
                              sar_fix="pick a date whose S1 covers the whole region, or a refine model without S1")
        arrays.update(composite_arrays(res.image, res.provenance, res.source_age_days, inputs.target))
        mean, _ = self.refiner({k: torch.from_numpy(v)[None] for k, v in arrays.items()})
        return mean[0]


def compute_fill_block(block: Block, height: int, width: int, loader: FillLoader, filler: Filler,
                       cfg: ReconstructConfig) -> BlockResult:
    """Fill one output block: ``fill_gaps`` on the block plus a halo of context, cropped to the block.

    Provenance 0 observed clear, 1 filled, 3 no clear observation within the maximum age (NaN, or with
    ``fill_unobserved="least-cloudy"`` the least cloudy value any date has there), 255 no data on any date;
    ``source_days`` is the age of each pixel's date. ``info`` holds the block's fill notes and pixel counts.
    """
    halo = filler.halo + (filler.refiner_halo if filler.refiner is not None else 0)
    a0, a1 = max(0, block.r0 - halo), min(height, block.r1 + halo)
    b0, b1 = max(0, block.c0 - halo), min(width, block.c1 + halo)
    inputs = loader(a0, a1, b0, b1)
    res = fill_gaps(inputs.target, inputs.clear, inputs.history, filler.fill, fits=filler.fits, origin=(a0, b0),
                    shadow_bands=filler.shadow_bands, ground_change=inputs.ground_change)
    crop = (slice(block.r0 - a0, block.r1 - a0), slice(block.c0 - b0, block.c1 - b0))
    image = np.clip(res.image[(slice(None),) + crop], 0.0, 1.0)  # NaN stays NaN
    prov = res.provenance[crop].copy()
    predicted = None
    if filler.refiner is not None:
        predicted = prov == PROVENANCE_FILLED
        image[:, predicted] = filler.refine(res, inputs)[(slice(None),) + crop][:, predicted]
    days = res.source_age_days[crop].copy()
    # the loader drops dates no pixel takes a value from: a pixel only they had data for saw clouds there
    prov[(prov == PROVENANCE_NODATA) & inputs.seen[crop]] = PROVENANCE_NO_CLEAR
    unobserved = prov == PROVENANCE_NO_CLEAR
    if inputs.least_cloudy is not None and unobserved.any():
        value, age = (a[(...,) + crop] for a in inputs.least_cloudy)
        take = unobserved & (age >= 0)
        image[:, take] = value[:, take]
        days[take] = age[take]
    days[prov == PROVENANCE_NODATA] = SOURCE_DAYS_NODATA
    filled_ages, filled_counts = np.unique(days[prov == PROVENANCE_FILLED], return_counts=True)
    per_age = {float(a): int(n) for a, n in zip(filled_ages, filled_counts)}
    notes = []
    for note in res.notes:  # counted on the block, not on its halo (the fallback count, on the window, is left out)
        n = per_age.get(float(note["age_days"]), 0)
        if n:
            notes.append({**{k: v for k, v in note.items() if k != "pixels_within_history_buffer"},
                          "filled_pixels": n})
    counts = {name: int((prov == code).sum()) for name, code in (
        ("observed", PROVENANCE_OBSERVED), ("filled", PROVENANCE_FILLED), ("no_clear", PROVENANCE_NO_CLEAR),
        ("nodata", PROVENANCE_NODATA))}
    if res.missed_shadow is not None:  # part of "filled": clear by the mask, filled as a shadow it missed
        counts["missed_shadow"] = int((res.missed_shadow[crop] & (prov == PROVENANCE_FILLED)).sum())
    if res.shadow_kept_by_sar is not None:  # part of "observed": the optical test flagged them, S1 had changed
        counts["shadow_kept_by_sar"] = int(res.shadow_kept_by_sar[crop].sum())
    info = {"counts": counts, "notes": notes, "dates_read": inputs.dates_read}
    if predicted is not None:  # counted as the fill made them (notes, counts); the layer says a model corrected them
        counts["predicted"] = int(predicted.sum())
        prov = np.where(predicted, np.uint8(PROVENANCE_PREDICTED), prov)
    return BlockResult(block, np.ascontiguousarray(image), prov, source_days=days, info=info)


# --- running all blocks: writers, progress, dask ---------------------------------------------------------


@dataclass
class Outputs:
    """Writers that receive finished blocks. ``std`` is opened on the first block that carries a variance
    (``std_factory(resume)``), so nobody has to run the model once just to learn whether it has one."""

    mean: BlockWriter
    provenance: BlockWriter
    std_factory: Callable[[bool], BlockWriter] | None = None
    resume: bool = False
    std: BlockWriter | None = None
    source_days: BlockWriter | None = None

    def all(self) -> list[BlockWriter]:
        return [w for w in (self.mean, self.provenance, self.std, self.source_days) if w is not None]

    def write(self, res: BlockResult) -> None:
        b = res.block
        self.mean.write(res.mean, b.r0, b.c0)
        self.provenance.write(res.provenance[None], b.r0, b.c0, encoded=True)
        if res.source_days is not None:
            if self.source_days is None:
                raise RuntimeError("the block has a source-date layer but no source-days output was configured")
            self.source_days.write(res.source_days[None], b.r0, b.c0, encoded=True)
        if res.std is not None:
            if self.std is None:
                if self.std_factory is None:
                    raise RuntimeError("the model returned a variance but no uncertainty output was configured")
                self.std = self.std_factory(self.resume)
            self.std.write(res.std, b.r0, b.c0)


class Progress:
    """Sidecar JSON listing finished blocks of one run fingerprint (and each block's ``info``, so a resumed run
    still summarizes every block); written atomically after each block."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: set[str] = set()
        self.info: dict[str, Any] = {}
        self.resumed = False
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                data = {}
            if data.get("fingerprint") == fingerprint:
                self.done = set(data.get("done", []))
                self.info = {k: v for k, v in data.get("info", {}).items() if k in self.done}
                self.resumed = bool(self.done)

    def mark(self, key: str, info: dict[str, Any] | None = None) -> None:
        self.done.add(key)
        if info is not None:
            self.info[key] = info
        data: dict[str, Any] = {"fingerprint": self.fingerprint, "done": sorted(self.done)}
        if self.info:
            data["info"] = self.info
        write_text_atomic(self.path, json.dumps(data))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


BlockCompute = Callable[[Block, int, int, Any, Any, ReconstructConfig], BlockResult]


def _run_local(todo: Sequence[Block], height: int, width: int, loader: Loader, predictor: Predictor,
               cfg: ReconstructConfig, compute: BlockCompute) -> Iterable[BlockResult]:
    for b in todo:
        yield compute(b, height, width, loader, predictor, cfg)


def _run_dask(todo: Sequence[Block], height: int, width: int, loader: Loader, predictor: Predictor,
              cfg: ReconstructConfig, client: Any, max_in_flight: int,
              compute: BlockCompute) -> Iterable[BlockResult]:
    from uuid import uuid4

    from distributed import as_completed

    if not todo:
        return
    run = uuid4().hex[:8]
    # Scatter once: workers keep the loader/model instead of receiving them with every block.
    loader_f, predictor_f = client.scatter([loader, predictor], broadcast=True)
    pending = list(todo)

    def submit(b: Block) -> Any:
        return client.submit(compute, b, height, width, loader_f, predictor_f, cfg,
                             key=f"cloudfree-block-{run}-{b.key}", pure=False)

    # at most ``max_in_flight`` blocks exist at once, so memory stays bounded on client and workers
    ac = as_completed([submit(pending.pop(0)) for _ in range(min(max_in_flight, len(pending)))])
    for fut in ac:
        res = fut.result()
        fut.release()
        if pending:
            ac.add(submit(pending.pop(0)))
        yield res


def run_blocks(
    height: int,
    width: int,
    loader: Loader,
    predictor: Predictor,
    cfg: ReconstructConfig,
    outputs: Outputs,
    progress: Progress,
    *,
    client: Any = None,
    on_block: Callable[[BlockResult], None] | None = None,
    compute: BlockCompute | None = None,
) -> int:
    """Compute and write every block not yet in ``progress``; returns the number of blocks computed.

    ``compute`` makes a block's result from ``(block, height, width, loader, predictor, cfg)``: ``compute_block``
    (a model) by default, ``compute_fill_block`` for the training-free fill. The caller commits the writers and
    clears the progress file after this returns.
    """
    compute = compute or compute_block
    blocks = plan_blocks(height, width, cfg.block)
    todo = [b for b in blocks if b.key not in progress.done]
    if progress.resumed:
        log.info("resuming: %d of %d blocks already written", len(blocks) - len(todo), len(blocks))
    if client is not None:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        results = _run_dask(todo, height, width, loader, predictor, cfg, client, max_in_flight=2 * n_workers,
                            compute=compute)
    else:
        results = _run_local(todo, height, width, loader, predictor, cfg, compute)
    n = 0
    # distributed.as_completed looks the client up as the "current" one; ours need not be the default
    with client.as_current() if client is not None else contextlib.nullcontext():
        for res in results:
            outputs.write(res)
            progress.mark(res.block.key, res.info)
            n += 1
            if on_block is not None:
                on_block(res)
    return n
