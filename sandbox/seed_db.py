"""A small Django-like database on a sandbox database host (tables with indexes, realistic rows)."""

from __future__ import annotations

from psycopg import sql

from sandbox.replication import wait_for_postgres
from sandbox.testhosts import TestHost

SCHEMA = """
CREATE TABLE IF NOT EXISTS auth_user (
    id bigserial PRIMARY KEY, username varchar(150) NOT NULL UNIQUE, email varchar(254) NOT NULL,
    first_name varchar(150) NOT NULL, last_name varchar(150) NOT NULL, password varchar(128) NOT NULL,
    is_staff boolean NOT NULL, is_active boolean NOT NULL, date_joined timestamptz NOT NULL,
    last_login timestamptz);
CREATE INDEX IF NOT EXISTS auth_user_email_idx ON auth_user (email);
CREATE TABLE IF NOT EXISTS shop_order (
    id bigserial PRIMARY KEY, user_id bigint NOT NULL REFERENCES auth_user (id),
    status varchar(20) NOT NULL, total_cents integer NOT NULL, created timestamptz NOT NULL,
    note text NOT NULL);
CREATE INDEX IF NOT EXISTS shop_order_user_idx ON shop_order (user_id);
CREATE INDEX IF NOT EXISTS shop_order_created_idx ON shop_order (created);
CREATE TABLE IF NOT EXISTS audit_event (
    id bigserial PRIMARY KEY, user_id bigint REFERENCES auth_user (id), kind varchar(40) NOT NULL,
    payload jsonb NOT NULL, created timestamptz NOT NULL);
CREATE INDEX IF NOT EXISTS audit_event_kind_created_idx ON audit_event (kind, created);
CREATE TABLE IF NOT EXISTS django_session (
    session_key varchar(40) PRIMARY KEY, session_data text NOT NULL, expire_date timestamptz NOT NULL);
CREATE INDEX IF NOT EXISTS django_session_expire_idx ON django_session (expire_date);
CREATE TABLE IF NOT EXISTS django_migrations (
    id serial PRIMARY KEY, app varchar(255) NOT NULL, name varchar(255) NOT NULL,
    applied timestamptz NOT NULL);
"""

DATA = """
INSERT INTO auth_user (username, email, first_name, last_name, password, is_staff, is_active,
                       date_joined, last_login)
SELECT 'user' || g, 'user' || g || '@example.com', 'First' || g, 'Last' || g,
       'pbkdf2_sha256$600000$' || md5(g::text), g % 50 = 0, g % 13 <> 0,
       now() - (g || ' minutes')::interval, now() - (g % 1000 || ' minutes')::interval
FROM generate_series(1, {users}) g;
INSERT INTO shop_order (user_id, status, total_cents, created, note)
SELECT 1 + (g % {users}), (ARRAY['new','paid','shipped','refunded'])[1 + g % 4], (g * 37) % 100000,
       now() - (g || ' seconds')::interval, repeat(md5(g::text), 2)
FROM generate_series(1, {orders}) g;
INSERT INTO audit_event (user_id, kind, payload, created)
SELECT 1 + (g % {users}), (ARRAY['login','logout','order','profile'])[1 + g % 4],
       jsonb_build_object('ip', '10.0.' || (g % 255) || '.' || (g % 200), 'ua', md5(g::text)),
       now() - (g || ' seconds')::interval
FROM generate_series(1, {users}) g;
INSERT INTO django_session (session_key, session_data, expire_date)
SELECT md5(g::text), repeat(md5((g * 7)::text), 4), now() + (g || ' minutes')::interval
FROM generate_series(1, {sessions}) g;
INSERT INTO django_migrations (app, name, applied)
VALUES ('auth', '0001_initial', now()), ('shop', '0001_initial', now());
"""


USERS_PER_MB = 900
"""About 1.1 KB of database (tables and indexes) per user at the default mix: 600k users made a
668 MB database (measured on the 2-core machine)."""


def scale_for_megabytes(megabytes: float) -> int:
    """The ``scale`` (users) for a database of about ``megabytes`` MB."""
    return max(10, int(megabytes * USERS_PER_MB))


def sandbox_db_scale() -> int:
    """The sandbox's database size: ``$FABFLOWS_SANDBOX_DB_MB`` (about that many MB, up to ~1 GB
    and more), else ``$FABFLOWS_SANDBOX_DB_SCALE`` users (default 2000, about 2 MB)."""
    import os

    if os.environ.get("FABFLOWS_SANDBOX_DB_MB"):
        return scale_for_megabytes(float(os.environ["FABFLOWS_SANDBOX_DB_MB"]))
    return int(os.environ.get("FABFLOWS_SANDBOX_DB_SCALE", "2000"))


def seed_timeout(scale: int) -> float:
    """Seconds the seeding ``psql`` may take for ``scale`` users: 2 minutes plus 1 s per thousand
    users. Measured on the 2-core test machine: 90,000 users (115 MB) in 18 s, 900,000 users
    (1,085 MB) in about 95 s; 1 GB may take 17 minutes, a margin for a loaded machine. A fixed 60 s
    killed the 1 GB seed of the reload benchmark."""
    return 120.0 + max(0, scale) / 1000


def psql(host: TestHost, script: str, database: str = "postgres", timeout: float = 60) -> str:
    """Run SQL as the postgres superuser inside the host (SQL on stdin, never on a command line)."""
    proc = host.exec(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-qAtX",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            database,
        ],
        input=script,
        timeout=timeout,
    )
    return proc.stdout


def seed_database(
    host: TestHost, database: str, owner: str, password: str, scale: int = 2000
) -> None:
    """Create ``owner`` (with ``password``) and ``database`` with Django-like tables, if missing.

    ``scale`` is the number of users; orders are 2.5x that, sessions a third.
    """
    wait_for_postgres(host)
    query = sql.SQL("SELECT 1 FROM pg_database WHERE datname = {};").format(database)
    exists = psql(host, query.as_string(None)).strip()
    if exists:
        return
    role = sql.Identifier(owner).as_string(None)
    quoted_password = sql.Literal(password).as_string(None)
    psql(
        host,
        f"DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;\n"
        f"ALTER ROLE {role} PASSWORD {quoted_password};\n"
        f"CREATE DATABASE {sql.Identifier(database).as_string(None)} OWNER {role} ENCODING 'UTF8';\n",
    )
    psql(
        host,
        f"SET ROLE {role};\n"
        + SCHEMA
        + DATA.format(users=scale, orders=int(scale * 2.5), sessions=max(1, scale // 3))
        + "ANALYZE;\n",
        database=database,
        timeout=seed_timeout(scale),
    )
