"""Earth Engine authentication: a service-account key or the user's ``earthengine authenticate`` login.

Credentials are never logged: only the kind of credential and the project are. Without credentials the
user gets one line with the exact command to run, not the library's multi-paragraph exception.

Every library exception on the way (google-auth, earthengine-api, the HTTP stack) becomes a one-line
``SourceError`` that names the variable and the problem but never the value: google-auth's own messages can
hold the whole key (``InvalidValue: {'type': 'service_account', ..., 'private_key': ...}``). The error is
raised after the ``except`` block has ended, so it carries no ``__context__`` back to the library exception
either (a chained exception would print, pickle into Prefect results, and reach the Prefect database).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from pipeline.errors import SourceError
from pipeline.redact import redact

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
NEW_KEY = "create a new JSON key for the service account (IAM & Admin -> Service accounts -> Keys)"
# google-auth's ``from_service_account_info`` needs these; a downloaded JSON key always has them.
REQUIRED_FIELDS = ("client_email", "private_key", "token_uri")


class EarthEngineUnreachable(SourceError):
    """The network, not the input, failed: worth retrying later (``flows.common.is_transient_error``)."""


def _network_errors() -> tuple[type[BaseException], ...]:
    """What "no route to Google" raises across the stack earthengine-api uses (all are imported by it)."""
    import google.auth.exceptions
    import httplib2

    # OSError covers socket.gaierror, ConnectionError, TimeoutError, ssl.SSLError and requests' ConnectionError
    return google.auth.exceptions.TransportError, httplib2.HttpLib2Error, socket.gaierror, OSError


def _library_errors() -> tuple[type[BaseException], ...]:
    import ee
    import google.auth.exceptions
    import googleapiclient.errors

    return google.auth.exceptions.GoogleAuthError, googleapiclient.errors.Error, ee.EEException, ValueError, TypeError


def _detail(exc: BaseException, limit: int = 200) -> str:
    """The exception's first line, scrubbed of secrets and clipped: enough to tell a DNS failure from a refusal."""
    lines = str(exc).strip().splitlines()
    first = redact(lines[0]) if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def unreachable(exc: BaseException) -> EarthEngineUnreachable:
    detail = _detail(exc)
    return EarthEngineUnreachable(
        f"Earth Engine unreachable ({type(exc).__name__}): check the network/proxy (HTTPS_PROXY) and that "
        "oauth2.googleapis.com and earthengine.googleapis.com are reachable, then retry"
        + (f" [{detail}]" if detail else "")
    )


def _looks_like_path(text: str) -> bool:
    """Whether an unusable value can be echoed: a path is not a secret, anything else may be a mangled key."""
    return (len(text) <= 256 and "\n" not in text and "PRIVATE KEY" not in text
            and ("/" in text or "\\" in text or text.lower().endswith((".json", ".pem"))))


def _is_file(path: Path) -> bool:
    try:
        return len(str(path)) <= 4096 and "\n" not in str(path) and path.is_file()
    except (OSError, ValueError):  # a name too long or with a NUL byte: a mangled value, not a file
        return False


def _check_key_info(info: Any, where: str) -> dict[str, Any]:
    """The parsed key if it has what google-auth needs and its private_key loads; else a SourceError."""
    if not isinstance(info, dict):
        raise SourceError(f"{where} is JSON but not a key object ({type(info).__name__}); {NEW_KEY}")
    missing = [f for f in REQUIRED_FIELDS if not isinstance(info.get(f), str) or not info[f].strip()]
    if missing:
        kind = info.get("type")
        # e.g. an OAuth client file ("installed") or a user login handed over by mistake
        other = isinstance(kind, str) and kind != "service_account" and len(kind) < 40
        raise SourceError(
            f"{where} has no {', '.join(missing)} field{'s' if len(missing) > 1 else ''}"
            f"{f' (its type is {kind!r})' if other else ''}: it is not a complete service-account key; {NEW_KEY}"
        )
    from google.auth import crypt

    try:
        crypt.RSASigner.from_string(info["private_key"])
    except Exception as exc:  # whatever the crypto backend raises: its message may quote the key
        problem = type(exc).__name__
    else:
        return info
    raise SourceError(
        f"{where}: the private_key does not load as a PEM key ({problem}); the key was truncated or its "
        f"newlines mangled (keep the \\n escapes of the JSON), or {NEW_KEY}"
    ) from None


