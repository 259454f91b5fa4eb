"""Secret redaction: a catalogue of shapes, and the filter on real handlers."""

from __future__ import annotations

import logging

import pytest
from pydantic import BaseModel, SecretStr

from fabflows import logfilter

CASES = [
    ("password=hunter2xyz", "hunter2xyz"),
    ("connecting with PGPASSWORD: 's3cr3t!x'", "s3cr3t!x"),
    ('{"api_key": "abc123def456"}', "abc123def456"),
    ("postgresql://app:pa55word@db:5432/x", "pa55word"),
    ("token xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij"),
    ("posting to https://hooks.slack.com/services/T000/B000/XXXXXXXX", "T000/B000/XXXXXXXX"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
    (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA\n-----END OPENSSH PRIVATE KEY-----",
        "b3BlbnNzaC1rZXktdjEAAAA",
    ),
]


@pytest.mark.parametrize(("text", "secret"), CASES, ids=[c[1][:12] for c in CASES])
def test_secret_shapes_are_redacted(text: str, secret: str) -> None:
    cleaned = logfilter.redact(text)
    assert secret not in cleaned
    assert logfilter.MASK in cleaned


def test_registered_values_are_redacted_anywhere() -> None:
    class Block(BaseModel):
        user: str
        key: SecretStr
        nested: dict | None = None

    logfilter.register_block_secrets(Block(user="deploy", key=SecretStr("Zq8-value-without-shape")))
    assert (
        logfilter.redact("sent Zq8-value-without-shape to host") == f"sent {logfilter.MASK} to host"
    )
    assert logfilter.redact("user deploy") == "user deploy"  # plain fields untouched


def test_filter_on_handlers_redacts_args_and_tracebacks() -> None:
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    logger = logging.getLogger("fabflows-test-redaction")
    handler = Capture()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logfilter.register_secret("Tq7-registered-secret")
        handler.addFilter(logfilter.RedactingFilter())
        logger.warning("login with %s", "Tq7-registered-secret")
        try:
            raise RuntimeError("failed: password=Tq7-registered-secret")
        except RuntimeError:
            logger.exception("oops")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(records)
    assert "Tq7-registered-secret" not in text
    assert text.count(logfilter.MASK) >= 2


def test_install_puts_the_filter_on_prefect_handlers() -> None:
    import prefect.logging.configuration as conf

    conf.setup_logging()
    logfilter.install()
    handlers = [
        h for name in logfilter.PREFECT_LOGGERS[:3] for h in logging.getLogger(name).handlers
    ]
    assert handlers and logfilter.installed_on(handlers)


def test_deployed_logging_config_is_current(tmp_path) -> None:
    """deployments/logging.yml is what write_logging_config makes (regenerate it if this fails)."""
    from deployments.generate import LOGGING_CONFIG, REPO

    fresh = logfilter.write_logging_config(tmp_path / "logging.yml").read_text()
    assert (REPO / LOGGING_CONFIG).read_text() == fresh
    assert "fabflows.logfilter.RedactingFilter" in fresh
