"""Shared fixtures. Test rasters come from the synthetic source or ../shared/data/real (never committed blobs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"

# The ``ee_offline`` fixture for every test that asks for it by name (importing a fixture into a test module
# and requesting it as an argument reads as a redefinition to linters).
pytest_plugins = ["tests.sources.ee_offline"]

# Prefect must never touch a user's profile or phone home from tests.
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect" / "test-home"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL.exists():
        pytest.skip(f"real samples not found at {REAL} (CI clones the repo with shared/ beside it)")
    return REAL
