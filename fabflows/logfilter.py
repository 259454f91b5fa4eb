"""Keep secret values out of run logs.

Prefect stores every log line of a run on the server, and nothing in Prefect redacts them
(only ``PREFECT_API_KEY``). ``RedactingFilter`` rewrites a record's message before any handler
formats or ships it. It replaces:

- every value registered with ``register_secret`` (block secrets: call
  ``register_block_secrets(block)`` after loading a block, or ``register_secret(value)``);
- well-known secret shapes: ``password=...`` / ``secret: ...`` / ``token ...`` pairs, passwords in
  URLs (``postgresql://user:pw@host``), PEM private keys, Slack tokens and webhook URLs, AWS secret
  access keys written after their name.

It must sit on the **handlers** (a filter on the ``prefect`` logger does nothing for child loggers):
``install()`` adds it to every handler of the root logger and of ``prefect.flow_runs``,
``prefect.task_runs`` and ``prefect.extra`` (where Prefect's API handler hangs). Deployments get it
without any code: ``fabflows deploy`` writes a logging config with the filter on Prefect's handlers
and points ``PREFECT_LOGGING_SETTINGS_PATH`` at it in the work pool's job variables.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretBytes, SecretStr

MASK = "***REDACTED***"
MIN_SECRET_LENGTH = 4
"""Shorter registered values are not redacted (they would mangle ordinary words)."""

_secrets: set[str] = set()
_secrets_lock = threading.Lock()

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S
        ),
        MASK,
    ),
    # scheme://user:password@host
    (
        re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?=@)"),
        r"\g<pre>" + MASK,
    ),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{8,}"), MASK),
    (re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+"), MASK),
    # password=..., "secret": "...", token: ..., aws_secret_access_key = ...
    (
        re.compile(
            r"(?P<pre>(?i:[\w-]*(?:password|passwd|secret|token|passphrase|api[_-]?key|license[_-]?key)"
            r"[\w-]*)[\"']?\s*[:=]\s*[\"']?)(?P<val>[^\s\"',;&]{3,})"
        ),
        r"\g<pre>" + MASK,
    ),
]


def register_secret(value: str | SecretStr | SecretBytes | None) -> None:
    """Redact ``value`` from every log record of this process from now on."""
    if value is None:
        return
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    elif isinstance(value, SecretBytes):
        value = value.get_secret_value().decode(errors="ignore")
    value = str(value)
    if len(value) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        _secrets.add(value)
        # a multi-line secret (a key file) is also redacted line by line
        for line in value.splitlines():
            if len(line.strip()) >= 16:
                _secrets.add(line.strip())


def register_block_secrets(block: BaseModel) -> None:
    """Register every SecretStr/SecretBytes field of a loaded block (nested models included)."""
    for name in type(block).model_fields:
        value = getattr(block, name, None)
        if isinstance(value, SecretStr | SecretBytes):
            register_secret(value)
        elif isinstance(value, BaseModel):
            register_block_secrets(value)


def redact(text: str) -> str:
    """``text`` with registered secrets and secret-looking values replaced by the mask."""
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message (and the exception text) in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string: leave it to the handler
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = redact(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


PREFECT_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.extra", "prefect")


def install() -> RedactingFilter:
    """Add the filter to the handlers that carry run logs (idempotent)."""
    flt = _FILTER
    seen: set[int] = set()
    for name in ("", *PREFECT_LOGGERS):
        for handler in logging.getLogger(name).handlers:
            if id(handler) in seen:
                continue
            seen.add(id(handler))
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(flt)
    return flt


_FILTER = RedactingFilter()


def installed_on(handlers: Iterable[logging.Handler]) -> bool:
    return all(any(isinstance(f, RedactingFilter) for f in h.filters) for h in handlers)


def write_logging_config(path: str | Path) -> Path:
    """Write Prefect's default logging config with ``RedactingFilter`` on every handler.

    Point ``PREFECT_LOGGING_SETTINGS_PATH`` at the result (``fabflows deploy`` does, for workers).
    """
    import prefect.logging

    default = Path(prefect.logging.__file__).parent / "logging.yml"
    config: dict[str, Any] = yaml.safe_load(default.read_text())
    config.setdefault("filters", {})["fabflows_redact"] = {
        "()": "fabflows.logfilter.RedactingFilter"
    }
    for handler in config.get("handlers", {}).values():
        filters = list(handler.get("filters") or [])
        if "fabflows_redact" not in filters:
            filters.append("fabflows_redact")
        handler["filters"] = filters
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
