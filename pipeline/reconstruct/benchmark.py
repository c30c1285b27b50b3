"""``cloudfree benchmark``: reconstruction methods scored against a hidden truth cut from a real archive.

The cases (``pipeline.reconstruct.cases``) hide a clear date under another date's real cloud, and in the
persistent-cloud variant the K dates before it too. Every method runs the path a user runs: ``reconstruct``
on the case's ``CaseSource`` into a temporary folder, and its COG, provenance and source-date layer are read
back and scored against the truth with the field's recipe (``pipeline.train.metrics`` on [0, 1] reflectance,
every output band): PSNR, SSIM, SAM, MAE on the hidden pixels (the donor's not-clear pixels that were clear on
the target) and on all pixels; the shares of hidden pixels left unfilled (NaN, provenance 3 or 255), filled
from a date whose product mask calls that pixel not clear (through the source-date layer and the masks the
benchmark computed once per date; 0 expected), and taken from under a pasted cloud that the product's mask
of the pasted pixels let through (the donor's own mask calls it not clear; filled or kept as observed).

On a source that knows its truth (the synthetic archive) the ``simulator`` variant also reconstructs each cloudy
date under its own cloud and scores it against the simulator's cloud-free truth of that overpass, on the pixels
its true mask calls cloud, thin cloud or shadow (``kept_hidden`` then counts those the product's mask missed).

Flood-aware scores (``flood_scores``), in every variant: PSNR on the hidden pixels the target date's flood covers
(``flood_hidden_psnr``; the flood comes from the source's truth, so a pasted case on the synthetic archive has it
too) and the water-under-cloud F1 (``water_hidden_f1``: the reconstruction's MNDWI water map against the same index
on the case's truth image - the unpasted target, or the simulator's truth). A case without flooded or water pixels
under the cloud has NaN there and is left out of the means; ``flood_context`` records what each case rests on.
``stale_scores``: the share of the hidden pixels that no date of the ``STALE_DAYS`` before the target saw clear
(``stale_hidden``) and the PSNR on them (``stale_hidden_psnr``), where change since the fill's date is likeliest.

Methods: ``composite`` is the training-free default of ``reconstruct``; ``last-clear`` and ``global-fit`` are
its fill with ``fit="none"`` / ``fit="global"`` (``ReconstructConfig.fill``); any other name is a training run
folder (a checkpoint). Outputs, written atomically and only once every case has run: ``benchmark.json`` (every
case and the means), ``benchmark.md`` (the tables) and one quicklook grid per case under ``quicklooks/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from pipeline import __version__
from pipeline.files import write_bytes_atomic, write_text_atomic
from pipeline.masking.codes import MaskClass, is_contaminated
from pipeline.normalize import optical_to_unit
from pipeline.reconstruct.cases import (
    DONOR_NOT_CLEAR,
    MIN_EARLIER,
    PERSISTENT_K,
    PERSISTENT_MIN_NOT_CLEAR,
    TARGET_MAX_NOT_CLEAR,
    BenchmarkError,
    Case,
    CaseSource,
    SearchCache,
    Series,
    archive_region,
    build_cases,
    case_dates,
    load_series,
    make_case,
    make_simulated_case,
    remask,
    simulated_targets,
    truth_reader,
    with_truth_layers,
)
from pipeline.reconstruct.config import ReconstructConfig
from pipeline.regions import Region
from pipeline.sensors import get_sensor
from pipeline.sources.base import Source

if TYPE_CHECKING:
    import torch

__all__ = ["MIN_WATER_PIXELS", "OPTIONAL_COLUMNS", "TABLE_COLUMNS", "BenchmarkError", "BenchmarkReport",
           "archive_region", "columns", "default_methods", "flood_scores", "hidden_water_f1", "markdown_table",
           "resolve_methods", "run_benchmark", "table_columns", "table_rows"]

COMPOSITE = "composite"
BASELINE = "last-clear"
# method name -> FillConfig.fit it sets (None: the default as it is)
FILL_VARIANTS: dict[str, str | None] = {COMPOSITE: None, BASELINE: "none", "global-fit": "global"}
METRICS = ("psnr", "ssim", "sam", "mae")
FLOOD_SCORES = ("flood_hidden_psnr", "water_hidden_f1")
STALE_SCORES = ("stale_hidden_psnr", "stale_hidden")
CHECKS = ("unfilled", "filled_from_cloudy", "from_pasted_cloud", "kept_hidden")
VARIANTS = ("standard", "persistent", "simulator")

# provenance codes of reconstruct's provenance layer, read by value
PROV_OBSERVED, PROV_FILLED, PROV_PREDICTED, PROV_NO_CLEAR, PROV_NODATA = 0, 1, 2, 3, 255
PROV_COLOURS = {PROV_OBSERVED: (40, 40, 40), PROV_FILLED: (60, 160, 230), PROV_PREDICTED: (120, 200, 80),
                PROV_NO_CLEAR: (230, 60, 60), PROV_NODATA: (255, 255, 255)}
MASK_COLOURS: dict[int, tuple[int, int, int]] = {
    MaskClass.CLOUD: (255, 255, 255), MaskClass.THIN_CLOUD: (190, 190, 190), MaskClass.SHADOW: (110, 60, 150),
    MaskClass.NODATA: (230, 60, 60)}
QUICKLOOK_GAIN = 3.5  # reflectance x 3.5 -> display, as reconstruct's own quicklook
QUICKLOOK_MIN_SIDE = 320


# --- methods ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    checkpoint: str  # "composite" or a training run folder
    config: ReconstructConfig


def default_methods() -> list[str]:
    """Every training-free variant of ``reconstruct``."""
    return list(FILL_VARIANTS)


def resolve_methods(names: Sequence[str], base: ReconstructConfig | None = None) -> list[Method]:
    """Method names -> how each one runs; a name that is neither a variant nor a run folder is one clear error."""
    base = base or ReconstructConfig()
    out: list[Method] = []
    for name in names:
        if any(m.name == name for m in out):
            raise BenchmarkError(f"--methods lists {name!r} twice; give each method once")
        if name in FILL_VARIANTS:
            fit = FILL_VARIANTS[name]
            if fit is None:
                out.append(Method(name, COMPOSITE, base))
                continue
            from pipeline.harmonize import FillConfig

            fill = FillConfig.model_validate({**base.fill.model_dump(), "fit": fit})
            out.append(Method(name, COMPOSITE, base.model_copy(update={"fill": fill})))
            continue
        run = Path(name).expanduser()
        if not run.is_dir():
            raise BenchmarkError(
                f"--methods {name!r} is neither a training-free method ({', '.join(default_methods())}) nor a "
                "training run folder (model.pt + model.json); fix the name or the path")
        out.append(Method(name, str(run), base))
    if not out:
        raise BenchmarkError(f"--methods is empty; name at least one, e.g. {','.join(default_methods())}")
    return out


# --- one reconstruction read back -----------------------------------------------------------------------------


@dataclass
class Output:
    """A method's reconstruction of a case, as its files hold it."""

    bands: tuple[str, ...]
    image: np.ndarray  # (C, H, W) reflectance, NaN nodata
    provenance: np.ndarray  # (H, W) uint8
    source_days: np.ndarray | None  # (H, W) int16 days between D and the source date, -1 none
    seconds: float
    warnings: list[str] = field(default_factory=list)  # what reconstruct warned about on this case


