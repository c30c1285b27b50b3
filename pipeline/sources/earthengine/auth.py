"""Earth Engine authentication: a service-account key or the user's ``earthengine authenticate`` login.

Credentials are never logged: only the kind of credential and the project are. Without credentials the
user gets one line with the exact command to run, not the library's multi-paragraph exception.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.errors import SourceError

log = logging.getLogger(__name__)

KEY_ENV = "EE_SERVICE_ACCOUNT_KEY"
PROJECT_ENV = "EE_PROJECT"
HIGH_VOLUME_ENV = "EE_HIGH_VOLUME"

MISSING_CREDENTIALS = (
    "Earth Engine credentials not found: run `earthengine authenticate` "
    f"(or set {KEY_ENV} to a service-account key file) and set {PROJECT_ENV} to your Cloud project id"
)
MISSING_PROJECT = (
    f"Earth Engine project not set: run `export {PROJECT_ENV}=your-cloud-project-id` "
    "(a Cloud project with the Earth Engine API enabled)"
)


def _service_account_credentials(value: str) -> tuple[Any, str | None]:
    import ee

    text = value.strip()
    if text.startswith("{"):
        try:
            info = json.loads(text)
        except json.JSONDecodeError as exc:
            # The value is a secret: name the variable and the position, never echo it.
            raise SourceError(
                f"{KEY_ENV} holds invalid JSON (at character {exc.pos}); set it to the key file path or its full JSON"
            ) from None
        return ee.ServiceAccountCredentials(info.get("client_email"), key_data=text), info.get("project_id")
    path = Path(text).expanduser()
    if not path.is_file():
        raise SourceError(
            f"{KEY_ENV} points to {path}, which does not exist; set it to the service-account JSON key file"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(
            f"{KEY_ENV}: cannot read {path} as a JSON key ({type(exc).__name__}); download a JSON key for the service "
            "account"
        ) from None
    return ee.ServiceAccountCredentials(info.get("client_email"), key_file=str(path)), info.get("project_id")


def resolve_credentials(env: dict[str, str] | None = None) -> tuple[Any, str]:
    """(credentials, project) from the environment; raises ``SourceError`` with the fix when missing."""
    import ee

    env = dict(os.environ if env is None else env)
    project = env.get(PROJECT_ENV) or None
    key = env.get(KEY_ENV)
    if key:
        credentials, key_project = _service_account_credentials(key)
        project = project or key_project
        kind = "service account"
    else:
        try:
            credentials = ee.data.get_persistent_credentials()
        except ee.EEException:
            raise SourceError(MISSING_CREDENTIALS) from None
        project = project or getattr(credentials, "quota_project_id", None)
        kind = "user credentials"
    if not project:
        raise SourceError(MISSING_PROJECT)
    log.info("Earth Engine: %s, project %s", kind, project)
    return credentials, project


def initialize(env: dict[str, str] | None = None, high_volume: bool | None = None, deadline_s: float = 300.0) -> None:
    """Initialize earthengine-api once per process (a no-op when the caller already did it).

    The library's own HTTP retries are switched off: ``ee_pixels.with_retries`` is the one retry layer,
    so a 429 is not retried 5 x N times by stacked loops.
    """
    import ee

    if ee.data.is_initialized():
        return
    env = dict(os.environ if env is None else env)
    credentials, project = resolve_credentials(env)
    if high_volume is None:
        high_volume = env.get(HIGH_VOLUME_ENV, "").lower() in {"1", "true", "yes"}
    url = ee.data.HIGH_VOLUME_API_BASE_URL if high_volume else None
    try:
        ee.Initialize(credentials=credentials, project=project, url=url)
    except ee.EEException as exc:
        raise SourceError(
            f"Earth Engine refused project {project!r}: {str(exc).splitlines()[0]}; check {PROJECT_ENV} and that the "
            "Earth Engine API is enabled for it"
        ) from None
    ee.data.setMaxRetries(0)
    ee.data.setDeadline(int(deadline_s * 1000))
