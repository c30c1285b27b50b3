"""Nothing leaks: a service-account key that does not load never reaches an error, a log line or Prefect's database.

The fake key carries unique markers (in its PEM body and its ``private_key_id``); every path that can see it -
the auth code, the real CLI in a subprocess, the logging filter, a flow run under Prefect - is fed the key and
its output searched for the markers. Each test also checks something that must be there (the variable's name,
a canary log line), so "marker not found" cannot pass because nothing was written.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import traceback
from pathlib import Path
from typing import Any

import pytest

from pipeline import redact
from pipeline.errors import SourceError

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / ".venv" / "bin" / "cloudfree"
MARKER = "FAKEKEYMARKER0123456789"
ID_MARKER = "PKIDMARKER9f8e7d6c5b4a"
BAD_PEM = f"-----BEGIN PRIVATE KEY-----\n{MARKER}abcdefghijklmnopqrstuvwxyz\n{MARKER}ZYX\n-----END PRIVATE KEY-----\n"
EMAIL = "cloudfree-ee@fake-project.iam.gserviceaccount.com"


def key_info(pem: str = BAD_PEM, **drop_or_set: Any) -> dict[str, Any]:
    info = {
        "type": "service_account", "project_id": "fake-project", "private_key_id": ID_MARKER, "private_key": pem,
        "client_email": EMAIL, "client_id": "123456789012345678901",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": "https://oauth2.googleapis.com/token",
    }
    for k, v in drop_or_set.items():
        if v is None:
            info.pop(k, None)
        else:
            info[k] = v
    return info


def assert_clean(*texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        for marker in (MARKER, ID_MARKER):
            assert marker.encode() not in data, f"secret marker {marker} leaked: ...{_around(data, marker)}..."


def _around(data: bytes, marker: str) -> str:
    i = data.find(marker.encode())
    return data[max(0, i - 200): i + 60].decode(errors="replace")


def formatted(exc: BaseException) -> str:
    """What a traceback of the error shows, chained exceptions included."""
    return "".join(traceback.format_exception(exc))


@pytest.fixture
def ee_env(monkeypatch, tmp_path):
    """No credentials of the machine's user, no metadata-server probe, and ee.Initialize only by test's leave."""
    import ee
    from ee import _state

    ee.Reset()
    _state.reset_state()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    for var in ("EE_PROJECT", "EE_SERVICE_ACCOUNT_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "EE_HIGH_VOLUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))

    def forbidden(*a, **k):
        raise AssertionError("ee.Initialize must not be reached with a key that does not load")

    monkeypatch.setattr(ee, "Initialize", forbidden)
    yield ee
    ee.Reset()


# -- every auth path -----------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "key.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


CASES = {
    # name: (value of EE_SERVICE_ACCOUNT_KEY given tmp_path, text the one-line error must contain)
    "inline-bad-pem": (lambda p: json.dumps(key_info()), "the private_key does not load as a PEM key"),
    "file-bad-pem": (lambda p: _write(p, json.dumps(key_info())), "the private_key does not load as a PEM key"),
    "inline-missing-fields": (lambda p: json.dumps(key_info(client_email=None, private_key=None)),
                              "has no client_email, private_key fields"),
    "file-missing-field": (lambda p: _write(p, json.dumps(key_info(client_email=None))), "has no client_email field"),
    "inline-invalid-json": (lambda p: json.dumps(key_info())[:-40] + ", broken", "holds invalid JSON"),
    "file-invalid-json": (lambda p: _write(p, json.dumps(key_info())[:-40]), "as a JSON key (JSONDecodeError)"),
    "raw-pem-not-json": (lambda p: BAD_PEM, "neither JSON nor the path of a key file"),
    "pem-with-escaped-newlines": (lambda p: BAD_PEM.replace("\n", "\\n"), "neither JSON nor the path of a key file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_auth_path_names_the_variable_never_the_key(ee_env, monkeypatch, tmp_path, case):
    from pipeline.sources.earthengine import auth

    value, needle = CASES[case]
    monkeypatch.setenv(auth.KEY_ENV, value(tmp_path))
    with pytest.raises(SourceError) as info:
        auth.initialize()
    err = info.value
    msg = str(err)
    assert "EE_SERVICE_ACCOUNT_KEY" in msg and needle in msg and "\n" not in msg
    # nothing chained: a traceback, a pickled Prefect result or a debugger sees only this error
    assert err.__cause__ is None and err.__context__ is None
    assert_clean(msg, repr(err), formatted(err))


def test_key_file_that_loads_reaches_initialize_and_names_the_service_account(ee_env, monkeypatch, tmp_path):
    """Control for the cases above: a good key passes every check, so they fail for the reason they name."""
    from pipeline.sources.earthengine import auth

    path = _write(tmp_path, json.dumps(key_info(pem=real_pem())))
    monkeypatch.setenv(auth.KEY_ENV, path)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(ee_env, "Initialize", lambda credentials, project, url: seen.update(
        email=credentials.service_account_email, project=project))
    monkeypatch.setattr(ee_env.data, "setMaxRetries", lambda n: None)
    monkeypatch.setattr(ee_env.data, "setDeadline", lambda ms: None)
    auth.initialize()
    assert seen == {"email": EMAIL, "project": "fake-project"}


def test_library_rejecting_a_loadable_key_is_one_line_without_the_key(ee_env, monkeypatch, tmp_path):
    """google-auth's own error for a key dict quotes the dict: the wrapper must drop the message, keep the type."""
    import google.auth.exceptions

    from pipeline.sources.earthengine import auth

    def reject(email, **key):
        raise google.auth.exceptions.InvalidValue(f"{key_info()} could not be converted to bytes")

    monkeypatch.setattr(ee_env, "ServiceAccountCredentials", reject)
    for value in (json.dumps(key_info(pem=real_pem())), _write(tmp_path, json.dumps(key_info(pem=real_pem())))):
        monkeypatch.setenv(auth.KEY_ENV, value)
        with pytest.raises(SourceError, match=r"google-auth rejects the service-account key \(InvalidValue\)") as info:
            auth.initialize()
        assert "EE_SERVICE_ACCOUNT_KEY" in str(info.value) and info.value.__context__ is None
        assert_clean(str(info.value), formatted(info.value))


