"""Areas of interest: the region YAML model, its UTM grid and its patch grid.

A region file is data (``regions/*.yaml``); this module validates it with pydantic and turns every
problem into one line naming the file, the field, the value and the fix.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from affine import Affine
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from pipeline.errors import RegionError
from pipeline.grid import Grid
from pipeline.sensors import DEFAULT_SENSOR, SENSORS, s1_max_days

PROJECT_REGIONS = Path(__file__).resolve().parents[1] / "regions"
SENSOR_FAMILIES = ("s1", "s2", "landsat")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Strict):
    start: dt.date = Field(description="First acquisition date searched (inclusive).")
    end: dt.date = Field(description="Last acquisition date searched (inclusive).")

    @model_validator(mode="after")
    def _ordered(self) -> "Window":
        if self.end < self.start:
            raise ValueError(f"window end {self.end} is before start {self.start}; swap them")
        return self


class PatchSpec(_Strict):
    size: int = Field(256, description="Patch side in pixels; a multiple of 8 so models can downsample.")
    stride: int | None = Field(None, description="Step between patches in pixels (default: size, no overlap).")

    @field_validator("size")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v <= 0 or v % 8:
            raise ValueError(f"patch size {v} is not a positive multiple of 8; use e.g. {max(8, round(v / 8) * 8)}")
        return v

    @field_validator("stride")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"patch stride {v} must be positive")
        return v


class Splits(_Strict):
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.15, ge=0, le=1)
    test: float = Field(0.15, ge=0, le=1)
    block_size: int = Field(
        2, ge=1, description="Spatial block side in patches; whole blocks go to one split so nothing leaks."
    )
    seed: int = 0

    @model_validator(mode="after")
    def _sum_to_one(self) -> "Splits":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions sum to {total:g}, not 1; adjust train/val/test")
        return self


_SAR_MAX_DAYS_HELP = (
    "S1 must lie within this many days of each optical date. Left out of a region file, it follows the S1 "
    "constellation over the window: half the revisit, 3 days while two satellites fly (2016-09-26..2021-12-23, from "
    "2025-05), 6 days with S1A alone (see pipeline.sensors.s1_max_days)."
)


class TCSEN12Rule(_Strict):
    """TCSEN12: a reference (target) date under 5 % cloud; earlier optical may be contaminated; S1 near each."""

    rule: Literal["tcsen12"] = "tcsen12"
    reference_max_cloud: float = Field(0.05, ge=0, le=1, description="Max cloud+shadow fraction of the reference date.")
    input_max_cloud: float = Field(1.0, ge=0, le=1, description="Max cloud fraction of the auxiliary optical dates.")
    input_dates: int = Field(
        1, ge=1, le=4, description="Auxiliary optical dates before the reference (1: pairs, 2: three-date samples)."
    )
    max_gap_days: int = Field(30, ge=1, description="Max days between the reference and the oldest auxiliary date.")
    sar_max_days: int = Field(3, ge=0, description=_SAR_MAX_DAYS_HELP)
    min_valid: float = Field(0.99, ge=0, le=1, description="Min fraction of valid (non-nodata) pixels per date.")


class CMSNRule(_Strict):
    """CMSN: three Landsat dates, each under its own cloud cap (T1, T2, T3)."""

    rule: Literal["cmsn"] = "cmsn"
    caps: tuple[float, float, float] = Field(
        (0.25, 0.15, 0.10), description="Cloud caps for T1, T2, T3 (T3 is the target)."
    )
    max_gap_days: int = Field(64, ge=1)
    min_valid: float = Field(0.99, ge=0, le=1)


class SEN12MSCRTSRule(_Strict):
    """SEN12MS-CR-TS: target = least cloudy date; inputs = the first n dates within a coverage range."""

    rule: Literal["sen12mscr_ts"] = "sen12mscr_ts"
    n_inputs: int = Field(3, ge=1)
    coverage_min: float = Field(0.0, ge=0, le=1)
    coverage_max: float = Field(1.0, ge=0, le=1)
    sar_max_days: int = Field(3, ge=0, description=_SAR_MAX_DAYS_HELP)
    min_valid: float = Field(0.99, ge=0, le=1)


class SelfSupervisedRule(_Strict):
    """Self-supervised training on the AOI's own archive: clear target dates, every earlier date as observed.

    No labelled pairs are needed: training pastes real clouds onto the clear target (the archive's cloudy dates'
    masks and pixels, plus simulated cloud shapes; ``pipeline.train.samples``) and the target's own pixels are the
    truth under them, the recipe ``cloudfree benchmark`` scores with. ``holdout_from`` adds the temporal hold-out:
    targets from that date on belong to the test split only (on test patches), earlier ones to train/val (on their
    patches), so no target date and no patch is seen by two splits.
    """

    rule: Literal["self-supervised"] = "self-supervised"
    reference_max_cloud: float = Field(
        0.02, ge=0, le=1, description="Max cloud+shadow fraction of a target date (by the product's mask).")
    input_dates: int = Field(
        4, ge=1, le=12, description="Earlier optical dates per sample, the most recent first taken (any cloud).")
    max_gap_days: int = Field(90, ge=1, description="Max days between the target and the oldest earlier date.")
    sar_max_days: int = Field(3, ge=0, description=_SAR_MAX_DAYS_HELP)
    min_valid: float = Field(0.99, ge=0, le=1, description="Min fraction of valid (non-nodata) pixels per date.")
    holdout_from: dt.date | None = Field(
        None, description="Temporal hold-out: targets on or after this date are test-only; unset: spatial splits only.")

    @property
    def input_max_cloud(self) -> float:
        return 1.0


SelectionRule = Annotated[Union[TCSEN12Rule, CMSNRule, SEN12MSCRTSRule, SelfSupervisedRule],
                          Field(discriminator="rule")]


class WRS(_Strict):
    path: int = Field(ge=1, le=233)
    row: int = Field(ge=1, le=248)


class Region(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Lower-case slug, also the file name.")
    description: str = ""
    active: bool = Field(
        False, description="Scheduled build-dataset runs build a dataset for active regions that have none."
    )
    bbox: tuple[float, float, float, float] | None = Field(None, description="[W, S, E, N] in EPSG:4326 degrees.")
    geometry: str | None = Field(None, description="GeoJSON file (relative to the region file) instead of bbox.")
    crs: str = Field("auto", description="'auto' (UTM zone of the centroid) or an EPSG code like 'EPSG:32650'.")
    resolution: float = Field(10.0, description="Pixel size in metres.")
    event_date: dt.date | None = None
    window: Window
    sensors: tuple[Literal["s1", "s2", "landsat"], ...] = ("s1", "s2")
    wrs: WRS | None = Field(None, description="Landsat WRS-2 path/row to restrict scenes to.")
    selection: SelectionRule = Field(default_factory=TCSEN12Rule)
    patch: PatchSpec = Field(default_factory=PatchSpec)
    splits: Splits = Field(default_factory=Splits)

    @field_validator("sensors", mode="before")
    @classmethod
    def _known_sensors(cls, v: Any) -> Any:
        for s in v if isinstance(v, (list, tuple)) else [v]:
            if s not in SENSOR_FAMILIES:
                raise ValueError(f"unknown sensor {s!r}; use some of {list(SENSOR_FAMILIES)}")
        return v

    @field_validator("geometry", mode="before")
    @classmethod
    def _geometry_is_a_path(cls, v: Any) -> Any:
        if isinstance(v, dict) and "bbox" in v:
            raise ValueError(
                f"got a mapping with a bbox ({v!r}); 'geometry' is a GeoJSON file path - for a box write "
                f"'bbox: {list(v['bbox']) if isinstance(v['bbox'], (list, tuple)) else v['bbox']}' at the top level "
                "and drop 'geometry'"
            )
        if isinstance(v, dict):
            raise ValueError(
                f"got inline GeoJSON (type {v.get('type')!r}); 'geometry' is the path of a GeoJSON file relative to "
                "the region file - save it as e.g. aoi.geojson and write 'geometry: aoi.geojson', or run "
                "'cloudfree regions new NAME --geojson FILE ...'"
            )
        return v

    @field_validator("resolution")
    @classmethod
    def _positive_resolution(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"resolution {v} must be > 0 metres (e.g. 10 for Sentinel-2, 30 for Landsat)")
        return v

    @field_validator("bbox")
    @classmethod
    def _valid_bbox(cls, v: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        if v is None:
            return v
        w, s, e, n = v
        for lat in (s, n):
            if not -90 <= lat <= 90:
                raise ValueError(
                    f"latitude {lat} is outside [-90, 90]; bbox is [W, S, E, N] in degrees - are longitude and "
                    "latitude swapped?"
                )
        for lon in (w, e):
            if not -180 <= lon <= 180:
                raise ValueError(f"longitude {lon} is outside [-180, 180]; bbox is [W, S, E, N] in degrees")
        if w > e:
            if w > 0 > e:
                raise ValueError(
                    f"bbox west {w} > east {e}: the AOI crosses the antimeridian, which is not supported; split it "
                    "into two regions at 180°"
                )
            raise ValueError(f"bbox west {w} > east {e}; swap them ([W, S, E, N])")
        if s > n:
            raise ValueError(f"bbox south {s} > north {n}; swap them ([W, S, E, N])")
        if w == e or s == n:
            raise ValueError(f"bbox {list(v)} has zero area")
        return v

    @field_validator("crs")
    @classmethod
    def _valid_crs(cls, v: str) -> str:
        if v == "auto":
            return v
        try:
            CRS.from_user_input(v)
        except Exception as exc:  # rasterio raises CRSError with a terse message
            raise ValueError(f"crs {v!r} is not a CRS rasterio knows ({exc}); use 'auto' or 'EPSG:326NN'") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Region":
        if (self.bbox is None) == (self.geometry is None):
            raise ValueError("give exactly one of 'bbox' ([W, S, E, N]) or 'geometry' (a GeoJSON file)")
        if self.event_date and not self.window.start <= self.event_date <= self.window.end:
            raise ValueError(
                f"event_date {self.event_date} is outside the window {self.window.start}..{self.window.end}; widen the "
                "window or fix the date"
            )
        rule = self.selection
        if isinstance(rule, (TCSEN12Rule, SEN12MSCRTSRule, SelfSupervisedRule)) and \
                "sar_max_days" not in rule.model_fields_set:
            # the default follows the S1 revisit of the region's dates: a fixed 3 days rejected every patch of
            # every event after S1B's failure (12-day revisit)
            resolved = rule.model_copy(update={"sar_max_days": s1_max_days(self.window.start, self.window.end)})
            object.__setattr__(self, "selection", resolved)  # frozen model; this is still its construction
        return self

    # -- geometry ---------------------------------------------------------------------------------
    def lonlat_bounds(self, base_dir: Path | None = None) -> tuple[float, float, float, float]:
        if self.bbox is not None:
            return self.bbox
        return _geojson_bounds(Path(base_dir or PROJECT_REGIONS) / str(self.geometry))

    def target_crs(self) -> str:
        if self.crs != "auto":
            return self.crs
        w, s, e, n = self.lonlat_bounds()
        return utm_crs((w + e) / 2, (s + n) / 2)

    def grid(self) -> Grid:
        """The AOI's grid in the target CRS, snapped outward to whole pixels of ``resolution``."""
        crs = self.target_crs()
        left, bottom, right, top = transform_bounds(
            CRS.from_epsg(4326), CRS.from_user_input(crs), *self.lonlat_bounds(), densify_pts=21
        )
        r = self.resolution
        left, bottom = math.floor(left / r) * r, math.floor(bottom / r) * r
        right, top = math.ceil(right / r) * r, math.ceil(top / r) * r
        return Grid(
            crs, Affine(r, 0.0, left, 0.0, -r, top), int(round((right - left) / r)), int(round((top - bottom) / r))
        )

    def patches(self) -> list[tuple[str, Grid]]:
        """Full patches of ``patch.size`` every ``patch.stride`` pixels; ids encode the pixel offset."""
        g = self.grid()
        size, stride = self.patch.size, self.patch.stride or self.patch.size
        out = []
        for row in range(0, g.height - size + 1, stride):
            for col in range(0, g.width - size + 1, stride):
                out.append((f"r{row:05d}c{col:05d}", g.window(row, col, size, size)))
        return out


