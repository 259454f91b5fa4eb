"""Supervisor restarts: the parsing as tables, the restart on a real test host."""

from __future__ import annotations

import pytest

from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost
from tasks.ssh.programs import (
    ProgramState,
    covered,
    describe_programs,
    parse_status,
    resolve_targets,
    restart_programs_on,
)

STATUS = """\
nginx                            RUNNING   pid 29, uptime 0:01:02
staging-pgbouncer:staging-pgbouncer RUNNING   pid 80, uptime 0:00:50
staging-web:staging-server       RUNNING   pid 81, uptime 0:00:50
staging-celery:staging-celery-main STOPPED   Nov 26 06:00 AM
"""


def test_parse_and_resolve() -> None:
    programs = parse_status(STATUS)
    assert [p.name for p in programs][:2] == ["nginx", "staging-pgbouncer:staging-pgbouncer"]
    assert programs[3].state == "STOPPED" and programs[3].group == "staging-celery"
    targets, missing = resolve_targets(programs, ["staging-web", "nginx", "newrelic-infra"])
    assert targets == ["staging-web:*", "nginx"] and missing == ["newrelic-infra"]
    assert [p.name for p in covered(programs, targets)] == ["nginx", "staging-web:staging-server"]
    with pytest.raises(ValueError, match="not a supervisor"):
        resolve_targets(programs, ["a; rm -rf /"])
    assert ProgramState(name="x", state="RUNNING").group is None


CONF = """\
[program:staging-server]
command=/bin/sh -c 'exec sleep 100000'
startsecs=0
[program:broken]
command=/bin/false
startsecs=1
autostart=false
startretries=0
[group:staging-web]
programs=staging-server
"""


@pytest.mark.hosts
def test_restart_group_and_report_missing_and_failures(make_hosts, test_network) -> None:
    (host,) = make_hosts(["prg1"])
    host.exec(
        [
            "sh",
            "-c",
            "cat > /etc/supervisor/conf.d/40-t.conf; for i in $(seq 100); do "
            "supervisorctl update && exit 0; sleep 0.1; done; exit 1",
        ],
        input=CONF,
    )
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=5,
    )
    fleet_host = FleetHost(name=host.name, address=host.ip, role="web")

    def pid() -> str:
        return host.exec(["supervisorctl", "pid", "staging-web:staging-server"]).stdout.strip()

    before = pid()
    with ConnectionPool(opts) as pool:
        names = {host.ip: ["staging-web", "newrelic-infra"]}
        dry = restart_programs_on.fn(pool, [fleet_host], names, dry_run=True)
        assert dry.results[0].commands == ["sudo -n -- supervisorctl restart 'staging-web:*'"]
        assert pid() == before
        done = restart_programs_on.fn(pool, [fleet_host], names, dry_run=False)
        assert done.ok and "not on this server: newrelic-infra" in done.results[0].message
        assert pid() != before
        bad = restart_programs_on.fn(pool, [fleet_host], {host.ip: ["broken"]}, dry_run=False)
        assert not bad.ok and "broken" in bad.results[0].message
        states = describe_programs.fn(pool, [fleet_host])[host.ip]
        assert {p.name for p in states} >= {"nginx", "staging-web:staging-server", "broken"}
