"""Region dicts shared by tests: small enough to build, train and reconstruct in seconds."""

from __future__ import annotations

from typing import Any


def tiny_region(name: str = "tiny", **changes: Any) -> dict[str, Any]:
    """2.5 km x 2.5 km near Zhengzhou in July 2021, 64 px patches (TCSEN12 rule, S1 + S2)."""
    return {
        "name": name,
        "description": "2.5 km x 2.5 km near Zhengzhou, 64 px patches: fast end-to-end tests",
        "bbox": [113.60, 34.71, 113.6275, 34.7325],
        "resolution": 10,
        "window": {"start": "2021-07-01", "end": "2021-07-31"},
        "sensors": ["s1", "s2"],
        "selection": {
            "rule": "tcsen12",
            "reference_max_cloud": 0.05,
            "input_dates": 1,
            "max_gap_days": 30,
            "sar_max_days": 3,
        },
        "patch": {"size": 64, "stride": 32},
        "splits": {"train": 0.6, "val": 0.2, "test": 0.2, "block_size": 2, "seed": 0},
        **changes,
    }
