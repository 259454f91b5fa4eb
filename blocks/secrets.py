"""The secrets of one deployment/environment: what FabulAWS kept in ``fabsecrets_<env>.py``.

The original kept the secrets in a local Python file that silently overrode the servers' values. Here
they live in one Prefect block per deployment/environment, named ``<deployment>-<environment>-secrets``
(e.g. ``myproject-staging-secrets``), encrypted at rest by the Prefect server and shown as ``********``
in the UI and the API. pull-server-secrets fills it from the servers; push-server-secrets writes it to
them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from prefect.blocks.core import Block
from prefect.types import SecretDict
from pydantic import Field, SecretStr, field_validator

SECRET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
"""A secret's name is also its file name under ``home`` on the servers."""

STANDARD_NAMES: tuple[str, ...] = (
    "database_password",
    "broker_password",
    "smtp_password",
    "newrelic_license_key",
    "newrelic_api_key",
    "s3_secret",
    "secret_key",
)
"""The original's default ``password_names`` (fields of the block); other names go in ``extra``."""

MAX_SECRET_LENGTH = 4096
# Entries that name a login (rotate-credentials' alternating users), kept in the block beside the
# passwords and written to the servers the same way, but not secret: never redacted from logs
# (a login such as ``deploy`` would otherwise mask that word everywhere in a message).
LOGIN_NAMES = frozenset({"database_user", "broker_user", "replication_user"})


def check_secret_name(name: str) -> str:
    """Raise ValueError unless ``name`` can be a secret (and file) name."""
    if not SECRET_NAME.match(name):
        raise ValueError(
            f"secret name {name!r} is not usable: lower-case letters, digits and _ only, starting "
            "with a letter (it is the file name <home>/<name> on the servers)"
        )
    return name


def check_secret_value(name: str, value: str) -> str:
    """Raise ValueError (naming the secret, never showing the value) if ``value`` is unusable."""
    if not value:
        raise ValueError(f"{name}: the value is empty")
    if len(value) > MAX_SECRET_LENGTH:
        raise ValueError(f"{name}: the value is longer than {MAX_SECRET_LENGTH} characters")
    if any(c in value for c in "\n\r\x00"):
        raise ValueError(f"{name}: the value contains a line break or a NUL character")
    return value


