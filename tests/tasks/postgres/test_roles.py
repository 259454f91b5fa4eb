"""ALTER ROLE ... PASSWORD on a real PostgreSQL (a db test host), through the SSH tunnel."""

from __future__ import annotations

import psycopg
import pytest
from prefect.logging import disable_run_logger
from pydantic import SecretStr

from sandbox.seed_db import psql, seed_database
from sandbox.testhosts import HostSpec
from tasks.postgres.roles import (
    RolePasswordError,
    alter_role_password,
    login_as,
    shown_statement,
    tunnel,
)
from tasks.ssh.connection import SshOptions

pytestmark = pytest.mark.hosts

OLD = "old pw'\"$x`id`"
NEW = "n3w pw'\"$(id)"


def test_statement_is_composed_and_masked() -> None:
    assert shown_statement('db"user') == 'ALTER ROLE "db""user" WITH PASSWORD \'********\''


def _login(ip: str, password: str) -> bool:
    try:
        psycopg.connect(
            host=ip, user="dbuser", dbname="appdb", password=password, connect_timeout=5
        ).close()
        return True
    except psycopg.OperationalError:
        return False


def _session(port: int, password: str) -> bool:
    conn = login_as(port, "dbuser", "appdb", SecretStr(password))
    if conn is None:
        return False
    with conn:
        return conn.execute("SELECT current_user").fetchone() == ("dbuser",)


def test_dry_apply_again_and_compensate(make_hosts, test_network) -> None:
    subnet = test_network.subnet
    taken = {h.ip for h in test_network.hosts.values()}
    ip = next(f"{subnet}.{n}" for n in range(150, 200) if f"{subnet}.{n}" not in taken)
    (db,) = make_hosts([HostSpec("rol1", ip, "db")])
    seed_database(db, "appdb", "dbuser", OLD, scale=1)
    psql(db, "ALTER SYSTEM SET log_statement = 'ddl'; SELECT pg_reload_conf();")
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=5,
    )
    args = dict(server=db.ip, role="dbuser", database="appdb")
    with disable_run_logger():
        dry = alter_role_password.fn(
            opts, **args, current=SecretStr(OLD), new=SecretStr(NEW), dry_run=True
        )
        assert dry.changed and dry.dry_run and "********" in dry.summary
        assert _login(db.ip, OLD) and not _login(db.ip, NEW)

        done = alter_role_password.fn(
            opts, **args, current=SecretStr(OLD), new=SecretStr(NEW), dry_run=False
        )
        assert done.changed and not done.dry_run
        assert _login(db.ip, NEW) and not _login(db.ip, OLD)

        again = alter_role_password.fn(
            opts, **args, current=SecretStr(OLD), new=SecretStr(NEW), dry_run=False
        )
        assert not again.changed

        back = alter_role_password.fn(
            opts, **args, current=SecretStr(NEW), new=SecretStr(OLD), dry_run=False
        )
        assert back.changed and _login(db.ip, OLD)

        with pytest.raises(RolePasswordError, match="both the current and the new") as info:
            alter_role_password.fn(
                opts, **args, current=SecretStr("wrong1"), new=SecretStr("wrong2"), dry_run=False
            )
        assert "wrong" not in str(info.value)
    # the server logged the DDL, but only ever the SCRAM verifier
    logs = db.exec(["sh", "-c", "cat /var/log/supervisor/postgresql.log"]).stdout
    assert "ALTER ROLE" in logs and "SCRAM-SHA-256$" in logs
    assert OLD not in logs and NEW not in logs

    # the SSH connection under the tunnel dies mid-task (sshd's session killed, the listener kept):
    # the next login opens a new one instead of failing the rotation
    with tunnel(db.ip, opts, 5432) as port:
        assert _session(port, OLD)
        sessions = db.exec(["pkill", "-KILL", "-f", "^sshd: deploy"], check=False)
        assert sessions.returncode == 0, "no sshd session to kill"
        assert _session(port, OLD)
