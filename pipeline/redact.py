"""One redaction layer for secrets in text and log records: private keys, OAuth tokens, secret env values.

Library exceptions are careless with credentials (google-auth puts a whole service-account key dict in an
``InvalidValue`` message), and under Prefect every log line, traceback included, is written to the database.
``install()`` puts ``RedactingFilter`` on the root handlers and the ``prefect`` loggers, so whatever a library
says is scrubbed before a handler formats it. Sources still must not put secrets in their own errors: this is
the second line of defence, not the first.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterable, Mapping

REDACTED = "[REDACTED]"
KEY_ENV = "EE_SERVICE_ACCOUNT_KEY"
SECRET_ENV_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
MIN_SECRET_LEN = 9  # "longer than 8": shorter values (flags, ports, "true") would scrub ordinary words

# A complete PEM private-key block, escaped newlines ("\\n" in a repr) included; the bound (a 4096-bit key is
# ~3.3 kB of PEM) keeps a BEGIN without END from scanning the rest of a long log line.
_PEM_BLOCK = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.{0,8000}?-----END [A-Z0-9 ]*PRIVATE KEY-----", re.DOTALL
)
# A block cut short (a truncated repr, a clipped log line): the base64 body up to the first other character.
_PEM_OPEN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[A-Za-z0-9+/=\s\\]*")
_SECRET_FIELDS = r"private_key_id|private_key|refresh_token|client_secret|access_token|id_token"
# "private_key": "..." in JSON, 'private_key': '...' in a dict repr, escaped quotes inside the value allowed (a
# backslash is only ever eaten with the character after it, so a run of them cannot backtrack exponentially).
_QUOTED_FIELD = re.compile(
    rf"""(?P<head>(?P<q>\\?["'])(?:{_SECRET_FIELDS})(?P=q)\s*:\s*)(?P<vq>\\?["'])(?:\\.|(?!(?P=vq))[^\\])*?(?P=vq)""",
    re.DOTALL,
)
# refresh_token=... in a form body or query string (token endpoints echo their request on errors).
_KV_FIELD = re.compile(rf"(?P<head>\b(?:{_SECRET_FIELDS})=)[^&\s\"',;)}}]+")
# OAuth access tokens (ya29.) and refresh tokens (1//) as Google issues them, and signed JWTs (a service
# account's token-request assertion is as good as a token until it expires).
_GOOGLE_TOKENS = re.compile(
    r"\bya29\.[A-Za-z0-9_\-.]+|(?<![A-Za-z0-9/])1//[A-Za-z0-9_\-]{16,}"
    r"|\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]+"
)


def _escaped_forms(value: str) -> set[str]:
    """``value`` as it may appear in text: literal, JSON-escaped, repr-escaped."""
    forms = {value, json.dumps(value)[1:-1], repr(value)[1:-1]}
    return {f for f in forms if len(f) >= MIN_SECRET_LEN}


def _json_secrets(value: str) -> set[str]:
    """The secret fields of a JSON credential held inline in an env var (a service-account key, a login)."""
    try:
        info = json.loads(value)
    except ValueError:
        return set()
    if not isinstance(info, dict):
        return set()
    out: set[str] = set()
    for name in ("private_key", "private_key_id", "refresh_token", "client_secret"):
        field = info.get(name)
        if isinstance(field, str):
            out |= _escaped_forms(field.strip())
            out |= {line for line in field.splitlines() if len(line) >= 16 and "-----" not in line}
    return out


def _is_existing_path(value: str) -> bool:
    # a key *file* path is not the secret, and blanking it would hide which file an error is about
    return len(value) < 4096 and "\n" not in value and os.path.exists(os.path.expanduser(value))


def secret_env_values(environ: Mapping[str, str] | None = None) -> dict[str, set[str]]:
    """name -> the text forms of the value of each secret-looking env var (``*_KEY``, ``_TOKEN``, ``_SECRET``, ...)."""
    env = os.environ if environ is None else environ
    out: dict[str, set[str]] = {}
    for name, value in env.items():
        upper = name.upper()
        if not (upper == KEY_ENV or upper.endswith(SECRET_ENV_SUFFIXES)):
            continue
        value = value.strip()
        if len(value) < MIN_SECRET_LEN or _is_existing_path(value):
            continue
        out[name] = _escaped_forms(value) | _json_secrets(value)
    return out


_env_cache: tuple[tuple[tuple[str, str], ...], re.Pattern[str] | None] = ((), None)


def _env_pattern() -> re.Pattern[str] | None:
    """One alternation of every secret env value, rebuilt only when those variables change."""
    global _env_cache
    items = tuple(sorted((k, v) for k, v in os.environ.items()
                         if k.upper() == KEY_ENV or k.upper().endswith(SECRET_ENV_SUFFIXES)))
    if items != _env_cache[0]:
        values: set[str] = set()
        for forms in secret_env_values(dict(items)).values():
            values |= forms
        # longest first, so a value is never half-replaced by one of its own substrings
        alts = sorted(values, key=len, reverse=True)
        _env_cache = (items, re.compile("|".join(map(re.escape, alts))) if alts else None)
    return _env_cache[1]


def redact(text: str) -> str:
    """``text`` with private keys, OAuth tokens, secret JSON fields and secret env values replaced."""
    if not text:
        return text
    pattern = _env_pattern()
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _PEM_BLOCK.sub(f"-----{REDACTED} PRIVATE KEY-----", text)
    text = _PEM_OPEN.sub(f"-----{REDACTED} PRIVATE KEY-----", text)
    text = _QUOTED_FIELD.sub(lambda m: f"{m['head']}{m['vq']}{REDACTED}{m['vq']}", text)
    text = _KV_FIELD.sub(lambda m: f"{m['head']}{REDACTED}", text)
    return _GOOGLE_TOKENS.sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    """Scrubs a record's message, arguments, exception and stack text before any handler formats it.

    The record is changed in place (and kept: the filter never drops a record), so every handler after this
    one - console, file, Prefect's API log handler - sees the scrubbed text.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed %-format: scrub the parts, the handler reports the format error
            record.msg = redact(str(record.msg))
            record.args = _redact_args(record.args)
        else:
            clean = redact(message)
            if clean != message:
                # args are already merged into the message: none left to re-insert a secret
                record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[0] is not None:
            text = record.exc_text or self._formatter.formatException(record.exc_info)
            # without exc_info the handlers use exc_text as is; with it, some formatters would format it again
            record.exc_text, record.exc_info = redact(text), None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _redact_args(args: Any) -> Any:
    if isinstance(args, Mapping):
        return {k: redact(str(v)) for k, v in args.items()}
    if isinstance(args, tuple):
        return tuple(redact(str(a)) for a in args)
    return args


_FILTER = RedactingFilter()
PREFECT_LOGGERS = ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.extra", "prefect.workers")


def _add(target: logging.Logger | logging.Handler) -> None:
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.addFilter(_FILTER)


def _loggers(names: Iterable[str]) -> list[logging.Logger]:
    manager = logging.Logger.manager
    existing = [n for n, lg in manager.loggerDict.items()
                if isinstance(lg, logging.Logger) and (n == "prefect" or n.startswith("prefect."))]
    return [logging.getLogger(n) for n in dict.fromkeys([*names, *existing])]


def install() -> None:
    """Put the redacting filter on the root logger's handlers and on the ``prefect`` loggers and their handlers.

    Idempotent. Logger-level filters cover records made on Prefect's run loggers whatever handler is added
    later; handler-level filters cover records that propagate from any library to the root's handlers.
    """
    for handler in logging.getLogger().handlers:
        _add(handler)
    for logger in _loggers(PREFECT_LOGGERS):
        _add(logger)
        for handler in logger.handlers:
            _add(handler)