def _credentials(email: str, **key: str) -> Any:
    """``ee.ServiceAccountCredentials`` with the library's exception replaced by one that cannot hold the key."""
    import ee

    try:
        return ee.ServiceAccountCredentials(email, **key)
    except _library_errors() as exc:
        problem = type(exc).__name__
    where = f"{KEY_ENV} (JSON text)" if "key_data" in key else f"{KEY_ENV} key file {key.get('key_file')}"
    raise SourceError(f"{where}: google-auth rejects the service-account key ({problem}); {NEW_KEY}") from None


def _service_account_credentials(value: str) -> tuple[Any, str | None]:
    text = value.strip()
    if text.startswith("{"):
        where = f"{KEY_ENV} (JSON text)"
        try:
            info = json.loads(text)
        except json.JSONDecodeError as exc:
            pos = exc.pos
        else:
            info = _check_key_info(info, where)
            return _credentials(info["client_email"], key_data=text), info.get("project_id")
        # The value is a secret: name the variable and the position, never echo it.
        raise SourceError(
            f"{KEY_ENV} holds invalid JSON (at character {pos}); set it to the key file path or its full JSON"
        ) from None
    path = Path(text).expanduser()
    if not _is_file(path):
        if _looks_like_path(text):
            raise SourceError(
                f"{KEY_ENV} points to {path}, which does not exist; set it to the service-account JSON key file"
            )
        raise SourceError(
            f"{KEY_ENV} is neither JSON nor the path of a key file (value not shown: {len(text)} characters); "
            "set it to the service-account JSON key file or its full JSON text"
        )
    where = f"{KEY_ENV} key file {path}"
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = type(exc).__name__
    else:
        info = _check_key_info(info, where)
        return _credentials(info["client_email"], key_file=str(path)), info.get("project_id")
    raise SourceError(
        f"{KEY_ENV}: cannot read {path} as a JSON key ({problem}); download a JSON key for the service account"
    ) from None


def _persistent_credentials() -> Any:
    """The ``earthengine authenticate`` login (or application-default credentials), refreshed once."""
    import ee

    try:
        return ee.data.get_persistent_credentials()
    except ee.EEException:
        failure = SourceError(MISSING_CREDENTIALS)
    except _network_errors() as exc:  # the login is refreshed against oauth2.googleapis.com right away
        failure = unreachable(exc)
    except _library_errors() as exc:
        failure = SourceError(
            f"the stored Earth Engine login cannot be used ({type(exc).__name__}: {_detail(exc)}); run "
            "`earthengine authenticate` again (or set GOOGLE_APPLICATION_CREDENTIALS / "
            f"{KEY_ENV} to a valid service-account key)"
        )
    raise failure from None


def resolve_credentials(env: dict[str, str] | None = None) -> tuple[Any, str]:
    """(credentials, project) from the environment; raises ``SourceError`` with the fix when missing."""
    env = dict(os.environ if env is None else env)
    project = env.get(PROJECT_ENV) or None
    key = env.get(KEY_ENV)
    if key:
        credentials, key_project = _service_account_credentials(key)
        project = project or key_project
        kind = "service account"
    else:
        credentials = _persistent_credentials()
        project = project or getattr(credentials, "quota_project_id", None)
        kind = "user credentials"
    if not project:
        raise SourceError(MISSING_PROJECT)
    log.info("Earth Engine: %s, project %s", kind, project)
    return credentials, project


def _initialize_error(exc: BaseException, project: str, kind: str) -> SourceError:
    import ee
    import google.auth.exceptions

    if isinstance(exc, _network_errors()):
        return unreachable(exc)
    if isinstance(exc, ee.EEException):
        return SourceError(
            f"Earth Engine refused project {project!r}: {_detail(exc, 300)}; check {PROJECT_ENV} and that the "
            "Earth Engine API is enabled for it"
        )
    if isinstance(exc, google.auth.exceptions.RefreshError):
        fix = (f"check that the key in {KEY_ENV} is not deleted or disabled, or {NEW_KEY}" if kind == KEY_ENV
               else "run `earthengine authenticate` again")
        return SourceError(f"Google rejected the Earth Engine credentials (RefreshError: {_detail(exc)}); {fix}")
    return SourceError(
        f"Earth Engine could not start for project {project!r} ({type(exc).__name__}: {_detail(exc)}); "
        f"check {KEY_ENV if kind == KEY_ENV else 'your `earthengine authenticate` login'} and {PROJECT_ENV}"
    )


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
    except (*_network_errors(), *_library_errors()) as exc:
        error = _initialize_error(exc, project, KEY_ENV if env.get(KEY_ENV) else "login")
    else:
        ee.data.setMaxRetries(0)
        ee.data.setDeadline(int(deadline_s * 1000))
        return
    raise error from None
