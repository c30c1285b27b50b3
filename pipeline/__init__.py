"""cloudfree: cloudy satellite archives -> cloud-free, analysis-ready imagery.

The library, one package per stage (see docs/architecture.md):
``sources`` (scenes and pixels) -> ``masking`` (cloud/shadow classes) -> ``dataset`` (patches, manifest,
Zarr cubes) -> ``train`` (checkpoints) -> ``reconstruct`` (cloud-free COGs), on the shared foundations
``regions``, ``grid``, ``sensors``, ``normalize``, ``files`` and ``errors``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cloudfree")
except PackageNotFoundError:  # a source tree used without `pip install -e .`
    __version__ = "0+unknown"
