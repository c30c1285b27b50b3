"""Band tables, DN <-> physical conversion and Landsat QA_PIXEL decoding (on real QA_PIXEL files)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from pipeline.errors import SourceError
from pipeline.sensors import (
    DEFAULT_SENSOR,
    S1_BANDS,
    S2_BANDS,
    SENSORS,
    QAPixel,
    get_sensor,
    s1_max_days,
    s1_revisit_days,
    s1_satellites,
    to_dn,
    to_physical,
)

L1C_ORDER = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")


def test_s2_l1c_has_the_13_sen12mscr_bands_in_order():
    assert S2_BANDS == L1C_ORDER
    s2 = get_sensor("s2_l1c")
    assert s2.reflectance_bands == L1C_ORDER
    assert s2.band("B8A").wavelength_nm == pytest.approx(864.7)
    assert s2.band("B10").common == "cirrus"
    assert all(s2.band(b).scale == 1e-4 and s2.band(b).offset == 0 for b in L1C_ORDER)
    assert s2.rgb == ("B4", "B3", "B2")


def test_s2_l2a_drops_b10_and_adds_scl():
    l2a = get_sensor("s2_l2a")
    assert "B10" not in l2a.band_names and "B8A" in l2a.band_names
    assert len(l2a.reflectance_bands) == 12
    assert l2a.band("SCL").units == "class"
    assert "SCL" not in get_sensor("s2_l1c").band_names


def test_landsat8_sr_scale_offset_and_qa():
    l8 = get_sensor("landsat8_l2")
    for b in ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"):
        assert l8.band(b).scale == 2.75e-5 and l8.band(b).offset == -0.2
    assert l8.band("ST_B10").scale == 0.00341802 and l8.band("ST_B10").offset == 149.0
    assert l8.band("QA_PIXEL").units == "bitmask" and l8.band("QA_PIXEL").scale == 1.0
    assert l8.by_common("nir") == "SR_B5"
    # TM/ETM+ number their bands differently: NIR is SR_B4 and there is no SR_B6
    assert get_sensor("landsat7_l2").by_common("nir") == "SR_B4"
    assert "SR_B6" not in get_sensor("landsat5_l2").band_names


def test_s1_bands_are_db():
    s1 = get_sensor("s1")
    assert s1.key == "s1_grd" and S1_BANDS == ("VV", "VH")
    assert all(s1.band(b).units == "dB" and s1.band(b).dtype == "float32" for b in S1_BANDS)


def test_family_defaults_and_unknown_sensor():
    assert {k: get_sensor(k).key for k in DEFAULT_SENSOR} == DEFAULT_SENSOR
    assert all(s.family in ("s1", "s2", "landsat") for s in SENSORS.values())
    with pytest.raises(SourceError, match="unknown sensor 'modis'; known: s1, s2, landsat"):
        get_sensor("modis")
    with pytest.raises(SourceError, match="has no band 'B13'"):
        get_sensor("s2_l1c").band("B13")


def test_s2_dn_roundtrip():
    s2 = get_sensor("s2_l1c")
    dn = np.array([0, 1, 1234, 10000, 65535], dtype=np.uint16)
    phys = to_physical(s2, "B4", dn)
    assert phys.dtype == np.float32
    np.testing.assert_allclose(phys, dn * 1e-4, rtol=1e-6)
    back = to_dn(s2, "B4", phys)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, dn)


def test_landsat_sr_roundtrip_and_known_value():
    l8 = get_sensor("landsat8_l2")
    dn = np.array([1, 7273, 20000, 43636, 65535], dtype=np.uint16)
    phys = to_physical(l8, "SR_B4", dn)
    np.testing.assert_allclose(phys, dn * 2.75e-5 - 0.2, atol=1e-6)
    assert phys[1] == pytest.approx(0.0000075, abs=1e-6)  # DN 7273 is ~0 reflectance
    np.testing.assert_array_equal(to_dn(l8, "SR_B4", phys), dn)


def test_to_dn_clips_and_fills_nan():
    s2 = get_sensor("s2_l1c")
    out = to_dn(s2, "B2", np.array([-0.5, 7.0, np.nan]))
    np.testing.assert_array_equal(out, np.array([0, 65535, 0], dtype=np.uint16))
    s1 = get_sensor("s1_grd")
    db = np.array([-12.5, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(to_dn(s1, "VV", db), db)  # float bands pass through unchanged


def test_qa_pixel_bits_on_synthetic_words():
    qa = np.array([0b1, 0b1000, 0b10000, 0b100000, 0b1000000, 0b1100000000, 0b0100000000], dtype=np.uint16)
    assert QAPixel.bit(qa, QAPixel.FILL).tolist() == [True, False, False, False, False, False, False]
    assert QAPixel.bit(qa, QAPixel.CLOUD).tolist() == [False, True, False, False, False, False, False]
    assert QAPixel.bit(qa, QAPixel.SHADOW).tolist() == [False, False, True, False, False, False, False]
    assert QAPixel.bit(qa, QAPixel.SNOW).tolist() == [False, False, False, True, False, False, False]
    assert QAPixel.confidence(qa, QAPixel.CLOUD_CONF).tolist() == [0, 0, 0, 0, 0, 3, 1]


@pytest.fixture(scope="module")
def real_qa(real_data):
    import rasterio

    files = sorted((real_data / "landsat-c2-l2").glob("*/*_QA_PIXEL.TIF"))
    assert len(files) == 2
    out = {}
    for f in files:
        with rasterio.open(f) as src:
            out[f.name[:40]] = src.read(1)
    return out


def test_qa_pixel_decoding_matches_hand_computed_bits_on_real_files(real_qa):
    rng = np.random.default_rng(0)
    for name, qa in real_qa.items():
        assert qa.dtype == np.uint16
        rows, cols = rng.integers(0, qa.shape[0], 50), rng.integers(0, qa.shape[1], 50)
        words = qa[rows, cols]
        for bit in (
            QAPixel.FILL,
            QAPixel.DILATED_CLOUD,
            QAPixel.CIRRUS,
            QAPixel.CLOUD,
            QAPixel.SHADOW,
            QAPixel.SNOW,
            QAPixel.CLEAR,
            QAPixel.WATER,
        ):
            expect = [(int(w) >> bit) & 1 == 1 for w in words]  # independent, per-pixel Python ints
            assert QAPixel.bit(words, bit).tolist() == expect, (name, bit)
        for first in (QAPixel.CLOUD_CONF, QAPixel.SHADOW_CONF, QAPixel.SNOW_CONF, QAPixel.CIRRUS_CONF):
            assert QAPixel.confidence(words, first).tolist() == [(int(w) >> first) & 3 for w in words]
        # the whole image agrees with numpy's own bit arithmetic too
        np.testing.assert_array_equal(QAPixel.bit(qa, QAPixel.CLOUD), (qa >> 3) & 1 == 1)


def test_real_qa_pixel_statistics_match_the_readme(real_qa):
    # README: 008059 ~81 % cloud, 6 % shadow; 005009 ~55 % cloud and ~40 % snow (Greenland)
    tropics, greenland = (
        real_qa["LC08_L2SP_008059_20191201_20200825_02_T1"],
        real_qa["LC08_L2SP_005009_20150710_20200908_02_T2"],
    )

    def frac(qa, bit):
        valid = ~QAPixel.bit(qa, QAPixel.FILL)
        return float(QAPixel.bit(qa, bit)[valid].mean())

    assert frac(tropics, QAPixel.CLOUD) == pytest.approx(0.81, abs=0.08)
    assert frac(tropics, QAPixel.SHADOW) == pytest.approx(0.06, abs=0.04)
    assert frac(greenland, QAPixel.CLOUD) == pytest.approx(0.55, abs=0.08)
    assert frac(greenland, QAPixel.SNOW) == pytest.approx(0.40, abs=0.08)
    # clear and cloud are exclusive in C2 QA
    assert not np.any(QAPixel.bit(tropics, QAPixel.CLEAR) & QAPixel.bit(tropics, QAPixel.CLOUD))


@pytest.mark.parametrize(
    ("day", "satellites", "revisit"),
    [
        ("2015-06-01", ("SENTINEL-1A",), 12),
        ("2016-09-26", ("SENTINEL-1A", "SENTINEL-1B"), 6),
        ("2021-07-20", ("SENTINEL-1A", "SENTINEL-1B"), 6),
        ("2021-12-23", ("SENTINEL-1A", "SENTINEL-1B"), 6),  # S1B's last day
        ("2021-12-24", ("SENTINEL-1A",), 12),
        ("2022-08-29", ("SENTINEL-1A",), 12),
        ("2025-04-30", ("SENTINEL-1A",), 12),
        ("2025-05-01", ("SENTINEL-1A", "SENTINEL-1C"), 6),
        ("2014-06-01", (), None),
    ],
)
def test_s1_constellation_by_date(day, satellites, revisit):
    d = dt.date.fromisoformat(day)
    assert s1_satellites(d) == satellites
    assert s1_revisit_days(d) == revisit


@pytest.mark.parametrize(
    ("start", "end", "days"),
    [
        ("2021-07-01", "2021-08-31", 3),  # S1A + S1B: 6-day revisit
        ("2022-08-13", "2022-09-28", 6),  # S1A alone: 12-day revisit
        ("2021-12-01", "2022-01-31", 6),  # straddles S1B's failure: the sparse side decides
        ("2016-09-01", "2016-10-31", 6),  # S1B not yet routine at the start
        ("2025-06-01", "2025-07-31", 3),  # S1A + S1C
        ("2025-04-15", "2025-05-15", 6),
        ("2013-01-01", "2013-12-31", 6),  # no S1 at all: moot, but a defined number
    ],
)
def test_s1_max_days_is_half_the_longest_revisit_of_the_window(start, end, days):
    assert s1_max_days(dt.date.fromisoformat(start), dt.date.fromisoformat(end)) == days
