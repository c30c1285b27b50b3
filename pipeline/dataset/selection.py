"""Patch selection: which (patch, date) combinations become training samples, and why the rest do not.

Everything here is a pure function over small tables, so the rules are cheap to test and to explain:

1. ``patch_offsets`` lays the region's patch grid out as pixel offsets on the region grid.
2. ``mask_fractions_by_patch`` turns one whole-scene mask into per-patch cloud / shadow / valid
   fractions with summed-area tables (one pass over the scene, no per-patch reads).
3. ``select_samples`` applies the region's rule (TCSEN12, CMSN, SEN12MS-CR-TS) to the table of
   per-(patch, date, sensor) fractions and returns the samples plus the reason each rejected patch
   failed.
4. ``assign_splits`` puts whole spatial blocks of patches into train/val/test and drops patches that
   overlap a patch of another split (patches overlap when stride < size), so nothing leaks.

"Cover" below means cloud + shadow fraction of the whole patch (thin cloud counts as cloud): the
reference date of a TCSEN12 sample is clean by that stricter measure, not by cloud alone.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from pipeline.errors import DataError
from pipeline.masking.codes import MaskClass
from pipeline.regions import CMSNRule, Region, SelfSupervisedRule, SEN12MSCRTSRule, Splits, TCSEN12Rule

FRACTION_COLUMNS = [
    "patch_id",
    "family",
    "sensor",
    "scene_id",
    "datetime",
    "cloud_fraction",
    "shadow_fraction",
    "valid_fraction",
]

REASON_OVERLAP = "overlaps a patch of another split (dropped to prevent leakage)"
REASON_MAX_PATCHES = "over --max-patches"


class SelectionError(DataError):
    """No patch passed the selection rule; the message counts the rejections per reason."""


@dataclass(frozen=True)
class PatchOffset:
    patch_id: str
    row: int
    col: int
    size: int


@dataclass(frozen=True)
class Member:
    """One file of a sample: its role and which scene/date fills it."""

    role: str  # input_1.., target, sar_input_1.., sar_target
    family: str
    sensor: str
    scene_id: str
    datetime: pd.Timestamp


@dataclass(frozen=True)
class Sample:
    sample_id: str
    patch_id: str
    members: tuple[Member, ...]

    @property
    def optical(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if not m.role.startswith("sar_"))

    @property
    def sar(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role.startswith("sar_"))


@dataclass
class Selection:
    samples: list[Sample]
    rejected_patches: Counter = field(default_factory=Counter)  # reason -> patches with no sample
    rejected_candidates: Counter = field(default_factory=Counter)  # reason -> (patch, reference date) candidates
    rule: str = ""

    @property
    def patch_ids(self) -> list[str]:
        return sorted({s.patch_id for s in self.samples})

    def explain(self) -> str:
        if not self.rejected_patches:
            return "no patches were evaluated"
        parts = [
            f"{n} patch(es): {reason}"
            for reason, n in sorted(self.rejected_patches.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        return "; ".join(parts)


# --- patch grid and fractions ------------------------------------------------------------------------


def patch_offsets(region: Region) -> list[PatchOffset]:
    """The region's patches as pixel offsets on ``region.grid()`` (row-major, same ids as ``Region.patches``)."""
    g = region.grid()
    out = []
    for pid, pg in region.patches():
        col = (pg.transform.c - g.transform.c) / g.transform.a
        row = (pg.transform.f - g.transform.f) / g.transform.e
        out.append(PatchOffset(pid, int(round(row)), int(round(col)), pg.width))
    return out