def read_output(result: Any, fallback_bands: Sequence[str], seconds: float) -> Output:
    """The COG, provenance and (when written) source-date layer of a ``ReconstructResult``."""
    import rasterio

    with rasterio.open(result.cog) as ds:
        data = ds.read(masked=True).astype(np.float32)
        image = data.filled(np.nan)
        if ds.dtypes[0] == "uint16":
            image = image * np.float32(ds.scales[0]) + np.float32(ds.offsets[0])
        names = tuple(ds.descriptions) if all(ds.descriptions) else tuple(fallback_bands)[: ds.count]
    with rasterio.open(result.provenance) as ds:
        prov = ds.read(1)
    days = None
    path = getattr(result, "source_days", None)
    if path is not None and Path(path).exists():
        with rasterio.open(path) as ds:
            days = ds.read(1).astype(np.int16)
    return Output(names, image, prov, days, seconds)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def collect_warnings(name: str = "pipeline") -> Iterator[list[str]]:
    """Warnings logged under ``name`` go into the yielded list instead of the console: a benchmark runs
    reconstruct dozens of times, and its warnings belong to each case's record, not to the terminal."""
    logger = logging.getLogger(name)
    handler = _Collect()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def run_method(case: Case, method: Method, source: Source) -> Output:
    """``reconstruct`` on the case, exactly as a user runs it, into a temporary folder read back at once."""
    from pipeline.reconstruct.run import reconstruct

    with tempfile.TemporaryDirectory(prefix="cloudfree-benchmark-") as tmp, collect_warnings() as warnings:
        t0 = time.perf_counter()
        result = reconstruct(case.series.region, case.target_date, method.checkpoint, tmp, method.config,
                             source=CaseSource(source, case))
        seconds = time.perf_counter() - t0
        out = read_output(result, case.series.reflectance_bands, seconds)
    out.warnings = list(dict.fromkeys(warnings))
    return out


