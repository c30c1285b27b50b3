"""Training-free gap filling on a real Sentinel-2 series, with truth: last-clear vs harmonized fills.

Series: ../shared/data/real/sen12mscr-ts (17 L1C dates 2018-06-10..12-22 near Rome, 13 bands, 256 x 256),
read through the ``local`` source; masks are the product's own (``mask_scene(method="auto")``, s2cloudless on
L1C), computed once per date and kept in memory.

Cases: every clear target date (<= 2 % not clear) with >= 2 earlier dates, x every cloudy date of the series
(20..90 % not clear: 2018-07-05 and 2018-09-18). The cloudy date's pixels AND mask replace the target's where
the cloudy date is not clear (real cloud, real spectra); the truth under it is the target's own pixels.
Methods see only the dates before the target. "persistent": the 3 dates before the target also get a real
cloud pasted, in turn from the other dates >= 20 % not clear (the fully overcast ones included, which
blot a date out), starting at an offset given by the target's index.

Scores on the hidden pixels (pasted not-clear) that a method filled: PSNR, SSIM, SAM, MAE (all 13 bands,
reflectance 0..1, ``pipeline.train.metrics``); dPSNR / min d: mean and worst per-case gain over last-clear
(a method that leaves far more pixels unfilled, e.g. max age 30, is scored on fewer, easier pixels); the
shares of hidden pixels left unfilled, filled from a pixel its date's mask calls not clear ("cloudy", must
be 0) and filled from within 3 px of such a pixel ("fringe"); the mean age of the fills; and "seam": the
mean |step| between neighbours across the border of the filled region over that between observed
neighbours (the truth scores 1.00; a visible seam is > 1.2).

    .venv/bin/python bench/harmonize_real.py [--quick] [--quicklooks /tmp/work] [--no-ssim]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from pipeline.harmonize import (
    AGE_NONE,
    PROVENANCE_FILLED,
    PROVENANCE_NO_CLEAR,
    PROVENANCE_NODATA,
    PROVENANCE_OBSERVED,
    FillConfig,
    FillResult,
    fill_gaps,
    shadow_bands,
)
from pipeline.masking.codes import MaskClass, is_contaminated
from pipeline.sensors import S2_BANDS

if TYPE_CHECKING:
    import rasterio

    from pipeline.grid import Grid

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
SERIES = REAL / "sen12mscr-ts"
RGB = (3, 2, 1)  # B4, B3, B2 in S2_BANDS order
SHADOW_BANDS = shadow_bands("s2_l1c", S2_BANDS)  # for the fill's missed-shadow check, where a variant turns it on
FRINGE_PX = 3

LAST_CLEAR = FillConfig(fit="none", buffer_px=0, history_buffer_px=0, feather_px=0)
DEFAULT = FillConfig()
METHODS: dict[str, FillConfig] = {
    "last-clear": LAST_CLEAR,
    "last-clear+buffers": FillConfig(fit="none"),
    "global-fit": FillConfig(fit="global"),
    "local-fit (default)": DEFAULT,
}
VARIANTS: dict[str, FillConfig] = {
    "local buffer 0/0": FillConfig(buffer_px=0, history_buffer_px=0),
    "local buffer 0/3": FillConfig(buffer_px=0, history_buffer_px=3),
    "local buffer 2/0": FillConfig(buffer_px=2, history_buffer_px=0),
    "local buffer 4/4": FillConfig(buffer_px=4, history_buffer_px=4),
    "local window 7": FillConfig(window_px=7),
    "local window 31": FillConfig(window_px=31),
    "local prior 0": FillConfig(prior_pixels=0),
    "local prior 60": FillConfig(prior_pixels=60),
    "local no class offsets": FillConfig(class_offsets=0),
    "local class offsets 6": FillConfig(class_offsets=6),
    "local class offsets 24": FillConfig(class_offsets=24),
    "local class prior 50": FillConfig(class_prior_pixels=50),
    "global-fit no class offsets": FillConfig(fit="global", class_offsets=0),
    "local no robust": FillConfig(robust_sigma=None),
    "local no window outlier drop": FillConfig(window_outlier_sigma=None),
    "local window outliers 12": FillConfig(window_outlier_sigma=12.0),
    "local window outliers 3": FillConfig(window_outlier_sigma=3.0),
    "local window outliers 8": FillConfig(window_outlier_sigma=8.0),
    "local no feather": FillConfig(feather_px=0),
    "local no buf fallback": FillConfig(history_buffer_fallback=False),
    "local max age 30": FillConfig(max_age_days=30),
    "local max age 60": FillConfig(max_age_days=60),
    "local max age 90": FillConfig(max_age_days=90),
    "local max age 120": FillConfig(max_age_days=120),
    # the series has no S1: the default check does not run on it; this runs its optical test alone
    "local shadow check 40 optical": FillConfig(shadow_sar_change_db=None),
}


@dataclass
class Series:
    dates: list[dt.date]
    refl: np.ndarray  # (T, C, H, W) float32 reflectance
    codes: np.ndarray  # (T, H, W) uint8 MaskClass


@dataclass
class Case:
    name: str
    variant: str
    target: int
    truth: np.ndarray  # (C, H, W)
    image: np.ndarray  # target with the pasted cloud
    clear: np.ndarray  # its clear mask
    hidden: np.ndarray  # pixels scored: the pasted not-clear ones
    history: list[tuple[float, np.ndarray, np.ndarray]]
    history_clear: dict[int, np.ndarray]  # age -> clear mask as given to the method (for the checks)


def load_series(root: Path = SERIES) -> Series:
    """Every S2 date of the folder, with the product's mask (one mask_scene call per date)."""
    import rasterio

    from pipeline.masking.scene import mask_scene
    from pipeline.sources.registry import get_source

    src = get_source("local", root=root)
    scenes = src.scenes("s2")
    with rasterio.open(scenes[0].properties["files"][0]) as ds:
        grid = utm_grid(ds)
    refl, codes = [], []
    for s in scenes:
        raster = src.read(s, grid).load()
        refl.append(raster.values.astype(np.float32))
        codes.append(mask_scene(raster, s, method="auto").values)
    return Series([s.date for s in scenes], np.stack(refl), np.stack(codes))


