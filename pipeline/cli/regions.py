"""``cloudfree regions list|show|validate`` and ``cloudfree scenes``."""

from __future__ import annotations
