"""Swap by rename on a real server: dry → apply → dry, the compensation, markers, connections."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from prefect.logging import disable_run_logger

from tasks.postgres.databases import (
    allow_connections,
    count_rows,
    create_database,
    describe_databases,
    drop_database,
    mark_database,
    swap_back_databases,
    swap_databases,
)
from tasks.postgres.names import Marker, now_text, previous_name, side_name

pytestmark = pytest.mark.hosts


def _psql(host, database: str, sql_text: str) -> str:
    return host.exec(
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
            database,
        ],
        input=sql_text,
    ).stdout.strip()


def _marker(state: str, **kw) -> Marker:
    return Marker(run="r1", live="appdb", state=state, since=now_text(), **kw)


def test_create_swap_and_swap_back(db_pair) -> None:
    pool, server, host = db_pair.pool, db_pair.target, db_pair.target_host
    live, side = "appdb", side_name("appdb")
    previous = previous_name(live, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    with disable_run_logger():
        # the live database, with an app session connected to it
        create_database.fn(pool, server, live, "dbuser", dry_run=False)
        _psql(host, live, "SET ROLE dbuser; CREATE TABLE t (v int); INSERT INTO t VALUES (1);")
        dry = create_database.fn(pool, server, side, "dbuser", _marker("side"), dry_run=True)
        assert dry.changed and dry.dry_run and "CREATE DATABASE" in dry.statements[0]
        assert side not in describe_databases.fn(pool, server).names
        create_database.fn(pool, server, side, "dbuser", _marker("side"), dry_run=False)
        _psql(host, side, "SET ROLE dbuser; CREATE TABLE t (v int); INSERT INTO t VALUES (2), (3);")
        facts = describe_databases.fn(pool, server)
        assert facts.get(side).marker.state == "side"
        assert facts.free_bytes > 0
        with pytest.raises(RuntimeError, match="already exists"):
            create_database.fn(pool, server, side, "dbuser", dry_run=False)

        host.exec(
            [
                "sh",
                "-c",
                f"runuser -u postgres -- psql -d {live} -c 'SELECT pg_sleep(60)' >/dev/null 2>&1 &",
            ]
        )
        time.sleep(0.3)
        assert (
            _psql(
                host,
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid();",
            )
            == "1"
        )
        swapped_marker = _marker("swapped", previous=previous)
        dry = swap_databases.fn(
            pool, server, live, side, previous, swapped_marker, _marker("previous"), dry_run=True
        )
        assert dry.changed and not dry.swapped
        assert any("RENAME" in s for s in dry.statements)
        result = swap_databases.fn(
            pool, server, live, side, previous, swapped_marker, _marker("previous"), dry_run=False
        )
        assert result.swapped and result.seconds < 6
        facts = describe_databases.fn(pool, server)
        assert side not in facts.names
        assert facts.get(live).allow_connections
        assert facts.get(live).marker.state == "swapped"
        assert facts.get(previous).marker.state == "previous"
        assert count_rows.fn(pool, server, live, ["public.t"]) == {"public.t": 2}
        assert count_rows.fn(pool, server, previous, ["public.t"]) == {"public.t": 1}
        # the app's session was ended (a rename waits for no one)
        assert (
            _psql(
                host,
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid();",
            )
            == "0"
        )
        with pytest.raises(RuntimeError, match="does not exist"):
            swap_databases.fn(
                pool,
                server,
                live,
                side,
                previous,
                swapped_marker,
                _marker("previous"),
                dry_run=False,
            )

        # the compensation: the old database is live again, the new one gone
        dry = swap_back_databases.fn(pool, server, live, previous, dry_run=True)
        assert dry.changed and previous in describe_databases.fn(pool, server).names
        swap_back_databases.fn(pool, server, live, previous, dry_run=False)
        facts = describe_databases.fn(pool, server)
        assert previous not in facts.names
        assert facts.get(live).allow_connections and facts.get(live).marker is None
        assert not [n for n in facts.names if n.startswith("appdb__failed")]
        assert count_rows.fn(pool, server, live, ["public.t"]) == {"public.t": 1}
        assert not swap_back_databases.fn(pool, server, live, previous, dry_run=False).changed

        # markers and connections
        mark_database.fn(pool, server, live, _marker("migrated"), dry_run=False)
        assert describe_databases.fn(pool, server).get(live).marker.state == "migrated"
        mark_database.fn(pool, server, live, None, dry_run=False)
        assert describe_databases.fn(pool, server).get(live).marker is None
        assert allow_connections.fn(pool, server, live, False, dry_run=False).changed
        assert not allow_connections.fn(pool, server, live, False, dry_run=False).changed
        assert allow_connections.fn(pool, server, live, True, dry_run=False).changed

        assert drop_database.fn(pool, server, live, dry_run=True).changed
        assert drop_database.fn(pool, server, live, dry_run=False).changed
        assert not drop_database.fn(pool, server, live, dry_run=False).changed