def utm_crs(lon: float, lat: float) -> str:
    zone = min(int((lon + 180) // 6) + 1, 60)
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def _geojson_bounds(path: Path, region_file: Path | None = None) -> tuple[float, float, float, float]:
    """Lon/lat bounds of a GeoJSON file's Polygon/MultiPolygon (bare geometry, Feature or FeatureCollection)."""
    where = f"{region_file}: field 'geometry' ({path})" if region_file else f"{path}: field 'geometry'"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegionError(
            f"{where}: GeoJSON file not found; fix the region's 'geometry' path (relative to the region file)"
        ) from None
    except json.JSONDecodeError as exc:
        raise RegionError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); fix the file") from None
    return geojson_bounds(data, where)


def geojson_bounds(data: Any, where: str) -> tuple[float, float, float, float]:
    """Lon/lat bounds of parsed GeoJSON (a Polygon/MultiPolygon, bare, in a Feature or a FeatureCollection).

    ``where`` starts every error message (the file and field, or "inline GeoJSON of AOI ..."). The bounds
    obey the same lat/lon/antimeridian rules as an inline bbox.
    """
    from shapely.errors import ShapelyError
    from shapely.geometry import shape

    if not isinstance(data, dict):
        raise RegionError(f"{where}: expected a GeoJSON object, got {type(data).__name__}; give a GeoJSON Polygon")
    try:
        if data.get("type") == "FeatureCollection":
            geoms = [f["geometry"] for f in data["features"]]
        else:
            geoms = [data["geometry"] if data.get("type") == "Feature" else data]
        shapes = [shape(g) for g in geoms]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ShapelyError) as exc:
        raise RegionError(
            f"{where}: malformed GeoJSON geometry ({type(exc).__name__}: {exc}); it needs a Polygon or MultiPolygon "
            "(bare, in a Feature or in a FeatureCollection) with [lon, lat] rings"
        ) from None
    kinds = sorted({s.geom_type for s in shapes if s.geom_type not in ("Polygon", "MultiPolygon")})
    if not shapes or kinds or any(s.is_empty for s in shapes):
        found = ", ".join(kinds) or "no geometry / empty geometry"
        raise RegionError(f"{where}: GeoJSON has {found}; the AOI must be a non-empty Polygon or MultiPolygon")
    bounds = (
        min(s.bounds[0] for s in shapes),
        min(s.bounds[1] for s in shapes),
        max(s.bounds[2] for s in shapes),
        max(s.bounds[3] for s in shapes),
    )
    try:
        Region._valid_bbox(bounds)  # the same lat/lon/antimeridian rules as an inline bbox
    except ValueError as exc:
        raise RegionError(f"{where}: GeoJSON bounds {list(bounds)}: {exc}") from None
    return bounds


