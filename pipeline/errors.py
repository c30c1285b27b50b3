"""Errors a user can act on: every message names the file/field/value and the fix.

The CLI turns ``CloudfreeError`` into a one-line message and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

from typing import Any, Callable


class CloudfreeError(Exception):
    """Base class of errors with a message meant for the user."""


class RegionError(CloudfreeError):
    """A region file or region field is invalid."""


class SourceError(CloudfreeError):
    """A data source cannot answer (no scenes, no coverage, missing credentials, bad band)."""


class DataError(CloudfreeError):
    """Input data on disk is missing, unreadable or inconsistent."""


class CheckpointError(CloudfreeError):
    """A checkpoint is missing, corrupt, or does not fit the requested data."""


def cli_option(field: str) -> str:
    """``batch_size`` -> ``--batch-size``: how the command line spells a config field."""
    return "--" + field.replace("_", "-")


def describe_validation(exc: Any, option: Callable[[str], str] = str, what: str = "options") -> str:
    """Every error of a pydantic ``ValidationError`` on one line: ``OPTION VALUE: what is wrong and the fix``.

    ``option`` spells a field as the user knows it (``cli_option`` for the CLI, ``str`` for flow parameters).
    Our own validators' messages already name the fix; pydantic's built-in ones name the constraint.
    """
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not loc:  # a rule across fields: its message names the options itself
            parts.append(msg if err["type"] == "value_error" else f"{what}: {msg}")
            continue
        name = option(".".join(loc))
        value = err.get("input")
        shown = f" {value!r}" if len(loc) == 1 and isinstance(value, (str, int, float, bool)) else ""
        parts.append(f"{name}{shown}: {msg}")
    return "; ".join(parts)
