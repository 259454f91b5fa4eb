"""The copy between two real database servers: over the network, in one snapshot, no password on
any command line."""

from __future__ import annotations

import threading
import time

import pytest
from prefect.logging import disable_run_logger
from pydantic import SecretStr

from tasks.postgres.copy import (
    CopyFailed,
    SourceUnavailable,
    describe_source_database,
    job_dir,
    read_database_password,
    start_copy,
    stop_copy,
    wait_for_copy,
)
from tasks.postgres.databases import count_rows, create_database, describe_databases, drop_database
from tests.tasks.postgres.conftest import PASSWORD, SCALE

pytestmark = pytest.mark.hosts


def test_describe_source_from_the_target(db_pair) -> None:
    with disable_run_logger():
        facts = describe_source_database.fn(
            db_pair.pool,
            db_pair.target,
            db_pair.source,
            "myproject_production",
            "dbuser",
            SecretStr(PASSWORD),
        )
    assert facts.database == "myproject_production"
    assert facts.size_bytes > 1_000_000
    assert [t.qualified for t in facts.tables][:2] == ["public.shop_order", "public.auth_user"]


@pytest.mark.parametrize(
    ("database", "password", "reason"),
    [
        ("myproject_nope", PASSWORD, 'database "myproject_nope" does not exist'),
        ("myproject_production", "wrong", "password authentication failed"),
    ],
)
def test_source_unavailable_is_a_clear_error(db_pair, database, password, reason) -> None:
    with disable_run_logger(), pytest.raises(SourceUnavailable, match=reason) as err:
        describe_source_database.fn(
            db_pair.pool, db_pair.target, db_pair.source, database, "dbuser", SecretStr(password)
        )
    assert PASSWORD not in str(err.value)


def _ps_snapshots(host, stop: threading.Event, seen: list[str]) -> None:
    while not stop.is_set():
        seen.append(host.exec(["ps", "-eo", "args"], check=False).stdout)
        time.sleep(0.05)


def test_copy_counts_match_the_snapshot_and_no_password_on_a_command_line(db_pair) -> None:
    side = "myproject_staging__reload"
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=_ps_snapshots, args=(db_pair.target_host, stop, seen))
    with disable_run_logger():
        facts = describe_source_database.fn(
            db_pair.pool,
            db_pair.target,
            db_pair.source,
            "myproject_production",
            "dbuser",
            SecretStr(PASSWORD),
        )
        tables = [t.qualified for t in facts.tables[:4]]
        create_database.fn(db_pair.pool, db_pair.target, side, "dbuser", dry_run=False)
        watcher.start()
        try:
            job = start_copy.fn(
                db_pair.pool,
                db_pair.target,
                db_pair.source,
                "myproject_production",
                "dbuser",
                SecretStr(PASSWORD),
                side,
                tables,
                dry_run=False,
            )
            result = wait_for_copy.fn(
                db_pair.pool, db_pair.target, job, facts.size_bytes, timeout=120
            )
        finally:
            stop.set()
            watcher.join()
        counts = count_rows.fn(db_pair.pool, db_pair.target, side, tables)
        assert counts == result.snapshot_counts
        assert result.snapshot_counts["public.auth_user"] == SCALE
        assert result.snapshot_counts["public.shop_order"] == int(SCALE * 2.5)
        server = describe_databases.fn(db_pair.pool, db_pair.target)
        assert server.get(side).owner == "dbuser"
        assert server.get(side).size_bytes > 1_000_000
        # tables restored as the app's role, so its migrations can alter them
        owners = db_pair.target_host.exec(
            ["runuser", "-u", "postgres", "--", "psql", "-AtX", "-d", side],
            input="SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public';",
        ).stdout.split()
        assert owners == ["dbuser"]
        stop_copy.fn(db_pair.pool, db_pair.target, side, dry_run=False)
        drop_database.fn(db_pair.pool, db_pair.target, side, dry_run=False)
    assert any("pg_dump" in snap for snap in seen), "the copy was never seen running"
    assert not any(PASSWORD in snap for snap in seen)
    assert not any("pr0d" in snap for snap in seen)
    # nothing left on the target: no job directory, no password file
    leftovers = db_pair.target_host.exec(
        [
            "sh",
            "-c",
            f"ls -d {job_dir(side)} 2>/dev/null; grep -rl pr0d /var/lib/postgresql /tmp 2>/dev/null",
        ],
        check=False,
    ).stdout
    assert leftovers.strip() == ""


def test_copy_failure_stops_at_the_first_error(db_pair) -> None:
    side = "myproject_staging__reload"
    with disable_run_logger():
        # the side database already holds a table the dump creates: pg_restore must stop there
        create_database.fn(db_pair.pool, db_pair.target, side, "dbuser", dry_run=False)
        db_pair.target_host.exec(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                "psql",
                "-AtX",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                side,
            ],
            input="CREATE TABLE public.auth_user (id int);",
        )
        job = start_copy.fn(
            db_pair.pool,
            db_pair.target,
            db_pair.source,
            "myproject_production",
            "dbuser",
            SecretStr(PASSWORD),
            side,
            ["public.auth_user"],
            dry_run=False,
        )
        with pytest.raises(CopyFailed, match="already exists"):
            wait_for_copy.fn(db_pair.pool, db_pair.target, job, 10_000_000, timeout=60)
        assert stop_copy.fn(db_pair.pool, db_pair.target, side, dry_run=False).changed
        assert not stop_copy.fn(db_pair.pool, db_pair.target, side, dry_run=False).changed
        drop_database.fn(db_pair.pool, db_pair.target, side, dry_run=False)


def test_read_database_password_file(db_pair) -> None:
    db_pair.source_host.exec(
        [
            "sh",
            "-c",
            "umask 077; cat > /home/deploy/database_password; chown deploy: /home/deploy/database_password",
        ],
        input=PASSWORD + "\n",
    )
    with disable_run_logger():
        secret = read_database_password.fn(
            db_pair.pool, db_pair.source, "/home/deploy/database_password"
        )
        assert secret.get_secret_value() == PASSWORD
        with pytest.raises(SourceUnavailable, match="cannot read"):
            read_database_password.fn(db_pair.pool, db_pair.source, "/home/deploy/nope")