def regions_dir() -> Path:
    return Path(os.environ.get("CLOUDFREE_REGIONS_DIR", PROJECT_REGIONS))


def list_regions() -> list[str]:
    return sorted(p.stem for p in regions_dir().glob("*.yaml"))


_TAGS = ("tcsen12", "cmsn", "sen12mscr_ts")
_MISSING_HINT = {
    "name": "add 'name: <slug>' equal to the file name, e.g. name: zhengzhou-demo",
    "window": "add e.g. 'window: {start: 2021-07-01, end: 2021-08-31}'",
    "window.start": "add the first date, e.g. 'start: 2021-07-01'",
    "window.end": "add the last date, e.g. 'end: 2021-08-31'",
}


def _loc_text(loc: tuple) -> str:
    """('patch', 'size') -> patch.size; ('sensors', 1) -> sensors[1]; union tags are dropped."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and part in _TAGS and loc[i - 1] == "selection":
            continue  # pydantic puts the discriminator value in the path; users never wrote it
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(loc: tuple) -> type[BaseModel]:
    """The pydantic model that owns the keys at ``loc`` (for 'allowed keys' lists)."""
    model: type[BaseModel] = Region
    for part in loc:
        if isinstance(part, int):
            continue
        if part in _TAGS:
            rules: dict[str, type[BaseModel]] = {
                "tcsen12": TCSEN12Rule,
                "cmsn": CMSNRule,
                "sen12mscr_ts": SEN12MSCRTSRule,
            }
            model = rules[part]
            continue
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return model


def _format_errors(source: str, exc: ValidationError) -> str:
    import difflib

    lines = []
    for err in exc.errors():
        loc = _loc_text(err["loc"])
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            parent, key = err["loc"][:-1], str(err["loc"][-1])
            allowed = list(_model_at(parent).model_fields)
            close = difflib.get_close_matches(key, allowed, n=1)
            fix = f"did you mean '{close[0]}'? " if close else "remove it; "
            under = f" under '{_loc_text(parent)}'" if parent else ""
            lines.append(
                f"{source}: unknown key '{loc}' (value {value!r}); {fix}allowed keys{under} are: {', '.join(allowed)}"
            )
            continue
        if err["type"] == "missing":
            if loc.startswith("bbox["):
                lines.append(
                    f"{source}: field 'bbox' needs 4 numbers [W, S, E, N] in degrees, e.g. [113.6, 34.71, 113.71, 34.8]"
                )
            else:
                lines.append(f"{source}: missing required field '{loc}'; {_MISSING_HINT.get(loc, 'add it')}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch" and loc == "name":
            msg = "must be a lower-case slug of letters, digits and '-' (e.g. zheng-zhou), equal to the file name"
        elif err["type"].startswith(("date_", "datetime_")):
            msg += "; write dates as YYYY-MM-DD"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown selection rule {err.get('ctx', {}).get('tag')!r}; use one of: {', '.join(_TAGS)}"
        elif loc.startswith("bbox") and err["type"] in ("too_long", "too_short", "tuple_type"):
            msg += "; bbox is 4 numbers [W, S, E, N] in degrees"
        where = f"field '{loc}'" if loc else "region"
        shown = "" if isinstance(value, dict) or loc == "" else f" (got {value!r})"
        lines.append(f"{source}: {where}: {msg}{shown}")
    return "\n".join(lines)


def parse_region(data: Any, source: str = "<region>") -> Region:
    if not isinstance(data, dict):
        raise RegionError(f"{source}: a region file must be a YAML mapping of keys (name, bbox, window, ...)")
    try:
        return Region.model_validate(data)
    except ValidationError as exc:
        raise RegionError(_format_errors(source, exc)) from None


class _RegionLoader(yaml.SafeLoader):
    """Safe YAML, except that a date-looking value that is no date stays text (see ``_date_or_text``)."""


def _date_or_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    # An unquoted 2021-13-01 makes PyYAML's own constructor raise a bare ValueError with no field or line;
    # as text it reaches pydantic, whose error names the field and the value.
    try:
        return yaml.SafeLoader.construct_yaml_timestamp(loader, node)
    except ValueError:
        return loader.construct_scalar(node)


_RegionLoader.add_constructor("tag:yaml.org,2002:timestamp", _date_or_text)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's text spans several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = f"{exc.problem or exc.context} at line {mark.line + 1}, column {mark.column + 1}"
        if exc.context and exc.problem and exc.context_mark is not None:  # where the unclosed [ or { began
            text = f"{exc.context} from line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}: {text}"
        return text
    return " ".join(str(exc).split())


def read_region_yaml(path: Path) -> Any:
    """The parsed YAML of a region file; unreadable, binary or malformed files are one ``RegionError`` line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RegionError(
            f"{path}: not a text file (byte {exc.start} is not UTF-8); a region is a YAML text file - pass the "
            ".yaml file, not an image or archive (make one with 'cloudfree regions new')"
        ) from None
    except IsADirectoryError:
        raise RegionError(f"{path}: is a folder; pass a region YAML file inside it") from None
    except OSError as exc:
        raise RegionError(f"{path}: cannot be read ({exc.strerror}); check the path and its permissions") from None
    try:
        return yaml.load(text, Loader=_RegionLoader)  # noqa: S506 - _RegionLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise RegionError(f"{path}: not valid YAML ({_yaml_problem(exc)}); fix the file") from None


