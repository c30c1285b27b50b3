"""Errors raised by ``models``: plain ``ValueError`` subclasses (``models`` must not import ``pipeline``).

Each message names the model / config key / batch key, the value it got, and the fix.
"""

from __future__ import annotations


class ModelError(ValueError):
    """Base class of user-actionable model errors."""


class ModelConfigError(ModelError):
    """Unknown model name, unknown or invalid config key, missing loss resource (e.g. VGG16 weights)."""


class ModelInputError(ModelError):
    """A batch does not match the model's InputSpec (missing key, wrong dates/bands/shape)."""