# --- scores ---------------------------------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def score(case: Case, out: Output, age: np.ndarray | None = None) -> dict[str, Any]:
    """Scores of one method on one case (module docstring); metrics are NaN where nothing could be scored.
    ``age``: the case's ``last_clear_age`` (computed here when not given; it is the same for every method)."""
    import torch

    from pipeline.train.metrics import compute_metrics

    series = case.series
    bands = [b for b in out.bands if b in series.reflectance_bands]
    if not bands:
        raise BenchmarkError(f"the reconstruction holds bands {list(out.bands)}, none of the archive's reflectance "
                             f"bands {list(series.reflectance_bands)}; nothing can be scored")
    pred = optical_to_unit(out.image[[out.bands.index(b) for b in bands]])
    truth = optical_to_unit(case.truth[[series.bands.index(b) for b in bands]])
    valid = np.isfinite(pred).all(axis=0) & np.isfinite(truth).all(axis=0)
    hidden = case.hidden & np.isfinite(truth).all(axis=0)
    n_hidden = max(int(hidden.sum()), 1)

    m = compute_metrics(torch.from_numpy(np.nan_to_num(pred, nan=0.0))[None],
                        torch.from_numpy(np.nan_to_num(truth, nan=0.0))[None],
                        valid=torch.from_numpy(valid)[None, None].float(),
                        cloud=torch.from_numpy(hidden)[None, None].float())
    prov = out.provenance
    unfilled = hidden & (~np.isfinite(pred).all(axis=0) | (prov == PROV_NO_CLEAR) | (prov == PROV_NODATA))
    res: dict[str, Any] = {
        "hidden": {k: m[f"cloud_{k}"] for k in METRICS},
        "all": {k: m[k] for k in METRICS},
        "unfilled": float(unfilled.sum() / n_hidden),
        "kept_hidden": float((hidden & (prov == PROV_OBSERVED)).sum() / n_hidden),
        "filled_from_cloudy": math.nan,
        "from_pasted_cloud": math.nan,
        "from_unknown_date": math.nan,
        "provenance": {str(int(c)): int(n) for c, n in zip(*np.unique(prov, return_counts=True))},
        "seconds": out.seconds,
        "warnings": out.warnings,
    }
    res.update(flood_scores(case, pred, truth, hidden & valid, bands))
    res.update(stale_scores(last_clear_age(case) if age is None else age, pred, truth, hidden & valid))
    if out.source_days is not None:
        res.update(_from_cloudy(case, hidden, prov, out.source_days, n_hidden))
    return res


# --- flood-aware scores ---------------------------------------------------------------------------------------


# Fewest reference water pixels under the cloud for a water F1: the real Rome series has 2-49 pixels over MNDWI 0.2
# per case (dark pixels, no water body), where one pixel moves the F1 by 0.1 or more
MIN_WATER_PIXELS = 100