def load_region(name_or_path: str | Path) -> Region:
    """Load a region by name (``regions/NAME.yaml``) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = regions_dir() / f"{name_or_path}.yaml"
    if not path.exists():
        raise RegionError(
            f"region '{name_or_path}' not found (looked for {path}); known regions: "
            f"{', '.join(list_regions()) or 'none'}"
        )
    region = parse_region(read_region_yaml(path), str(path))
    if path.stem != region.name and path.parent == regions_dir():
        raise RegionError(
            f"{path}: field 'name' is {region.name!r} but the file is named {path.stem!r}; make them equal"
        )
    if region.geometry is not None:
        region = region.model_copy(update={"geometry": str((path.parent / region.geometry).resolve())})
        _geojson_bounds(Path(str(region.geometry)), path)  # a broken GeoJSON fails here, not at the first grid() call
    return region


# -- size guard ---------------------------------------------------------------------------------------
MAX_MEGAPIXELS_ENV = "CLOUDFREE_MAX_MEGAPIXELS"
# 10 Mpx is 1,000 km² at 10 m (about 32 x 32 km; 9,000 km² at 30 m): a city or river-reach flood AOI, and what a
# 16 GB machine builds with room to spare (~7.5 GB build-dataset peak, measured below; ~0.3 GB of hidden reconstruct
# intermediates in uint16, 0.55 GB in float32). A larger AOI needs --yes or a machine-wide CLOUDFREE_MAX_MEGAPIXELS.
DEFAULT_MAX_MEGAPIXELS = 10.0
# build-dataset reads and masks each scene on the whole region grid. Peak RSS measured with the synthetic source
# (2 cores, 2022 Sindh windows): 1.66 GB at 1.1 Mpx, 7.07 GB at 9.1 Mpx. Modelled as the interpreter and libraries,
# ~443 bytes a pixel of whole-grid rendering, reading and masking, and the scene cache (BuildConfig.cache_bytes,
# 2 GiB) filling at ~237 bytes a pixel until it is full.
BUILD_BASE_BYTES = 900_000_000
BUILD_BYTES_PER_PIXEL = 443
BUILD_CACHE_BYTES_PER_PIXEL = 237
BUILD_CACHE_BYTES = 2 << 30
# the reconstruct composite's hidden .partial.tif files are uncompressed: the reflectance bands in the output
# dtype, the uint8 provenance and the int16 source-days layer. RECONSTRUCT_DTYPE is ReconstructConfig.dtype's
# default (a foundation cannot import the reconstruct stage; tests/cli/test_cli_guards.py checks they agree).
RECONSTRUCT_DTYPE = "uint16"
_DTYPE_BYTES = {"uint16": 2, "float32": 4}
_EXTRA_LAYER_BYTES = 1 + 2


@dataclass(frozen=True)
class SizeEstimate:
    """What a region costs: its grid, the reconstruct outputs on disk and build-dataset's peak memory."""

    width: int
    height: int
    resolution: float
    bands: int
    dtype: str
    intermediate_bytes: int
    cog_bytes: int
    build_peak_bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def megapixels(self) -> float:
        return self.pixels / 1e6

    @property
    def area_km2(self) -> float:
        return self.pixels * self.resolution**2 / 1e6

    def lines(self) -> list[str]:
        return [
            f"size: {self.width:,} x {self.height:,} px at {self.resolution:g} m = {self.megapixels:,.1f} Mpx "
            f"({self.area_km2:,.0f} km²)",
            f"disk: reconstruct writes ~{_gb(self.intermediate_bytes)} of hidden uncompressed intermediates "
            f"({self.bands} {self.dtype} bands + provenance + source days) and a COG of up to "
            f"~{_gb(self.cog_bytes)} per date",
            f"memory: build-dataset peaks near ~{_gb(self.build_peak_bytes)} (whole-grid scene reads)",
        ]


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.0f} MB"


