"""RabbitMQ on an isolated test host (the cache server's broker), from Debian's real packages.

Test hosts have no route out, so the .debs are fetched on the machine with ``apt-get download``
(once, cached under ``~/.cache/fabflows/debs``), copied into the host and installed with
``apt-get install ./*.deb``; the broker then runs under the host's supervisord (no systemd there).
About 8 s to install and 5 s to start.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = (
    "rabbitmq-server",
    "erlang-base",
    "erlang-asn1",
    "erlang-crypto",
    "erlang-eldap",
    "erlang-ftp",
    "erlang-inets",
    "erlang-mnesia",
    "erlang-os-mon",
    "erlang-parsetools",
    "erlang-public-key",
    "erlang-runtime-tools",
    "erlang-snmp",
    "erlang-ssl",
    "erlang-syntax-tools",
    "erlang-tftp",
    "erlang-tools",
    "erlang-xmerl",
    "socat",
    "logrotate",
    "libpopt0",
    "lsb-base",
    "cron",
    "cron-daemon-common",
)
"""rabbitmq-server and what it needs beyond the test hosts' base image (Debian bookworm)."""

SUPERVISOR_CONF = """\
[program:rabbitmq]
command=/usr/lib/rabbitmq/bin/rabbitmq-server
user=rabbitmq
environment=HOME="/var/lib/rabbitmq"
autostart=true
autorestart=true
startsecs=3
stopwaitsecs=30
redirect_stderr=true
stdout_logfile=/var/log/supervisor/rabbitmq.log
"""


class RabbitmqSetupError(RuntimeError):
    """The broker could not be installed or started on a test host (names the step)."""


def debs_dir() -> Path:
    base = os.environ.get("FABFLOWS_DEBS_CACHE") or Path.home() / ".cache" / "fabflows" / "debs"
    return Path(base) / "rabbitmq"


def ensure_debs() -> Path:
    """The directory holding the .debs, downloading the missing ones with ``apt-get download``."""
    directory = debs_dir()
    directory.mkdir(parents=True, exist_ok=True)
    # One download at a time (parallel test workers): another process never copies a half-written .deb.
    with open(directory.parent / ".rabbitmq.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _download_missing(directory)
    return directory


def _download_missing(directory: Path) -> None:
    have = {p.name.split("_", 1)[0] for p in directory.glob("*.deb")}
    missing = [p for p in PACKAGES if p not in have]
    if missing:
        proc = subprocess.run(
            ["apt-get", "download", *missing],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise RabbitmqSetupError(
                f"apt-get download {' '.join(missing)} failed: {proc.stderr.strip()[-500:]}"
            )


def install_rabbitmq(host, users: dict[str, str] | None = None, timeout: float = 60) -> float:  # noqa: ANN001
    """Install and start RabbitMQ on ``host`` (a TestHost), add ``users``; return the seconds taken.

    Passwords go to ``rabbitmqctl`` on stdin, as fabflows itself does.
    """
    started = time.monotonic()
    source = ensure_debs()
    target = host.root() / "tmp" / "fabflows-debs"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    proc = host.exec(
        [
            "sh",
            "-c",
            "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d; "
            "chmod 755 /usr/sbin/policy-rc.d; "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
            "/tmp/fabflows-debs/*.deb; rc=$?; rm -rf /tmp/fabflows-debs; exit $rc",
        ],
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RabbitmqSetupError(f"installing rabbitmq-server failed: {proc.stdout[-800:]}")
    host.exec(
        [
            "sh",
            "-c",
            "install -d -o rabbitmq -g rabbitmq /run/rabbitmq; "
            "cat > /etc/supervisor/conf.d/20-rabbitmq.conf; "
            "supervisorctl reread >/dev/null; supervisorctl update >/dev/null",
        ],
        input=SUPERVISOR_CONF,
    )
    deadline = time.monotonic() + timeout
    while True:
        if host.exec(["rabbitmqctl", "-q", "await_startup"], check=False).returncode == 0:
            break
        if time.monotonic() > deadline:
            raise RabbitmqSetupError(f"RabbitMQ on {host.name} did not start within {timeout} s")
        time.sleep(0.3)
    for user, password in (users or {}).items():
        host.exec(["rabbitmqctl", "-q", "add_user", user], input=password + "\n")
    return time.monotonic() - started


def authenticates(host, user: str, password: str) -> bool:  # noqa: ANN001
    """Does the broker on ``host`` accept ``password`` for ``user``? (password on stdin)"""
    proc = host.exec(
        ["rabbitmqctl", "-q", "authenticate_user", user], input=password + "\n", check=False
    )
    return proc.returncode == 0
