"""Masking a copied database before it goes live: operators' SQL, then operators' checks.

The statements come from config (``fabflows.reload_production_db.masking.statements``), e.g.
``UPDATE auth_user SET email = 'user' || id || '@example.invalid'``. They are trusted operator
input (like a migration), run as the database owner's role in **one transaction** on the side
database, so a failing statement leaves nothing half-masked. Each check is a query returning one
number, the rows still unmasked; every check must return 0.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field

from tasks.plan import StepResult
from tasks.postgres.server import DbServer, psql_error, read_sql, remote_for, render, write_sql
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.remote import CommandError


class MaskingFailed(RuntimeError):
    """A masking statement failed, or a check found rows left unmasked."""


def masking_script(statements: list[str], role: str) -> list[str]:
    return [
        "BEGIN",
        render(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role))),
        *[s.strip().rstrip(";") for s in statements],
        "COMMIT",
    ]


@task(
    name="mask-database",
    task_run_name="mask-database-{database}",
    cache_policy=NO_CACHE,
    retries=0,
    tags=["non-idempotent"],
)
def mask_database(
    pool: ConnectionPool,
    server: DbServer,
    database: str,
    statements: list[str],
    role: str,
    *,
    dry_run: bool,
    timeout: float = 3600,
) -> StepResult:
    """Run the masking ``statements`` in one transaction on ``database`` as ``role``.

    No compensation is needed: the side database is not live, and a failure rolls the transaction
    back (the run then drops the side database).

    Raises:
        MaskingFailed: a statement failed; the message has PostgreSQL's error.
    """
    if not statements:
        return StepResult(changed=False, dry_run=dry_run, summary="no masking configured")
    remote = remote_for(pool, server, dry_run=dry_run)
    try:
        write_sql(remote, masking_script(statements, role), database=database, timeout=timeout)
    except CommandError as exc:
        detail = psql_error(exc.stderr) or str(exc)
        raise MaskingFailed(f"masking {database} failed (nothing was changed): {detail}") from None
    verb = "Would run" if dry_run else "Ran"
    summary = f"{verb} {len(statements)} masking statement(s) on {database}"
    get_run_logger().info("%s", summary)
    return StepResult(changed=True, dry_run=dry_run, summary=summary)


class MaskingCheck(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    query: str
    unmasked: int = Field(description="What the check returned; 0 means masked.")

    @property
    def ok(self) -> bool:
        return self.unmasked == 0


@task(
    name="check-masking",
    task_run_name="check-masking-{database}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=2,
)
def check_masking(
    pool: ConnectionPool, server: DbServer, database: str, checks: list[str]
) -> list[MaskingCheck]:
    """Run each check query on ``database``; each must return one number, and it must be 0.

    Raises:
        MaskingFailed: a check returned more than 0, or did not return one number.
    """
    remote = remote_for(pool, server)
    results = []
    for query in checks:
        try:
            out = read_sql(remote, [query.strip().rstrip(";")], database=database).strip()
        except CommandError as exc:
            detail = psql_error(exc.stderr) or str(exc)
            raise MaskingFailed(f"masking check {query!r} failed: {detail}") from None
        if not out.lstrip("-").isdigit():
            raise MaskingFailed(
                f"masking check {query!r} must return one number, got {out[:100]!r}"
            )
        results.append(MaskingCheck(query=query, unmasked=int(out)))
    bad = [c for c in results if not c.ok]
    for c in results:
        get_run_logger().info("masking check %r: %d unmasked", c.query, c.unmasked)
    if bad:
        raise MaskingFailed(
            "masking left rows unmasked: "
            + "; ".join(f"{c.query!r} returned {c.unmasked}" for c in bad)
        )
    return results
