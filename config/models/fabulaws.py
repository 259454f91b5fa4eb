"""The FabulAWS file as is (``fabulaws-config.yaml``): typed where fabflows uses a key,
tolerant elsewhere; the ``fabflows:`` section inside it is strict."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from config.models.base import ROLES, Legacy, _rename_roles, normalize_role
from config.models.section import FabflowsSection

LEGACY_UNUSED_KEYS: frozenset[str] = frozenset(
    {
        # Read by the original only, or not even by it.
        "run_upgrade",
        "database_host",
        "logstash_config",
        "less_version",
        "secure_root",
        "secure_home",
        "wsgi_app",
        "requirements_file",
        "settings_managepy",
        "localsettings_template",
        "local_settings_py_relative_path",
        "gelf_log_host",
        "syslog_server",
        "awslogs_access_key_id",
        "extra_log_files",
        "backup_key_fingerprint",
        "vcs_cmd",
        "latest_changeset_cmd",
        "repo",
        "branches",
        "gunicorn_worker_multiplier",
        "use_basic_auth",
        "cloudfront_distribution_ids",
        "avail_zones",
        "subnets",
        "security_groups",
        "volume_sizes",
        "volume_types",
        "db_settings",
        "webserver_user",
        "python",
        "celery_application",
    }
)


_ROLE_KEYED = ("security_groups", "volume_types")
_ENV_ROLE_KEYED = ("instance_types", "volume_sizes")


class InstanceSettings(Legacy):
    ami: str | None = None
    key_prefix: str | None = None
    admin_groups: list[str] = Field(default_factory=lambda: ["admin", "sudo"])
    app_root: str | None = None
    fs_type: str | None = "ext4"
    fs_encrypt: bool = False
    ebs_encrypt: bool = False
    ubuntu_mirror: str | None = None
    swap_multiplier: float | None = None


class StaticHtml(Legacy):
    upgrade_message: str | None = None
    healthcheck_override: str | None = None


class FabulawsConfig(Legacy):
    """The FabulAWS file, plus the ``fabflows`` section."""

    # environments and roles
    project: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    default_deployment: str | None = None
    deployments: list[str] = Field(min_length=1)
    environments: list[str] = Field(min_length=1)
    production_environments: list[str] = Field(default_factory=lambda: ["production"])
    valid_roles: list[str] = Field(default_factory=lambda: list(ROLES))

    # users and paths
    deploy_user: str = Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    database_user: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    home: str = "/home/deploy"
    instance_settings: InstanceSettings = Field(default_factory=InstanceSettings)
    ssh_keys: str | None = None
    disable_known_hosts: bool = False
    password_names: list[str] = Field(
        default_factory=lambda: [
            "database_password",
            "broker_password",
            "smtp_password",
            "newrelic_license_key",
            "newrelic_api_key",
            "s3_secret",
            "secret_key",
        ]
    )
    static_html: StaticHtml = Field(default_factory=StaticHtml)
    requirements_sdists: str | None = None
    app_server_packages: list[str] = Field(default_factory=list)

    # app servers
    pgbouncer_port: int = Field(default=5432, ge=1, le=65535)
    server_ports: dict[str, int] = Field(default_factory=dict)
    static_hosting: Literal["local", "remote"] = "remote"
    celery_workers: dict[str, str] = Field(default_factory=dict)
    site_domains_map: dict[str, list[str] | None] = Field(default_factory=dict)

    # AWS
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    ec2_attr_for_ssh: str = "public_dns_name"
    instance_types: dict[str, dict[str, str]] = Field(default_factory=dict)
    load_balancers: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    auto_scaling_groups: dict[str, dict[str, str]] = Field(default_factory=dict)

    fabflows: FabflowsSection = Field(default_factory=FabflowsSection)

    @model_validator(mode="before")
    @classmethod
    def _legacy_roles(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("valid_roles"), list):
            data["valid_roles"] = [
                normalize_role(r) if isinstance(r, str) else r for r in data["valid_roles"]
            ]
        for key in _ROLE_KEYED:
            if key in data:
                data[key] = _rename_roles(data[key])
        for key in _ENV_ROLE_KEYED:
            if isinstance(data.get(key), dict):
                data[key] = {env: _rename_roles(roles) for env, roles in data[key].items()}
        return data

    @field_validator("valid_roles")
    @classmethod
    def _known_roles(cls, v: list[str]) -> list[str]:
        unknown = [r for r in v if r not in ROLES and r != "combo"]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; fabflows knows {list(ROLES) + ['combo']}")
        return v

    @model_validator(mode="after")
    def _cross_references(self) -> FabulawsConfig:
        envs = set(self.environments)
        deps = set(self.deployments)
        problems: list[tuple[str, str]] = []
        if self.default_deployment is not None and self.default_deployment not in deps:
            problems.append(
                ("default_deployment", f"{self.default_deployment!r} is not in deployments")
            )
        for env in self.production_environments:
            if env not in envs:
                problems.append(("production_environments", f"{env!r} is not in environments"))
        for env, roles in self.instance_types.items():
            if env not in envs:
                problems.append((f"instance_types.{env}", f"{env!r} is not in environments"))
                continue
            for role in roles:
                if role not in self.valid_roles:
                    problems.append(
                        (f"instance_types.{env}.{role}", f"{role!r} is not in valid_roles")
                    )
        for key in ("load_balancers", "auto_scaling_groups"):
            for dep, per_env in getattr(self, key).items():
                if dep not in deps:
                    problems.append((f"{key}.{dep}", f"{dep!r} is not in deployments"))
                    continue
                for env in per_env:
                    if env not in envs:
                        problems.append((f"{key}.{dep}.{env}", f"{env!r} is not in environments"))
        for env in self.fabflows.environments:
            if env not in envs:
                problems.append((f"fabflows.environments.{env}", f"{env!r} is not in environments"))
        if problems:
            raise CrossReferenceError(problems)
        return self

    # ----------------------------------------------------------------- what the original left implicit

    def unknown_keys(self) -> list[str]:
        """Top-level keys neither fabflows nor the original defines (kept, reported by config check)."""
        return sorted(k for k in (self.model_extra or {}) if k not in LEGACY_UNUSED_KEYS)

    def warnings(self) -> list[str]:
        """Things in the file that are legal but probably not what the author meant."""
        import difflib

        out = []
        known = [*type(self).model_fields, *LEGACY_UNUSED_KEYS]
        for key in self.unknown_keys():
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            hint = f": did you mean {close[0]}?" if close else ""
            out.append(f"unknown key {key}{hint} (kept and ignored)")
        for env in self.environments:
            if not self.instance_types.get(env):
                out.append(f"instance_types.{env}: missing (no instance type for any role)")
            for dep in self.deployments:
                if not (self.auto_scaling_groups.get(dep) or {}).get(env):
                    out.append(f"auto_scaling_groups.{dep}.{env}: missing (no web group to manage)")
        if self.disable_known_hosts:
            out.append("disable_known_hosts: ignored; fabflows always checks SSH host keys")
        if "celery_application" in self.celery_workers:
            out.append(
                "celery_workers.celery_application: looks misindented (as in FabulAWS's sample); "
                "it is read as a worker named 'celery_application'"
            )
        if (
            "secure_root" in (self.instance_settings.model_extra or {})
            and self.instance_settings.app_root is None
        ):
            out.append(
                "instance_settings: uses secure_root/secure_home (pre-app_root FabulAWS) and has no app_root"
            )
        return out


class CrossReferenceError(ValueError):
    """Several keys refer to names that do not exist; each problem carries its key path."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
