"""Checkpoint ``composite``: the harmonized training-free fill through ``reconstruct`` -> COG, on the synthetic
archive and on a local SEN12MS-CR-TS folder (provenance classes, source dates, masks, refusals, block borders,
dates on other grids)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.errors import SourceError
from pipeline.grid import Grid
from pipeline.harmonize import FillConfig, fill_reach
from pipeline.masking.codes import MaskClass, to_cube_codes
from pipeline.reconstruct.cog import validate_cog
from pipeline.reconstruct.config import ReconstructConfig
from pipeline.reconstruct.mosaic import mosaic_date
from pipeline.reconstruct.plan import plan_fill
from pipeline.reconstruct.run import reconstruct
from pipeline.regions import parse_region
from pipeline.sensors import S2_BANDS
from pipeline.sources.synthetic.source import SyntheticSource

DATE = dt.date(2021, 7, 22)  # partly cloudy over Zhengzhou; 07-17 overcast, 07-12 and 07-07 clear


def fast(**options) -> ReconstructConfig:
    """s2cloudless costs ~10 s per Mpx and date here; masking is tested elsewhere. float32 so pixels compare
    exactly (the uint16 default's rounding is tested in test_config)."""
    return ReconstructConfig(**{"mask_method": "cloudscore", "dtype": "float32", **options})


def _region(name: str, east: float, north: float, sensors=("s1", "s2", "landsat")):
    return parse_region({
        "name": name, "bbox": [113.60, 34.71, east, north], "crs": "auto", "resolution": 10,
        "event_date": "2021-07-20", "window": {"start": "2021-07-01", "end": "2021-08-31"}, "sensors": list(sensors),
    })


SMALL = _region("tiny", 113.6225, 34.7295)  # ~210 x 215 px
WIDE = _region("strip", 113.6775, 34.7185)  # ~715 x 95 px: two output blocks of 512


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


@pytest.fixture(scope="module")
def fill_run(tmp_path_factory):
    return reconstruct(SMALL, DATE, "composite", tmp_path_factory.mktemp("fill"), fast(block=512))


def test_writes_cog_provenance_and_source_days(fill_run):
    for path in (fill_run.cog, fill_run.provenance, fill_run.source_days):
        assert validate_cog(path).ok
    assert fill_run.source_days.name == "tiny_20210722_composite_source_days.tif"
    with rasterio.open(fill_run.source_days) as ds:
        assert ds.dtypes[0] == "int16" and ds.nodata == -1 and ds.count == 1
    prov, days, image = _read(fill_run.provenance)[0], _read(fill_run.source_days)[0], _read(fill_run.cog)
    assert set(np.unique(prov)) == {0, 1}  # partly cloudy, clear dates 10 and 15 days before: everything filled
    assert (days[prov == 0] == 0).all() and (days[prov == 1] > 0).all()
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    filled = {d["date"]: d["filled_pixels"] for d in fill_run.fill["dates"]}
    assert sum(filled.values()) == int((prov == 1).sum()) == fill_run.fill["counts"]["filled"]
    assert filled["2021-07-12"] > 0.9 * (prov == 1).sum()  # the most recent clear date (07-17 is overcast)
    assert "2021-07-17" not in filled


def test_observed_pixels_away_from_the_fill_are_returned_exactly(fill_run):
    src, grid = SyntheticSource(), SMALL.grid()
    refl, codes = mosaic_date(src, fill_run.plan.target_scenes, grid, S2_BANDS, "cloudscore")
    clear = (to_cube_codes(codes) == MaskClass.CLEAR) & np.isfinite(refl).all(axis=0)
    away = clear & ~fill_reach(clear, FillConfig(shadow_check_px=0))
    assert 0.05 < away.mean() < 0.95
    image, prov = _read(fill_run.cog), _read(fill_run.provenance)[0]
    # the missed-shadow check fills some clear pixels near the clouds (and feathers around them), never one beyond
    # its ring
    missed = clear & (prov != 0)
    assert not (missed & ~fill_reach(clear, FillConfig())).any()
    kept = away & ~fill_reach(~missed, FillConfig(shadow_check_px=0))
    assert kept.sum() > 0.9 * away.sum()
    observed = np.clip(refl, 0, 1)
    assert np.array_equal(image[:, kept].view(np.uint32), observed[:, kept].view(np.uint32))
    assert (prov[~clear] == 1).all()


def test_the_shadow_check_runs_with_s1_after_the_date_and_says_so(fill_run, tmp_path):
    """07-22: S1 on 07-19 and 07-25 (6-day repeat). The check runs with S1 and the metadata names the S1 dates; a
    region without S1, or S1 only before the date, leaves the mask as it is and says why."""
    stac = json.loads(fill_run.stac.read_text())["properties"]
    assert stac["cloudfree:shadow_check"].startswith("on within 40 px, flagged pixels whose S1 VV/VH changed by more "
                                                    "than 2 dB stay observed (S1 2021-07-19, 2021-07-25)")
    with rasterio.open(fill_run.cog) as ds:
        assert ds.tags()["shadow_check"] == stac["cloudfree:shadow_check"]
    assert {"2021-07-19", "2021-07-25"} <= {s.date.isoformat() for _, g in fill_run.plan.change_sar for s in g}
    counts = fill_run.fill["counts"]
    assert "missed_shadow" in counts and "shadow_kept_by_sar" in counts

    optical_only = _region("tiny-s2", 113.6225, 34.7295, sensors=("s2",))
    res = reconstruct(optical_only, DATE, "composite", tmp_path / "s2", fast(block=512))
    status = json.loads(res.stac.read_text())["properties"]["cloudfree:shadow_check"]
    assert status == ("off: no S1 on 2021-07-22 or within 6 days after it to tell a flood from a shadow the mask "
                      "missed (--shadow-sar-change-db none runs the check on optical alone)")
    assert "missed_shadow" not in res.fill["counts"]
    # S1 only before the date (3 days after it is too late here) cannot see a flood that arrived since
    late = reconstruct(SMALL, DATE, "composite", tmp_path / "late", fast(block=512, sar_max_days=2))
    assert json.loads(late.stac.read_text())["properties"]["cloudfree:shadow_check"].startswith("off: no S1")


def test_never_filled_from_a_pixel_its_dates_mask_calls_not_clear(fill_run):
    src, grid = SyntheticSource(), SMALL.grid()
    prov, days = _read(fill_run.provenance)[0], _read(fill_run.source_days)[0]
    by_date = dict(zip(fill_run.plan.optical_dates, fill_run.plan.optical_scenes))
    checked = 0
    for age in np.unique(days[prov == 1]):
        day = DATE - dt.timedelta(days=int(age))
        refl, codes = mosaic_date(src, by_date[day], grid, S2_BANDS, "cloudscore")
        took = (prov == 1) & (days == age)
        assert (to_cube_codes(codes[took]) == MaskClass.CLEAR).all(), day
        assert np.isfinite(refl[:, took]).all()
        checked += int(took.sum())
    assert checked == int((prov == 1).sum()) > 0


def test_all_history_cloudy_writes_class_3_nodata_and_warns(tmp_path, caplog):
    """07-17, five days before, is overcast: with at most 5 days of history nothing can be filled."""
    caplog.set_level(logging.WARNING)
    res = reconstruct(SMALL, DATE, "composite", tmp_path, fast(block=512, fill=FillConfig(max_age_days=5)))
    assert res.plan.optical_dates == [dt.date(2021, 7, 17), DATE]
    prov, days, image = _read(res.provenance)[0], _read(res.source_days)[0], _read(res.cog)
    assert set(np.unique(prov)) == {0, 3}
    assert np.isnan(image[:, prov == 3]).all() and (days[prov == 3] == -1).all()
    assert np.isfinite(image[:, prov == 0]).all()
    share = 100 * (prov == 3).mean()
    (warning,) = res.warnings
    assert warning.startswith(f"nothing could be filled: every hidden pixel ({(prov == 3).sum()} px, {share:.1f} % "
                              "of the AOI)")
    assert warning in caplog.text and all(validate_cog(p).ok for p in (res.cog, res.provenance, res.source_days))
    # the explicit option: the least cloudy value any date has there, still marked 3
    least = reconstruct(SMALL, DATE, "composite", tmp_path / "least",
                        fast(block=512, fill=FillConfig(max_age_days=5), fill_unobserved="least-cloudy"))
    lp, ld, li = _read(least.provenance)[0], _read(least.source_days)[0], _read(least.cog)
    assert np.array_equal(lp, prov) and np.isfinite(li).all()
    assert set(np.unique(ld[lp == 3])) <= {0, 5} and "least cloudy value" in least.warnings[0]


def test_fewer_than_two_dates_and_no_scene_on_the_date_are_refused(tmp_path):
    with pytest.raises(SourceError, match=r"the composite fills 2021-07-22 from earlier s2 dates, but the synthetic "
                       r"source has none within 4 days before it .*at least 2 dates.*--max-age-days"):
        plan_fill(SMALL, DATE, SyntheticSource(), fast(fill=FillConfig(max_age_days=4)))
    with pytest.raises(SourceError, match=r"no s2 scene on 2021-07-20 .*nearest dates with scenes: .*2021-07-17.*"
                       r"2021-07-22"):
        reconstruct(SMALL, dt.date(2021, 7, 20), "composite", tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_plan_reads_every_date_before_d_within_the_maximum_age_in_one_search():
    calls = []

    class Counting(SyntheticSource):
        def search(self, region, start, end, sensor):
            calls.append((start, end, sensor))
            return super().search(region, start, end, sensor)

    plan = plan_fill(SMALL, DATE, Counting(), fast(fill=FillConfig(max_age_days=30)))
    assert calls == [(DATE - dt.timedelta(days=30), DATE, "s2")]
    assert plan.optical_dates == [dt.date(2021, 6, 22) + dt.timedelta(days=5 * i) for i in range(7)]
    assert plan.optical_sensor == "s2_l1c" and [s.date for s in plan.target_scenes] == [DATE]


def _border_step(image: np.ndarray, filled: np.ndarray, col: int) -> tuple[float, float]:
    """Mean |step| between columns col-1 and col over filled pixels, and the same between other column pairs."""
    step = np.abs(np.diff(image, axis=2)).mean(axis=0)  # (h, w-1): step[:, j] is between columns j and j+1
    both = filled[:, :-1] & filled[:, 1:]
    at = step[:, col - 1][both[:, col - 1]]
    inside = np.concatenate([step[:, j][both[:, j]] for j in range(col - 60, col + 60) if abs(j - (col - 1)) > 2])
    return float(at.mean()), float(inside.mean())


def test_block_border_does_not_show(tmp_path):
    """Two 512-px blocks vs one block: the halo and the AOI-wide fits make them the same fill; across the border
    column the step between neighbours is the one inside."""
    # the strip's common clear pixels on the flood date fail the correlation guard; with it off every date is fitted,
    # which is what shows a step when each block fits its own line
    fitted = FillConfig(min_correlation=-1.0)
    two = reconstruct(WIDE, DATE, "composite", tmp_path / "two", fast(block=512, fill=fitted))
    one = reconstruct(WIDE, DATE, "composite", tmp_path / "one", fast(block=1024, fill=fitted))
    assert (two.blocks_total, one.blocks_total) == (2, 1)
    a, b = _read(two.cog), _read(one.cog)
    pa, pb = _read(two.provenance)[0], _read(one.provenance)[0]
    assert np.array_equal(pa, pb) and np.array_equal(_read(two.source_days), _read(one.source_days))
    assert np.abs(a - b).max() < 1e-5
    at, inside = _border_step(a, pa == 1, 512)
    assert (pa[:, 508:516] == 1).mean() > 0.2 and at < 2 * inside  # the content's own steps (1.5x here)
    # what the AOI-wide fits prevent: each block fitting its own global line leaves a step at the border
    from pipeline.reconstruct.mosaic import FillLoader
    from pipeline.reconstruct.tiling import Filler, compute_fill_block, plan_blocks

    cfg, grid = fast(block=512, fill=fitted), WIDE.grid()
    loader = FillLoader(SyntheticSource(), grid, two.plan, mask_method="cloudscore", fill=cfg.fill)
    own = np.empty_like(a)
    for blk in plan_blocks(grid.height, grid.width, 512):
        own[:, blk.r0:blk.r1, blk.c0:blk.c1] = compute_fill_block(blk, grid.height, grid.width, loader,
                                                                  Filler(cfg.fill), cfg).mean
    own_at, own_inside = _border_step(own, pa == 1, 512)
    assert own_at > 4 * own_inside, (own_at, own_inside)  # 8.5x here: a seam anyone sees


# --- a local SEN12MS-CR-TS folder with one date on another grid ---------------------------------------------

CRS = "EPSG:32633"
ORIGIN = (399960.0, 5600040.0)
SPECTRUM = np.array([.12, .10, .09, .07, .12, .25, .30, .32, .33, .10, .003, .20, .11], np.float32)  # vegetation
GAIN, OFFSET = 1.08, 0.004  # the target date's radiometry relative to the history's


def _ground(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Reflectance (13, ...) of the ground at projected coordinates of CRS, smooth with structure every ~100 m."""
    mod = 0.8 + 0.4 * (np.sin(x / 70.0) + np.cos(y / 90.0) + 2) / 4
    return SPECTRUM.reshape(13, *([1] * x.ndim)) * mod[None]


def _write_s2(root: Path, t: int, day: str, crs: str, transform: Affine, refl: np.ndarray) -> None:
    path = root / "ROIs1158" / "106" / "S2" / str(t) / f"s2_ROIs1158_106_ImgNo_{t}_{day}_patch_0.tif"
    path.parent.mkdir(parents=True, exist_ok=True)
    dn = np.clip(np.rint(refl * 10000), 1, 65535).astype(np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=dn.shape[2], height=dn.shape[1], count=13, dtype="uint16",
                       crs=crs, transform=transform) as ds:
        ds.write(dn)


def _pixel_centres(crs: str, transform: Affine, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in CRS of the pixel centres of a grid in ``crs``."""
    from rasterio.warp import transform as warp_points

    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    xs, ys = transform * (cols.ravel(), rows.ravel())
    if crs != CRS:
        xs, ys = warp_points(crs, CRS, xs, ys)
    return np.asarray(xs).reshape(height, width), np.asarray(ys).reshape(height, width)


@pytest.mark.parametrize("history_grid", ["shifted", "reprojected"])
def test_local_dates_on_other_grids_are_read_onto_the_aoi_grid(tmp_path, history_grid):
    """The target date on the AOI's grid with a cloud; the history date on a grid shifted by 7 x -4 px, or in the
    neighbouring UTM zone. The local source warps every date onto the AOI grid, so the fill matches the ground
    under the cloud (misaligned by 7 px it would be off by the ground's structure)."""
    from pipeline.sources.local.source import LocalSource

    size = 96
    t0 = Affine(10.0, 0, ORIGIN[0], 0, -10.0, ORIGIN[1])
    x, y = _pixel_centres(CRS, t0, size, size)
    target = GAIN * _ground(x, y) + OFFSET
    target[:, 40:60, 40:60] = 0.6  # a thick cloud: bright, flat, no cirrus
    target[10, 40:60, 40:60] = 0.05
    _write_s2(tmp_path, 1, "2018-07-21", CRS, t0, target)
    if history_grid == "shifted":
        crs, tr, w, h = CRS, t0 @ Affine.translation(7, -4), size, size
    else:  # UTM 32N: the same ground, 10 m pixels in another projection
        from rasterio.warp import calculate_default_transform

        left, top = ORIGIN
        tr, w, h = calculate_default_transform(CRS, "EPSG:32632", size, size, left, top - 10 * size,
                                               left + 10 * size, top, resolution=10)
        crs = "EPSG:32632"
    hx, hy = _pixel_centres(crs, tr, w, h)
    _write_s2(tmp_path, 0, "2018-07-11", crs, tr, _ground(hx, hy))

    inner = Grid(CRS, t0 @ Affine.translation(16, 16), 64, 64)  # inside both files whatever their grid
    w_, s_, e_, n_ = inner.bounds_lonlat()
    eps = 1e-6
    region = parse_region({"name": "local-aoi", "bbox": [w_ + eps, s_ + eps, e_ - eps, n_ - eps], "crs": CRS,
                           "resolution": 10, "window": {"start": "2018-07-01", "end": "2018-07-31"},
                           "sensors": ["s2"]})
    grid = region.grid()
    res = reconstruct(region, dt.date(2018, 7, 21), "composite", tmp_path / "out",
                      ReconstructConfig(source={"name": "local", "root": str(tmp_path)}, mask_method="s2cloudless",
                                        dtype="float32"),
                      source=LocalSource(tmp_path))
    prov, days, image = _read(res.provenance)[0], _read(res.source_days)[0], _read(res.cog)
    assert (prov == 1).sum() >= 400 and set(np.unique(days[prov == 1])) == {10}
    gx, gy = _pixel_centres(CRS, grid.transform, grid.width, grid.height)
    truth = GAIN * _ground(gx, gy) + OFFSET
    err = np.abs(image - truth)[:, prov == 1]
    # DN rounding (1e-4) and, reprojected, bilinear resampling of a smooth field
    assert err.max() < (2e-3 if history_grid == "reprojected" else 5e-4), err.max()
    notes = json.loads(rasterio.open(res.cog).tags()["fill_notes"])
    assert notes[0]["date"] == "2018-07-11" and notes[0]["harmonization"] == ["local"]


def test_cli_lists_the_source_days_layer_and_warns_when_nothing_is_fillable(tmp_path, monkeypatch, capsys):
    import sys

    import yaml

    import pipeline.cli.reconstruct  # noqa: F401  (registers the command)
    from pipeline.cli import main

    region = tmp_path / "mini.yaml"
    region.write_text(yaml.safe_dump({
        "name": "mini", "bbox": [113.60, 34.71, 113.611, 34.7192], "crs": "auto", "resolution": 10,
        "window": {"start": "2021-07-01", "end": "2021-08-31"}, "sensors": ["s1", "s2"]}))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["cloudfree", "reconstruct", str(region), "--date", "2021-07-22", "--out",
                                      str(out), "--mask-method", "cloudscore", "--max-age-days", "5"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "mini_20210722_composite_source_days.tif" in "".join(text.split())  # rich wraps long lines anywhere
    assert "warning:2021-07-22:nothingcouldbefilled:everyhiddenpixel" in "".join(text.split())
    assert (out / "mini_20210722_composite_source_days.tif").is_file()


def test_cli_shadow_sar_change_db_takes_none_and_refuses_a_bad_value_in_one_line(tmp_path, monkeypatch, capsys):
    import sys

    import pipeline.cli.reconstruct  # noqa: F401  (registers the command)
    from pipeline.cli import main

    def run(value: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["cloudfree", "reconstruct", "zhengzhou-demo", "--date", "2021-07-22",
                                          "--out", str(tmp_path / value), "--mask-method", "cloudscore",
                                          "--max-age-days", "5", "--shadow-sar-change-db", value])
        with pytest.raises(SystemExit) as done:
            main()
        return int(done.value.code or 0), capsys.readouterr().err

    for bad in ("-1", "two"):
        code, err = run(bad)
        assert code != 0 and "--shadow-sar-change-db" in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    # "none" parses (the run then stops where the AOI size is checked, before any scene is read)
    monkeypatch.setattr(pipeline.cli.reconstruct, "check_size",
                        lambda aoi, **kw: (_ for _ in ()).throw(SystemExit(0)))
    assert run("none")[0] == 0


def test_cli_class_offsets_out_of_range_is_one_line_naming_the_option(tmp_path, monkeypatch, capsys):
    import sys

    import pipeline.cli.reconstruct  # noqa: F401  (registers the command)
    from pipeline.cli import main

    for bad in ("-1", "65"):
        monkeypatch.setattr(sys, "argv", ["cloudfree", "reconstruct", "zhengzhou-demo", "--date", "2021-07-22",
                                          "--out", str(tmp_path / bad), "--class-offsets", bad])
        with pytest.raises(SystemExit) as done:
            main()
        err = capsys.readouterr().err
        assert done.value.code and "--class-offsets" in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