class ServerSecrets(Block):
    """Secrets of one deployment/environment, as files ``<home>/<name>`` on its servers.

    One field per name of FabulAWS's default ``password_names``; names the config adds go in
    ``extra``. Unset means "not known here": push-server-secrets refuses to write an unset secret
    that the config lists. Block documents are named ``<deployment>-<environment>-secrets``.

    Example:
        Load the staging secrets and read one:
        ```python
        from blocks.secrets import ServerSecrets
        secrets = ServerSecrets.load("BLOCK_NAME")
        password = secrets.get("database_password")  # a SecretStr, or None
        ```
    """

    _block_type_name = "fabflows server secrets"
    _block_type_slug = "fabflows-server-secrets"
    _description = (
        "Secrets of one deployment/environment (database, broker, SMTP, New Relic, S3, Django), "
        "written to the servers as <home>/<name> by push-server-secrets."
    )
    _documentation_url = "https://github.com/caktus/fabulaws/blob/master/docs/maintenance.rst"

    database_password: SecretStr | None = Field(
        default=None, description="Password of the application's PostgreSQL role."
    )
    broker_password: SecretStr | None = Field(
        default=None, description="Password of the RabbitMQ user the app and Celery use."
    )
    smtp_password: SecretStr | None = Field(default=None, description="SMTP password of the app.")
    newrelic_license_key: SecretStr | None = Field(
        default=None, description="New Relic license (ingest) key of the agents."
    )
    newrelic_api_key: SecretStr | None = Field(
        default=None, description="New Relic API key (deployment markers)."
    )
    s3_secret: SecretStr | None = Field(
        default=None, description="Secret access key the app uses for S3."
    )
    secret_key: SecretStr | None = Field(default=None, description="Django's SECRET_KEY.")
    extra: SecretDict = Field(
        default_factory=lambda: SecretDict({}),
        description="Secrets named in the config's password_names beyond the standard ones.",
    )

    @field_validator("extra")
    @classmethod
    def _extra_names(cls, v: SecretDict) -> SecretDict:
        plain = v.get_secret_value()
        for name, value in plain.items():
            check_secret_name(name)
            if name in STANDARD_NAMES:
                raise ValueError(f"extra.{name}: {name} is a field of its own, not an extra")
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if not isinstance(value, str):
                raise ValueError(f"extra.{name}: the value is not text")
            check_secret_value(name, value)
        return SecretDict(
            {k: (x.get_secret_value() if isinstance(x, SecretStr) else x) for k, x in plain.items()}
        )

    @field_validator(*STANDARD_NAMES)
    @classmethod
    def _value(cls, v: SecretStr | None, info) -> SecretStr | None:  # noqa: ANN001
        if v is not None:
            check_secret_value(info.field_name, v.get_secret_value())
        return v

    # ------------------------------------------------------------------ access by name

    def get(self, name: str) -> SecretStr | None:
        """The secret called ``name`` (None: not set)."""
        if name in STANDARD_NAMES:
            return getattr(self, name)
        value = self.extra.get_secret_value().get(check_secret_name(name))
        return SecretStr(value) if value is not None else None

    def set(self, name: str, value: str | SecretStr) -> None:
        """Set the secret called ``name`` (validated; the value is never shown in errors)."""
        plain = value.get_secret_value() if isinstance(value, SecretStr) else value
        check_secret_value(check_secret_name(name), plain)
        if name in STANDARD_NAMES:
            setattr(self, name, SecretStr(plain))
        else:
            self.extra = SecretDict({**self.extra.get_secret_value(), name: plain})

    def names_set(self) -> list[str]:
        """Names that have a value, standard ones first."""
        out = [n for n in STANDARD_NAMES if getattr(self, n) is not None]
        return out + sorted(self.extra.get_secret_value())

    def values(self, names: Iterable[str]) -> dict[str, SecretStr | None]:
        """``{name: SecretStr or None}`` for ``names``."""
        return {n: self.get(n) for n in names}


def secrets_block_name(deployment: str, environment: str, configured: str | None = None) -> str:
    """The block document's name: ``configured``, or ``<deployment>-<environment>-secrets``."""
    if configured:
        return configured
    return re.sub(r"[^a-z0-9-]+", "-", f"{deployment}-{environment}-secrets".lower()).strip("-")


# --------------------------------------------------------------------------- New Relic key formats

NEWRELIC_KEY_FORMATS: dict[str, tuple[tuple[str, str], ...]] = {
    "newrelic_license_key": (
        (r"^[0-9a-fA-F]{40}$", "40 hexadecimal characters (original license key)"),
        (r"^[0-9A-Za-z]{36}NRAL$", "36 letters/digits followed by NRAL (ingest - license key)"),
        (r"^eu01xx[0-9a-fA-F]{34}$", "eu01xx + 34 hexadecimal characters (EU region key)"),
    ),
    "newrelic_api_key": (
        (r"^NRAK-[0-9A-Z]{27}$", "NRAK- + 27 upper-case letters/digits (user API key)"),
        (r"^NRRA-[0-9a-f]{42}$", "NRRA- + 42 hexadecimal characters (REST API key)"),
    ),
}
"""Key formats accepted before anything changes. Every license (ingest) key is 40 characters: the
original hexadecimal ones, the newer ones ending in ``NRAL``, and EU ones starting ``eu01xx``. API
keys: user keys ``NRAK-`` + 27, legacy REST keys ``NRRA-`` + 42 (the deployment markers' key)."""


def check_newrelic_key(name: str, value: SecretStr | str) -> None:
    """Raise ValueError if ``value`` is not a key of the kind ``name`` holds (never shows it).

    The message names the secret, its length and the formats accepted.
    """
    plain = value.get_secret_value() if isinstance(value, SecretStr) else value
    formats = NEWRELIC_KEY_FORMATS[name]
    if any(re.match(pattern, plain) for pattern, _ in formats):
        return
    hint = ""
    if plain != plain.strip():
        hint = " (it has leading or trailing white space)"
    raise ValueError(
        f"{name} does not look like a New Relic key: {len(plain)} characters{hint}; accepted: "
        + "; ".join(desc for _, desc in formats)
    )
