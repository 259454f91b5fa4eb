"""An environment for upgrade tests and benchmarks: moto inventory, isolated test hosts at the
instances' addresses (web servers with FabulAWS's nginx logic), and a local apt repository.

Packages (every host has version 1 of the first four installed, "as in its image"):

- ``fabflows-demo`` 1.0 -> 2.0: a plain upgrade;
- ``fabflows-reboot`` 1.0 -> 2.0: 2.0's postinst creates ``/var/run/reboot-required`` (like
  update-notifier-common does for kernels);
- ``fabflows-broken`` 1.0 -> 2.0: 2.0's postinst fails on a host that has ``/etc/fabflows-break``;
- ``fabflows-slow`` 1.0 -> 2.0: 2.0's postinst writes ``/tmp/fabflows-slow-started`` and sleeps
  for the seconds in ``/etc/fabflows-slow`` (if present): a window to kill a run in;
- ``fabflows-app-tools`` 1.0 (depends on ``fabflows-app-lib`` 1.0): an app-server package that is
  not installed anywhere.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config import load_config
from fabflows.testing.apt_repo import AptRepo, DebSpec
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed
from sandbox.provision import point_apt_at, provision_web

REBOOT_POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    touch /var/run/reboot-required
    echo fabflows-reboot >> /var/run/reboot-required.pkgs
fi
"""
BROKEN_POSTINST = """#!/bin/sh
if [ -e /etc/fabflows-break ]; then
    echo "fabflows-broken: post-installation failed on purpose on $(hostname)" >&2
    exit 1
fi
"""
SLOW_POSTINST = """#!/bin/sh
touch /tmp/fabflows-slow-started
if [ -s /etc/fabflows-slow ]; then sleep "$(cat /etc/fabflows-slow)"; fi
"""

INSTALLED = (
    DebSpec("fabflows-demo", "1.0"),
    DebSpec("fabflows-reboot", "1.0"),
    DebSpec("fabflows-broken", "1.0"),
    DebSpec("fabflows-slow", "1.0"),
)
UPDATES = (
    DebSpec("fabflows-demo", "2.0"),
    DebSpec("fabflows-reboot", "2.0", postinst=REBOOT_POSTINST),
    DebSpec("fabflows-broken", "2.0", postinst=BROKEN_POSTINST),
    DebSpec("fabflows-slow", "2.0", postinst=SLOW_POSTINST),
    DebSpec("fabflows-app-lib", "1.0"),
    DebSpec("fabflows-app-tools", "1.0", depends=("fabflows-app-lib",)),
)
APP_SERVER_PACKAGES = ["fabflows-app-tools"]
HOME = "/home/deploy"
NGINX_ROOT = f"{HOME}/services/nginx/html"
APP_PORT = 8000  # server_ports.staging in the sample config


def populate_repo(repo: AptRepo) -> None:
    """Build every test package into ``repo`` and index it."""
    repo.add(*INSTALLED, *UPDATES)
    repo.publish()


def install_image_packages(host: Any, repo: AptRepo) -> None:
    """Install version 1 of the test packages with dpkg, as if they came with the host's image."""
    tmp = host.root() / "tmp"
    names = []
    for spec in INSTALLED:
        shutil.copy(repo.deb(spec.name, spec.version), tmp / spec.filename)
        names.append(f"/tmp/{spec.filename}")
    host.exec(["dpkg", "-i", *names])
    host.exec(["rm", "-f", *names])


def prepare_host(host: Any, role: str, repo: AptRepo) -> None:
    """apt pointed at the local repository, version 1 installed; web servers get nginx + app."""
    point_apt_at(host, repo.url)
    install_image_packages(host, repo)
    if role == "web":
        provision_web(host, NGINX_ROOT, APP_PORT)


@dataclass
class Lab:
    """One seeded environment with a test host per server."""

    config_path: Path
    servers: list[Any]
    hosts: dict[str, Any] = field(default_factory=dict)  # instance id -> TestHost

    def by_role(self, role: str) -> list[Any]:
        return [self.hosts[s.instance_id] for s in self.servers if s.role == role]

    @property
    def web(self) -> list[Any]:
        return self.by_role("web")

    def all_hosts(self) -> list[Any]:
        return [self.hosts[s.instance_id] for s in self.servers]


