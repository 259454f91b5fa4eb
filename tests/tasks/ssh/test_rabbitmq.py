"""The broker user's password on a real RabbitMQ (Debian's package on a test host)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from fabflows.testing.rabbitmq import authenticates as broker_accepts
from fabflows.testing.rabbitmq import install_rabbitmq
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost, RateControl, run_fleet
from tasks.ssh.rabbitmq import broker_password_step

pytestmark = pytest.mark.hosts

OLD = "br0ker'$(id)\"`x` old"
NEW = "n3w br0ker;'$HOME\""


def _run(pool, host, step, dry_run):
    result = run_fleet(
        [FleetHost(name=host.name, address=host.ip, role="cache")],
        step,
        pool=pool,
        rate=RateControl(max_concurrency=1),
        dry_run=dry_run,
        name="broker",
    )
    return result.results[0]


def test_dry_apply_again_compensate_and_refusal(make_hosts, test_network) -> None:
    (cache,) = make_hosts(["rmq1"])
    install_rabbitmq(cache, {"deploy": OLD})
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=5,
    )
    step = broker_password_step("deploy", SecretStr(OLD), SecretStr(NEW))
    with ConnectionPool(opts) as pool:
        dry = _run(pool, cache, step, dry_run=True)
        assert dry.status == "changed" and dry.dry_run
        assert dry.commands == [
            "sudo -n -- rabbitmqctl -q change_password -- deploy < stdin(secret, not shown)"
        ]
        assert broker_accepts(cache, "deploy", OLD) and not broker_accepts(cache, "deploy", NEW)

        done = _run(pool, cache, step, dry_run=False)
        assert done.status == "changed", done.message
        assert broker_accepts(cache, "deploy", NEW) and not broker_accepts(cache, "deploy", OLD)

        again = _run(pool, cache, step, dry_run=False)
        assert again.status == "unchanged" and again.commands == []

        back = _run(
            pool, cache, broker_password_step("deploy", SecretStr(NEW), SecretStr(OLD)), False
        )
        assert back.status == "changed" and broker_accepts(cache, "deploy", OLD)

        wrong = _run(
            pool, cache, broker_password_step("deploy", SecretStr("a1"), SecretStr("b2")), False
        )
        assert wrong.status == "failed" and "both the current and the new" in wrong.message
    assert OLD not in cache.exec(["ps", "-eo", "args"]).stdout