def test_corrupt_user_login_file_is_one_line_without_the_token(ee_env, tmp_path):
    from pipeline.sources.earthengine import auth

    creds = tmp_path / ".config" / "earthengine" / "credentials"  # HOME is tmp_path
    creds.parent.mkdir(parents=True)
    creds.write_text(f'{{"refresh_token": "1//{MARKER}abcdefghij", "project": ')
    with pytest.raises(SourceError, match=r"^the stored Earth Engine login cannot be used \(JSONDecodeError") as info:
        auth.initialize()
    assert "earthengine authenticate" in str(info.value) and info.value.__context__ is None
    assert_clean(str(info.value), formatted(info.value))


_PEM_CACHE: list[str] = []


def real_pem() -> str:
    """A freshly generated RSA key in PKCS#8 PEM (loads; belongs to no account)."""
    if not _PEM_CACHE:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _PEM_CACHE.append(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).decode())
    return _PEM_CACHE[0]


# -- no network ----------------------------------------------------------------------------------------


def _network_errors() -> list[BaseException]:
    import socket

    import google.auth.exceptions
    import httplib2
    import requests

    # the library message quotes the key: the one-line error must still not
    quoted = f"while refreshing {json.dumps(key_info())}"
    return [
        google.auth.exceptions.TransportError(f"HTTPSConnectionPool(host='oauth2.googleapis.com'): {quoted}"),
        requests.ConnectionError("Max retries exceeded with url: /token"),
        httplib2.ServerNotFoundError("Unable to find the server at earthengine.googleapis.com"),
        socket.gaierror(-3, "Temporary failure in name resolution"),
        TimeoutError("timed out"),
    ]


@pytest.mark.parametrize("error", _network_errors(), ids=lambda e: type(e).__name__)
def test_initialize_without_network_is_one_line(ee_env, monkeypatch, tmp_path, error):
    from flows.common import is_transient_error
    from pipeline.sources.earthengine import auth

    monkeypatch.setenv(auth.KEY_ENV, json.dumps(key_info(pem=real_pem())))

    def offline(**kwargs):
        raise error

    monkeypatch.setattr(ee_env, "Initialize", offline)
    with pytest.raises(SourceError) as info:
        auth.initialize()
    msg = str(info.value)
    assert msg.startswith(f"Earth Engine unreachable ({type(error).__name__}): check the network/proxy")
    assert "\n" not in msg and info.value.__context__ is None
    assert_clean(msg, formatted(info.value))
    # the network's fault, not the input's: flows retry it like any other transient error
    assert is_transient_error(info.value)


def test_user_login_without_network_is_one_line(ee_env, monkeypatch):
    import google.auth.exceptions

    from pipeline.sources.earthengine import auth

    def refresh_offline():
        raise google.auth.exceptions.TransportError("Failed to establish a new connection: [Errno 101]")

    monkeypatch.setattr(ee_env.data, "get_persistent_credentials", refresh_offline)
    with pytest.raises(SourceError, match=r"^Earth Engine unreachable \(TransportError\)") as info:
        auth.initialize()
    assert "\n" not in str(info.value) and info.value.__context__ is None


