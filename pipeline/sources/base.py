"""The one seam that matters: every data source answers ``search`` and ``read``.

Masking, selection, export and inference only see ``Scene`` objects and ``xarray.DataArray`` rasters
on a requested ``Grid``, never where the pixels came from.

Raster contract of ``Source.read``:
- dims ``(band, y, x)``, ``band`` coordinate = band names of ``pipeline.sensors``, ``y``/``x`` = pixel
  centres of the requested grid (exactly its shape, CRS and transform);
- float32 in physical units: reflectance (0..1, not DN) for optical bands, dB for S1 VV/VH, degrees for
  angles; QA/classification bands keep their integer codes (exact in float32);
- nodata (outside the footprint, fill) is NaN in spectral bands;
- attrs: ``scene_id``, ``sensor`` (a ``pipeline.sensors`` key), ``datetime`` (ISO 8601 UTC),
  ``crs``, ``transform`` (6 numbers), ``simulated`` (bool: True only for the synthetic archive);
- lazy (dask-backed) where the source can be.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import xarray as xr

    from pipeline.grid import Grid
    from pipeline.regions import Region


@dataclass(frozen=True)
class Scene:
    id: str
    sensor: str  # a pipeline.sensors key, e.g. "s2_l1c", "s1_grd", "landsat8_l2"
    datetime: dt.datetime  # acquisition time, UTC
    footprint: dict  # GeoJSON geometry in EPSG:4326
    cloud_cover: float | None  # scene-level cloud fraction 0..1 as the provider reports it (None for SAR)
    properties: dict[str, Any] = field(default_factory=dict)  # sun angles, orbit pass, platform, simulated, ...

    @property
    def family(self) -> str:
        from pipeline.sensors import get_sensor

        return get_sensor(self.sensor).family

    @property
    def date(self) -> dt.date:
        return self.datetime.date()


@runtime_checkable
class Source(Protocol):
    name: str

    def search(self, region: Region, start: dt.date, end: dt.date, sensor: str) -> list[Scene]:
        """Scenes of ``sensor`` (a family ``s1|s2|landsat`` or a sensor key) over the region, sorted by time."""
        ...

    def read(self, scene: Scene, grid: Grid, bands: Sequence[str] | None = None) -> xr.DataArray:
        """Pixels of ``scene`` on ``grid`` (all bands when ``bands`` is None); see the module contract."""
        ...


def raster_attrs(scene: Scene, grid: Grid, simulated: bool) -> dict[str, Any]:
    return {
        "scene_id": scene.id,
        "sensor": scene.sensor,
        "datetime": scene.datetime.astimezone(dt.timezone.utc).isoformat(),
        "crs": grid.crs,
        "transform": list(grid.transform)[:6],
        "simulated": simulated,
    }
