"""``cloudfree`` command line. Each stage registers its commands from its own module."""

from pipeline.cli.app import app, main
from pipeline.cli import regions  # noqa: F401  (regions, scenes)
from pipeline.cli import preview  # noqa: F401  (preview)
from pipeline.cli import dataset  # noqa: F401  (build-dataset)
from pipeline.cli import train  # noqa: F401  (train, evaluate, export-model)
from pipeline.cli import reconstruct  # noqa: F401  (reconstruct)
from pipeline.cli import demo  # noqa: F401  (demo)

__all__ = ["app", "main"]
