"""Where the harmonized composite still goes wrong, and what a learned model or SAR could win there.

Three measurements, each printed as a table of figures:

1. **Synthetic Zhengzhou on the flood's first day and after it** (``zhengzhou-demo``, the benchmark's simulator
   cases on 2021-07-22, 08-21 and 08-31: each date under its own cloud, scored against the simulator's truth), the
   composite with the fill's missed-shadow check (``FillConfig.shadow_check_px``) off, on with its optical test
   only (``shadow_sar_change_db`` None) and as the default (40 px, flagged pixels whose S1 changed stay observed).
   The error on the hidden pixels is
   split by where each pixel came from: kept as observed (the product's mask called it clear although the true mask
   says cloud, thin cloud or shadow) or filled from a date N days before. For each part: pixels, PSNR, share of the
   squared error, water-index false/missed water and F1 against the truth; "PSNR if kept fixed" is the ceiling of a
   perfect fix of the kept pixels. Then the true mask's classes against the scene mask's.
2. **Real S1 over real flood water** (``../shared/data/real/sen1floods11``, hand-labelled): VV (5 x 5 mean in
   linear power) of labelled water and dry pixels, and the share of labelled water a rule "SAR says land above
   T dB" would call dry; next to the synthetic S1 of zhengzhou-demo's flooded and standing water on its first S1
   date after the event.
3. **Real series, more than one earlier date** (``sen12mscr-ts``, the standard cases of bench/harmonize_real.py):
   the default composite against per-pixel blends of the two or three most recent harmonized dates, and the
   oracle that picks, per pixel, the better of the two most recent (the ceiling of any learned selector).

    .venv/bin/python bench/composite_errors.py [--skip-synthetic] [--skip-sar] [--skip-series]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real"
POST_EVENT = (dt.date(2021, 8, 21), dt.date(2021, 8, 31))
FLOOD_ONSET = dt.date(2021, 7, 22)  # the demo date: the flood's first day, 80 % cloud
SAR_THRESHOLDS_DB = (-18.0, -16.0, -14.0, -12.0)


def _psnr(se: np.ndarray) -> float:
    return float(10 * np.log10(1 / se.mean())) if se.size else float("nan")


def synthetic_composite_errors() -> None:
    import torch

    from pipeline.masking.codes import MaskClass
    from pipeline.reconstruct.benchmark import optical_to_unit, resolve_methods, run_method
    from pipeline.reconstruct.cases import (
        SearchCache,
        build_cases,
        load_series,
        make_simulated_case,
        simulated_targets,
        truth_reader,
    )
    from pipeline.regions import load_region
    from pipeline.sources.registry import get_source
    from pipeline.train.metrics import water_index, water_map

    region = load_region("zhengzhou-demo")
    src = SearchCache(get_source("synthetic"))
    series = load_series(region, src)
    truth = truth_reader(src, series)
    assert truth is not None
    dates = [FLOOD_ONSET, *POST_EVENT]
    specs = [s for s in build_cases(series, 0, None, dates, simulated_targets(series, truth))
             if s.variant == "simulator"]
    from pipeline.harmonize import FillConfig
    from pipeline.reconstruct.config import ReconstructConfig

    def composite(**fill: object) -> object:
        return resolve_methods(["composite"], ReconstructConfig(fill=FillConfig(**fill)))[0]  # type: ignore[arg-type]

    variants = {"off": composite(shadow_check_px=0), "optical": composite(shadow_sar_change_db=None),
                "default": composite()}
    bands = list(series.reflectance_bands)
    index = water_index(bands)
    assert index is not None
    print("\n1. synthetic zhengzhou-demo on the flood's first day and after it: the composite's error on the hidden "
          "pixels, by origin, with the fill's missed-shadow check off, optical test only, and the default (40 px, S1 "
          "test)")
    print(f"{'date':<7}{'fill':<11}{'origin':<20}{'pixels':>8}{'PSNR':>7}{'err %':>7}{'water FP':>9}{'water FN':>9}"
          f"{'F1':>6}")
    for spec in specs:
        case = make_simulated_case(series, spec, truth)
        day = f"{series.dates[spec.target]:%m-%d}"
        true = optical_to_unit(case.truth[[series.bands.index(b) for b in bands]])
        tw = water_map(torch.from_numpy(true), index).numpy()
        for label, method in variants.items():
            out = run_method(case, method, src)
            assert out.source_days is not None
            pred = optical_to_unit(out.image[[out.bands.index(b) for b in bands]])
            hidden = case.hidden & np.isfinite(pred).all(axis=0) & np.isfinite(true).all(axis=0)
            se = ((pred - true) ** 2).mean(axis=0)
            pw = water_map(torch.from_numpy(pred), index).numpy()
            total = se[hidden].sum()
            kept = hidden & (out.source_days == 0)
            parts = [("all hidden", hidden), ("kept as observed", kept),
                     ("filled <= 10 d", hidden & (out.source_days > 0) & (out.source_days <= 10)),
                     ("filled > 10 d", hidden & (out.source_days > 10))]
            for name, sel in parts:
                tp, fp, fn = (int(v.sum()) for v in (sel & pw & tw, sel & pw & ~tw, sel & ~pw & tw))
                f1 = 2 * tp / max(1, 2 * tp + fp + fn)
                print(f"{day:<7}{label:<11}{name:<20}{int(sel.sum()):>8}{_psnr(se[sel]):>7.2f}"
                      f"{100 * se[sel].sum() / total:>7.1f}{fp:>9}{fn:>9}{f1:>6.3f}")
            fixed = np.where(kept, 0.0, se)[hidden]
            print(f"{day:<7}{label:<11}{'PSNR if kept fixed':<20}{'':>8}{_psnr(fixed):>7.2f}  ({out.seconds:.1f} s)")
        ds = src.inner.truth(series.scenes[spec.target][0], series.grid)
        true_codes, product = np.asarray(ds["mask"].values), series.codes[spec.target]
        for cls in (MaskClass.CLOUD, MaskClass.THIN_CLOUD, MaskClass.SHADOW):
            sel = true_codes == cls
            clear = int((sel & (product == MaskClass.CLEAR)).sum())
            share = 100 * clear / max(1, int(sel.sum()))
            print(f"{'':<18}true {cls.name.lower():<15}{int(sel.sum()):>8}   the scene mask calls {share:.1f} % "
                  "of them clear")


def _vv_5x5(vv: np.ndarray) -> np.ndarray:
    """5 x 5 mean of VV in linear power, back in dB: speckle off, as any SAR water rule would look at it."""
    ok = np.isfinite(vv)
    lin = ndimage.uniform_filter(np.where(ok, 10 ** (vv / 10), 0.0), 5)
    weight = ndimage.uniform_filter(ok.astype(float), 5)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(weight > 0, 10 * np.log10(np.maximum(lin / weight, 1e-9)), np.nan)


def _sar_row(name: str, vv: np.ndarray, water: np.ndarray, dry: np.ndarray) -> None:
    w = np.nanpercentile(vv[water], [5, 50, 95])
    d = np.nanpercentile(vv[dry], [5, 50, 95])
    above = "".join(f"{100 * float((vv[water] > t).mean()):>8.1f}" for t in SAR_THRESHOLDS_DB)
    print(f"{name:<34}{int(water.sum()):>8}{w[0]:>7.1f}{w[1]:>7.1f}{w[2]:>7.1f}{d[0]:>7.1f}{d[1]:>7.1f}{d[2]:>7.1f}"
          f"{above}")


def sar_separability() -> None:
    import rasterio

    print("\n2. VV (dB, 5x5 mean) of water and dry pixels; '> T': % of the water a 'SAR says land' rule would call dry")
    print(f"{'data':<34}{'water':>8}{'w p5':>7}{'w p50':>7}{'w p95':>7}{'d p5':>7}{'d p50':>7}{'d p95':>7}"
          + "".join(f"{'> ' + str(int(t)):>8}" for t in SAR_THRESHOLDS_DB))
    stem = REAL / "sen1floods11" / "Spain_7370579_"
    with rasterio.open(f"{stem}S1Hand.tif") as s1, rasterio.open(f"{stem}LabelHand.tif") as lab:
        vv, label = _vv_5x5(s1.read(1).astype(np.float64)), lab.read(1)
    _sar_row("real Sen1Floods11 (hand label)", vv, label == 1, label == 0)

    from pipeline.regions import load_region
    from pipeline.sources.registry import get_source

    region = load_region("zhengzhou-demo")
    src = get_source("synthetic")
    grid = region.grid()
    event = region.event_date or dt.date(2021, 7, 20)
    scene = min((s for s in src.search(region, event, region.window.end, "s1")), key=lambda s: s.date)
    day = scene.date
    raster = src.read(scene, grid)
    names = [str(b) for b in raster["band"].values]
    truth = src.truth(scene, grid)
    water_codes = [int(c.split()[0]) for c in str(truth.attrs["landcover_classes"]).split(",")
                   if c.strip().split(" ", 1)[1] in ("water", "flooded")]
    flooded = np.asarray(truth["flooded"].values, bool)
    standing = np.isin(np.asarray(truth["landcover"].values), water_codes) & ~flooded
    vv = _vv_5x5(raster.values[names.index("VV")].astype(np.float64))
    _sar_row(f"synthetic {day} standing water", vv, standing, ~standing & ~flooded)
    _sar_row(f"synthetic {day} flooded", vv, flooded, ~standing & ~flooded)


def series_blends() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from harmonize_real import build_cases, load_series

    from pipeline.harmonize import PROVENANCE_FILLED, FillConfig, fill_gaps

    series = load_series()
    cases = build_cases(series, persistent=False)
    cfg = FillConfig()
    rows: dict[str, list[float]] = {k: [] for k in ("default", "mean of 2", "0.65/0.35 of 2", "mean of 3",
                                                     "median of 3", "oracle of 2")}
    for case in cases:
        base = fill_gaps(case.image, case.clear, case.history, cfg)
        per_date = []
        for h in [h for h in case.history if h[0] <= cfg.max_age_days][:5]:
            r = fill_gaps(case.image, case.clear, [h], cfg)
            per_date.append(np.where((r.provenance == PROVENANCE_FILLED)[None], r.image, np.nan))
        stack = np.stack(per_date)
        valid = np.isfinite(stack).all(axis=1)
        order = np.argsort(~valid, axis=0, kind="stable")  # most recent valid date first, per pixel

        def recent(n: int, stack: np.ndarray = stack, valid: np.ndarray = valid,
                   order: np.ndarray = order) -> np.ndarray:
            idx = order[:n]
            x = np.take_along_axis(stack, np.repeat(idx[:, None], stack.shape[1], axis=1), 0)
            return np.where(np.take_along_axis(valid, idx, 0)[:, None], x, np.nan)

        scored = case.hidden & (base.provenance == PROVENANCE_FILLED)

        def psnr(image: np.ndarray, base: np.ndarray = base.image, scored: np.ndarray = scored,
                 truth: np.ndarray = case.truth) -> float:
            image = np.where(np.isfinite(image), image, base)
            return _psnr(((image[:, scored] - truth[:, scored]) ** 2).mean(axis=0))

        two, three = recent(2), recent(3)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            # numpy warns on all-NaN slices: those pixels fall back to the default fill
            warnings.simplefilter("ignore", RuntimeWarning)
            rows["default"].append(psnr(base.image))
            rows["mean of 2"].append(psnr(np.nanmean(two, axis=0)))
            rows["0.65/0.35 of 2"].append(psnr(np.where(np.isfinite(two[1]), 0.65 * two[0] + 0.35 * two[1], two[0])))
            rows["mean of 3"].append(psnr(np.nanmean(three, axis=0)))
            rows["median of 3"].append(psnr(np.nanmedian(three, axis=0)))
            err = np.nan_to_num(((two - case.truth[None]) ** 2).mean(axis=1), nan=np.inf)
            rows["oracle of 2"].append(psnr(np.where((err[0] <= err[1])[None], two[0], two[1])))
    base_psnr = np.array(rows["default"])
    print(f"\n3. real series, {len(cases)} standard cases: PSNR on the filled hidden pixels (mean over cases)")
    print(f"{'method':<18}{'PSNR':>7}{'d mean':>8}{'d min':>7}{'d max':>7}")
    for name, vals in rows.items():
        d = np.array(vals) - base_psnr
        print(f"{name:<18}{np.mean(vals):>7.2f}{d.mean():>8.2f}{d.min():>7.2f}{d.max():>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-sar", action="store_true")
    ap.add_argument("--skip-series", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not args.skip_synthetic:
        synthetic_composite_errors()
    if not args.skip_sar:
        sar_separability()
    if not args.skip_series:
        series_blends()
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