def flood_scores(case: Case, pred: np.ndarray, truth: np.ndarray, scored: np.ndarray,
                 bands: Sequence[str], min_water_pixels: int = MIN_WATER_PIXELS) -> dict[str, float]:
    """On the hidden pixels a method filled (``scored``; unfilled ones count in ``unfilled``):

    - ``flood_hidden_psnr``: PSNR on those the flood covers on the target date (the source's truth; NaN on a source
      without one, or with no flooded pixel there);
    - ``water_hidden_f1``: F1 of the reconstruction's water map (``water_index``) against the same index on the case's
      truth image (NaN with fewer than ``min_water_pixels`` reference water pixels there, or without the index's
      bands).

    The reference is the truth image's own water map, not the simulator's land cover: the score is then the
    reconstruction's alone (a perfect one scores 1; against land cover it would be capped by the index's own errors,
    F1 0.74-0.94 on the synthetic truth) and a real archive, with no land cover, is scored the same way.
    """
    import torch

    from pipeline.train.metrics import masked_psnr

    p, t, where = torch.from_numpy(pred), torch.from_numpy(truth), torch.from_numpy(scored)
    flooded = math.nan
    if case.flooded is not None:
        flooded = masked_psnr(p, t, where & torch.from_numpy(case.flooded))
    return {"flood_hidden_psnr": flooded, "water_hidden_f1": hidden_water_f1(p, t, where, bands, min_water_pixels)}


def hidden_water_f1(pred: torch.Tensor, truth: torch.Tensor, where: torch.Tensor, bands: Sequence[str],
                    min_water_pixels: int = MIN_WATER_PIXELS) -> float:
    """F1 of ``pred``'s water map (``water_index`` of ``bands``) against ``truth``'s on the ``where`` pixels; NaN
    without the index's bands or with fewer than ``min_water_pixels`` reference water pixels there."""
    from pipeline.train.metrics import water_f1, water_index, water_map

    index = water_index(bands)
    if index is None:
        return math.nan
    ref = water_map(truth, index)
    if int((ref & where).sum()) < min_water_pixels:
        return math.nan
    return water_f1(water_map(pred, index), ref, where)


# A hidden pixel is stale when no date of the STALE_DAYS before the target saw it clear: there the ground most
# likely changed since (a flood came or went) and every fill is oldest. On the synthetic flood's aftermath 0.48 %
# (2021-08-21) and 0.26 % (08-31) of the hidden pixels are stale and they carry 28 % and 35 % of the composite's
# squared error (README, refine). Fewer than MIN_STALE_PIXELS give no figure: a handful would swing it by decibels.
STALE_DAYS = 15
MIN_STALE_PIXELS = 100


def last_clear_age(case: Case) -> np.ndarray:
    """(H, W) days from the most recent earlier date whose product mask calls the pixel clear (the masks the fill
    works with) to the target; inf where no earlier date does."""
    dates, target = case.series.dates, case.spec.target
    age = np.full(case.hidden.shape, np.inf)
    for i in range(target - 1, -1, -1):
        seen = (case.product_codes_on(i) == MaskClass.CLEAR) & np.isinf(age)
        age[seen] = (dates[target] - dates[i]).days
    return age


def stale_scores(age: np.ndarray, pred: np.ndarray, truth: np.ndarray, scored: np.ndarray,
                 min_pixels: int = MIN_STALE_PIXELS) -> dict[str, float]:
    """On the hidden pixels a method filled (``scored``): ``stale_hidden``, the share of them no date of the
    ``STALE_DAYS`` before the target saw clear (``age``: the case's ``last_clear_age``), and ``stale_hidden_psnr``,
    the PSNR on those (NaN with fewer than ``min_pixels``)."""
    import torch

    from pipeline.train.metrics import masked_psnr

    stale = scored & (age > STALE_DAYS)
    n = int(stale.sum())
    psnr = (masked_psnr(torch.from_numpy(pred), torch.from_numpy(truth), torch.from_numpy(stale))
            if n >= min_pixels else math.nan)
    return {"stale_hidden_psnr": psnr, "stale_hidden": n / max(int(scored.sum()), 1)}


def flood_context(case: Case) -> dict[str, Any]:
    """What the flood-aware scores of a case rest on: the water index, how many hidden pixels its truth image calls
    water and the flood covers, and how well the index finds the land cover's water there (the truth image's index
    against the simulator's land cover: the ceiling a water index reaches; NaN without land cover)."""
    import torch

    from pipeline.train.metrics import water_f1, water_index, water_map

    series = case.series
    bands = series.reflectance_bands
    index = water_index(bands)
    truth = torch.from_numpy(optical_to_unit(case.truth[[series.bands.index(b) for b in bands]]))
    hidden = torch.from_numpy(case.hidden) & torch.isfinite(truth).all(dim=0)
    ref = water_map(truth, index) if index is not None else None
    vs_cover = math.nan
    if ref is not None and case.water is not None:
        vs_cover = water_f1(ref, torch.from_numpy(case.water), hidden)
    return {
        "water_index": str(index) if index is not None else None,
        "hidden_water_pixels": int((ref & hidden).sum()) if ref is not None else None,
        "hidden_flooded_pixels": int((torch.from_numpy(case.flooded) & hidden).sum())
        if case.flooded is not None else None,
        "index_vs_land_cover_f1": vs_cover,
    }


