"""Server secrets: the files that embed them, push/pull-server-secrets, update-newrelic-keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from config.models.base import _NAME, ROLES, Strict, normalize_role

SECRET_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
"""Secret names are file names under ``home`` on the servers: no path separators, no dots."""

_MODE = r"^0?[0-7]{3}$"


class SecretFileSettings(Strict):
    """A config file on the servers that embeds secrets, re-rendered from the secrets block.

    ``path`` and each ``restart`` entry may use ``{home}``, ``{environment}``, ``{deployment}`` and
    ``{project}``. The template is Jinja2 (undefined names are errors) with every secret name, plus
    ``deployment``, ``environment``, ``project``, ``home``, ``database_name``, ``database_user``,
    ``deploy_user``, ``host`` (the server's name) and ``role``.
    """

    path: str = Field(description="Absolute path on the server (placeholders allowed).")
    template: str | None = Field(default=None, description="Jinja2 template text.")
    template_file: str | None = Field(
        default=None,
        description="Jinja2 template file, relative to the config file (instead of template).",
    )
    roles: list[str] = Field(
        min_length=1, description="Roles whose servers get the file (e.g. [web, worker])."
    )
    owner: str | None = Field(
        default=None,
        pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
        description="File owner. Default: deploy_user.",
    )
    mode: str = Field(default="0600", pattern=_MODE, description="Octal file mode.")
    restart: list[str] = Field(
        default_factory=list,
        description="Supervisor programs or groups restarted when the file changes "
        "(e.g. {environment}-pgbouncer).",
    )
    kind: Literal["app", "newrelic"] = Field(
        default="app",
        description="newrelic: also rendered by update-newrelic-keys; app: only by "
        "push-server-secrets.",
    )

    @model_validator(mode="after")
    def _one_template(self) -> SecretFileSettings:
        if (self.template is None) == (self.template_file is None):
            raise ValueError("give exactly one of template and template_file")
        if not self.path.startswith("/") and not self.path.startswith("{home}"):
            raise ValueError(f"path {self.path!r} is not absolute (nor under {{home}})")
        unknown = [r for r in self.roles if normalize_role(r) not in ROLES]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; fabflows knows {list(ROLES)}")
        return self


class SecretsSettings(Strict):
    """Server secrets (blocks/secrets.py): pull-server-secrets and push-server-secrets."""

    block: str | None = Field(
        default=None,
        pattern=_NAME,
        description="Secrets block document. Default: <deployment>-<environment>-secrets.",
    )
    pull_from_role: str = Field(
        default="worker",
        description="pull-server-secrets reads the servers' files from the first server of this "
        "role (the original read the first worker), and compares the others with it.",
    )
    files: list[SecretFileSettings] | None = Field(
        default=None,
        description="Config files that embed secrets. Default: the pgbouncer userlist, the New "
        "Relic agent files and the New Relic infrastructure agent config (see tasks/ssh/secrets.py).",
    )
    app_programs: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "web": ["{environment}-web"],
            "worker": ["{environment}-celery"],
        },
        description="Role -> supervisor groups restarted on a server whose secrets changed (the "
        "app reads them when it starts).",
    )
    broker_user: str | None = Field(
        default=None,
        description="RabbitMQ user whose password is broker_password. Default: deploy_user (as "
        "FabulAWS sets it up).",
    )
    database_port: int = Field(
        default=5432, ge=1, le=65535, description="PostgreSQL port on the db-primary server."
    )
    window_for: list[str] = Field(
        default_factory=lambda: ["database_password", "broker_password"],
        description="Secrets whose change is applied inside an upgrade window (the password "
        "checked by the database or the broker changes with the files).",
    )


class NewRelicSettings(Strict):
    """update-newrelic-keys."""

    restart_timeout_seconds: float = Field(
        default=120,
        gt=0,
        le=3600,
        description="Longest a restart of one server's programs may take.",
    )
    healthy_timeout_seconds: float = Field(
        default=120,
        gt=0,
        le=3600,
        description="Rolling mode: how long a restarted web server has to answer 200 again.",
    )
    drain_seconds: float = Field(
        default=5,
        ge=0,
        le=600,
        description="Rolling mode: wait after taking a server out of the load balancers before "
        "restarting it (in-flight requests finish).",
    )
