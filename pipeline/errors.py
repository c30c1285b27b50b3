"""Errors a user can act on: every message names the file/field/value and the fix.

The CLI turns ``CloudfreeError`` into a one-line message and a non-zero exit instead of a traceback.
"""


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
