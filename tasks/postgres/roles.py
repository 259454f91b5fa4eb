"""The application's PostgreSQL role password, changed where it is checked: on the db-primary server.

FabulAWS never changed it when ``database_password`` was rotated (``change_db_user_password`` was
unused), so a rotation broke the site. Here the role's own session changes it:

- psycopg connects through an SSH tunnel (the one connection factory, host keys checked) to the
  db-primary's PostgreSQL, **as the application role**, with the password the servers use now;
- libpq computes the SCRAM-SHA-256 verifier of the new password on this side
  (``PQencryptPasswordConn``), and ``ALTER ROLE <role> WITH PASSWORD '<verifier>'`` is built with
  ``psycopg.sql``. The plain password never reaches the server, its logs or any command line, and a
  ``log_statement = 'ddl'`` server logs only the verifier;
- the new password is then checked by logging in with it.

Idempotent: a role that already accepts the new password is left alone (``changed=False``). The
compensation is the same task with the passwords swapped (:func:`alter_role_password` with
``current`` and ``new`` exchanged).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from psycopg import sql
from pydantic import Field, SecretStr

from tasks.plan import StepResult
from tasks.ssh.connection import SshOptions, connect

MASK = "********"


class RolePasswordError(RuntimeError):
    """The role's password could not be checked or changed (never shows a password)."""


class RolePasswordResult(StepResult):
    """What alter_role_password did (or would do)."""

    role: str = Field(description="The PostgreSQL role.")
    server: str = Field(description="The db-primary server's address.")
    statement: str = Field(description="The statement, with the password shown as ********.")


def alter_role_statement(role: str, verifier: str) -> sql.Composed:
    """``ALTER ROLE "<role>" WITH PASSWORD '<verifier>'`` (pure)."""
    return sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(verifier)
    )


def shown_statement(role: str) -> str:
    """The statement as plans and logs show it: the password masked."""
    return alter_role_statement(role, MASK).as_string()


def _pump(a: socket.socket, b) -> None:  # noqa: ANN001 - a paramiko Channel
    """Copy bytes both ways between a local socket and an SSH channel until either closes."""
    try:
        while True:
            ready, _, _ = select.select([a, b], [], [], 1.0)
            if a in ready:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
            if b in ready:
                data = b.recv(65536)
                if not data:
                    break
                a.sendall(data)
    except (OSError, EOFError):
        pass
    finally:
        try:
            b.close()
        except (OSError, EOFError):  # the SSH connection itself is gone: nothing to tell it
            pass
        a.close()


class _Forwarder:
    """The SSH side of :func:`tunnel`: opens a channel per local connection, and opens a new
    SSH connection when the old one died (a dropped connection costs one session, not the task)."""

    def __init__(self, host: str, opts: SshOptions, port: int):
        self.host, self.opts, self.port = host, opts, port
        self._lock = threading.Lock()
        self.conn = connect(host, opts)
        self.reconnects = 0

    def _transport(self):  # noqa: ANN202 - a paramiko Transport
        with self._lock:
            transport = self.conn.client.get_transport()
            if transport is None or not transport.is_active():
                self.conn.close()
                self.conn = connect(self.host, self.opts)
                self.reconnects += 1
                transport = self.conn.client.get_transport()
            return transport

    def open(self, peer: tuple[str, int]):  # noqa: ANN201 - a paramiko Channel
        for attempt in (1, 2):
            transport = self._transport()
            try:
                return transport.open_channel(
                    "direct-tcpip",
                    ("127.0.0.1", self.port),
                    peer,
                    timeout=self.opts.connect_timeout,
                )
            except Exception:  # the connection may have died just now: once more on a new one
                if attempt == 2 or transport.is_active():
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self.conn.close()


