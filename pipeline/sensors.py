"""Band tables of the sensors cloudfree reads.

Each band knows its centre wavelength, native resolution, stored dtype and the scale/offset that turn
stored digital numbers (DN) into physical values (``physical = DN * scale + offset``). Sources return
physical values (reflectance, dB, degrees); the dataset stores DN again with ``to_dn``. ``common`` names
(blue, green, red, nir, swir1, swir2, cirrus) let masking rules work across sensors.

Landsat QA_PIXEL bits follow USGS Collection 2 (LSDS-1619): 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud,
4 cloud shadow, 5 snow, 6 clear, 7 water, 8-9 cloud confidence, 10-11 shadow confidence,
12-13 snow/ice confidence, 14-15 cirrus confidence (00 none, 01 low, 10 medium, 11 high).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from pipeline.errors import SourceError


@dataclass(frozen=True)
class Band:
    name: str
    wavelength_nm: float | None
    resolution_m: float
    dtype: str = "uint16"
    scale: float = 1.0
    offset: float = 0.0
    common: str | None = None
    units: str = "reflectance"
    description: str = ""
    nodata: float | None = 0


@dataclass(frozen=True)
class Sensor:
    key: str
    family: str  # s1 | s2 | landsat: what a region's ``sensors`` names
    title: str
    bands: tuple[Band, ...]
    revisit_days: int
    ee_collection: str | None = None
    rgb: tuple[str, str, str] | None = None
    qa_bands: tuple[str, ...] = field(default_factory=tuple)

    def band(self, name: str) -> Band:
        for b in self.bands:
            if b.name == name:
                return b
        raise SourceError(f"sensor {self.key} has no band {name!r}; its bands are: {', '.join(self.band_names)}")

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    @property
    def reflectance_bands(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands if b.units == "reflectance")

    def by_common(self, common: str) -> str:
        for b in self.bands:
            if b.common == common:
                return b.name
        raise SourceError(f"sensor {self.key} has no {common} band; its bands are: {', '.join(self.band_names)}")

    def check_bands(self, names: Iterable[str]) -> tuple[str, ...]:
        names = tuple(names)
        missing = [n for n in names if n not in self.band_names]
        if missing:
            raise SourceError(
                f"sensor {self.key} has no band(s) {missing}; its bands are: {', '.join(self.band_names)}"
            )
        return names


def _s2_bands(product: str) -> tuple[Band, ...]:
    s = 1e-4  # S2 DN = reflectance x 10000 (harmonized collections remove the baseline-04.00 +1000 offset)
    spectral = [
        Band("B1", 442.7, 60, scale=s, common="coastal", description="Coastal aerosol"),
        Band("B2", 492.4, 10, scale=s, common="blue", description="Blue"),
        Band("B3", 559.8, 10, scale=s, common="green", description="Green"),
        Band("B4", 664.6, 10, scale=s, common="red", description="Red"),
        Band("B5", 704.1, 20, scale=s, common="rededge1", description="Red edge 1"),
        Band("B6", 740.5, 20, scale=s, common="rededge2", description="Red edge 2"),
        Band("B7", 782.8, 20, scale=s, common="rededge3", description="Red edge 3"),
        Band("B8", 832.8, 10, scale=s, common="nir", description="NIR"),
        Band("B8A", 864.7, 20, scale=s, common="nir08", description="Narrow NIR"),
        Band("B9", 945.1, 60, scale=s, common="nir09", description="Water vapour"),
        Band("B10", 1373.5, 60, scale=s, common="cirrus", description="Cirrus (L1C only)"),
        Band("B11", 1613.7, 20, scale=s, common="swir1", description="SWIR 1.6 um"),
        Band("B12", 2202.4, 20, scale=s, common="swir2", description="SWIR 2.2 um"),
    ]
    if product == "L2A":
        spectral = [b for b in spectral if b.name != "B10"]
    qa = [
        Band(
            "QA60",
            None,
            60,
            units="bitmask",
            description="Bit 10 opaque cloud, bit 11 cirrus (unfilled 2022-02..2024-02)",
            nodata=None,
        ),
        Band(
            "CLOUD_PROB",
            None,
            10,
            dtype="uint8",
            units="percent",
            description="s2cloudless cloud probability 0-100",
            nodata=None,
        ),
        Band(
            "cs_cdf", None, 10, dtype="float32", units="score", description="Cloud Score+ CDF, 1 = clear", nodata=None
        ),
    ]
    if product == "L2A":
        qa.insert(
            0,
            Band(
                "SCL",
                None,
                20,
                dtype="uint8",
                units="class",
                description="Scene classification (3 shadow, 8/9 cloud, 10 cirrus, 11 snow)",
                nodata=0,
            ),
        )
    return tuple(spectral + qa)


_LS_SR = 2.75e-5
_LS_SR_OFF = -0.2
_LS_ST = 0.00341802
_LS_ST_OFF = 149.0
_QA_PIXEL = Band("QA_PIXEL", None, 30, units="bitmask", description="C2 pixel QA bits", nodata=1)


def _landsat_oli() -> tuple[Band, ...]:
    return (
        Band("SR_B1", 443, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="coastal", description="Coastal aerosol"),
        Band("SR_B2", 482, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="blue", description="Blue"),
        Band("SR_B3", 561.5, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="green", description="Green"),
        Band("SR_B4", 654.5, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="red", description="Red"),
        Band("SR_B5", 865, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="nir", description="NIR"),
        Band("SR_B6", 1608.5, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="swir1", description="SWIR 1"),
        Band("SR_B7", 2200.5, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="swir2", description="SWIR 2"),
        Band(
            "ST_B10",
            10895,
            100,
            scale=_LS_ST,
            offset=_LS_ST_OFF,
            units="kelvin",
            common="lwir11",
            description="Surface temperature",
        ),
        _QA_PIXEL,
    )


def _landsat_tm_etm() -> tuple[Band, ...]:
    return (
        Band("SR_B1", 485, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="blue", description="Blue"),
        Band("SR_B2", 560, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="green", description="Green"),
        Band("SR_B3", 660, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="red", description="Red"),
        Band("SR_B4", 835, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="nir", description="NIR"),
        Band("SR_B5", 1650, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="swir1", description="SWIR 1"),
        Band("SR_B7", 2215, 30, scale=_LS_SR, offset=_LS_SR_OFF, common="swir2", description="SWIR 2"),
        Band(
            "ST_B6",
            11450,
            120,
            scale=_LS_ST,
            offset=_LS_ST_OFF,
            units="kelvin",
            common="lwir",
            description="Surface temperature",
        ),
        _QA_PIXEL,
    )


def _landsat_oli_toa() -> tuple[Band, ...]:
    f = "float32"  # Earth Engine's C2 TOA collections store reflectance as float
    return (
        Band("B1", 443, 30, dtype=f, common="coastal", nodata=None),
        Band("B2", 482, 30, dtype=f, common="blue", nodata=None),
        Band("B3", 561.5, 30, dtype=f, common="green", nodata=None),
        Band("B4", 654.5, 30, dtype=f, common="red", nodata=None),
        Band("B5", 865, 30, dtype=f, common="nir", nodata=None),
        Band("B6", 1608.5, 30, dtype=f, common="swir1", nodata=None),
        Band("B7", 2200.5, 30, dtype=f, common="swir2", nodata=None),
        Band("B9", 1373.5, 30, dtype=f, common="cirrus", nodata=None),
        Band("B10", 10895, 100, dtype=f, units="kelvin", common="lwir11", nodata=None),
        Band("B11", 12005, 100, dtype=f, units="kelvin", common="lwir12", nodata=None),
        _QA_PIXEL,
    )


_S1 = (
    Band("VV", None, 10, dtype="float32", units="dB", description="sigma0 VV", nodata=None),
    Band("VH", None, 10, dtype="float32", units="dB", description="sigma0 VH", nodata=None),
    Band("angle", None, 10, dtype="float32", units="degrees", description="Incidence angle", nodata=None),
)

SENSORS: dict[str, Sensor] = {
    s.key: s
    for s in [
        Sensor("s1_grd", "s1", "Sentinel-1 GRD (IW, dB)", _S1, 6, "COPERNICUS/S1_GRD"),
        Sensor(
            "s2_l1c",
            "s2",
            "Sentinel-2 MSI L1C (TOA)",
            _s2_bands("L1C"),
            5,
            "COPERNICUS/S2_HARMONIZED",
            ("B4", "B3", "B2"),
            ("QA60",),
        ),
        Sensor(
            "s2_l2a",
            "s2",
            "Sentinel-2 MSI L2A (SR)",
            _s2_bands("L2A"),
            5,
            "COPERNICUS/S2_SR_HARMONIZED",
            ("B4", "B3", "B2"),
            ("QA60", "SCL"),
        ),
        Sensor(
            "landsat8_l2",
            "landsat",
            "Landsat 8 OLI/TIRS C2 L2",
            _landsat_oli(),
            16,
            "LANDSAT/LC08/C02/T1_L2",
            ("SR_B4", "SR_B3", "SR_B2"),
            ("QA_PIXEL",),
        ),
        Sensor(
            "landsat9_l2",
            "landsat",
            "Landsat 9 OLI-2/TIRS-2 C2 L2",
            _landsat_oli(),
            16,
            "LANDSAT/LC09/C02/T1_L2",
            ("SR_B4", "SR_B3", "SR_B2"),
            ("QA_PIXEL",),
        ),
        Sensor(
            "landsat7_l2",
            "landsat",
            "Landsat 7 ETM+ C2 L2",
            _landsat_tm_etm(),
            16,
            "LANDSAT/LE07/C02/T1_L2",
            ("SR_B3", "SR_B2", "SR_B1"),
            ("QA_PIXEL",),
        ),
        Sensor(
            "landsat5_l2",
            "landsat",
            "Landsat 5 TM C2 L2",
            _landsat_tm_etm(),
            16,
            "LANDSAT/LT05/C02/T1_L2",
            ("SR_B3", "SR_B2", "SR_B1"),
            ("QA_PIXEL",),
        ),
        Sensor(
            "landsat8_toa",
            "landsat",
            "Landsat 8 C2 TOA",
            _landsat_oli_toa(),
            16,
            "LANDSAT/LC08/C02/T1_TOA",
            ("B4", "B3", "B2"),
            ("QA_PIXEL",),
        ),
        Sensor(
            "landsat9_toa",
            "landsat",
            "Landsat 9 C2 TOA",
            _landsat_oli_toa(),
            16,
            "LANDSAT/LC09/C02/T1_TOA",
            ("B4", "B3", "B2"),
            ("QA_PIXEL",),
        ),
    ]
}

# The default sensor for each region sensor family.
DEFAULT_SENSOR = {"s1": "s1_grd", "s2": "s2_l1c", "landsat": "landsat8_l2"}

# Sentinel-1 satellites: first and last day of routine IW data (None = still flying). One satellite repeats its
# ground track every 12 days (175 orbits); two in opposite orbit slots halve that. S1B's commissioning ended in
# September 2016 and its SAR power supply failed on 2021-12-23, so from then until S1C joined S1A (routine data
# from May 2025) every AOI had a 12-day S1 revisit. The synthetic archive flies exactly these periods.
S1_SATELLITES: dict[str, tuple[dt.date, dt.date | None]] = {
    "SENTINEL-1A": (dt.date(2014, 10, 3), None),
    "SENTINEL-1B": (dt.date(2016, 9, 26), dt.date(2021, 12, 23)),
    "SENTINEL-1C": (dt.date(2025, 5, 1), None),
}
S1_REPEAT_DAYS = 12


def s1_satellites(day: dt.date) -> tuple[str, ...]:
    """The Sentinel-1 satellites delivering data on ``day``."""
    return tuple(p for p, (first, last) in S1_SATELLITES.items() if first <= day and (last is None or day <= last))


def s1_revisit_days(day: dt.date) -> int | None:
    """Days between S1 overpasses of one ground track on ``day`` (6 with two satellites, 12 with one; None: none)."""
    n = len(s1_satellites(day))
    return S1_REPEAT_DAYS // n if n else None


def s1_max_days(start: dt.date, end: dt.date | None = None) -> int:
    """Default S1 pairing tolerance over ``start..end``: half the longest revisit, so every optical date has an S1
    scene within it (3 days with two satellites, 6 with one).

    A window that straddles a constellation change takes the single-satellite value: a tighter tolerance would
    reject every date on the sparse side. Before any S1 data the value is moot (there is nothing to pair).
    """
    end = end or start
    days = [start] + [d for first, last in S1_SATELLITES.values() for d in (first, last and last + dt.timedelta(1))
                      if d is not None and start < d <= end]
    revisits = [r for r in map(s1_revisit_days, days) if r is not None]
    return max(revisits, default=S1_REPEAT_DAYS) // 2


S2_BANDS = tuple(b for b in SENSORS["s2_l1c"].reflectance_bands)  # the 13 bands of SEN12MS-CR
S1_BANDS = ("VV", "VH")
S1_DB_RANGE = {"VV": (-25.0, 0.0), "VH": (-32.5, 0.0)}


class QAPixel:
    """Landsat Collection 2 QA_PIXEL bit layout."""

    FILL = 0
    DILATED_CLOUD = 1
    CIRRUS = 2
    CLOUD = 3
    SHADOW = 4
    SNOW = 5
    CLEAR = 6
    WATER = 7
    CLOUD_CONF = 8  # two bits each, 0 none .. 3 high
    SHADOW_CONF = 10
    SNOW_CONF = 12
    CIRRUS_CONF = 14

    @staticmethod
    def bit(qa: np.ndarray, bit: int) -> np.ndarray:
        return (np.asarray(qa).astype(np.uint16) >> bit) & 1 == 1

    @staticmethod
    def confidence(qa: np.ndarray, first_bit: int) -> np.ndarray:
        return (np.asarray(qa).astype(np.uint16) >> first_bit) & 0b11


def get_sensor(key: str) -> Sensor:
    if key in SENSORS:
        return SENSORS[key]
    if key in DEFAULT_SENSOR:
        return SENSORS[DEFAULT_SENSOR[key]]
    raise SourceError(f"unknown sensor {key!r}; known: {', '.join(list(DEFAULT_SENSOR) + list(SENSORS))}")


def to_physical(sensor: Sensor, band: str, dn: np.ndarray) -> np.ndarray:
    b = sensor.band(band)
    out = np.asarray(dn, dtype=np.float32)
    if b.scale != 1.0 or b.offset != 0.0:
        out = out * np.float32(b.scale) + np.float32(b.offset)
    return out


def to_dn(sensor: Sensor, band: str, value: np.ndarray) -> np.ndarray:
    """Physical value -> stored DN of the band's dtype, rounded and clipped to the dtype's range."""
    b = sensor.band(band)
    v = np.asarray(value, dtype=np.float64)
    if b.scale != 1.0 or b.offset != 0.0:
        v = (v - b.offset) / b.scale
    dtype = np.dtype(b.dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        v = np.clip(np.rint(np.nan_to_num(v, nan=b.nodata or 0)), info.min, info.max)
    return v.astype(dtype)
