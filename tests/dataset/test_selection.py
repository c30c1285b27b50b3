"""Selection rules, per-patch fractions and leak-free spatial splits, on small hand-made tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.dataset.selection import (
    FRACTION_COLUMNS,
    PatchOffset,
    assign_splits,
    cap_patches,
    dedupe_dates,
    mask_fractions_by_patch,
    patch_offsets,
    select_samples,
)
from pipeline.masking.scene import mask_fractions
from pipeline.regions import parse_region


def region(selection: dict, sensors=("s1", "s2"), patch=None, splits=None):
    return parse_region(
        {
            "name": "t",
            "bbox": [113.60, 34.71, 113.64, 34.74],
            "window": {"start": "2021-07-01", "end": "2021-08-31"},
            "sensors": list(sensors),
            "selection": selection,
            "patch": patch or {"size": 64, "stride": 64},
            "splits": splits or {"train": 0.6, "val": 0.2, "test": 0.2, "block_size": 1, "seed": 0},
        }
    )


def row(pid, family, day, cloud=0.0, shadow=0.0, valid=1.0, sensor=None, hour=3):
    sensor = sensor or {"s2": "s2_l1c", "s1": "s1_grd", "landsat": "landsat8_l2"}[family]
    when = pd.Timestamp(f"2021-{day} {hour:02d}:00", tz="UTC")
    sid = f"{sensor}_{when:%Y%m%dT%H}"
    if family == "s1":
        cloud, shadow = np.nan, np.nan
    return dict(zip(FRACTION_COLUMNS, [pid, family, sensor, sid, when, cloud, shadow, valid]))


def table(rows):
    return pd.DataFrame(rows, columns=FRACTION_COLUMNS)


# --- fractions ---------------------------------------------------------------------------------------


def test_patch_fractions_match_mask_fractions_of_each_cut():
    rng = np.random.default_rng(1)
    mask = rng.choice([0, 1, 2, 3, 4, 5], size=(100, 120), p=[0.5, 0.2, 0.1, 0.05, 0.1, 0.05]).astype(np.uint8)
    offs = [PatchOffset("a", 0, 0, 32), PatchOffset("b", 10, 50, 32), PatchOffset("c", 68, 88, 32)]
    got = mask_fractions_by_patch(mask, offs)
    for i, o in enumerate(offs):
        want = mask_fractions(mask[o.row : o.row + o.size, o.col : o.col + o.size])
        for k, v in want.items():
            assert got[k][i] == pytest.approx(v)
    aligned = [PatchOffset(f"p{r}{c}", r, c, 32) for r in range(0, 65, 16) for c in range(0, 81, 16)]  # block fast path
    got = mask_fractions_by_patch(mask, aligned)
    for i, o in enumerate(aligned):
        want = mask_fractions(mask[o.row : o.row + o.size, o.col : o.col + o.size])
        assert [got[k][i] for k in want] == pytest.approx(list(want.values()))
    with pytest.raises(ValueError, match="past the mask"):
        mask_fractions_by_patch(mask, [PatchOffset("x", 90, 0, 32)])


def test_patch_offsets_follow_region_patches():
    r = region({"rule": "tcsen12"}, patch={"size": 64, "stride": 32})
    g = r.grid()
    offs = patch_offsets(r)
    assert [o.patch_id for o in offs] == [pid for pid, _ in r.patches()]
    for o, (_, pg) in zip(offs, r.patches()):
        assert g.window(o.row, o.col, o.size, o.size) == pg
        assert o.patch_id == f"r{o.row:05d}c{o.col:05d}"


def test_dedupe_keeps_the_most_complete_scene_of_a_day():
    t = table(
        [row("p", "s2", "07-05", cloud=0.0, valid=0.5, hour=3), row("p", "s2", "07-05", cloud=0.3, valid=1.0, hour=4)]
    )
    d = dedupe_dates(t)
    assert len(d) == 1 and d.iloc[0]["valid_fraction"] == 1.0


# --- TCSEN12 -----------------------------------------------------------------------------------------


def test_tcsen12_reference_is_clear_inputs_earlier_and_sar_nearest():
    r = region(
        {"rule": "tcsen12", "reference_max_cloud": 0.05, "input_dates": 1, "max_gap_days": 30, "sar_max_days": 3}
    )
    rows = [
        row("p", "s2", "07-01", cloud=0.6),
        row("p", "s2", "07-06", cloud=0.02, shadow=0.02),  # reference (4 %)
        row("p", "s2", "07-11", cloud=0.04, shadow=0.02),  # 6 %: not a reference
        row("p", "s1", "06-30"),
        row("p", "s1", "07-02"),  # nearer to 07-01 than 06-30? both 1 day: the earlier wins
        row("p", "s1", "07-08"),
    ]
    sel = select_samples(table(rows), r)
    assert [s.sample_id for s in sel.samples] == ["p_20210706"]
    m = {x.role: x for x in sel.samples[0].members}
    assert [x.role for x in sel.samples[0].members] == ["input_1", "target", "sar_input_1", "sar_target"]
    assert m["input_1"].datetime.day == 1 and m["target"].datetime.day == 6
    assert m["sar_input_1"].datetime.day == 30 and m["sar_target"].datetime.day == 8
    assert sel.rejected_candidates["tcsen12: reference cloud+shadow > 5 %"] == 2


def test_tcsen12_rejections_name_the_rule_that_failed():
    r = region({"rule": "tcsen12", "input_dates": 2, "max_gap_days": 10, "sar_max_days": 1})
    rows = [
        # p1: no clear date at all
        row("p1", "s2", "07-01", cloud=0.5), row("p1", "s2", "07-06", cloud=0.3),
        # p2: clear reference but only one earlier date within 10 days
        row("p2", "s2", "06-01"), row("p2", "s2", "07-01", cloud=0.5), row("p2", "s2", "07-06"),
        # p3: everything but S1 (nearest S1 is 3 days away)
        row("p3", "s2", "07-01", cloud=0.5), row("p3", "s2", "07-03", cloud=0.5), row("p3", "s2", "07-06"),
        row("p3", "s1", "07-09"),
        # p4: incomplete coverage
        row("p4", "s2", "07-06", valid=0.9),
    ]
    sel = select_samples(table(rows), r, patch_ids=["p1", "p2", "p3", "p4", "p5"])
    assert sel.samples == []
    assert sel.rejected_patches == {
        "tcsen12: no reference date with cloud+shadow <= 5 %": 1,
        "tcsen12: fewer than 2 earlier optical date(s) within 10 days": 1,
        "tcsen12: no S1 within ±1 days of every optical date": 1,
        "tcsen12: no optical date with valid_fraction >= 0.99": 1,
        "tcsen12: no s2 scene covers the patch": 1,
    }
    assert "1 patch(es): tcsen12: no S1 within ±1 days of every optical date" in sel.explain()


def test_tcsen12_three_date_samples_take_the_most_recent_inputs_oldest_first():
    r = region({"rule": "tcsen12", "input_dates": 2, "max_gap_days": 30, "input_max_cloud": 0.8}, sensors=("s2",))
    rows = [row("p", "s2", d, cloud=c) for d, c in [("07-01", 0.5), ("07-05", 0.9), ("07-09", 0.3), ("07-13", 0.0)]]
    sel = select_samples(table(rows), r)
    (s,) = sel.samples
    assert [m.datetime.day for m in s.members] == [1, 9, 13]  # 07-05 is over input_max_cloud
    assert all(not m.role.startswith("sar") for m in s.members)


def test_sar_with_nodata_is_not_paired():
    r = region({"rule": "tcsen12", "sar_max_days": 3})
    rows = [
        row("p", "s2", "07-01", cloud=0.5),
        row("p", "s2", "07-06"),
        row("p", "s1", "07-02", valid=0.995),
        row("p", "s1", "07-06"),
    ]
    sel = select_samples(table(rows), r)
    assert sel.samples == [] and "no S1" in sel.explain()


# --- CMSN and SEN12MS-CR-TS --------------------------------------------------------------------------


def test_cmsn_caps_per_date_and_gap():
    r = region({"rule": "cmsn", "caps": [0.25, 0.15, 0.10], "max_gap_days": 64}, sensors=("landsat",))
    rows = [
        row("p", "landsat", "06-01", cloud=0.20),
        row("p", "landsat", "06-17", cloud=0.14),
        row("p", "landsat", "07-03", cloud=0.20),  # over the T2 cap: skipped as T2
        row("p", "landsat", "07-19", cloud=0.05),  # T3
        row("q", "landsat", "06-01", cloud=0.30),
        row("q", "landsat", "06-17", cloud=0.10),
        row("q", "landsat", "07-03", cloud=0.0),
    ]
    sel = select_samples(table(rows), r)
    ids = [s.sample_id for s in sel.samples]
    assert "p_20210719" in ids
    s = next(s for s in sel.samples if s.sample_id == "p_20210719")
    assert [m.datetime.day for m in s.members] == [1, 17, 19]
    assert [m.role for m in s.members] == ["input_1", "input_2", "target"]
    assert not any(i.startswith("q") for i in ids)  # q's only T1 candidate is over 25 %
    assert "cmsn: no T1" in sel.explain()


def test_sen12mscr_ts_target_least_cloudy_inputs_first_in_range():
    r = region({"rule": "sen12mscr_ts", "n_inputs": 2, "coverage_min": 0.1, "coverage_max": 0.8}, sensors=("s2",))
    rows = [
        row("p", "s2", d, cloud=c)
        for d, c in [("07-01", 0.05), ("07-05", 0.9), ("07-09", 0.3), ("07-13", 0.01), ("07-17", 0.5)]
    ]
    (s,) = select_samples(table(rows), r).samples
    assert s.sample_id == "p_20210713"
    assert [m.datetime.day for m in s.members] == [9, 17, 13]  # inputs in time order, target last
    r3 = region({"rule": "sen12mscr_ts", "n_inputs": 3, "coverage_min": 0.1, "coverage_max": 0.8}, sensors=("s2",))
    sel = select_samples(table(rows), r3)
    assert sel.samples == [] and "fewer than 3 input dates" in sel.explain()


# --- splits ------------------------------------------------------------------------------------------


def _grid_offsets(n: int, size: int, stride: int) -> list[PatchOffset]:
    return [
        PatchOffset(f"r{r * stride:05d}c{c * stride:05d}", r * stride, c * stride, size)
        for r in range(n)
        for c in range(n)
    ]


def test_block_splits_do_not_leak_through_overlapping_patches():
    offs = _grid_offsets(8, 64, 32)
    from pipeline.regions import Splits

    cfg = Splits(train=0.6, val=0.2, test=0.2, block_size=2, seed=3)
    split_of, dropped = assign_splits(offs, cfg, stride=32)
    assert dropped and set(split_of) | set(dropped) == {o.patch_id for o in offs}
    assert set(split_of.values()) == {"train", "val", "test"}
    by_id = {o.patch_id: o for o in offs}
    kept = list(split_of)
    for i, a in enumerate(kept):
        for b in kept[i + 1 :]:
            oa, ob = by_id[a], by_id[b]
            if abs(oa.row - ob.row) < 64 and abs(oa.col - ob.col) < 64:
                assert split_of[a] == split_of[b], f"{a} ({split_of[a]}) overlaps {b} ({split_of[b]})"
    assert assign_splits(offs, cfg, stride=32) == (split_of, dropped)  # deterministic
    # whole blocks stay together
    for a in kept:
        for b in kept:
            if (by_id[a].row // 64, by_id[a].col // 64) == (by_id[b].row // 64, by_id[b].col // 64):
                assert split_of[a] == split_of[b]


def test_non_overlapping_patches_drop_nothing_and_seed_changes_the_deal():
    from pipeline.regions import Splits

    offs = _grid_offsets(6, 64, 64)
    a, dropped = assign_splits(offs, Splits(block_size=1, seed=0), stride=64)
    b, _ = assign_splits(offs, Splits(block_size=1, seed=1), stride=64)
    assert dropped == [] and len(a) == 36 and a != b
    counts = pd.Series(a).value_counts()
    assert counts.to_dict() == {"train": 25, "val": 6, "test": 5}  # largest remainder of 25.2 / 5.4 / 5.4


def test_cap_patches_deals_round_robin():
    split_of = {f"p{i}": s for i, s in enumerate(["train"] * 6 + ["val"] * 2 + ["test"] * 2)}
    kept, capped = cap_patches(split_of, 5)
    assert len(kept) == 5 and len(capped) == 5
    assert set(kept.values()) == {"train", "val", "test"}
    assert cap_patches(split_of, None) == (split_of, [])


def test_no_candidate_rows_rejects_every_patch():
    r = region({"rule": "tcsen12"})
    sel = select_samples(table([]), r, patch_ids=["a", "b"])
    assert sel.samples == [] and sel.rejected_patches == {"tcsen12: no s2 scene covers the patch": 2}


# --- self-supervised rule and temporal hold-out -------------------------------------------------------


def test_self_supervised_takes_clear_targets_and_every_earlier_date_as_observed():
    r = region({"rule": "self-supervised", "input_dates": 3, "max_gap_days": 40}, sensors=("s2",))
    t = table([row("p", "s2", "07-01", cloud=0.9), row("p", "s2", "07-06", cloud=0.4), row("p", "s2", "07-11"),
               row("p", "s2", "07-16", cloud=0.01), row("p", "s2", "07-21", cloud=0.03)])
    sel = select_samples(t, r)
    # 07-16 is clear (<= 2 %) with three earlier dates, cloudy ones included; 07-21 (3 %) is no target; 07-11 has
    # only two earlier dates
    assert [s.sample_id for s in sel.samples] == ["p_20210716"]
    assert [m.datetime.strftime("%m-%d") for m in sel.samples[0].optical] == ["07-01", "07-06", "07-11", "07-16"]
    assert sel.rejected_candidates["self-supervised: reference cloud+shadow > 2 %"] == 3


def test_self_supervised_on_an_archive_without_a_clear_date_says_what_to_change():
    r = region({"rule": "self-supervised"}, sensors=("s2",))
    sel = select_samples(table([row("p", "s2", f"07-{d:02d}", cloud=0.3) for d in (1, 6, 11, 16, 21)]), r)
    assert not sel.samples
    assert sel.explain() == "1 patch(es): self-supervised: no reference date with cloud+shadow <= 2 %"


def test_temporal_holdout_keeps_no_target_date_or_patch_in_two_splits():
    from collections import Counter

    from pipeline.dataset.selection import temporal_holdout

    r = region({"rule": "self-supervised", "input_dates": 1}, sensors=("s2",))
    days = ("07-01", "07-11", "07-21", "07-31", "08-10")
    t = table([row(p, "s2", d) for p in ("a", "b") for d in days])
    samples = select_samples(t, r).samples
    rejected: Counter = Counter()
    kept = temporal_holdout(samples, {"a": "train", "b": "test"}, pd.Timestamp("2021-07-25").date(), rejected)
    assert [s.sample_id for s in kept] == ["a_20210711", "a_20210721", "b_20210731", "b_20210810"]
    assert rejected == {"temporal hold-out: target on/after 2021-07-25 on a train patch": 2,
                        "temporal hold-out: target before 2021-07-25 on a test patch": 2}
    assert temporal_holdout(samples, {"a": "train", "b": "test"}, None, rejected) == samples
