"""The fleet against real hosts: concurrency, unreachable hosts (sshd killed, partitioned), threshold.

Pure rate-control tables are in test_fleet_rate.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import (
    FleetError,
    FleetHost,
    HostResult,
    RateControl,
    run_fleet,
    server_label,
)
from tasks.ssh.remote import Remote

pytestmark = pytest.mark.hosts

CONNECT_TIMEOUT = 2.0


def _opts(net) -> SshOptions:
    return SshOptions(
        user="deploy",
        known_hosts_file=str(net.known_hosts),
        key_file=str(net.client_key),
        connect_timeout=CONNECT_TIMEOUT,
    )


def _fleet(hosts) -> list[FleetHost]:
    return [FleetHost(name=h.name, address=h.ip, role="web") for h in hosts]


def touch_step(remote: Remote, host: FleetHost) -> HostResult:
    """Write /var/tmp/fleet-<host> (a real write with a dry form), timing itself."""
    started = time.monotonic()
    remote.read(["sleep", "0.4"])
    remote.write(["touch", f"/var/tmp/fleet-{host.name}"])
    return HostResult(status="changed", message="touched", output=(started, time.monotonic()))


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def _exists(host, path: str) -> bool:
    return host.exec(["test", "-e", path], check=False).returncode == 0


def test_concurrency_and_dry_run(make_hosts, test_network) -> None:
    hosts = make_hosts(["fl1", "fl2", "fl3", "fl4"])
    with disable_run_logger(), ConnectionPool(_opts(test_network)) as pool:
        dry = run_fleet(
            _fleet(hosts),
            touch_step,
            pool=pool,
            rate=RateControl(max_concurrency="50%"),
            dry_run=True,
            name="touch",
        )
        assert [r.label for r in dry.results] == ["would change"] * 4
        assert dry.results[0].commands == ["touch /var/tmp/fleet-fl1"]
        assert not any(_exists(h, f"/var/tmp/fleet-{h.name}") for h in hosts)

        two = run_fleet(
            _fleet(hosts), touch_step, pool=pool, rate=RateControl(max_concurrency=2),
            dry_run=False, name="touch",
        )  # fmt: skip
        assert two.ok and two.max_concurrency == 2
        assert _max_overlap([r.output for r in two.results]) == 2
        assert all(_exists(h, f"/var/tmp/fleet-{h.name}") for h in hosts)

        wide = run_fleet(
            _fleet(hosts), touch_step, pool=pool, rate=RateControl(max_concurrency="100%"),
            dry_run=False, name="touch",
        )  # fmt: skip
        assert _max_overlap([r.output for r in wide.results]) == 4
        assert wide.duration_s < two.duration_s
        assert [r.host for r in wide.results] == ["fl1", "fl2", "fl3", "fl4"]  # host order kept


def test_unreachable_hosts_are_errors_and_do_not_hang(make_hosts, test_network) -> None:
    hosts = make_hosts(["fl5", "fl6", "fl7", "fl8"])
    test_network.kill_sshd("fl6")
    test_network.partition("fl7")
    started = time.monotonic()
    with disable_run_logger(), ConnectionPool(_opts(test_network)) as pool:
        result = run_fleet(
            _fleet(hosts),
            touch_step,
            pool=pool,
            rate=RateControl(max_concurrency="100%", max_errors=2),
            dry_run=False,
            name="touch",
        )
    elapsed = time.monotonic() - started
    by_host = {r.host: r for r in result.results}
    assert by_host["fl5"].status == by_host["fl8"].status == "changed"
    assert by_host["fl6"].status == "failed" and "connection refused" in by_host["fl6"].message
    assert by_host["fl7"].status == "failed" and "timed out" in by_host["fl7"].message
    assert by_host["fl7"].duration_s < CONNECT_TIMEOUT + 1.5
    assert elapsed < CONNECT_TIMEOUT + 3, "an unreachable host must not hold up the run"
    assert not result.stopped  # 2 errors are tolerated
    with pytest.raises(FleetError, match=r"fl7 \(.*\): failed: unreachable: timed out"):
        result.raise_for_errors()

    # the same hosts with no error tolerated, one at a time: the first failure stops the rollout
    order = [hosts[1], hosts[0], hosts[3]]
    with disable_run_logger(), ConnectionPool(_opts(test_network)) as pool:
        stopped = run_fleet(
            _fleet(order),
            lambda r, h: HostResult(status="changed", output=r.write(["touch", "/var/tmp/second"])),
            pool=pool,
            rate=RateControl(max_concurrency=1, max_errors=0),
            dry_run=False,
            name="second",
        )
    assert stopped.stopped
    assert [r.status for r in stopped.results] == ["failed", "skipped", "skipped"]
    assert "not started" in stopped.results[1].message
    assert not _exists(hosts[0], "/var/tmp/second")
    assert "STOPPED" in stopped.summary()


def test_partition_of_an_open_connection(make_hosts, test_network) -> None:
    """A host that drops off mid-run fails after the channel/command timeout, it does not hang."""
    (host,) = make_hosts(["fl9"])
    with disable_run_logger(), ConnectionPool(_opts(test_network)) as pool:
        pool.get(host.ip)  # connected, then the network goes
        test_network.partition("fl9")
        started = time.monotonic()
        result = run_fleet(
            _fleet([host]),
            touch_step,
            pool=pool,
            rate=RateControl(),
            dry_run=False,
            name="touch",
            command_timeout=3,
        )
        assert time.monotonic() - started < 8
        assert result.results[0].status == "failed"
        assert host.ip not in pool._conns, "a broken connection is not reused"
        test_network.heal("fl9")
        again = run_fleet(
            _fleet([host]), touch_step, pool=pool, rate=RateControl(), dry_run=False, name="touch"
        )
        assert again.ok, again.text_report()


def test_step_error_fails_that_host_only(make_hosts, test_network, tmp_path: Path) -> None:
    hosts = make_hosts(["fl10", "fl11"])

    def step(remote: Remote, host: FleetHost) -> HostResult:
        remote.write(["sh", "-c", "exit 3"] if host.name == "fl10" else ["true"])
        return HostResult(status="changed")

    with disable_run_logger(), ConnectionPool(_opts(test_network)) as pool:
        result = run_fleet(
            _fleet(hosts), step, pool=pool, rate=RateControl(max_concurrency=2, max_errors=1),
            dry_run=False, name="exit",
        )  # fmt: skip
    assert [r.status for r in result.results] == ["failed", "changed"]
    assert "`sh -c 'exit 3'` exited 3" in result.results[0].message
    assert result.results[0].commands == ["sh -c 'exit 3'"]


def test_same_named_servers_are_told_apart_by_instance_id(make_hosts, test_network) -> None:
    """Two servers with one Name tag: every result and report line carries the instance id."""
    hosts = make_hosts(["fl9", "fl10"])
    fleet = [
        FleetHost(name="web", address=h.ip, role="web", instance_id=f"i-{n}")
        for n, h in enumerate(hosts)
    ]
    with disable_run_logger(), ConnectionPool(_opts(test_network)) as pool:
        result = run_fleet(
            fleet, touch_step, pool=pool, rate=RateControl(), dry_run=True, name="touch"
        )
    assert [r.host for r in result.results] == ["web (i-0)", "web (i-1)"]
    report = result.text_report()
    assert "web (i-0) (" in report and "web (i-1) (" in report
    assert [row["host"] for row in result.rows()] == ["web (i-0)", "web (i-1)"]


@pytest.mark.parametrize(
    ("name", "instance_id", "label"),
    [
        ("web", "i-1", "web (i-1)"),
        ("", "i-1", "i-1"),
        ("i-1", "i-1", "i-1"),
        ("10.0.0.5", None, "10.0.0.5"),
    ],
)
def test_server_label(name: str, instance_id: str | None, label: str) -> None:
    assert server_label(name, instance_id) == label
    assert FleetHost(name=name or "x", address="a", instance_id=instance_id).label == (
        label if name else server_label("x", instance_id)
    )