def test_revoked_key_and_refused_project_are_one_line_without_the_key(ee_env, monkeypatch):
    import google.auth.exceptions

    from pipeline.sources.earthengine import auth

    monkeypatch.setenv(auth.KEY_ENV, json.dumps(key_info(pem=real_pem())))
    for error, start in [
        (google.auth.exceptions.RefreshError(f"invalid_grant: Invalid JWT Signature. {json.dumps(key_info())}"),
         "Google rejected the Earth Engine credentials (RefreshError: invalid_grant"),
        (ee_env.EEException(f"Project not registered\n{BAD_PEM}"), "Earth Engine refused project 'fake-project'"),
    ]:
        def refuse(**kwargs):
            raise error  # noqa: B023 - called at once, inside this iteration

        monkeypatch.setattr(ee_env, "Initialize", refuse)
        with pytest.raises(SourceError) as info:
            auth.initialize()
        assert str(info.value).startswith(start) and "\n" not in str(info.value)
        assert_clean(str(info.value), formatted(info.value))


# -- the real CLI ----------------------------------------------------------------------------------------


def _cli_env(tmp_path: Path, key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EE_PROJECT", "GOOGLE_APPLICATION_CREDENTIALS", "EE_SERVICE_ACCOUNT_KEY")}
    env.update(HOME=str(tmp_path / "home"), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="True",
               EE_SERVICE_ACCOUNT_KEY=key, COLUMNS="300")
    return env


def _run_cli(tmp_path: Path, key: str, *args: str) -> subprocess.CompletedProcess:
    assert CLI.exists(), f"{CLI} missing: install the package into .venv (pip install -e .)"
    return subprocess.run([str(CLI), *args], env=_cli_env(tmp_path, key), capture_output=True, timeout=120,
                          cwd=ROOT)


def _files_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]


def test_cli_reconstruct_with_an_inline_key_that_does_not_load(tmp_path):
    """The reported case: the JSON text of a key with a bad PEM, through `cloudfree reconstruct`."""
    out = tmp_path / "out"
    res = _run_cli(tmp_path, json.dumps(key_info()), "reconstruct", "zhengzhou-demo", "--source", "earthengine",
                   "--date", "2021-07-22", "--out", str(out))
    err = res.stderr.decode()
    assert res.returncode == 2, err[-3000:]
    assert err.strip().count("\n") == 0 and err.startswith("error: ")
    assert "EE_SERVICE_ACCOUNT_KEY" in err and "does not load as a PEM key" in err
    assert "Traceback" not in err
    assert_clean(res.stdout, res.stderr, *(data for _, data in _files_bytes(out) if out.exists()))


@pytest.mark.parametrize("case", ["file-bad-pem", "inline-missing-fields", "inline-invalid-json"])
def test_cli_scenes_each_bad_key_one_line_no_secret(tmp_path, case):
    value, needle = CASES[case]
    res = _run_cli(tmp_path, value(tmp_path), "scenes", "zhengzhou-demo", "--source", "earthengine")
    err = res.stderr.decode()
    assert res.returncode == 2, err[-3000:]
    assert err.strip().count("\n") == 0 and "EE_SERVICE_ACCOUNT_KEY" in err and needle in err
    assert_clean(res.stdout, res.stderr)


# -- the logging filter ------------------------------------------------------------------------------


