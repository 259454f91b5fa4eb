"""A throwaway PostgreSQL 15 cluster on a free loopback port (initdb + start ~1.5 s).

Run as root: the server tools run as the ``postgres`` user (``runuser``), clients connect over TCP
as ``postgres`` with trust auth. Used by the lock and scale-out tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(os.environ.get("FABFLOWS_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self, base: Path | None = None, port: int | None = None):
        self.base = Path(base or tempfile.mkdtemp(prefix="fabflows-pg-"))
        self.port = port or free_port()
        self.data = self.base / "data"
        self.log = self.base / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def _as_postgres(self, *argv: str) -> None:
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} failed: {result.stderr.strip() or result.stdout.strip()}"
            )

    def start(self) -> PgCluster:
        if not (BIN / "initdb").exists():
            raise RuntimeError(
                f"PostgreSQL binaries not found in {BIN} (apt-get install postgresql-15)"
            )
        (self.base / "sock").mkdir(parents=True, exist_ok=True)
        shutil.chown(self.base, "postgres", "postgres")
        shutil.chown(self.base / "sock", "postgres", "postgres")
        if not self.data.exists():
            self._as_postgres(
                str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                "-E", "UTF8", "--locale=C.UTF-8",
            )  # fmt: skip
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(
                    f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.base / 'sock'}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 200\n"
                )
        self._as_postgres(
            str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start"
        )
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster for the whole test run (fails, never skips, if it cannot start)."""
    cluster = PgCluster()
    try:
        cluster.start()
    except Exception as exc:
        cluster.destroy()
        pytest.fail(f"cannot start a PostgreSQL cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.destroy()