def _from_cloudy(case: Case, hidden: np.ndarray, prov: np.ndarray, days: np.ndarray, n_hidden: int) -> dict[str, float]:
    """Through the source-date layer, shares of the hidden pixels

    - ``filled_from_cloudy``: filled from a date whose product mask calls the pixel not clear (a pasted date's
      product mask is that of its pasted pixels, ``remask``);
    - ``from_pasted_cloud``: whose value (filled or kept as observed) came from under a pasted cloud, by the
      donor's own mask: real cloud the product's mask of the pasted pixels let through;
    - ``from_unknown_date``: filled from a date outside the series (not checkable).
    """
    filled = hidden & (prov == PROV_FILLED)
    taken = hidden & (days >= 0)
    cloudy, pasted, unknown = (np.zeros_like(hidden) for _ in range(3))
    for age in np.unique(days[taken]):
        at = taken & (days == age)
        i = case.series.index(case.target_date - dt.timedelta(days=int(age)))
        if i is None:
            unknown |= at & filled
            continue
        cloudy |= at & filled & is_contaminated(case.product_codes_on(i))
        if i in case.pasted_codes:
            pasted |= at & is_contaminated(case.pasted_codes[i])
    return {"filled_from_cloudy": float(cloudy.sum() / n_hidden), "from_pasted_cloud": float(pasted.sum() / n_hidden),
            "from_unknown_date": float(unknown.sum() / n_hidden)}


# --- quicklook grid -----------------------------------------------------------------------------------------------


def _rgb(image: np.ndarray, bands: Sequence[str], rgb: Sequence[str]) -> np.ndarray:
    from pipeline.reconstruct.quicklook import rgb_quicklook

    if not all(b in bands for b in rgb):
        return np.zeros((*image.shape[-2:], 3), np.uint8)
    return rgb_quicklook(image[[list(bands).index(b) for b in rgb]], gain=QUICKLOOK_GAIN)


def _paint(codes: np.ndarray, colours: dict[int, tuple[int, int, int]], background: int = 0) -> np.ndarray:
    out = np.full((*codes.shape, 3), background, np.uint8)
    for code, colour in colours.items():
        out[codes == code] = colour
    return out


def quicklook_png(case: Case, outputs: dict[str, Output], scores: dict[str, dict[str, Any]]) -> bytes:
    """Rows: truth | pasted input | each method (hidden-pixel PSNR); what is scored | the input's mask | each
    method's provenance (grey observed, blue filled, green predicted, red no clear observation); for a
    persistent-cloud case, the clouded history dates."""
    from PIL import Image

    from pipeline.reconstruct.quicklook import side_by_side

    series = case.series
    rgb = get_sensor(series.sensor).rgb or series.bands[:3]
    s = case.spec
    top = [_rgb(case.truth, series.bands, rgb), _rgb(case.image, series.bands, rgb)]
    own = s.variant == "simulator"
    top_labels = [f"{'simulator truth' if own else 'truth'} {case.target_date}",
                  "input: its own cloud" if own else f"input: cloud of {series.dates[s.donor]}"]
    hidden = np.where(case.hidden[..., None], np.uint8(255), np.uint8(0)).repeat(3, axis=-1)
    bottom = [hidden, _paint(case.product_codes_on(s.target), MASK_COLOURS)]
    bottom_labels = [f"scored: {int(case.hidden.sum())} hidden px" + (" (true mask)" if own else ""),
                     "input's mask (white cloud, purple shadow)"]
    for name, out in outputs.items():
        psnr = scores[name]["hidden"]["psnr"]
        top.append(_rgb(out.image, out.bands, rgb))
        top_labels.append(f"{name}: {psnr:.2f} dB hidden" if math.isfinite(psnr) else name)
        bottom.append(_paint(out.provenance, PROV_COLOURS, background=128))
        bottom_labels.append(f"{name} provenance")
    panels = [(top, top_labels), (bottom, bottom_labels)]
    if s.history:  # persistent cloud: the clouded dates the method had instead of a clear history
        panels.append(([_rgb(case.pasted[j], series.bands, rgb) for j, _ in s.history],
                       [f"history {series.dates[j]}: cloud of {series.dates[p]}" for j, p in s.history]))
    h, w = case.hidden.shape
    up = -(-QUICKLOOK_MIN_SIDE // max(h, w))  # small AOIs enlarged (nearest) so labels and pixels stay readable
    rows = [side_by_side([p.repeat(up, axis=0).repeat(up, axis=1) for p in images], labels)
            for images, labels in panels]
    width = max(r.shape[1] for r in rows)
    gap = np.full((4, width, 3), 255, np.uint8)
    stacked = [part for r in rows for part in (np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)),
                                                      constant_values=255), gap)][:-1]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(stacked, axis=0)).save(buf, format="PNG")
    return buf.getvalue()