@pytest.fixture
def captured():
    """A private logger whose handler carries the redacting filter, and what the handler wrote."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(redact.RedactingFilter())
    logger = logging.getLogger("tests.secrets.private")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_log_record_with_the_key_in_its_args(captured):
    logger, stream = captured
    logger.warning("credentials %s from %r", key_info(), json.dumps(key_info()))
    logger.warning("token %s, body %s", "ya29.a0AfB_byCanaryToken_123",
                   "grant_type=refresh_token&refresh_token=1//0gSecret")
    out = stream.getvalue()
    assert_clean(out)
    assert EMAIL in out and "credentials {" in out  # the rest of the record survives
    assert "ya29.a0AfB" not in out and "1//0gSecret" not in out and "refresh_token=[REDACTED]" in out


def test_exception_log_with_the_key_in_the_exception_text(captured):
    logger, stream = captured
    try:
        try:
            raise ValueError(f"{key_info()} could not be converted to bytes")
        except ValueError as inner:
            raise RuntimeError("auth failed") from inner
    except RuntimeError:
        logger.exception("while starting Earth Engine")
    out = stream.getvalue()
    assert_clean(out)
    assert "Traceback" in out and "RuntimeError: auth failed" in out and "could not be converted" in out


def test_install_filters_root_handlers_and_prefect_loggers_once(monkeypatch):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    monkeypatch.setenv("CLOUDFREE_TEST_API_TOKEN", "tok-" + MARKER)
    try:
        redact.install()
        redact.install()
        assert sum(isinstance(f, redact.RedactingFilter) for f in handler.filters) == 1
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            assert sum(isinstance(f, redact.RedactingFilter) for f in logging.getLogger(name).filters) == 1
        # a library logger that propagates to the root: its handlers scrub, env values included
        library = logging.getLogger("tests.secrets.library")
        library.error("env says %s; key %s", os.environ["CLOUDFREE_TEST_API_TOKEN"], BAD_PEM)
    finally:
        root.removeHandler(handler)
    out = stream.getvalue()
    assert "env says [REDACTED]" in out
    assert_clean(out)


@pytest.mark.parametrize("text", [
    BAD_PEM,
    BAD_PEM.replace("\n", "\\n"),
    BAD_PEM.replace("\n", "\\\\n"),
    repr(key_info()),
    json.dumps(key_info()),
    json.dumps(json.dumps(key_info())),  # JSON inside a JSON string (a Prefect event payload)
    repr(key_info())[:80],  # a clipped repr: BEGIN without END
    f"private_key_id={ID_MARKER}&private_key=x",
])
def test_redact_scrubs_every_form_of_the_key(text):
    assert_clean(redact.redact(text))


def test_redact_is_linear_on_hostile_text():
    import time

    t = time.perf_counter()
    for text in ('"private_key": "' + "\\" * 20000, "-----BEGIN PRIVATE KEY-----" * 2000, "ya29." * 20000):
        redact.redact(text)
    assert time.perf_counter() - t < 2.0


def test_redact_env_values_by_name_and_length(monkeypatch, tmp_path):
    keyfile = tmp_path / "key.json"
    keyfile.write_text("{}")
    monkeypatch.setenv("SOME_SERVICE_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to be told from ordinary words
    monkeypatch.setenv("DATA_ROOT_KEY_PATH", "notASecretName1")  # name does not end in a secret suffix
    monkeypatch.setenv("EE_SERVICE_ACCOUNT_KEY", str(keyfile))  # a key *file* path is not the secret
    text = f"pw hunter2hunter2 abc notASecretName1 {keyfile}"
    assert redact.redact(text) == f"pw [REDACTED] abc notASecretName1 {keyfile}"


# -- Prefect: logs, states, events, results ------------------------------------------------------------------


@pytest.mark.slow  # a Prefect server subprocess: ~30-60 s to start on a loaded machine
def test_failed_flow_run_leaves_no_key_in_the_prefect_database(ee_env, monkeypatch, tmp_path):
    """A flow that fails at Earth Engine auth, and a flow that logs library messages quoting the key: the
    sqlite database (logs, states, events), result storage and the output folder hold the failure but no key.

    (An exception *raised* out of a flow becomes its state message verbatim, past any log filter: that is why the
    auth code must never put the key in its errors in the first place.)"""
    pytest.importorskip("prefect")
    from prefect import flow, get_run_logger
    from prefect.settings import (
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    from flows.build_dataset import build_dataset_flow
    from flows.params import BuildDatasetParams

    monkeypatch.setenv("EE_SERVICE_ACCOUNT_KEY", json.dumps(key_info()))
    storage, out = tmp_path / "results", tmp_path / "data"

    @flow(name="leaky-library")
    def leaky_library() -> None:
        logger = get_run_logger()
        logger.warning("canary-warning-line")  # tests run Prefect at WARNING
        logger.warning("google-auth said: %s", {"private_key": BAD_PEM, "private_key_id": ID_MARKER})
        try:
            raise ValueError(f"{key_info()} could not be converted to bytes")
        except ValueError:
            logger.exception("canary-exception-line")

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=90):
            db_url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
            state = build_dataset_flow(
                params=BuildDatasetParams(region="zhengzhou-demo", source="earthengine", out_root=str(out)),
                return_state=True)
            leaky = leaky_library(return_state=True)
    assert state.is_failed() and "EE_SERVICE_ACCOUNT_KEY" in state.message, state.message
    assert leaky.is_completed()
    db_dir = Path(db_url.split("///", 1)[1]).parent
    files = _files_bytes(db_dir) + (_files_bytes(storage) if storage.exists() else []) + (
        _files_bytes(out) if out.exists() else [])
    blob = b"".join(data for _, data in files)
    # the failures did reach the database: the state message, the log lines
    assert b"does not load as a PEM key" in blob and b"canary-warning-line" in blob and b"canary-exception-line" in blob
    for path, data in files:
        for marker in (MARKER, ID_MARKER):
            assert marker.encode() not in data, f"{marker} in {path}: ...{_around(data, marker)}..."