@contextmanager
def tunnel(host: str, opts: SshOptions, port: int) -> Iterator[int]:
    """A local port (127.0.0.1, bound before this yields) forwarded over SSH to the server's
    ``127.0.0.1:<port>``: PostgreSQL needs no address reachable from here."""
    forwarder = _Forwarder(host, opts, port)
    listener = socket.socket()
    stop = threading.Event()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)

        def accept() -> None:
            while not stop.is_set():
                try:
                    client, peer = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                try:
                    channel = forwarder.open(peer)
                except Exception:  # noqa: BLE001 - the client sees a closed connection
                    client.close()
                    continue
                threading.Thread(target=_pump, args=(client, channel), daemon=True).start()

        threading.Thread(target=accept, daemon=True, name=f"tunnel-{host}").start()
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        forwarder.close()


def login_as(port: int, role: str, database: str, password: SecretStr) -> psycopg.Connection | None:
    """A session as ``role`` with ``password``; None when the password is refused.

    A connection dropped before PostgreSQL answered (the SSH connection under the tunnel died) is
    tried twice more: the tunnel opens a new SSH connection, and a login only reads."""
    for attempt in range(1, 4):
        try:
            return psycopg.connect(
                host="127.0.0.1",
                port=port,
                user=role,
                dbname=database,
                password=password.get_secret_value(),
                connect_timeout=10,
                autocommit=True,
                application_name="fabflows",
            )
        except psycopg.OperationalError as exc:
            text = str(exc)
            if "password authentication failed" in text or "authentication failed" in text:
                return None
            if attempt < 3 and "closed the connection unexpectedly" in text:
                time.sleep(0.5 * attempt)
                continue
            raise RolePasswordError(
                f"cannot reach PostgreSQL as {role} on the db-primary: {' '.join(text.split())}"
            ) from None
    raise AssertionError("unreachable")


@task(
    name="alter-role-password",
    task_run_name="alter-role-password-{role}",
    retries=0,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def alter_role_password(
    opts: SshOptions,
    server: str,
    role: str,
    database: str,
    current: SecretStr,
    new: SecretStr,
    *,
    port: int = 5432,
    dry_run: bool,
) -> RolePasswordResult:
    """Make ``role`` accept ``new`` instead of ``current`` (read in dry run too, changed only if not).

    Args:
        opts: SSH options (the tunnel to the db-primary).
        server: The db-primary's address.
        role: The application's role (config ``database_user``).
        database: A database the role may connect to.
        current: The password the role accepts now (the servers' ``database_password``).
        new: The password it must accept.
        port: PostgreSQL's port on the server.
        dry_run: Only check which password works.
    Raises:
        RolePasswordError: neither password is accepted, or the check after the change failed.
    """
    logger = get_run_logger()
    shown = shown_statement(role)
    with tunnel(server, opts, port) as local:
        session = login_as(local, role, database, new)
        if session is not None:
            session.close()
            summary = f"{role} on {server} already accepts the new password"
            logger.info("%s", summary)
            return RolePasswordResult(
                changed=False,
                dry_run=dry_run,
                summary=summary,
                role=role,
                server=server,
                statement=shown,
            )
        session = login_as(local, role, database, current)
        if session is None:
            raise RolePasswordError(
                f"PostgreSQL on {server} refuses {role} with both the current and the new "
                "password: the servers' database_password does not match the database"
            )
        with session:
            if dry_run:
                summary = f"Would run on {server}: {shown}"
                logger.info("%s", summary)
                return RolePasswordResult(
                    changed=True,
                    dry_run=True,
                    summary=summary,
                    role=role,
                    server=server,
                    statement=shown,
                )
            verifier = session.pgconn.encrypt_password(
                new.get_secret_value().encode(), role.encode(), b"scram-sha-256"
            ).decode()
            # back to the login itself: rotate-credentials' alternate login acts as its group
            # (ALTER ROLE ... SET role, which RESET ROLE would restore), and a role may change
            # only its own password
            session.execute("SET ROLE NONE")
            session.execute(alter_role_statement(role, verifier))
        check = login_as(local, role, database, new)
        if check is None:
            raise RolePasswordError(
                f"{role} on {server}: ALTER ROLE ran but the new password is refused"
            )
        check.close()
    summary = f"Ran on {server}: {shown}; {role} logs in with the new password"
    logger.info("%s", summary)
    return RolePasswordResult(
        changed=True, dry_run=False, summary=summary, role=role, server=server, statement=shown
    )
