"""Flood-aware scores: the water index, water-under-cloud F1 and flood PSNR on small arrays with known answers, their
place in the benchmark's means and tables and in ``evaluate``, and one synthetic benchmark across the flood.
"""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.reconstruct import benchmark as bm
from pipeline.reconstruct.cases import Case, CaseSpec
from pipeline.regions import parse_region
from pipeline.train.metrics import WaterIndex, masked_psnr, water_f1, water_index, water_map

# --- the metric functions ---------------------------------------------------------------------------------------


def test_water_index_prefers_mndwi_and_falls_back_to_ndwi():
    assert water_index(("B2", "B3", "B4", "B8", "B11")) == WaterIndex("mndwi", 1, 4, 0.2)
    assert water_index(("B2", "B3", "B4", "B8")) == WaterIndex("ndwi", 1, 3, 0.0)
    assert water_index(("SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6")) == WaterIndex("mndwi", 1, 4, 0.2)
    assert water_index(("B2", "B4")) is None
    assert str(water_index(("B3", "B11"))) == "mndwi > 0.2"


def test_water_map_thresholds_the_index_and_leaves_undefined_pixels_dry():
    index = WaterIndex("mndwi", 0, 1, 0.2)
    green = torch.tensor([[0.10, 0.10, 0.10, 0.0, math.nan]])
    swir = torch.tensor([[0.02, 0.06, 0.30, 0.0, 0.1]])  # index 0.667, 0.25, -0.5, undefined, NaN
    assert water_map(torch.stack([green, swir]), index).tolist() == [[True, True, False, False, False]]
    assert water_map(torch.stack([green, swir])[None], index).shape == (1, 1, 5)  # a batch axis is kept


def test_water_f1_by_hand():
    truth = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 1, 1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    everywhere = torch.ones_like(truth)
    assert water_f1(pred, truth, everywhere) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # tp 3, fp 1, fn 1
    assert water_f1(truth, truth, everywhere) == 1.0
    only = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)  # the miss and the false alarm: tp 0
    assert water_f1(pred, truth, only) == 0.0


def test_water_f1_without_reference_water_or_pixels_is_nan_not_zero():
    pred = torch.tensor([[1, 0, 0, 0]], dtype=torch.bool)
    dry = torch.zeros(1, 4, dtype=torch.bool)
    assert math.isnan(water_f1(pred, dry, torch.ones(1, 4, dtype=torch.bool)))  # no water to find
    assert math.isnan(water_f1(pred, ~dry, dry))  # no pixel to score
    with pytest.raises(DataError, match="must be the same"):
        water_f1(pred, dry[:, :3], dry)


def test_masked_psnr_by_hand():
    target = torch.full((3, 4, 4), 0.4)
    pred = target.clone()
    where = torch.zeros(4, 4, dtype=torch.bool)
    where[:2] = True
    pred[:, :2] += 0.1  # off by 0.1 on the scored pixels only
    pred[:, 2:] = 0.0
    assert masked_psnr(pred, target, where) == pytest.approx(20.0)
    assert masked_psnr(target, target, where) == math.inf
    assert math.isnan(masked_psnr(pred, target, torch.zeros(4, 4, dtype=torch.bool)))
    # nodata (NaN) outside the scored pixels leaves the score as it was
    holes = pred.clone()
    holes[:, ~where] = math.nan
    assert masked_psnr(holes, target, where) == pytest.approx(20.0)
    with pytest.raises(DataError, match="psnr mask"):
        masked_psnr(pred, target, where[:3])


# --- in the benchmark ---------------------------------------------------------------------------------------------

BANDS = ("B3", "B8", "B11")
WATER = (0.10, 0.05, 0.02)  # MNDWI 0.67
LAND = (0.08, 0.30, 0.20)  # MNDWI -0.43


def _case(flooded: np.ndarray | None) -> Case:
    """A 1 x 4 target: water, water, land, land; the first three pixels hidden (no series: not read)."""
    truth = np.array([WATER, WATER, LAND, LAND], np.float32).T[:, None, :]
    hidden = np.array([[True, True, True, False]])
    return Case(CaseSpec("standard", 3, 2), None, truth, truth, hidden, flooded=flooded)


def test_flood_scores_of_a_case():
    truth = np.array([WATER, WATER, LAND, LAND], np.float32).T[:, None, :]
    pred = np.array([WATER, LAND, LAND, WATER], np.float32).T[:, None, :]  # one hidden water pixel lost
    pred[:, 0, 0] += 0.1
    scored = np.array([[True, True, True, False]])
    flooded = np.array([[True, False, False, False]])
    got = bm.flood_scores(_case(flooded), pred, truth, scored, BANDS, min_water_pixels=1)
    assert got["flood_hidden_psnr"] == pytest.approx(20.0)  # the flooded hidden pixel is 0.1 off in every band
    assert got["water_hidden_f1"] == pytest.approx(2 / 3)  # tp 1, fn 1 (the unhidden false alarm is not scored)
    nothing = bm.flood_scores(_case(None), pred, truth, scored, BANDS, 1)  # no truth: no flood figure, F1 still
    assert math.isnan(nothing["flood_hidden_psnr"]) and nothing["water_hidden_f1"] == pytest.approx(2 / 3)
    dry = bm.flood_scores(_case(~scored), pred, truth, scored, ("B3", "B4"), 1)  # flood outside; no index bands
    assert math.isnan(dry["flood_hidden_psnr"]) and math.isnan(dry["water_hidden_f1"])
    # two water pixels under the cloud are too few for an F1 by default (one pixel would move it by 1/3)
    assert math.isnan(bm.flood_scores(_case(flooded), pred, truth, scored, BANDS)["water_hidden_f1"])


