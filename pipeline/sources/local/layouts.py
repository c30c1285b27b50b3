"""Folder layouts the ``local`` source understands, one small declaration each (torchgeo style).

A layout says which files belong to it (``filename_glob`` under the root, then ``filename_regex`` with
named groups matched against the path relative to the root), how groups become a scene id, a sensor,
a date and the band names stored in each file. ``pipeline.sources.local.source`` has the one reader.

Groups with a meaning to the reader: ``date`` (parsed with ``date_format``), ``band`` (band-per-file
layouts), plus whatever ``sensor_of``/``role_of``/``properties_of`` use.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.sensors import S1_BANDS, S2_BANDS

Groups = Mapping[str, str]


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    example: str  # a path relative to the root, shown when nothing matched
    filename_glob: str  # recursive glob relative to the root
    filename_regex: str  # re.search'ed against the posix path relative to the root; anchor with $
    scene_id: str  # str.format(**groups) -> the scene id; files with the same id form one scene
    sensor_of: Callable[[Groups], str]  # groups -> pipeline.sensors key
    bands: Mapping[str, tuple[str, ...]]  # sensor key -> bands stored in each file, in file order
    band_per_file: bool = False  # True: each file holds one band named by the ``band`` group
    date_format: str | None = None  # strptime format of the ``date`` group; None: names carry no date
    pseudo_datetime: Callable[[Groups], dt.datetime] | None = None  # stable stand-in for undated layouts
    role_of: Callable[[Groups], str | None] = lambda g: None
    properties_of: Callable[[Groups], dict[str, Any]] = lambda g: {}
    metadata_of: Callable[[Path, Groups], dict[str, Any]] | None = None  # sidecar metadata (Landsat MTL)
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.filename_regex))

    @property
    def dated(self) -> bool:
        return self.date_format is not None

    def expects(self) -> str:
        return f"{self.name} ({self.title}): e.g. {self.example}"


# -- SEN12MS-CR ---------------------------------------------------------------------------------------
# The dataset's file names carry no date; only the season of 2017 (winter = Dec 2016 - Feb 2017). A
# stable pseudo-date keeps ordering meaningful for the pipeline: the cloudy S2 one day before the
# cloud-free S2 and its co-registered S1, so the cloud-free image is the last (target) date.
_SEASON_MID = {
    "winter": dt.date(2017, 1, 15),
    "spring": dt.date(2017, 4, 15),
    "summer": dt.date(2017, 7, 15),
    "fall": dt.date(2017, 10, 15),
}
_SEN12MSCR_KIND = {"s1": "s1", "s2": "s2_cloudfree", "s2_cloudfree": "s2_cloudfree", "s2_cloudy": "s2_cloudy"}


def _sen12mscr_kind(g: Groups) -> str:
    return _SEN12MSCR_KIND[g["kind"]]


def _sen12mscr_datetime(g: Groups) -> dt.datetime:
    day = _SEASON_MID[g["season"].lower()] + dt.timedelta(days=0 if _sen12mscr_kind(g) == "s2_cloudy" else 1)
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc)


def _sen12mscr_role(g: Groups) -> str:
    return {"s1": "sar", "s2_cloudfree": "cloudfree", "s2_cloudy": "cloudy"}[_sen12mscr_kind(g)]


def _sen12mscr_props(g: Groups) -> dict[str, Any]:
    sample = f"{g['roi']}_{g['season']}_{g['scene']}_p{g['patch']}"
    return {
        "roi": g["roi"],
        "season": g["season"],
        "scene": int(g["scene"]),
        "patch": int(g["patch"]),
        "sample": sample,
    }


def _s1_or_s2(g: Groups) -> str:
    return "s1_grd" if g["kind"].lower() == "s1" else "s2_l1c"


_SEN12_BANDS = {"s1_grd": S1_BANDS, "s2_l1c": S2_BANDS}

SEN12MSCR = Layout(
    name="sen12mscr",
    title="SEN12MS-CR as published, nested season/scene folders",
    example="ROIs1158_spring_s1/s1_1/ROIs1158_spring_s1_1_p407.tif (+ _s2 and _s2_cloudy siblings)",
    filename_glob="**/ROIs*_*_s*_*_p*.tif",
    filename_regex=(
        r"(?:^|/)(?P<roi>ROIs\d{4})_(?P<season>spring|summer|fall|winter)_(?P<kind>s1|s2_cloudy|s2)"
        r"_(?P<scene>\d+)_p(?P<patch>\d+)\.tif$"
    ),
    scene_id="{roi}_{season}_{scene}_p{patch}_{kind_norm}",
    sensor_of=_s1_or_s2,
    bands=_SEN12_BANDS,
    pseudo_datetime=_sen12mscr_datetime,
    role_of=_sen12mscr_role,
    properties_of=_sen12mscr_props,
)

SEN12MSCR_FLAT = Layout(
    name="sen12mscr_flat",
    title="SEN12MS-CR triplets in three flat folders",
    example=(
        "s1/ROIs1970_fall_139_p839.tif, s2_cloudy/ROIs1970_fall_139_p839.tif, s2_cloudfree/ROIs1970_fall_139_p839.tif"
    ),
    filename_glob="**/ROIs*_*_*_p*.tif",
    filename_regex=(
        r"(?:^|/)(?P<kind>s1|s2_cloudy|s2_cloudfree)/(?P<roi>ROIs\d{4})_(?P<season>spring|summer|fall|winter)"
        r"_(?P<scene>\d+)_p(?P<patch>\d+)\.tif$"
    ),
    scene_id="{roi}_{season}_{scene}_p{patch}_{kind_norm}",
    sensor_of=_s1_or_s2,
    bands=_SEN12_BANDS,
    pseudo_datetime=_sen12mscr_datetime,
    role_of=_sen12mscr_role,
    properties_of=_sen12mscr_props,
)

# -- SEN12MS-CR-TS: 30 dated acquisitions per ROI; the least cloudy one is the target (chosen later) --
SEN12MSCR_TS = Layout(
    name="sen12mscr_ts",
    title="SEN12MS-CR-TS time series",
    example="ROIs1158/106/S2/0/s2_ROIs1158_106_ImgNo_0_2018-01-07_patch_0.tif (and S1/0/s1_..._patch_0.tif)",
    filename_glob="**/ROIs*/*/S[12]/*/s[12]_ROIs*_ImgNo_*_patch_*.tif",
    filename_regex=(
        r"(?:^|/)(?P<collection>ROIs\d{4})/(?P<roi>\d+)/(?P<kind>S1|S2)/(?P<time_index>\d+)/"
        r"(?:s1|s2)_ROIs\d{4}_\d+_ImgNo_\d+_(?P<date>\d{4}-\d{2}-\d{2})_patch_(?P<patch>\d+)\.tif$"
    ),
    scene_id="{kind_lower}_{collection}_{roi}_ImgNo_{time_index}_{date}_patch_{patch}",
    sensor_of=_s1_or_s2,
    bands=_SEN12_BANDS,
    date_format="%Y-%m-%d",
    properties_of=lambda g: {
        "collection": g["collection"],
        "roi": f"{g['collection']}/{g['roi']}",
        "time_index": int(g["time_index"]),
        "patch": int(g["patch"]),
        "sample": f"{g['collection']}_{g['roi']}_patch_{g['patch']}",
    },
)

# -- Region_T{1,2,3}_Patch{i}.tif: CMSN-style multi-temporal Landsat patches exported from Earth Engine
# (Landsat 8 C2 TOA B2..B5 as float reflectance). T1..T3 carry order, not dates: pseudo-dates one
# Landsat revisit (16 days) apart keep that order; T3 is the target.
_REGION_T_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)

REGION_T = Layout(
    name="region_t",
    title="multi-temporal Landsat patches (CMSN), T3 = target",
    example="Wuhan_T1_Patch0.tif, Wuhan_T2_Patch0.tif, Wuhan_T3_Patch0.tif (4 bands B2, B3, B4, B5)",
    filename_glob="**/*_T[123]_Patch*.tif",
    filename_regex=r"(?:^|/)(?P<region>[A-Za-z0-9][A-Za-z0-9_-]*?)_T(?P<t>[123])_Patch(?P<patch>\d+)\.tif$",
    scene_id="{region}_T{t}_Patch{patch}",
    sensor_of=lambda g: "landsat8_toa",
    bands={"landsat8_toa": ("B2", "B3", "B4", "B5")},
    pseudo_datetime=lambda g: _REGION_T_EPOCH + dt.timedelta(days=16 * (int(g["t"]) - 1)),
    role_of=lambda g: "cloudfree" if g["t"] == "3" else "cloudy",
    properties_of=lambda g: {
        "region": g["region"],
        "t": int(g["t"]),
        "patch": int(g["patch"]),
        "sample": f"{g['region']}_Patch{g['patch']}",
    },
)

# -- Landsat Collection 2 Level-2 scene folders as USGS delivers them: one band per file + MTL ---------
_LANDSAT_SENSOR = {
    "LC08": "landsat8_l2",
    "LC09": "landsat9_l2",
    "LE07": "landsat7_l2",
    "LT05": "landsat5_l2",
    "LT04": "landsat5_l2",
}
_OLI = ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7", "ST_B10", "QA_PIXEL")
_TM = ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B7", "ST_B6", "QA_PIXEL")


def read_mtl(path: Path) -> dict[str, str]:
    """``KEY = VALUE`` pairs of a Landsat MTL.txt (ODL); groups are flattened, quotes removed."""
    out: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and key not in ("GROUP", "END_GROUP"):
            out[key] = value.strip().strip('"')
    return out


def _landsat_metadata(first_file: Path, g: Groups) -> dict[str, Any]:
    mtl = first_file.parent / f"{g['product']}_MTL.txt"
    if not mtl.exists():
        return {}
    m = read_mtl(mtl)
    out: dict[str, Any] = {"mtl": str(mtl)}
    if "CLOUD_COVER" in m and float(m["CLOUD_COVER"]) >= 0:  # USGS writes -1 when unknown
        out["cloud_cover"] = round(float(m["CLOUD_COVER"]) / 100.0, 6)
    if "CLOUD_COVER_LAND" in m and float(m["CLOUD_COVER_LAND"]) >= 0:
        out["cloud_cover_land"] = round(float(m["CLOUD_COVER_LAND"]) / 100.0, 6)
    for key, name in (("SUN_AZIMUTH", "sun_azimuth"), ("SUN_ELEVATION", "sun_elevation")):
        if key in m:
            out[name] = float(m[key])
    if "DATE_ACQUIRED" in m and "SCENE_CENTER_TIME" in m:
        clock = m["SCENE_CENTER_TIME"].rstrip("Z")[:15]  # microseconds: strptime takes 6 digits at most
        out["datetime"] = dt.datetime.strptime(f"{m['DATE_ACQUIRED']}T{clock}", "%Y-%m-%dT%H:%M:%S.%f").replace(
            tzinfo=dt.timezone.utc
        )
    if "SPACECRAFT_ID" in m:
        out["platform"] = m["SPACECRAFT_ID"].lower().replace("_", "-")
    return out


LANDSAT_C2_L2 = Layout(
    name="landsat_c2_l2",
    title="Landsat Collection 2 Level-2 scene folders, one band per file",
    example=(
        "LC08_L2SP_008059_20191201_20200825_02_T1/LC08_L2SP_008059_20191201_20200825_02_T1_SR_B1.TIF ... _QA_PIXEL.TIF "
        "+ _MTL.txt"
    ),
    filename_glob="**/L[CET]0[45789]_L2SP_*_*.TIF",
    filename_regex=(
        r"(?:^|/)(?P<product>(?P<platform>L[CET]0[45789])_L2SP_(?P<wrs_path>\d{3})(?P<wrs_row>\d{3})_(?P<date>\d{8})"
        r"_(?P<processed>\d{8})_(?P<collection>\d{2})_(?P<tier>T1|T2|RT))_(?P<band>SR_B\d|ST_B\d+|QA_PIXEL)\.TIF$"
    ),
    scene_id="{product}",
    sensor_of=lambda g: _LANDSAT_SENSOR[g["platform"]],
    bands={"landsat8_l2": _OLI, "landsat9_l2": _OLI, "landsat7_l2": _TM, "landsat5_l2": _TM},
    band_per_file=True,
    date_format="%Y%m%d",
    properties_of=lambda g: {
        "wrs_path": int(g["wrs_path"]),
        "wrs_row": int(g["wrs_row"]),
        "tier": g["tier"],
        "processed": g["processed"],
    },
    metadata_of=_landsat_metadata,
)

LAYOUTS: dict[str, Layout] = {
    lay.name: lay for lay in (SEN12MSCR, SEN12MSCR_FLAT, SEN12MSCR_TS, REGION_T, LANDSAT_C2_L2)
}


def scene_groups(layout: Layout, groups: Groups) -> dict[str, str]:
    """Groups plus the derived keys the scene-id templates use."""
    g = {k: v for k, v in groups.items() if v is not None}
    if "kind" in g:
        g["kind_norm"] = _SEN12MSCR_KIND.get(g["kind"], g["kind"].lower())
        g["kind_lower"] = g["kind"].lower()
    return g
