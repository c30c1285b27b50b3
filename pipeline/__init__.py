"""cloudfree: cloudy satellite archives -> cloud-free, analysis-ready imagery.

Stages (raster-vision style, each a plain function with an explicit config):
query + mask (``sources``, ``masking``) -> select + export patches (``selection``, ``export``)
-> tiled cubes (``cubes``) -> train (``training``) -> reconstruct (``inference``) -> COG (``geotiff``).
"""

__version__ = "0.1.0"
