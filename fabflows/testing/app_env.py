"""A whole FabulAWS-shaped environment on real peers, for flow tests and benchmarks.

moto holds the inventory (seeded by ``sandbox.aws_seed``); every instance's private address is an
isolated test host of the matching kind:

- db-primary: the ``db`` image, with the app's role and database (``sandbox.seed_db``);
- web and worker: the ``app`` image running the sandbox's Django app under supervisor behind nginx
  and pgbouncer (``sandbox.provision.provision_app``), reading ``<home>/database_password``;
- cache: RabbitMQ (``fabflows.testing.rabbitmq``) with the broker user, when asked for;
- every server: the secret files ``<home>/<name>`` (mode 600, deploy user), and a
  ``newrelic-infra`` supervisor program standing in for New Relic's infrastructure agent.

:class:`InstanceFollower` gives instances the autoscaling group launches later their own host (what
the sandbox daemon does), provisioned like the image would be, and destroys terminated ones. It
starts hosts, so it must run on the main thread (hosts die with the thread that started them):
run the flow in another thread and call :meth:`InstanceFollower.run_until`.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from config import load_config
from fabflows.testing.configs import moto_section, write_config
from fabflows.testing.moto_server import ChangeWatch
from sandbox.aws_seed import seed
from sandbox.testhosts import HostSpec, TestHost, TestNetwork

ENVIRONMENT = "staging"
HOME = "/home/deploy"
DEPLOY_USER = "deploy"
DB_USER = "dbuser"
DB_NAME = "myproject_staging"

NEWRELIC_INFRA_PROGRAM = """\
; stands in for New Relic's infrastructure agent: reads its config at start, then idles
[program:newrelic-infra]
command=/bin/sh -c 'test -r /etc/newrelic-infra.yml || true; exec sleep 1000000'
autostart=true
autorestart=true
startsecs=1
redirect_stderr=true
stdout_logfile=/var/log/supervisor/newrelic-infra.log
"""


def default_secrets(tag: str = "") -> dict[str, str]:
    """Distinctive values (quotes, $, backticks, spaces) that must survive every path unharmed."""
    return {
        "database_password": f"db pw'\"$HOME`x`{tag}Q7",
        "broker_password": f"br0ker'$(id)\"{tag}K2",
        "smtp_password": f"smtp-{tag}-Zp4$'s",
        "newrelic_license_key": ("0123456789abcdef0123456789abcdef" + (tag + "01234567")[:8])[:40],
        "newrelic_api_key": "NRAK-" + ("ABCDEFGHIJKLMNOPQRSTUVWXYZ0" + tag.upper())[:27],
        "s3_secret": f"s3/secret+{tag}/AAAAbbbbCCCCddddEEEE",
        "secret_key": f"django-{tag}-k!@#%^&*()_+",
    }


@dataclass
class AppEnv:
    """What :func:`build_app_env` made."""

    config_path: Path
    endpoint: str
    net: TestNetwork
    hosts: dict[str, TestHost] = field(default_factory=dict)  # instance id -> host
    roles: dict[str, str] = field(default_factory=dict)  # instance id -> role
    secrets: dict[str, str] = field(default_factory=dict)
    load_balancer: str = ""
    auto_scaling_group: str = ""
    db_host: TestHost | None = None
    replication_password: str = ""
    """The replication role's password (secret file ``<home>/replication_password`` on the db
    servers, the replicas' ``.pgpass``); set when the replicas stream (``replicas=True``)."""

    def by_role(self, role: str) -> list[TestHost]:
        return [h for iid, h in self.hosts.items() if self.roles.get(iid) == role]

    def destroy(self) -> None:
        from fabflows.testing import moto_fidelity

        moto_fidelity.elb_health_checks(False)
        for host in list(self.hosts.values()):
            if host.name in self.net.hosts:
                self.net.destroy(host.name)
        self.hosts.clear()


@functools.lru_cache(maxsize=32)
def _client(endpoint: str, service: str) -> Any:
    """One client per endpoint and service (a new one costs ~70 ms of CPU; they are thread-safe)."""
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def write_secret_files(host: TestHost, secrets: dict[str, str]) -> None:
    """FabulAWS's secret files ``<home>/<name>``: mode 600, the deploy user's (values on stdin)."""
    for name, value in secrets.items():
        path = f"{HOME}/{name}"
        host.exec(
            [
                "sh",
                "-c",
                'umask 077; cat > "$1"; chown "$2": "$1"; chmod 600 "$1"',
                "sh",
                path,
                DEPLOY_USER,
            ],
            input=value,
        )


def add_newrelic_infra(host: TestHost) -> None:
    host.exec(
        [
            "sh",
            "-c",
            "cat > /etc/supervisor/conf.d/30-newrelic-infra.conf; for i in $(seq 100); do "
            "supervisorctl update >/dev/null 2>&1 && exit 0; sleep 0.1; done; exit 1",
        ],
        input=NEWRELIC_INFRA_PROGRAM,
    )


