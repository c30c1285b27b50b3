"""The local source: a folder of GeoTIFFs indexed by declarative filename layouts."""
