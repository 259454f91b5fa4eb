"""The pure parts of the alternating replication logins: conninfo's user, .pgpass lines, pg_hba
lines (no peer: the rotation itself runs on real replicas in tests/flows/test_rotate_credentials.py),
and which login push-server-secrets pushes after a rotation."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from blocks.secrets import ServerSecrets
from fabflows.errors import BadInput
from flows.push_server_secrets import active_logins
from tasks.postgres.replication_logins import conninfo_user, hba_line, pgpass_with, with_user

CONNINFO = (
    "user=replicator passfile='/var/lib/postgresql/.pgpass' channel_binding=prefer "
    "host=10.0.0.1 port=5432 sslmode=prefer application_name=r1"
)


@pytest.mark.parametrize(
    ("conninfo", "user"),
    [
        (CONNINFO, "replicator"),
        ("host=10.0.0.1 user = 'replicator_alt' port=5432", "replicator_alt"),
        ("host=10.0.0.1", None),
        ("", None),
    ],
)
def test_conninfo_user(conninfo: str, user: str | None) -> None:
    assert conninfo_user(conninfo) == user
    changed = with_user(conninfo, "replicator_alt")
    assert conninfo_user(changed) == "replicator_alt"
    # everything else kept
    rest = [p for p in changed.split() if not p.startswith("user")]
    assert all(p in conninfo for p in rest)


def test_with_user_refuses_odd_names() -> None:
    with pytest.raises(ValueError):
        with_user(CONNINFO, "x' host=evil")
    with pytest.raises(ValueError):
        hba_line("10.0.0.1", "a b")
    with pytest.raises(ValueError):
        hba_line("10.0.0.1/0 trust", "replicator")
    assert hba_line("10.0.0.2", "replicator_alt") == (
        "host    replication  replicator_alt  10.0.0.2/32  scram-sha-256"
    )


def test_pgpass_with() -> None:
    old = "*:*:*:replicator:old\\:pw\n"
    both = pgpass_with(old, "replicator_alt", SecretStr("n:e\\w"))
    # the new login first, the old line kept (the replica streams as it until it switches)
    assert both.get_secret_value() == (
        "*:*:*:replicator_alt:n\\:e\\\\w\n*:*:*:replicator:old\\:pw\n"
    )
    # the next rotation replaces the line of the login it sets: never more than two lines
    again = pgpass_with(both.get_secret_value(), "replicator", SecretStr("third"))
    assert again.get_secret_value() == "*:*:*:replicator:third\n*:*:*:replicator_alt:n\\:e\\\\w\n"
    assert pgpass_with("", "replicator", SecretStr("x")).get_secret_value() == (
        "*:*:*:replicator:x\n"
    )
    with pytest.raises(ValueError):
        pgpass_with(old, "replicator_alt", SecretStr("a\nb"))


def test_push_pushes_the_login_in_use() -> None:
    names = ["database_password", "broker_password", "smtp_password"]
    block = ServerSecrets()
    for n in names:
        block.set(n, f"{n}-value")
    values = {n: block.get(n) for n in names}
    # no rotation yet: as before
    assert active_logins(block, "b", names, values) == (names, values)
    block.set("database_user", "dbuser_alt")
    block.set("broker_user", "deploy_alt")
    pushed, pushed_values = active_logins(block, "b", names, values)
    assert pushed == [*names, "database_user", "broker_user"]
    assert pushed_values["database_user"].get_secret_value() == "dbuser_alt"
    # only the login of a password that is pushed
    assert active_logins(block, "b", ["smtp_password"], {})[0] == ["smtp_password"]
    block.set("database_password_pending", "left-over")
    with pytest.raises(BadInput, match="database_password_pending .* `fabflows recover`"):
        active_logins(block, "b", names, values)