def _window_sums(flag: np.ndarray, offsets: Sequence[PatchOffset]) -> np.ndarray:
    """Sum of ``flag`` inside each patch window via a summed-area table: O(H*W + patches)."""
    # int32 holds any count up to 2**31 pixels (a 46k x 46k grid) and halves the memory traffic of int64.
    sat = np.zeros((flag.shape[0] + 1, flag.shape[1] + 1), dtype=np.int32)
    np.cumsum(np.cumsum(flag, axis=0, dtype=np.int32), axis=1, out=sat[1:, 1:])
    r0 = np.array([o.row for o in offsets], dtype=np.int64)
    c0 = np.array([o.col for o in offsets])
    s = np.array([o.size for o in offsets])
    r1, c1 = r0 + s, c0 + s
    if len(offsets) and (r1.max() > flag.shape[0] or c1.max() > flag.shape[1]):
        raise ValueError(f"patch window reaches past the mask of shape {flag.shape}")
    return sat[r1, c1].astype(np.int64) - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]


def _block_window_sums(flag: np.ndarray, offsets: Sequence[PatchOffset], block: int) -> np.ndarray:
    """``_window_sums`` for patches aligned to a ``block``-pixel lattice: count per block, then a tiny SAT."""
    nr, nc = flag.shape[0] // block, flag.shape[1] // block
    counts = flag[: nr * block, : nc * block].reshape(nr, block, nc, block).sum(axis=(1, 3), dtype=np.int64)
    coarse = [PatchOffset(o.patch_id, o.row // block, o.col // block, o.size // block) for o in offsets]
    return _window_sums(counts, coarse)


def mask_fractions_by_patch(mask: np.ndarray, offsets: Sequence[PatchOffset]) -> dict[str, np.ndarray]:
    """Per-patch cloud (incl. thin cloud), shadow and valid (not nodata) fractions of a MaskClass mask."""
    mask = np.asarray(mask)
    if not offsets:
        return {k: np.zeros(0) for k in ("cloud_fraction", "shadow_fraction", "valid_fraction")}
    h, w = max(o.row + o.size for o in offsets), max(o.col + o.size for o in offsets)
    if h > mask.shape[0] or w > mask.shape[1]:
        raise ValueError(f"patch window reaches past the mask of shape {mask.shape}")
    mask = mask[:h, :w]  # only the rows/cols some patch covers
    # Region patches sit on a stride lattice: block counts make this ~10x cheaper than a full-res SAT.
    block = int(np.gcd.reduce([o.size for o in offsets] + [o.row for o in offsets] + [o.col for o in offsets]))
    sums = (lambda f: _block_window_sums(f, offsets, block)) if block >= 4 else (lambda f: _window_sums(f, offsets))
    area = np.array([o.size * o.size for o in offsets], dtype=np.float64)
    cloud = (mask == MaskClass.CLOUD) | (mask == MaskClass.THIN_CLOUD)
    return {
        "cloud_fraction": sums(cloud) / area,
        "shadow_fraction": sums(mask == MaskClass.SHADOW) / area,
        "valid_fraction": sums(mask != MaskClass.NODATA) / area,
    }


def fraction_rows(
    mask: np.ndarray,
    offsets: Sequence[PatchOffset],
    *,
    family: str,
    sensor: str,
    scene_id: str,
    datetime: dt.datetime | str,
) -> pd.DataFrame:
    """The fraction table rows of one scene: one row per patch. SAR rows carry NaN cloud/shadow."""
    fr = mask_fractions_by_patch(mask, offsets)
    df = pd.DataFrame(
        {
            "patch_id": [o.patch_id for o in offsets],
            "family": family,
            "sensor": sensor,
            "scene_id": scene_id,
            "datetime": pd.Timestamp(datetime).tz_convert("UTC")
            if pd.Timestamp(datetime).tzinfo
            else pd.Timestamp(datetime, tz="UTC"),
            **fr,
        }
    )
    if family == "s1":
        df["cloud_fraction"] = np.nan
        df["shadow_fraction"] = np.nan
    return df[FRACTION_COLUMNS]


def dedupe_dates(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (patch, family, sensor, calendar date): the scene with most valid pixels, then least cover.

    Patch files are named ``<sensor>_<YYYYMMDD>.tif``, so two scenes of one day (adjacent tiles, two
    orbits) must collapse to one; the tie-breakers make the choice deterministic.
    """
    if table.empty:
        return table.copy()
    t = table.copy()
    t["_date"] = t["datetime"].dt.strftime("%Y%m%d")
    t["_cover"] = (t["cloud_fraction"].fillna(0) + t["shadow_fraction"].fillna(0)).round(12)
    t["_nvalid"] = -t["valid_fraction"].round(12)
    t = t.sort_values(["patch_id", "family", "sensor", "_date", "_nvalid", "_cover", "scene_id"], kind="mergesort")
    t = t.drop_duplicates(["patch_id", "family", "sensor", "_date"], keep="first")
    return t.drop(columns=["_date", "_cover", "_nvalid"]).reset_index(drop=True)


# --- rules -------------------------------------------------------------------------------------------


def optical_family(region: Region) -> str:
    """The optical family the rule works on: CMSN is Landsat by definition, the others prefer S2."""
    if isinstance(region.selection, CMSNRule):
        if "landsat" not in region.sensors:
            raise SelectionError(
                f"region {region.name}: selection rule 'cmsn' needs 'landsat' in sensors "
                f"(got {list(region.sensors)}); add it"
            )
        return "landsat"
    if "s2" in region.sensors:
        return "s2"
    if "landsat" in region.sensors:
        return "landsat"
    raise SelectionError(
        f"region {region.name}: rule {region.selection.rule!r} needs an optical sensor (s2 or landsat) in sensors; "
        "add one"
    )


def uses_sar(region: Region) -> bool:
    """CMSN is optical-only; the other rules pair every optical date with S1 when the region lists s1."""
    return "s1" in region.sensors and not isinstance(region.selection, CMSNRule)


@dataclass(frozen=True)
class Obs:
    """One (patch, date, sensor) row of the fraction table, as the rules see it."""

    family: str
    sensor: str
    scene_id: str
    datetime: pd.Timestamp
    cloud: float
    shadow: float
    valid: float

    @property
    def cover(self) -> float:
        return self.cloud + self.shadow

    def member(self, role: str) -> Member:
        return Member(role, self.family, self.sensor, self.scene_id, self.datetime)


_EPS = 1e-12


def _pct(x: float) -> str:
    return f"{x * 100:g} %"


def _nearest_sar(sar: Sequence[Obs], when: pd.Timestamp, max_days: int) -> Obs | None:
    limit = pd.Timedelta(days=max_days)
    best = None
    for s in sar:  # sorted by time, so the earlier of two equidistant scenes wins
        d = abs(s.datetime - when)
        if d <= limit and (best is None or d < best[0]):
            best = (d, s)
    return best[1] if best else None


def _attach_sar(inputs: Sequence[Obs], target: Obs, sar: Sequence[Obs], max_days: int) -> list[Member] | None:
    out = []
    for i, o in enumerate([*inputs, target]):
        s = _nearest_sar(sar, o.datetime, max_days)
        if s is None:
            return None
        out.append(s.member("sar_target" if i == len(inputs) else f"sar_input_{i + 1}"))
    return out


def _sample(patch_id: str, inputs: Sequence[Obs], target: Obs, sar_members: list[Member] | None) -> Sample:
    members = [o.member(f"input_{i + 1}") for i, o in enumerate(inputs)] + [target.member("target")]
    return Sample(f"{patch_id}_{target.datetime:%Y%m%d}", patch_id, tuple(members + (sar_members or [])))


def _tcsen12(
    pid: str, opt: list[Obs], sar: list[Obs] | None, rule: TCSEN12Rule | SelfSupervisedRule, cand: Counter
) -> tuple[list[Sample], str]:
    """TCSEN12, and the self-supervised rule (the same choice with any cloud on the earlier dates)."""
    name = rule.rule
    valid = [o for o in opt if o.valid >= rule.min_valid]
    if not valid:
        return [], f"{name}: no optical date with valid_fraction >= {rule.min_valid:g}"
    refs = [o for o in valid if o.cover <= rule.reference_max_cloud + _EPS]
    cand[f"{name}: reference cloud+shadow > {_pct(rule.reference_max_cloud)}"] += len(valid) - len(refs)
    if not refs:
        return [], f"{name}: no reference date with cloud+shadow <= {_pct(rule.reference_max_cloud)}"
    gap = pd.Timedelta(days=rule.max_gap_days)
    reasons = [
        f"{name}: fewer than {rule.input_dates} earlier optical date(s) within {rule.max_gap_days} days",
        f"{name}: fewer than {rule.input_dates} earlier date(s) with cloud+shadow <= {_pct(rule.input_max_cloud)}",
        f"{name}: no S1 within ±{rule.sar_max_days} days of every optical date",
    ]
    furthest, samples = -1, []
    for ref in refs:
        earlier = [o for o in valid if o.datetime.date() < ref.datetime.date() and ref.datetime - o.datetime <= gap]
        if len(earlier) < rule.input_dates:
            cand[reasons[0]] += 1
            furthest = max(furthest, 0)
            continue
        usable = [o for o in earlier if o.cover <= rule.input_max_cloud + _EPS]
        if len(usable) < rule.input_dates:
            cand[reasons[1]] += 1
            furthest = max(furthest, 1)
            continue
        inputs = usable[-rule.input_dates :]  # the most recent ones, still oldest first
        sar_members = None
        if sar is not None:
            sar_members = _attach_sar(inputs, ref, sar, rule.sar_max_days)
            if sar_members is None:
                cand[reasons[2]] += 1
                furthest = max(furthest, 2)
                continue
        samples.append(_sample(pid, inputs, ref, sar_members))
    return (samples, "") if samples else ([], reasons[furthest])


def _cmsn(pid: str, opt: list[Obs], rule: CMSNRule, cand: Counter) -> tuple[list[Sample], str]:
    c1, c2, c3 = rule.caps
    valid = [o for o in opt if o.valid >= rule.min_valid]
    if not valid:
        return [], f"cmsn: no Landsat date with valid_fraction >= {rule.min_valid:g}"
    targets = [o for o in valid if o.cover <= c3 + _EPS]
    cand[f"cmsn: T3 cover > {_pct(c3)}"] += len(valid) - len(targets)
    if not targets:
        return [], f"cmsn: no T3 date with cover <= {_pct(c3)}"
    gap = pd.Timedelta(days=rule.max_gap_days)
    reasons = [
        f"cmsn: no T2 with cover <= {_pct(c2)} within {rule.max_gap_days} days before a T3",
        f"cmsn: no T1 with cover <= {_pct(c1)} before T2 within {rule.max_gap_days} days of T3",
    ]
    furthest, samples = 0, []
    for t3 in targets:
        window = [o for o in valid if o.datetime.date() < t3.datetime.date() and t3.datetime - o.datetime <= gap]
        # The latest admissible T2 leaves the widest range for T1, so a greedy pick never misses a triplet.
        t2s = [o for o in window if o.cover <= c2 + _EPS]
        if not t2s:
            cand[reasons[0]] += 1
            continue
        t2 = t2s[-1]
        t1s = [o for o in window if o.datetime.date() < t2.datetime.date() and o.cover <= c1 + _EPS]
        if not t1s:
            cand[reasons[1]] += 1
            furthest = 1
            continue
        samples.append(_sample(pid, [t1s[-1], t2], t3, None))
    return (samples, "") if samples else ([], reasons[furthest])


def _sen12mscr_ts(
    pid: str, opt: list[Obs], sar: list[Obs] | None, rule: SEN12MSCRTSRule, cand: Counter
) -> tuple[list[Sample], str]:
    valid = [o for o in opt if o.valid >= rule.min_valid]
    if not valid:
        return [], f"sen12mscr_ts: no optical date with valid_fraction >= {rule.min_valid:g}"
    target = min(valid, key=lambda o: round(o.cover, 12))  # least cloudy; min() keeps the earliest of a tie
    rest = [o for o in valid if o is not target]
    inputs = [o for o in rest if rule.coverage_min - _EPS <= o.cover <= rule.coverage_max + _EPS][: rule.n_inputs]
    if len(inputs) < rule.n_inputs:
        reason = (f"sen12mscr_ts: fewer than {rule.n_inputs} input dates with cover in "
                  f"[{_pct(rule.coverage_min)}, {_pct(rule.coverage_max)}]")
        cand[reason] += 1
        return [], reason
    sar_members = None
    if sar is not None:
        sar_members = _attach_sar(inputs, target, sar, rule.sar_max_days)
        if sar_members is None:
            reason = f"sen12mscr_ts: no S1 within ±{rule.sar_max_days} days of every optical date"
            cand[reason] += 1
            return [], reason
    return [_sample(pid, inputs, target, sar_members)], ""


def select_samples(table: pd.DataFrame, region: Region, patch_ids: Iterable[str] | None = None) -> Selection:
    """Apply ``region.selection`` to the per-(patch, date, sensor) fraction table.

    ``table`` has ``FRACTION_COLUMNS``; ``datetime`` is tz-aware UTC. Patches listed in ``patch_ids``
    that have no rows at all are rejected as "no scene covers the patch".
    """
    rule = region.selection
    fam = optical_family(region)
    sar_on = uses_sar(region)
    t = dedupe_dates(table)
    sel = Selection(samples=[], rule=rule.rule)
    ids = sorted(set(patch_ids) if patch_ids is not None else set(t["patch_id"]))
    per_patch: dict[str, list[Obs]] = {}
    if not t.empty:
        t = t.sort_values(["patch_id", "datetime", "sensor", "scene_id"], kind="mergesort")
        cols = zip(t["patch_id"], t["family"], t["sensor"], t["scene_id"], t["datetime"], t["cloud_fraction"],
                   t["shadow_fraction"], t["valid_fraction"])
        for pid, f, s, sid, when, c, sh, v in cols:
            per_patch.setdefault(pid, []).append(Obs(f, s, sid, when, float(c), float(sh), float(v)))
    for pid in ids:
        obs = per_patch.get(pid, [])
        opt = [o for o in obs if o.family == fam]
        if not opt:
            sel.rejected_patches[f"{rule.rule}: no {fam} scene covers the patch"] += 1
            continue
        # S1 must cover the whole patch: training refuses NaN SAR rather than zero-filling it.
        sar = [o for o in obs if o.family == "s1" and o.valid >= 1.0 - _EPS] if sar_on else None
        if isinstance(rule, (TCSEN12Rule, SelfSupervisedRule)):
            samples, reason = _tcsen12(pid, opt, sar, rule, sel.rejected_candidates)
        elif isinstance(rule, CMSNRule):
            samples, reason = _cmsn(pid, opt, rule, sel.rejected_candidates)
        elif isinstance(rule, SEN12MSCRTSRule):
            samples, reason = _sen12mscr_ts(pid, opt, sar, rule, sel.rejected_candidates)
        else:  # pragma: no cover - the pydantic union admits only these rules
            raise NotImplementedError(f"selection rule {rule!r}")
        if samples:
            sel.samples.extend(samples)
        else:
            sel.rejected_patches[reason] += 1
    sel.samples.sort(key=lambda s: s.sample_id)
    return sel


# --- splits ------------------------------------------------------------------------------------------


def assign_splits(offsets: Sequence[PatchOffset], splits: Splits, stride: int) -> tuple[dict[str, str], list[str]]:
    """Split patches by spatial blocks of ``splits.block_size`` patches; drop cross-split overlaps.

    Blocks are shuffled with ``splits.seed`` and dealt to train/val/test by their fractions (largest
    remainder). Two patches of different splits that share pixels would leak, so conflicting patches are
    dropped one by one, always from the split most over its target share, which keeps the kept counts
    near the fractions. Returns ``(patch -> split, dropped patch ids)``; dropped patches are absent from
    the mapping.
    """
    if not offsets:
        return {}, []
    bs = splits.block_size
    block_of = {o.patch_id: (o.row // stride // bs, o.col // stride // bs) for o in offsets}
    blocks = sorted(set(block_of.values()))
    rng = np.random.default_rng(splits.seed)
    order = rng.permutation(len(blocks))
    names = ["train", "val", "test"]
    fractions = np.array([splits.train, splits.val, splits.test])
    # Deal blocks by largest remainder so small block counts still honour the fractions closely.
    quota = fractions * len(blocks)
    counts = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - counts), kind="stable")[: len(blocks) - counts.sum()]:
        counts[i] += 1
    split_of_block: dict[tuple[int, int], str] = {}
    k = 0
    for name, n in zip(names, counts):
        for b in order[k : k + n]:
            split_of_block[blocks[b]] = name
        k += n
    split = {o.patch_id: split_of_block[block_of[o.patch_id]] for o in offsets}
    target = dict(zip(names, fractions))
    count = {name: sum(1 for v in split.values() if v == name) for name in names}
    at = {(o.row, o.col): o for o in offsets}
    reach = -(-max(o.size for o in offsets) // stride) - 1  # neighbours this many grid steps away can overlap
    conflicts: dict[str, set[str]] = {}
    for oa in offsets:
        for dr in range(-reach, reach + 1):
            for dc in range(-reach, reach + 1):
                ob = at.get((oa.row + dr * stride, oa.col + dc * stride))
                if ob is None or ob is oa or split[ob.patch_id] == split[oa.patch_id]:
                    continue
                if abs(oa.row - ob.row) < min(oa.size, ob.size) and abs(oa.col - ob.col) < min(oa.size, ob.size):
                    conflicts.setdefault(oa.patch_id, set()).add(ob.patch_id)
    dropped: set[str] = set()
    # Drop one patch at a time: from the split most over its share (keeps the fractions), then the patch
    # that touches most other-split patches (fewest drops), then the largest id (determinism).
    while conflicts:
        loser = max(conflicts, key=lambda p: (count[split[p]] / max(target[split[p]], 1e-9), len(conflicts[p]), p))
        for q in conflicts.pop(loser):
            conflicts[q].discard(loser)
            if not conflicts[q]:
                del conflicts[q]
        dropped.add(loser)
        count[split[loser]] -= 1
    return {pid: s for pid, s in split.items() if pid not in dropped}, sorted(dropped)


def temporal_holdout(samples: Sequence[Sample], split_of: dict[str, str], holdout_from: dt.date | None,
                     rejected: Counter) -> list[Sample]:
    """The samples a temporal hold-out keeps: targets before ``holdout_from`` on train/val patches, from it on test
    patches; the others (a date or a patch another split sees) are counted in ``rejected`` by reason."""
    if holdout_from is None:
        return list(samples)
    kept = []
    for s in samples:
        day = next(m.datetime for m in s.members if m.role == "target").date()
        late = day >= holdout_from
        if late == (split_of[s.patch_id] == "test"):
            kept.append(s)
        elif late:
            rejected[f"temporal hold-out: target on/after {holdout_from} on a {split_of[s.patch_id]} patch"] += 1
        else:
            rejected[f"temporal hold-out: target before {holdout_from} on a test patch"] += 1
    return kept


def cap_patches(split_of: dict[str, str], max_patches: int | None) -> tuple[dict[str, str], list[str]]:
    """Keep at most ``max_patches`` patches, dealt round-robin over train/val/test in patch-id order."""
    if max_patches is None or len(split_of) <= max_patches:
        return dict(split_of), []
    queues = {s: sorted(p for p, sp in split_of.items() if sp == s) for s in ("train", "val", "test")}
    kept: list[str] = []
    while len(kept) < max_patches:
        for s in ("train", "val", "test"):
            if queues[s] and len(kept) < max_patches:
                kept.append(queues[s].pop(0))
    keep = set(kept)
    return {p: s for p, s in split_of.items() if p in keep}, sorted(set(split_of) - keep)