def utm_grid(ds: rasterio.io.DatasetReader, res: float = 10.0) -> Grid:
    """A 10 m UTM grid inside the file's footprint, as a region's grid would be.

    The files are on EPSG:4326; mask_scene converts its metre buffers with the grid's pixel size, which on a
    degree grid is ~9e-5, so a 30 m shadow buffer becomes ~300 000 px and a 0.04 % cloud turns the whole
    scene into shadow. The product reads onto a region's UTM grid, so this bench does too.
    """
    from affine import Affine
    from rasterio.warp import transform as warp_points

    from pipeline.grid import Grid
    from pipeline.regions import utm_crs

    b = ds.bounds
    crs = utm_crs((b.left + b.right) / 2, (b.bottom + b.top) / 2)
    xs, ys = warp_points(ds.crs, crs, [b.left, b.right, b.right, b.left], [b.top, b.top, b.bottom, b.bottom])
    left, right = np.ceil(max(xs[0], xs[3]) / res) * res, np.floor(min(xs[1], xs[2]) / res) * res
    bottom, top = np.ceil(max(ys[2], ys[3]) / res) * res, np.floor(min(ys[0], ys[1]) / res) * res
    return Grid(crs, Affine(res, 0.0, left, 0.0, -res, top), int((right - left) // res), int((top - bottom) // res))


def not_clear_share(codes: np.ndarray) -> float:
    return float(is_contaminated(codes).mean())


def build_cases(series: Series, persistent: bool, targets: list[int] | None = None) -> list[Case]:
    codes = series.codes
    share = [not_clear_share(c) for c in codes]
    clear_targets = [t for t in range(len(codes)) if share[t] <= 0.02 and t >= 2]
    cloudy = [t for t in range(len(codes)) if 0.20 <= share[t] <= 0.90]
    overcast = [t for t in range(len(codes)) if share[t] >= 0.20]
    out = []
    for t in targets if targets is not None else clear_targets:
        for c in cloudy:
            paste = is_contaminated(codes[c])
            image = np.where(paste[None], series.refl[c], series.refl[t])
            t_codes = np.where(paste, codes[c], codes[t])
            history, hist_clear = [], {}
            pool = [p for p in overcast if p != c]
            for k, j in enumerate(range(t - 1, -1, -1)):
                refl_j, codes_j = series.refl[j], codes[j]
                if persistent and k < 3 and pool:
                    p = pool[(t + k) % len(pool)]
                    pj = is_contaminated(codes[p])
                    refl_j = np.where(pj[None], series.refl[p], refl_j)
                    codes_j = np.where(pj, codes[p], codes_j)
                age = float((series.dates[t] - series.dates[j]).days)
                ok = ~is_contaminated(codes_j)
                history.append((age, refl_j, ok))
                hist_clear[int(age)] = ok
            name = f"{series.dates[t]:%m-%d} <- cloud {series.dates[c]:%m-%d}"
            out.append(Case(name, "persistent" if persistent else "standard", t, series.refl[t], image,
                            ~is_contaminated(t_codes), paste, history, hist_clear))
    return out


def seam_ratio(image: np.ndarray, filled: np.ndarray) -> float:
    """Mean |step| between 4-neighbours across the border of the filled region over the mean |step| between
    two observed neighbours: ~1 when no seam shows (the truth scores 1.00 on these cases)."""
    border, inside = [], []
    for ax in (1, 2):
        step = np.abs(np.diff(image, axis=ax)).mean(axis=0)
        a, b = (filled[:, :-1], filled[:, 1:]) if ax == 2 else (filled[:-1], filled[1:])
        ok = np.isfinite(step)
        border.append(step[(a != b) & ok])
        inside.append(step[~a & ~b & ok])
    across, within = np.concatenate(border), np.concatenate(inside)
    return float(across.mean() / within.mean()) if across.size and within.size else float("nan")


def checks(case: Case, res: FillResult) -> dict[str, float]:
    """Shares of hidden pixels: unfilled, filled from a not-clear pixel, filled from within FRINGE_PX of one."""
    hidden = case.hidden
    n = max(int(hidden.sum()), 1)
    filled = hidden & (res.provenance == PROVENANCE_FILLED)
    cloudy = np.zeros_like(hidden)
    fringe = np.zeros_like(hidden)
    for age in np.unique(res.source_age_days[filled]):
        ok = case.history_clear[int(age)]
        at = filled & (res.source_age_days == age)
        cloudy |= at & ~ok
        fringe |= at & ndimage.binary_dilation(~ok, iterations=FRINGE_PX)
    unfilled = hidden & ~np.isfinite(res.image).all(axis=0)
    return {"unfilled": unfilled.sum() / n, "from_cloudy": cloudy.sum() / n, "from_fringe": fringe.sum() / n,
            "seam": seam_ratio(res.image, res.provenance == PROVENANCE_FILLED),
            "mean_age": float(res.source_age_days[filled].mean()) if filled.any() else float("nan")}


def scores(case: Case, res: FillResult, ssim: bool) -> dict[str, float]:
    scored = case.hidden & np.isfinite(res.image).all(axis=0)
    if not scored.any():
        return dict.fromkeys(("psnr", "ssim", "sam", "mae"), float("nan"))
    if ssim:
        import torch

        from pipeline.train.metrics import compute_metrics

        torch.set_num_threads(1)  # 13 x 256^2 SSIM is 3x faster on one thread than fighting for two busy cores

        pred = torch.from_numpy(np.nan_to_num(res.image, nan=0.0))[None]
        truth = torch.from_numpy(case.truth)[None]
        m = compute_metrics(pred, truth, cloud=torch.from_numpy(scored)[None, None].float())
        return {k: m[f"cloud_{k}"] for k in ("psnr", "ssim", "sam", "mae")}
    p, t = res.image[:, scored].astype(np.float64), case.truth[:, scored].astype(np.float64)
    mse = float(((p - t) ** 2).mean())
    cos = (p * t).sum(0) / np.maximum(np.linalg.norm(p, axis=0) * np.linalg.norm(t, axis=0), 1e-12)
    return {"psnr": 20 * np.log10(1 / np.sqrt(mse)), "ssim": float("nan"),
            "sam": float(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean()), "mae": float(np.abs(p - t).mean())}


def evaluate(cases: list[Case], methods: dict[str, FillConfig], ssim: bool) -> dict[str, list[dict[str, float]]]:
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for case in cases:
        for name, cfg in methods.items():
            res = fill_gaps(case.image, case.clear, case.history, cfg, shadow_bands=SHADOW_BANDS)
            rows[name].append({**scores(case, res, ssim), **checks(case, res)})
    return rows


def print_table(title: str, rows: dict[str, list[dict[str, float]]], base: str = "last-clear") -> None:
    ref = np.array([r["psnr"] for r in rows[base]])
    print(f"\n{title}  ({len(ref)} cases; mean over cases of scores on the hidden pixels each method filled)")
    print(f"{'method':<22}{'PSNR':>7}{'dPSNR':>7}{'min d':>7}{'SSIM':>7}{'SAM':>7}{'MAE':>8}"
          f"{'unfill%':>9}{'cloudy%':>9}{'fringe%':>9}{'age d':>7}{'seam':>6}")
    for name, rs in rows.items():
        psnr = np.array([r["psnr"] for r in rs])
        d = psnr - ref
        ok = np.isfinite(d)

        def mean(k: str, rs: list[dict[str, float]] = rs) -> float:
            vals = [r[k] for r in rs if np.isfinite(r[k])]
            return float(np.mean(vals)) if vals else float("nan")

        print(f"{name:<22}{np.nanmean(psnr):7.2f}{d[ok].mean():+7.2f}{d[ok].min():+7.2f}"
              f"{mean('ssim'):7.3f}{mean('sam'):7.2f}"
              f"{mean('mae'):8.4f}{100 * mean('unfilled'):9.2f}{100 * mean('from_cloudy'):9.3f}"
              f"{100 * mean('from_fringe'):9.2f}{mean('mean_age'):7.1f}{mean('seam'):6.2f}")


def fringe_profile(series: Series) -> None:
    """How far a real cloud's fringe reaches beyond its mask: the residual of a clear neighbour date's global fit
    onto the cloudy date, by distance from the cloudy date's not-clear mask (fit on pixels > 12 px away).

    The pasted-cloud cases cannot show this (a pasted cloud ends exactly at its mask), so the buffers are set
    from this profile: observed pixels within a few px of a mask are worse than a harmonized fill (~0.02 rms)."""
    bins = ((1, 2), (2, 3), (3, 4), (4, 6), (6, 9), (9, 13), (13, 10**6))
    share = [not_clear_share(c) for c in series.codes]
    print("\nfringe profile: rms residual (13 bands) of a neighbour clear date fitted onto a cloudy date, by distance")
    heads = [f"{a}-{b - 1}px" if b - a > 1 else f"{a}px" for a, b in bins[:-1]] + [">12px"]
    print(f"{'cloudy <- clear':<24}" + "".join(f"{h:>9}" for h in heads))
    for c in (t for t in range(len(share)) if 0.20 <= share[t] <= 0.90):
        nc = is_contaminated(series.codes[c])
        dist = ndimage.distance_transform_edt(~nc)
        for r in (c - 1, c + 1):
            if not 0 <= r < len(share) or share[r] > 0.02:
                continue
            ok = ~nc & ~is_contaminated(series.codes[r])
            x, y = series.refl[r].astype(np.float64), series.refl[c].astype(np.float64)
            far = ok & (dist > 12)
            res = np.stack([y[b] - np.polyval(np.polyfit(x[b, far], y[b, far], 1), x[b]) for b in range(len(x))])
            cells = []
            for a, b in bins:
                m = ok & (dist >= a) & (dist < b)
                cells.append(f"{np.sqrt((res[:, m] ** 2).mean()):9.4f}" if m.sum() >= 50 else f"{'-':>9}")
            print(f"{series.dates[c]:%m-%d} <- {series.dates[r]:%m-%d}{'':<12}" + "".join(cells))


def _rgb(img: np.ndarray) -> np.ndarray:
    rgb = np.nan_to_num(np.moveaxis(img[list(RGB)], 0, -1), nan=0.0) * 3.5
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _prov_rgb(prov: np.ndarray) -> np.ndarray:
    colours = {PROVENANCE_OBSERVED: (40, 40, 40), PROVENANCE_FILLED: (60, 160, 230), PROVENANCE_NO_CLEAR: (230, 60, 60),
               PROVENANCE_NODATA: (255, 255, 255)}
    out = np.zeros((*prov.shape, 3), dtype=np.uint8)
    for code, c in colours.items():
        out[prov == code] = c
    return out


def quicklooks(cases: list[Case], folder: Path, tag: str) -> list[Path]:
    """truth | pasted cloudy input | last-clear | harmonized (default) | provenance, one row per case."""
    from PIL import Image

    rows = []
    for case in cases:
        lc = fill_gaps(case.image, case.clear, case.history, LAST_CLEAR, shadow_bands=SHADOW_BANDS)
        hz = fill_gaps(case.image, case.clear, case.history, DEFAULT, shadow_bands=SHADOW_BANDS)
        panels = [_rgb(case.truth), _rgb(case.image), _rgb(lc.image), _rgb(hz.image), _prov_rgb(hz.provenance)]
        gap = np.full((case.truth.shape[1], 4, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1))
    sep = np.full((4, rows[0].shape[1], 3), 255, dtype=np.uint8)
    grid = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    path = folder / f"harmonize_{tag}.png"
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    return [path]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every other target date only (deterministic subsample)")
    ap.add_argument("--no-ssim", action="store_true", help="skip SSIM (torch) for speed")
    ap.add_argument("--no-variants", action="store_true", help="only the four main methods")
    ap.add_argument("--quicklooks", type=Path, default=None, help="folder for harmonize_*.png quicklook grids")
    ap.add_argument("--cache", type=Path, default=None, help="npz to keep the series and masks in between runs")
    args = ap.parse_args()
    if not SERIES.exists():
        sys.exit(f"real series not found at {SERIES}")
    t0 = time.perf_counter()
    if args.cache and args.cache.exists():
        z = np.load(args.cache)
        series = Series([dt.date.fromisoformat(str(d)) for d in z["dates"]], z["refl"], z["codes"])
    else:
        series = load_series()
        if args.cache:
            np.savez(args.cache, dates=np.array([str(d) for d in series.dates]), refl=series.refl, codes=series.codes)
    print(f"series: {len(series.dates)} dates, masks in {time.perf_counter() - t0:.0f} s")
    for d, c in zip(series.dates, series.codes):
        cloud = 100 * float((c == MaskClass.CLOUD).mean())
        print(f"  {d}  not clear {100 * not_clear_share(c):5.1f} %  cloud {cloud:5.1f} %")
    fringe_profile(series)
    methods = METHODS if args.no_variants else {**METHODS, **VARIANTS}
    share = [not_clear_share(c) for c in series.codes]
    targets = [t for t in range(len(share)) if share[t] <= 0.02 and t >= 2]
    if args.quick:
        targets = targets[::2]
    for persistent in (False, True):
        cases = build_cases(series, persistent, targets)
        rows = evaluate(cases, methods, ssim=not args.no_ssim)
        print_table("persistent cloud (3 dates before the target also clouded)" if persistent else "standard", rows)
        if args.quicklooks:
            pick = [cases[i] for i in sorted(set(np.linspace(0, len(cases) - 1, 4).astype(int)))]
            for p in quicklooks(pick, args.quicklooks, "persistent" if persistent else "standard"):
                print(f"quicklook: {p}  (truth | cloudy input | last-clear | harmonized | provenance: "
                      f"grey observed, blue filled, red none)")
            print("  rows: " + "; ".join(c.name for c in pick))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; provenance codes {PROVENANCE_NO_CLEAR} no clear observation, "
          f"{PROVENANCE_NODATA} nodata; source age {AGE_NONE} = none")


if __name__ == "__main__":
    main()
