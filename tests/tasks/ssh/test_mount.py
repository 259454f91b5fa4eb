"""The post-start step (the original's mount_encrypted), the quiet step and SSH reachability, on a
real isolated test host.

LUKS cannot run on this machine: its kernel has no device-mapper (no /dev/mapper/control, no
dm_crypt, nothing in /proc/misc), so ``cryptsetup luksOpen`` would fail on any host here. The test
puts a recording stand-in at /usr/local/sbin/cryptsetup *inside the host* to prove what the step
sends it (the passphrase on stdin, never in its arguments); the mount command then mounts a tmpfs
whose source is /dev/mapper/crypt-xvdf, so the step's own ``findmnt`` check is real.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger
from pydantic import SecretStr

from tasks.ssh.connection import ConnectionPool, HostKeyError, SshOptions
from tasks.ssh.fleet import FleetHost, RateControl, run_fleet
from tasks.ssh.mount import (
    EncryptedVolume,
    ReachableTimeout,
    broker_queues_step,
    parse_queues,
    post_start_step,
    quiet_step,
    wait_for_ssh,
)

pytestmark = pytest.mark.hosts

PASSPHRASE = "correct horse battery staple"

SUPERVISOR = """\
[group:staging-celery]
programs=staging-celery-main
[program:staging-celery-main]
command=/bin/sleep 100000
autostart=false
startsecs=0
[group:staging-pgbouncer]
programs=staging-pgbouncer-main
[program:staging-pgbouncer-main]
command=/bin/sleep 100000
autostart=false
startsecs=0
[program:slowdb]
command=/bin/sleep 100000
autostart=false
startsecs=3
"""

INIT_SCRIPT = """#!/bin/sh
case "$1" in
  status) test -e /run/fakesvc.running && exit 0 || exit 3 ;;
  start) touch /run/fakesvc.running ;;
  stop) rm -f /run/fakesvc.running ;;
