"""``cloudfree`` command line. Each stage registers its commands from its own module."""

from pipeline.cli.app import app, main
from pipeline.cli import regions  # noqa: F401  (regions, scenes)

__all__ = ["app", "main"]
