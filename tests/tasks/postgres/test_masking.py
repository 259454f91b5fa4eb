"""Masking SQL from config on a real database: one transaction, then the checks."""

from __future__ import annotations

import pytest
from prefect.logging import disable_run_logger

from tasks.postgres.databases import create_database, drop_database
from tasks.postgres.masking import MaskingFailed, check_masking, mask_database

pytestmark = pytest.mark.hosts

STATEMENTS = ["UPDATE people SET email = 'user' || id || '@example.invalid'"]
CHECKS = ["SELECT count(*) FROM people WHERE email NOT LIKE '%@example.invalid'"]


def test_masking_runs_in_one_transaction_and_is_checked(db_pair) -> None:
    pool, server, host = db_pair.pool, db_pair.target, db_pair.target_host
    with disable_run_logger():
        create_database.fn(pool, server, "maskdb", "dbuser", dry_run=False)
        try:
            host.exec(
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
                    "maskdb",
                ],
                input="SET ROLE dbuser; CREATE TABLE people (id int, email text);"
                "INSERT INTO people SELECT g, 'p' || g || '@real.example.com' FROM generate_series(1, 50) g;",
            )
            with pytest.raises(MaskingFailed, match="50"):
                check_masking.fn(pool, server, "maskdb", CHECKS)
            assert mask_database.fn(
                pool, server, "maskdb", STATEMENTS, "dbuser", dry_run=True
            ).changed
            with pytest.raises(MaskingFailed, match="50"):
                check_masking.fn(pool, server, "maskdb", CHECKS)
            # a failing statement after a good one: the transaction rolls both back
            with pytest.raises(MaskingFailed, match='relation "nope" does not exist'):
                mask_database.fn(
                    pool,
                    server,
                    "maskdb",
                    [*STATEMENTS, "UPDATE nope SET x = 1"],
                    "dbuser",
                    dry_run=False,
                )
            with pytest.raises(MaskingFailed, match="50"):
                check_masking.fn(pool, server, "maskdb", CHECKS)
            mask_database.fn(pool, server, "maskdb", STATEMENTS, "dbuser", dry_run=False)
            assert [c.unmasked for c in check_masking.fn(pool, server, "maskdb", CHECKS)] == [0]
            with pytest.raises(MaskingFailed, match="one number"):
                check_masking.fn(pool, server, "maskdb", ["SELECT 'x'"])
        finally:
            drop_database.fn(pool, server, "maskdb", dry_run=False)