def _optical_bands(region: Region) -> int:
    family = "s2" if "s2" in region.sensors or "landsat" not in region.sensors else "landsat"
    return len(SENSORS[DEFAULT_SENSOR[family]].reflectance_bands)


def estimate_size(region: Region, dtype: str = RECONSTRUCT_DTYPE) -> SizeEstimate:
    """Pixels of the region's grid, the reconstruct composite's disk use per date (``dtype``: its output type) and
    build-dataset's peak memory."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not a reconstruct output type; use one of {', '.join(_DTYPE_BYTES)}")
    g = region.grid()
    px = g.width * g.height
    bands = _optical_bands(region)
    intermediate = px * (bands * _DTYPE_BYTES[dtype] + _EXTRA_LAYER_BYTES)
    build = BUILD_BASE_BYTES + BUILD_BYTES_PER_PIXEL * px + min(BUILD_CACHE_BYTES, BUILD_CACHE_BYTES_PER_PIXEL * px)
    return SizeEstimate(g.width, g.height, region.resolution, bands, dtype, intermediate, intermediate, build)


def max_megapixels() -> float:
    """The size limit: ``CLOUDFREE_MAX_MEGAPIXELS`` or ``DEFAULT_MAX_MEGAPIXELS``."""
    raw = os.environ.get(MAX_MEGAPIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_MEGAPIXELS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or math.isinf(value):
        raise RegionError(
            f"{MAX_MEGAPIXELS_ENV}={raw!r} is not a positive number of megapixels; set it to e.g. 100, or unset it "
            f"for the default {DEFAULT_MAX_MEGAPIXELS:g}"
        )
    return value


def check_size(region: Region, *, yes: bool = False, dtype: str = RECONSTRUCT_DTYPE) -> SizeEstimate:
    """The region's ``SizeEstimate``; a one-line ``RegionError`` when it is over the limit and ``yes`` is False."""
    est = estimate_size(region, dtype)
    limit = max_megapixels()
    if est.megapixels > limit and not yes:
        raise RegionError(
            f"region {region.name} is {est.area_km2:,.0f} km² = {est.megapixels:,.1f} Mpx at {region.resolution:g} m "
            f"(~{_gb(est.intermediate_bytes)} of reconstruct intermediates, ~{_gb(est.build_peak_bytes)} build "
            f"memory), over the {limit:g} Mpx limit ({MAX_MEGAPIXELS_ENV}); pass --yes to run it anyway, or use a "
            "smaller bbox or a coarser resolution"
        )
    return est