# --- the run --------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    variant: str
    name: str
    target: dt.date
    donor: dt.date
    history: list[tuple[dt.date, dt.date]]
    hidden_pixels: int
    hidden_share: float
    methods: dict[str, dict[str, Any]]
    quicklook: str  # path relative to the output folder
    flood: dict[str, Any] = field(default_factory=dict)  # flood_context: what its flood-aware scores rest on

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "name": self.name, "target": self.target.isoformat(),
                "donor": self.donor.isoformat(),
                "history": [{"date": d.isoformat(), "cloud_of": p.isoformat()} for d, p in self.history],
                "hidden_pixels": self.hidden_pixels, "hidden_share": self.hidden_share,
                "quicklook": self.quicklook, "flood": self.flood, "methods": self.methods}


@dataclass
class BenchmarkReport:
    out: Path
    series: Series
    methods: list[str]
    cases: list[CaseResult]
    means: dict[str, dict[str, dict[str, float]]]  # variant -> method -> mean of each number
    seconds: float
    files: list[Path] = field(default_factory=list)


def _mean(values: Sequence[float]) -> float:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(ok)) if ok else math.nan


def summarize(cases: Sequence[CaseResult], methods: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and method: the mean over cases of every score, and the mean hidden-pixel PSNR gain over
    last-clear (``vs_last_clear_db``, when last-clear ran)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant in VARIANTS:
        rows = [c for c in cases if c.variant == variant]
        if not rows:
            continue
        out[variant] = {}
        for name in methods:
            res = [c.methods[name] for c in rows]
            means = {f"{where}_{k}": _mean([r[where][k] for r in res]) for where in ("hidden", "all") for k in METRICS}
            # flood scores: cases without flooded or water pixels under the cloud are NaN and left out, never 0
            means.update({k: _mean([r.get(k, math.nan) for r in res]) for k in (*CHECKS, *STALE_SCORES, *FLOOD_SCORES,
                                                                                "seconds")})
            if BASELINE in methods:
                means["vs_last_clear_db"] = _mean([r["hidden"]["psnr"] - c.methods[BASELINE]["hidden"]["psnr"]
                                                   for r, c in zip(res, rows)])
            means["cases"] = float(len(rows))
            out[variant][name] = means
    return out


TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # key in the means, header, format
    ("hidden_psnr", "hidden PSNR", "{:.2f}"), ("hidden_ssim", "hidden SSIM", "{:.3f}"),
    ("hidden_sam", "hidden SAM°", "{:.2f}"), ("hidden_mae", "hidden MAE", "{:.4f}"), ("all_psnr", "all PSNR", "{:.2f}"),
    ("all_ssim", "all SSIM", "{:.3f}"), ("all_sam", "all SAM°", "{:.2f}"), ("all_mae", "all MAE", "{:.4f}"),
    ("unfilled", "unfilled %", "{:.2%}"), ("filled_from_cloudy", "from cloudy %", "{:.3%}"),
    ("from_pasted_cloud", "pasted cloud %", "{:.2%}"), ("vs_last_clear_db", "vs last-clear dB", "{:+.2f}"),
    ("seconds", "s/run", "{:.1f}"),
)
# shown only when some case measured them: enough stale pixels, a flooded target under a source's truth, enough
# water under the cloud
OPTIONAL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("stale_hidden_psnr", f"stale (> {STALE_DAYS} d) hidden PSNR", "{:.2f}"),
    ("flood_hidden_psnr", "flood hidden PSNR", "{:.2f}"), ("water_hidden_f1", "water F1 hidden", "{:.3f}"),
)


