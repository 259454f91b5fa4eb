"""The connection factory against a real sshd: host keys are checked, unknown or changed ones refused."""

from __future__ import annotations

from pathlib import Path

import paramiko
import pytest
from prefect.logging import disable_run_logger

from fabflows.testing.sshkeys import ed25519_pair
from tasks.ssh.connection import ConnectionPool, HostKeyError, SshOptions, connect
from tasks.ssh.fleet import FleetHost, HostResult, RateControl, run_fleet

pytestmark = pytest.mark.hosts


def _opts(net, known_hosts: Path, key: Path | None = None) -> SshOptions:
    return SshOptions(
        user="deploy",
        known_hosts_file=str(known_hosts),
        key_file=str(key or net.client_key),
        connect_timeout=3,
    )


def test_host_keys_checked(make_hosts, test_network, tmp_path: Path) -> None:
    (host,) = make_hosts(["kh1"])
    good = _opts(test_network, test_network.known_hosts)
    conn = connect(host.ip, good)
    assert conn.transport.sock.getsockopt(6, 1) == 1  # TCP_NODELAY
    conn.close()

    impostor = ed25519_pair().public.split()[:2]
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"{host.ip} {' '.join(impostor)}\n")
    with pytest.raises(HostKeyError, match="host key CHANGED"):
        connect(host.ip, _opts(test_network, wrong))

    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    with pytest.raises(HostKeyError, match="host key unknown"):
        connect(host.ip, _opts(test_network, empty))

    stranger = ed25519_pair().write_private(tmp_path / "stranger")
    with pytest.raises(paramiko.AuthenticationException):
        connect(host.ip, _opts(test_network, test_network.known_hosts, stranger))

    # through the fleet: the host fails with the reason, and the step never runs there
    ran: list[str] = []

    def step(remote, h: FleetHost) -> HostResult:
        ran.append(h.name)
        remote.write(["touch", "/var/tmp/mismatch"])
        return HostResult(status="changed")

    with disable_run_logger(), ConnectionPool(_opts(test_network, wrong)) as pool:
        result = run_fleet(
            [FleetHost(name=host.name, address=host.ip)],
            step,
            pool=pool,
            rate=RateControl(),
            dry_run=False,
            name="mismatch",
        )
    assert result.results[0].status == "failed"
    assert "host key refused" in result.results[0].message
    assert ran == []
    assert host.exec(["test", "-e", "/var/tmp/mismatch"], check=False).returncode == 1


def test_pool_reuses_connections(make_hosts, test_network) -> None:
    (host,) = make_hosts(["kh2"])
    with ConnectionPool(_opts(test_network, test_network.known_hosts)) as pool:
        first = pool.get(host.ip)
        assert pool.get(host.ip) is first
    assert not first.is_connected  # closed at the end of the run