def _result(name: str, flood: float, f1: float) -> bm.CaseResult:
    scores = {"hidden": dict.fromkeys(bm.METRICS, 20.0), "all": dict.fromkeys(bm.METRICS, 25.0),
              **dict.fromkeys(bm.CHECKS, 0.0), "seconds": 1.0, "flood_hidden_psnr": flood, "water_hidden_f1": f1}
    day = dt.date(2021, 8, 1)
    return bm.CaseResult("standard", name, day, day, [], 10, 0.1, {"composite": scores}, "q.png")


def test_cases_without_flood_are_left_out_of_the_means_and_the_columns():
    means = bm.summarize([_result("a", 24.0, 0.8), _result("b", math.nan, math.nan)], ["composite"])
    m = means["standard"]["composite"]
    assert m["flood_hidden_psnr"] == 24.0 and m["water_hidden_f1"] == pytest.approx(0.8)  # not halved by a 0
    assert [c[0] for c in bm.columns(means)][-2:] == ["flood_hidden_psnr", "water_hidden_f1"]
    assert "flood hidden PSNR" in bm.markdown_table(means) and len(bm.table_rows(means)[0]) == 3 + len(
        bm.columns(means))
    _, rows = bm.table_columns(means)
    assert rows[-1] == ["water F1 hidden", "0.800"]
    dry = bm.summarize([_result("b", math.nan, math.nan)], ["composite"])
    assert math.isnan(dry["standard"]["composite"]["flood_hidden_psnr"])
    assert bm.columns(dry) == bm.TABLE_COLUMNS and "flood" not in bm.markdown_table(dry)


# --- in evaluate ----------------------------------------------------------------------------------------------


def test_evaluate_scores_water_under_cloud_per_image():
    from pipeline.train.evaluate import image_scores, markdown_table, mean_scores

    target = torch.tensor(LAND).view(1, 3, 1, 1).repeat(2, 1, 8, 8)
    target[0, :, :4] = torch.tensor(WATER).view(3, 1, 1)  # image 0: water in the top half, image 1: none
    pred = target.clone()
    pred[0, :, :2] = torch.tensor(LAND).view(3, 1, 1)  # half the water lost
    cloud = torch.ones(2, 8, 8)
    rows = image_scores(pred, target, torch.ones(2, 8, 8), cloud, water=water_index(BANDS))
    assert rows[0]["cloud_water_f1"] == pytest.approx(2 / 3) and math.isnan(rows[1]["cloud_water_f1"])
    mean = mean_scores(rows)
    assert mean["cloud_water_f1"] == pytest.approx(2 / 3) and mean["n_images_water"] == 1
    assert "cloud_water_f1" not in image_scores(pred, target, torch.ones(2, 8, 8), cloud)[0]
    result = {"model": "unet", "split": "test", "n_samples": 2, "cloud_pixels": "all", "water_index": "mndwi > 0.2",
              "results": {"model": {"all": mean}, "composite": {"all": mean}}}
    assert "Water-under-cloud F1 (mndwi > 0.2" in markdown_table(result) and "unet 0.667" in markdown_table(result)


# --- a synthetic benchmark across the flood ---------------------------------------------------------------------

# ~1 x 1 km of zhengzhou-demo's flooded south-east (37 % of it flooded on 2021-08-01), up to a clear date after the
# event (2021-07-20; the flood recedes until 08-13): 7 dates, two small cases of one method (~15 s)
FLOOD_TINY = {"name": "flood-tiny", "bbox": [113.668, 34.7154, 113.679, 34.724], "sensors": ["s2"],
              "event_date": "2021-07-20", "window": {"start": "2021-07-01", "end": "2021-08-01"}}
BEFORE, AFTER = dt.date(2021, 7, 12), dt.date(2021, 8, 1)


def test_synthetic_benchmark_after_the_event_reports_flood_figures(tmp_path):
    from pipeline.sources.synthetic.source import SyntheticSource

    report = bm.run_benchmark(parse_region(FLOOD_TINY, "flood-tiny"), SyntheticSource(), tmp_path / "out",
                              methods=["composite"], persistent=0, max_cases=2, targets=[BEFORE, AFTER],
                              simulator=False)
    by_target = {c.target: c for c in report.cases}
    assert set(by_target) == {BEFORE, AFTER}
    after, before = by_target[AFTER], by_target[BEFORE]
    assert after.flood["hidden_flooded_pixels"] > 500 and after.flood["hidden_water_pixels"] > 500
    assert after.flood["index_vs_land_cover_f1"] > 0.9  # the index finds the simulator's water: a fair reference
    scores = after.methods["composite"]
    assert 15 < scores["flood_hidden_psnr"] < 60 and 0.3 < scores["water_hidden_f1"] <= 1
    assert before.flood["hidden_flooded_pixels"] == 0 and math.isnan(before.methods["composite"]["flood_hidden_psnr"])
    assert report.means["standard"]["composite"]["flood_hidden_psnr"] == pytest.approx(scores["flood_hidden_psnr"])
    data = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    cases = {c["target"]: c for c in data["cases"]}
    assert cases["2021-07-12"]["methods"]["composite"]["flood_hidden_psnr"] is None
    assert cases["2021-08-01"]["flood"]["water_index"] == "mndwi > 0.2"
    assert "flood hidden PSNR" in (tmp_path / "out" / "benchmark.md").read_text()