def lab_config(
    directory: Path,
    endpoint: str,
    network: Any,
    *,
    environment: str = "staging",
    roles: Sequence[str] = ("db-primary", "web", "worker"),
    site_url: str | None = None,
    production: bool = False,
    upgrade: dict[str, Any] | None = None,
    approval: dict[str, Any] | None = None,
) -> Path:
    """Write the config: the sample file, trimmed to ``roles``, pointed at moto and the test hosts."""
    section = moto_section(endpoint)
    section["ssh"] = {
        "identity_file": str(network.client_key),
        "known_hosts_file": str(network.known_hosts),
        "address_attribute": "private_ip_address",
        "connect_timeout": 3,
    }
    section["state_dir"] = str(directory / "state")
    section["upgrade"] = {
        "reboot_packages": ["fabflows-reboot", "linux-image-*"],
        "check_timeout_seconds": 10,
        "apt_update_attempts": 2,
        **(upgrade or {}),
    }
    section["approval"] = {"timeout_minutes": 5, "poll_seconds": 1, **(approval or {})}
    env_settings: dict[str, Any] = {}
    if site_url:
        env_settings["site_url"] = site_url
    section["environments"] = {environment: env_settings}
    return write_config(
        directory,
        fabflows=section,
        deploy_user="deploy",
        home=HOME,
        static_html={},
        app_server_packages=APP_SERVER_PACKAGES,
        valid_roles=list(roles),
        instance_types={environment: {r: "m1.small" for r in roles}},
        production_environments=[environment] if production else [],
    )


def make_lab(
    directory: Path,
    endpoint: str,
    network: Any,
    start_hosts: Callable[[list[Any]], list[Any]],
    repo: AptRepo,
    *,
    web_count: int = 2,
    extra_per_role: int = 0,
    roles: Sequence[str] = ("db-primary", "web", "worker"),
    production: bool = False,
    upgrade: dict[str, Any] | None = None,
    approval: dict[str, Any] | None = None,
) -> Lab:
    """Seed moto, start a prepared test host at every server's address, write the final config.

    ``start_hosts`` takes a list of ``HostSpec`` (the ``make_hosts`` fixture, or a TestNetwork's
    ``start``). The site URL is the first web server's (tests have no load balancer).
    """
    from prefect.logging import disable_run_logger

    from fabflows.runbook import load_context
    from sandbox.testhosts import HostSpec
    from tasks.aws.ec2 import describe_servers

    path = lab_config(directory, endpoint, network, roles=roles, production=production)
    cfg = load_config(path)
    subnet = network.subnet
    seed(
        endpoint,
        cfg,
        ["staging"],
        f"{subnet}.0/24",
        (f"{subnet}.{n}" for n in itertools.count(200)),
        web_count=web_count,
        extra_per_role=extra_per_role,
    )
    with disable_run_logger():
        creds = load_context("staging", config=str(path)).creds
        servers = describe_servers.fn(creds, "myproject", "staging")
    specs = [HostSpec(f"up{i}", s.private_ip_address) for i, s in enumerate(servers)]
    started = start_hosts(specs)
    lab = Lab(config_path=path, servers=servers)
    for server, host in zip(servers, started, strict=True):
        lab.hosts[server.instance_id] = host
        host.wait_for_port(80) if server.role == "web" else None
        prepare_host(host, server.role, repo)
    site = f"http://{lab.web[0].ip}/" if lab.web else None
    lab.config_path = lab_config(
        directory,
        endpoint,
        network,
        roles=roles,
        site_url=site,
        production=production,
        upgrade=upgrade,
        approval=approval,
    )
    return lab


def serve_test_repo(directory: Path, network: Any) -> AptRepo:
    """The test packages, built, indexed and served on the test network's bridge address."""
    repo = AptRepo(directory, bind=network.bridge_ip).start()
    try:
        populate_repo(repo)
    except BaseException:
        repo.stop()
        raise
    return repo