def _cell(value: float, fmt: str) -> str:
    return fmt.format(value).replace("%", "") if math.isfinite(value) else "-"


def columns(means: dict[str, dict[str, dict[str, float]]]) -> tuple[tuple[str, str, str], ...]:
    """``TABLE_COLUMNS``, then each of ``OPTIONAL_COLUMNS`` that some variant and method measured."""
    measured = [key for key, _, _ in OPTIONAL_COLUMNS
                if any(math.isfinite(m.get(key, math.nan)) for by_method in means.values() for m in by_method.values())]
    return TABLE_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c[0] in measured)


def table_rows(means: dict[str, dict[str, dict[str, float]]]) -> list[list[str]]:
    """The table as text cells, a row per variant and method: variant, method, cases, then ``columns``
    ('-' where not measured)."""
    rows = []
    for variant, by_method in means.items():
        for name, m in by_method.items():
            cells = [variant, name, str(int(m["cases"]))]
            rows.append(cells + [_cell(m.get(key, math.nan), fmt) for key, _, fmt in columns(means)])
    return rows


def table_columns(means: dict[str, dict[str, dict[str, float]]]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """The same table turned for a terminal: a column per (variant, method), a row per score (the first: cases)."""
    heads = [(variant, name) for variant, by_method in means.items() for name in by_method]
    rows = [["cases"] + [str(int(means[v][n]["cases"])) for v, n in heads]]
    rows += [[head] + [_cell(means[v][n].get(key, math.nan), fmt) for v, n in heads]
             for key, head, fmt in columns(means)]
    return heads, rows


def markdown_table(means: dict[str, dict[str, dict[str, float]]]) -> str:
    heads = ["variant", "method", "cases"] + [h for _, h, _ in columns(means)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(means)]
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x


def report_json(report: BenchmarkReport, methods: Sequence[Method]) -> dict[str, Any]:
    s = report.series
    targets, donors = case_dates(s)
    return _json_safe({
        "cloudfree_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "archive": {
            "source": s.source_name, "region": s.region.model_dump(mode="json"), "grid": s.grid.to_dict(),
            "sensor": s.sensor, "bands": list(s.bands), "mask_method": s.mask_method,
            "dates": [{"date": d.isoformat(), "not_clear": nc, "target": i in targets, "donor": i in donors}
                      for i, (d, nc) in enumerate(zip(s.dates, s.not_clear))],
        },
        "criteria": {
            "target_max_not_clear": TARGET_MAX_NOT_CLEAR, "target_min_earlier_dates": MIN_EARLIER,
            "donor_not_clear": list(DONOR_NOT_CLEAR), "persistent_min_not_clear": PERSISTENT_MIN_NOT_CLEAR,
            "hidden": "donor not clear and target clear, by the product's mask",
            "metrics": "pipeline.train.metrics on [0, 1] reflectance, every output reflectance band",
            "flood_hidden_psnr": "PSNR on the hidden pixels the target date's flood covers (the source's truth; "
                                 "NaN without one or without flooded hidden pixels)",
            "water_hidden_f1": "F1 on the hidden pixels of the reconstruction's water map (MNDWI > 0.2, NDWI > 0 "
                               "without SWIR1) against the same index on the case's truth image (NaN with fewer "
                               f"than {MIN_WATER_PIXELS} water pixels there)",
            "provenance_codes": {"0": "observed clear", "1": "filled", "2": "predicted", "3": "no clear observation",
                                 "255": "nodata"},
        },
        "methods": [{"name": m.name, "checkpoint": m.checkpoint,
                     "fill": m.config.fill.model_dump()} for m in methods],
        "means": report.means,
        "cases": [c.to_json() for c in report.cases],
        "seconds": report.seconds,
    })


