"""Data sources behind the ``Source`` protocol: synthetic (embedded default), local GeoTIFFs, Earth Engine."""

from pipeline.sources.base import Scene, Source, get_source

__all__ = ["Scene", "Source", "get_source"]