esac
"""

FAKE_CRYPTSETUP = """#!/bin/sh
# recording stand-in: this machine's kernel has no device-mapper
printf '%s\\n' "$*" > /root/cryptsetup.argv
cat > /root/cryptsetup.stdin
cat /proc/$$/cmdline | tr '\\0' ' ' > /root/cryptsetup.cmdline
mkdir -p /dev/mapper && touch /dev/mapper/crypt-xvdf
"""

MOUNT_SCRIPT = """#!/bin/sh
mkdir -p /srv/data && mount -t tmpfs /dev/mapper/crypt-xvdf /srv/data
"""


def _write(host, path: str, text: str, mode: str = "0755") -> None:
    host.exec(["sh", "-c", f"cat > {path} && chmod {mode} {path}"], input=text)


def supervisorctl(host, *args: str, timeout: float = 15.0) -> None:
    """Run supervisorctl in a host, waiting for supervisord (PID 1) to open its socket first."""
    deadline = time.monotonic() + timeout
    while True:
        done = host.exec(["supervisorctl", *args], check=False)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"supervisorctl {' '.join(args)}: {done.stdout}{done.stderr}")
        time.sleep(0.2)


@pytest.fixture
def host(make_hosts):
    (h,) = make_hosts(["mnt1"])
    _write(h, "/etc/supervisor/conf.d/app.conf", SUPERVISOR, "0644")
    supervisorctl(h, "update")
    _write(h, "/etc/init.d/fakesvc", INIT_SCRIPT)
    _write(h, "/usr/local/sbin/cryptsetup", FAKE_CRYPTSETUP)
    _write(h, "/mount-deferred.sh", MOUNT_SCRIPT)
    return h


@pytest.fixture
def opts(test_network) -> SshOptions:
    return SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=3,
    )


def _status(host, name: str) -> str:
    return host.exec(["supervisorctl", "status", name], check=False).stdout.split()[1]


SERVICES = ["staging-pgbouncer", "staging-celery", "fakesvc", "postgresql"]
VOLUME = EncryptedVolume(passphrase_block="staging-luks")


def test_post_start_unlocks_mounts_and_starts_services_once(host, opts) -> None:
    fleet = [FleetHost(name="mnt1", address=host.ip, role="worker")]
    step = post_start_step(SERVICES, volume=VOLUME, passphrase=SecretStr(PASSPHRASE))
    rate = RateControl(max_concurrency=1)
    with disable_run_logger(), ConnectionPool(opts) as pool:
        dry = run_fleet(fleet, step, pool=pool, rate=rate, dry_run=True, name="t").results[0]
        assert dry.label == "would change", dry.message
        unlock = dry.commands[0]
        assert unlock == (
            "sudo -n -- cryptsetup luksOpen --key-file=- /dev/xvdf crypt-xvdf "
            "< stdin(passphrase from block staging-luks)"
        )
        assert all(PASSPHRASE not in c for c in dry.commands)
        assert "sudo -n -- /mount-deferred.sh" in dry.commands
        assert "sudo -n -- supervisorctl start 'staging-celery:*'" in dry.commands
        assert "sudo -n -- service fakesvc start" in dry.commands
        assert host.exec(["test", "-e", "/root/cryptsetup.argv"], check=False).returncode == 1
        assert _status(host, "staging-celery:staging-celery-main") == "STOPPED"

        real = run_fleet(fleet, step, pool=pool, rate=rate, dry_run=False, name="t").results[0]
        assert real.status == "changed", real.message
        assert "not on this server: postgresql" in real.message
        assert host.exec(["cat", "/root/cryptsetup.argv"]).stdout == (
            "luksOpen --key-file=- /dev/xvdf crypt-xvdf\n"
        )
        assert host.exec(["cat", "/root/cryptsetup.stdin"]).stdout == PASSPHRASE
        assert PASSPHRASE not in host.exec(["cat", "/root/cryptsetup.cmdline"]).stdout
        assert host.exec(["findmnt", "--source", "/dev/mapper/crypt-xvdf"]).returncode == 0
        assert _status(host, "staging-celery:staging-celery-main") == "RUNNING"
        assert _status(host, "staging-pgbouncer:staging-pgbouncer-main") == "RUNNING"
        assert host.exec(["service", "fakesvc", "status"], check=False).returncode == 0

        again = run_fleet(fleet, step, pool=pool, rate=rate, dry_run=False, name="t").results[0]
        assert again.status == "unchanged" and again.commands == []

        quiet = quiet_step(["staging-celery", "fakesvc"])
        stopped = run_fleet(fleet, quiet, pool=pool, rate=rate, dry_run=False, name="q")
        assert stopped.results[0].status == "changed"
        assert _status(host, "staging-celery:staging-celery-main") == "STOPPED"
        assert _status(host, "staging-pgbouncer:staging-pgbouncer-main") == "RUNNING"
        assert host.exec(["service", "fakesvc", "status"], check=False).returncode == 3
        quiet_again = run_fleet(fleet, quiet, pool=pool, rate=rate, dry_run=False, name="q")
        assert quiet_again.results[0].status == "unchanged"

        # no RabbitMQ on this host: nothing to lose, said so
        queues = run_fleet(
            fleet,
            broker_queues_step("myproject_staging"),
            pool=pool,
            rate=rate,
            dry_run=True,
            name="b",
        ).results[0]
        assert queues.output is None and "no RabbitMQ" in queues.message


def test_locked_volume_without_passphrase_fails_clearly(host, opts) -> None:
    fleet = [FleetHost(name="mnt1", address=host.ip, role="db-primary")]
    step = post_start_step([], volume=VOLUME, passphrase=None)
    with disable_run_logger(), ConnectionPool(opts) as pool:
        result = run_fleet(fleet, step, pool=pool, rate=RateControl(), dry_run=False, name="t")
    assert result.results[0].status == "failed"
    assert "no LUKS passphrase is configured" in result.results[0].message


def test_without_fs_encrypt_only_services(host, opts) -> None:
    fleet = [FleetHost(name="mnt1", address=host.ip, role="worker")]
    with disable_run_logger(), ConnectionPool(opts) as pool:
        result = run_fleet(
            fleet,
            post_start_step(["staging-celery"]),
            pool=pool,
            rate=RateControl(),
            dry_run=False,
            name="t",
        ).results[0]
    assert result.status == "changed" and not any("cryptsetup" in c for c in result.commands)


def test_wait_for_ssh(host, opts, test_network, tmp_path: Path) -> None:
    from fabflows.testing.hosts_fixtures import TEST_SUBNET

    with disable_run_logger():
        ok = wait_for_ssh.fn([FleetHost(name="mnt1", address=host.ip)], opts, timeout=10)
        assert ok[0].host == "mnt1"
        nobody = FleetHost(name="gone", address=f"{TEST_SUBNET}.250")
        with pytest.raises(ReachableTimeout, match="gone"):
            wait_for_ssh.fn(
                [nobody],
                opts.__class__(**{**opts.__dict__, "connect_timeout": 0.5}),
                timeout=1,
                poll=0.2,
            )
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        stranger = SshOptions(
            user="deploy",
            known_hosts_file=str(empty),
            key_file=str(test_network.client_key),
            connect_timeout=3,
        )
        with pytest.raises(HostKeyError):
            wait_for_ssh.fn([FleetHost(name="mnt1", address=host.ip)], stranger, timeout=10)


def test_parse_queues() -> None:
    assert parse_queues("celery\t3\nceleryev.abc 0\nnoise\n") == {"celery": 3, "celeryev.abc": 0}


def test_a_program_still_starting_is_waited_for_not_restarted(host, opts) -> None:
    """After a boot supervisor may still be STARTING a program (PostgreSQL recovering)."""
    host.exec(["sh", "-c", "supervisorctl start slowdb >/dev/null 2>&1 &"])
    deadline = time.monotonic() + 5
    while _status(host, "slowdb") != "STARTING" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status(host, "slowdb") == "STARTING"
    fleet = [FleetHost(name="mnt1", address=host.ip, role="db-primary")]
    with disable_run_logger(), ConnectionPool(opts) as pool:
        result = run_fleet(
            fleet,
            post_start_step(["slowdb"]),
            pool=pool,
            rate=RateControl(),
            dry_run=False,
            name="t",
        ).results[0]
    assert result.status == "unchanged", result.message  # waited, nothing started twice
    assert result.commands == [] and _status(host, "slowdb") == "RUNNING"