def _check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be written before the cases run (nothing is created here)."""
    import os

    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BenchmarkError(f"--out {out}: {existing} is not a writable folder; pass a --out folder you can write")


def _quicklook_name(i: int, case: Case) -> str:
    s, d = case.spec, case.series.dates
    if s.variant == "simulator":
        return f"quicklooks/{s.variant}-{i:02d}-{d[s.target]:%Y%m%d}.png"
    return f"quicklooks/{s.variant}-{i:02d}-{d[s.target]:%Y%m%d}-cloud-{d[s.donor]:%Y%m%d}.png"


def run_benchmark(
    region: Region | None,
    source: Source,
    out: str | Path,
    *,
    methods: Sequence[str] | None = None,
    persistent: int = PERSISTENT_K,
    max_cases: int | None = None,
    targets: Sequence[dt.date] | None = None,
    simulator: bool = True,
    config: ReconstructConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchmarkReport:
    """Build the cases of ``region`` (None: derived from ``source``'s archive, ``archive_region``), run every
    method on each and write the report into ``out``; see the module docstring.

    ``persistent``: K dates before each target also clouded (0: the standard cases only); ``targets``: only these
    target dates; ``max_cases``: that many (target, donor) pairs spread over all of them, each run in every
    variant; ``simulator``: where the source knows its truth (synthetic), also score each cloudy date under its own
    cloud against the simulator's truth. Bad input raises one ``BenchmarkError`` (or another ``CloudfreeError``)
    line before anything is written.
    """
    t0 = time.perf_counter()
    say = progress or (lambda text: None)
    if persistent < 0:
        raise BenchmarkError(f"--persistent {persistent}: give the number of dates before the target to cloud "
                             f"(0 for the standard cases only, default {PERSISTENT_K})")
    if max_cases is not None and max_cases < 1:
        raise BenchmarkError(f"--max-cases {max_cases}: give at least 1 (or leave it out for every case)")
    _check_writable(Path(out))
    config = config or ReconstructConfig()
    resolved = resolve_methods(list(methods) if methods is not None else default_methods(), config)
    names = [m.name for m in resolved]
    cached = SearchCache(source)
    region = region if region is not None else archive_region(source)
    series = load_series(region, cached, mask_method=config.mask_method, progress=say)
    # the truth gives every case its flood and land cover; ``simulator`` only adds the cases scored on it
    truth = truth_reader(cached, series)
    specs = build_cases(series, persistent, max_cases, targets, simulated_targets(series, truth if simulator else None))

    out_dir = Path(out)
    results: list[CaseResult] = []
    pngs: dict[str, bytes] = {}
    for i, spec in enumerate(specs):
        if spec.variant == "simulator":
            assert truth is not None  # simulator cases exist only with a truth
            case = make_simulated_case(series, spec, truth)
        else:
            case = with_truth_layers(make_case(series, spec), truth)
            remask(case)
        outputs: dict[str, Output] = {}
        scores: dict[str, dict[str, Any]] = {}
        age = last_clear_age(case)
        for m in resolved:
            say(f"case {i + 1}/{len(specs)} ({spec.variant}) {spec.name(series)}: {m.name}")
            outputs[m.name] = run_method(case, m, cached)
            scores[m.name] = score(case, outputs[m.name], age)
        png = _quicklook_name(i, case)
        pngs[png] = quicklook_png(case, outputs, scores)
        d = series.dates
        results.append(CaseResult(spec.variant, spec.name(series), d[spec.target], d[spec.donor],
                                  [(d[j], d[p]) for j, p in spec.history], int(case.hidden.sum()),
                                  float(case.hidden.mean()), scores, png, flood_context(case)))
    report = BenchmarkReport(out_dir, series, names, results, summarize(results, names), time.perf_counter() - t0)

    # written last and each atomically: a failed run leaves no report behind, a finished one a complete report
    for rel, data in pngs.items():
        write_bytes_atomic(out_dir / rel, data)
        report.files.append(out_dir / rel)
    md = f"# cloudfree benchmark: {region.name} ({series.source_name})\n\n{markdown_table(report.means)}\n"
    write_text_atomic(out_dir / "benchmark.md", md)
    write_text_atomic(out_dir / "benchmark.json", json.dumps(report_json(report, resolved), indent=1) + "\n")
    report.files += [out_dir / "benchmark.md", out_dir / "benchmark.json"]
    return report