def provision_server(env: AppEnv, host: TestHost, role: str) -> None:
    """Make ``host`` what the image of ``role`` would be (app, secrets, agent)."""
    from sandbox.provision import provision_app

    host.wait_for_port(80, timeout=60)  # nginx starts a second after the host (more under load)
    write_secret_files(host, env.secrets)
    if role in ("web", "worker"):
        assert env.db_host is not None
        provision_app(
            host,
            role=role,
            environment=ENVIRONMENT,
            db_host=env.db_host.ip,
            db_name=DB_NAME,
            db_user=DB_USER,
            db_password=env.secrets["database_password"],
            home=HOME,
            owner=DEPLOY_USER,
            wait=30,
        )
    add_newrelic_infra(host)


def build_app_env(
    moto_endpoint: str,
    net: TestNetwork,
    directory: Path,
    *,
    web_count: int = 2,
    rabbitmq: bool = True,
    secrets: dict[str, str] | None = None,
    site_url: str | None = None,
    fabflows_extra: dict[str, Any] | None = None,
    prefix: str = "ae",
    app: bool = True,
    replicas: bool = True,
) -> AppEnv:
    """Seed moto with staging and give every instance its provisioned test host (main thread).

    ``app=False``: every host on the base image with only the secret files (no database, no app):
    enough for flows that read or write files. ``replicas`` (with ``app``): every db-replica
    streams from the db-primary (``sandbox.replication``).
    """
    import requests

    from fabflows.testing import moto_fidelity

    moto_fidelity.apply()
    moto_fidelity.elb_health_checks(True)  # off again in AppEnv.destroy()
    # moto keeps one state per process, whichever server serves it: start from an empty one
    requests.post(moto_endpoint + "/moto-api/reset", timeout=10).raise_for_status()

    section = moto_section(moto_endpoint)
    section["ssh"] = {
        "identity_file": str(net.client_key),
        "known_hosts_file": str(net.known_hosts),
        "address_attribute": "private_ip_address",
        "connect_timeout": 5,
        "command_timeout": 120,
    }
    staging: dict[str, Any] = {"target_groups": ["myproject-staging-web"]}
    if site_url:
        staging["site_url"] = site_url
    section["environments"] = {ENVIRONMENT: staging}
    section.update(fabflows_extra or {})
    section["state_dir"] = str(directory / "state")
    path = write_config(
        directory,
        fabflows=section,
        deploy_user=DEPLOY_USER,
        home=HOME,
        database_user=DB_USER,
        static_html={},
    )
    cfg = load_config(path)
    subnet = net.subnet
    result = seed(
        moto_endpoint,
        cfg,
        [ENVIRONMENT],
        f"{subnet}.0/24",
        (f"{subnet}.{n}" for n in itertools.count(200)),
        web_count=web_count,
    )
    seeded = result.environments[0]
    env = AppEnv(
        config_path=path,
        endpoint=moto_endpoint,
        net=net,
        secrets=dict(secrets or default_secrets()),
        load_balancer=(cfg.load_balancers.get("myproject", {}).get(ENVIRONMENT) or [""])[0],
        auto_scaling_group=seeded.auto_scaling_group or "",
    )
    ec2 = _client(moto_endpoint, "ec2")
    specs: list[HostSpec] = []
    for role, ids in seeded.instance_ids.items():
        for iid in ids:
            inst = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
            image = {"db-primary": "db", "db-replica": "db", "web": "app", "worker": "app"}.get(
                role, "base"
            )
            image = image if app else "base"
            specs.append(HostSpec(f"{prefix}{role[:3]}{iid[-5:]}", inst["PrivateIpAddress"], image))
            env.roles[iid] = role
    ids = [iid for ids in seeded.instance_ids.values() for iid in ids]
    started = net.start(specs)
    env.hosts = dict(zip(ids, started, strict=True))
    try:
        if not app:
            for host in env.hosts.values():
                write_secret_files(host, env.secrets)
            return env
        from sandbox.provision import migrate_app
        from sandbox.seed_db import seed_database

        env.db_host = env.by_role("db-primary")[0]
        seed_database(env.db_host, DB_NAME, DB_USER, env.secrets["database_password"], scale=50)
        for iid, host in env.hosts.items():
            if env.roles[iid] == "worker":
                provision_server(env, host, "worker")
                migrate_app(host, ENVIRONMENT, home=HOME, owner=DEPLOY_USER)
        for iid, host in env.hosts.items():
            if env.roles[iid] not in ("worker",):
                provision_server(env, host, env.roles[iid])
        if replicas and env.by_role("db-replica"):
            import secrets as pysecrets

            from sandbox.replication import provision_replication

            env.replication_password = pysecrets.token_urlsafe(18)
            provision_replication(
                env.db_host,
                env.by_role("db-replica"),
                env.replication_password,
                home=HOME,
                owner=DEPLOY_USER,
            )
        if rabbitmq:
            from fabflows.testing.rabbitmq import install_rabbitmq

            for host in env.by_role("cache"):
                install_rabbitmq(host, {DEPLOY_USER: env.secrets["broker_password"]})
    except BaseException:
        env.destroy()
        raise
    return env


