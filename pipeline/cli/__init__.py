"""``cloudfree`` command line. Each stage registers its commands from its own module.

``cloudfree demo`` runs the Prefect flows, so it is registered by ``flows.cli`` (the console script).
"""

from pipeline.cli.app import app, main

# Imported for their side effect, in pipeline order: `cloudfree --help` lists commands in registration order.
# isort: off
from pipeline.cli import regions  # noqa: F401  (regions, scenes)
from pipeline.cli import preview  # noqa: F401  (preview)
from pipeline.cli import dataset  # noqa: F401  (build-dataset)
from pipeline.cli import train  # noqa: F401  (train, evaluate, export-model)
from pipeline.cli import reconstruct  # noqa: F401  (reconstruct)
from pipeline.cli import benchmark  # noqa: F401  (benchmark)
# isort: on

__all__ = ["app", "main"]