IMAGE_PATHS = (
    "/etc/nginx/sites-available",
    "/etc/nginx/sites-enabled",
    "/etc/supervisor/conf.d",
    "/etc/newrelic-infra.yml",
    HOME + "/www",
    HOME + "/services",
)


def clone_image(source: TestHost, target: TestHost, secret_names: list[str]) -> None:
    """Give ``target`` the web files of ``source``, as booting from an image of it would.

    Files first (site, supervisor programs, code, config, secret files), then the programs start,
    and nginx switches to the app's site only once the app answers: like an instance booting from
    an AMI, the new server never answers the health check before it can serve.
    """
    import subprocess

    from sandbox.provision import reload_nginx

    # the host has booted (supervisord has started nginx) before its files change: an nginx that
    # started while sites-enabled was being replaced would run with no site and never open port 80
    target.wait_for_port(80, timeout=60)
    src, dst = source.root(), target.root()
    paths = list(IMAGE_PATHS) + [f"{HOME}/{n}" for n in secret_names]
    for path in paths:
        if not (src / path.lstrip("/")).exists():
            continue
        target_path = dst / path.lstrip("/")
        subprocess.run(["rm", "-rf", str(target_path)], check=True)
        subprocess.run(["cp", "-a", str(src / path.lstrip("/")), str(target_path)], check=True)
    target.exec(
        [
            "sh",
            "-c",
            "for i in $(seq 100); do supervisorctl update >/dev/null 2>&1 && break; sleep 0.1; done; "
            "for i in $(seq 300); do "
            "curl -fs -o /dev/null http://127.0.0.1:8000/healthcheck.html && break; sleep 0.1; done",
        ],
        timeout=60,
    )
    reload_nginx(target)  # once nginx has written its pid file (a fresh host starts it late)


class InstanceFollower:
    """Give instances launched after the seed a provisioned host; destroy terminated ones' hosts."""

    def __init__(self, env: AppEnv, prefix: str = "an"):
        self.env = env
        self.prefix = prefix
        self.ec2 = _client(env.endpoint, "ec2")
        self.started: list[str] = []
        self.destroyed: list[str] = []
        self.errors: list[str] = []

    def tick(self) -> None:
        reservations = self.ec2.describe_instances()["Reservations"]
        for inst in (i for r in reservations for i in r["Instances"]):
            iid, state = inst["InstanceId"], inst["State"]["Name"]
            tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
            host = self.env.hosts.get(iid)
            if state in ("pending", "running") and host is None and inst.get("PrivateIpAddress"):
                role = tags.get("role", "web")
                image = (
                    "app"
                    if role.removesuffix("-PENDING") in ("web", "worker")
                    else "db"
                    if role.removesuffix("-PENDING") in ("db-primary", "db-replica")
                    else "base"
                )
                (host,) = self.env.net.start(
                    [HostSpec(f"{self.prefix}{iid[-6:]}", inst["PrivateIpAddress"], image)]
                )
                self.env.hosts[iid] = host
                self.env.roles[iid] = role
                try:
                    self.provision(host, role)
                except Exception as exc:  # noqa: BLE001 - recorded, the test asserts on it
                    self.errors.append(f"{iid}: {exc}")
                self.started.append(iid)
            elif state in ("shutting-down", "terminated") and host is not None:
                self.env.net.destroy(host.name)
                del self.env.hosts[iid]
                self.destroyed.append(iid)

    def provision(self, host: TestHost, role: str) -> None:
        """What the image gives a new server: a web server's files cloned, else provisioning; a
        new db-replica is built from the db-primary and streams; add-server's pending worker or
        cache boots as its role's image (a cache: RabbitMQ with the broker user)."""
        if role in ("worker-PENDING", "cache-PENDING"):
            role = role.removesuffix("-PENDING")
        sources = [
            h
            for iid, h in self.env.hosts.items()
            if self.env.roles.get(iid) == role and h is not host
        ]
        if role == "web" and sources:
            clone_image(sources[0], host, list(self.env.secrets))
        else:
            provision_server(self.env, host, role)
        if role == "cache":
            from fabflows.testing.rabbitmq import install_rabbitmq

            install_rabbitmq(host, {DEPLOY_USER: self.env.secrets["broker_password"]})
        if role == "db-replica" and self.env.db_host and self.env.replication_password:
            from sandbox.replication import provision_replication

            provision_replication(
                self.env.db_host,
                [host],
                self.env.replication_password,
                home=HOME,
                owner=DEPLOY_USER,
            )

    def run_until(self, future: Future, interval: float = 0.3, timeout: float = 900) -> Any:
        """Follow the instances (on this, the main, thread) until ``future`` is done."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("InstanceFollower must run on the main thread")
        deadline = time.monotonic() + timeout
        watch = ChangeWatch(self.env.endpoint)
        while not future.done():
            if watch.due():
                self.tick()
            if time.monotonic() > deadline:
                raise TimeoutError("the flow did not finish in time")
            time.sleep(interval)
        self.tick()
        return future.result()


def run_in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """Run ``fn`` in a worker thread (the main thread stays free to start hosts)."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    threading.Thread(target=target, daemon=True, name="flow").start()
    return future
