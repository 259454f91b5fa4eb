"""One maintenance at a time per environment.

Every flow that changes an environment wraps its apply phase (or the whole run after loading the
config) in the environment's lock::

    from fabflows import lock

    with lock.environment_lock(ctx.env, ctx.config) as held:
        ...                # held.check() between long steps raises LockLost if the lock was lost

A second run on the same ``deployment/environment`` waits (logging every 30 s who holds the lock:
flow, run, who started it, since when, host and pid) and fails with ``EnvironmentBusy`` after
``fabflows.lock.wait_timeout_minutes``.

Why not a Prefect global concurrency limit: its slots leak for good when the Prefect server
restarts (leases live in server memory), it must be created before use, and without ``strict=True``
it silently lets everyone in. The two backends here are released by the operating system or the
database the moment the holder dies, and a server restart does not touch them:

- ``file`` (default): ``flock`` on ``<state_dir>/locks/<deployment>-<environment>.lock``. The kernel
  drops the lock when the holder process exits in any way (SIGKILL included). Correct only while
  every worker runs on one machine.
- ``postgres``: ``pg_try_advisory_lock`` on a session of the lock database
  (``fabflows.lock.postgres_url`` or a Secret block). The server drops the lock when the session ends:
  at once when the holder process dies (its socket closes); after ``dead_session_seconds`` when the
  holder's machine vanishes (``idle_session_timeout`` with a 10 s heartbeat, plus TCP keepalives).
  A ``fabflows_lock_holders`` table says who holds it. Use this as soon as workers run on more than
  one machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig, FabulawsConfig
from config.models import LockSettings, default_state_dir, slug

WAIT_LOG_SECONDS = 30.0
"""A waiting run logs who holds the lock this often (and whenever the holder changes)."""

_log = logging.getLogger("fabflows.lock")


class EnvironmentBusy(RuntimeError):
    """The environment stayed locked by another run for longer than the wait timeout."""


class LockLost(RuntimeError):
    """The holder's lock was taken away (database session ended); stop changing the environment."""


class LockHolder(BaseModel):
    """Who holds an environment's lock."""

    model_config = ConfigDict(frozen=True)

    label: str = Field(description="deployment/environment")
    flow_name: str | None = None
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    started_by: str | None = None
    host: str
    pid: int
    since: datetime

    def describe(self) -> str:
        what = self.flow_name or "a process"
        if self.flow_run_name:
            what += f" run {self.flow_run_name!r} ({self.flow_run_id})"
        who = f" started by {self.started_by}" if self.started_by else ""
        return (
            f"{what}{who}, since {self.since.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
            f"on {self.host} pid {self.pid}"
        )


def current_holder(label: str) -> LockHolder:
    """Describe this process (and its flow run, if any) as a lock holder."""
    flow_name = run_id = run_name = started_by = None
    try:
        from fabflows import audit

        run = audit.current_flow_run() if "prefect.context" in sys.modules else None
        if run is not None:
            flow_name = audit.current_flow_name()
            run_id, run_name = str(run.id), run.name
            starter = audit.current_starter()
            started_by = starter.label if starter else None
    except Exception:  # noqa: BLE001 - a holder description must never stop the lock
        _log.debug("could not describe the flow run", exc_info=True)
    return LockHolder(
        label=label,
        flow_name=flow_name,
        flow_run_id=run_id,
        flow_run_name=run_name,
        started_by=started_by,
        host=socket.gethostname(),
        pid=os.getpid(),
        since=datetime.now(UTC),
    )


class Backend(Protocol):
    def try_acquire(self, holder: LockHolder) -> bool: ...
    def read_holder(self) -> LockHolder | None: ...
    def release(self) -> None: ...
    def lost(self) -> bool: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------- file backend


class FileBackend:
    """flock on a file under the state directory (one machine)."""

    def __init__(self, label: str, state_dir: str | os.PathLike[str]):
        directory = Path(state_dir).expanduser() / "locks"
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{slug(label)}.lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._held = False

    def try_acquire(self, holder: LockHolder) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._held = True
        data = holder.model_dump_json().encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        return True

    def read_holder(self) -> LockHolder | None:
        try:
            text = self.path.read_text()
            return LockHolder.model_validate_json(text) if text else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._held:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._held = False

    def lost(self) -> bool:
        return False

    def close(self) -> None:
        self.release()
        os.close(self._fd)


# --------------------------------------------------------------------------- postgres backend

_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS fabflows_lock_holders (
    lock_key bigint PRIMARY KEY,
    label text NOT NULL,
    holder jsonb NOT NULL,
    backend_pid integer NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
)
"""
_DDL_LOCK_KEY = 0x0FAB_F10E  # serialises the CREATE TABLE IF NOT EXISTS of concurrent first users


def lock_key(label: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``label``."""
    digest = hashlib.blake2b(f"fabflows:{label}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresBackend:
    """A session-level advisory lock, with a heartbeat and a holders table."""

    def __init__(self, label: str, url: str, dead_session_seconds: int = 60):
        import psycopg

        self.label = label
        self.key = lock_key(label)
        self.url = url
        self.dead_session_seconds = dead_session_seconds
        self._psycopg = psycopg
        self._conn = self._connect()
        self._mutex = threading.Lock()
        self._held = False
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        with self._mutex, self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK_KEY,))
            self._conn.execute(_TABLE_DDL)

    def _connect(self):  # noqa: ANN202 - psycopg.Connection
        conn = self._psycopg.connect(
            self.url,
            autocommit=True,
            application_name="fabflows-lock",
            connect_timeout=10,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            tcp_user_timeout=30000,
        )
        # the server ends a silent session (holder machine gone) and so releases its locks
        conn.execute(
            "SELECT set_config('idle_session_timeout', %s, false)",
            (f"{self.dead_session_seconds}s",),
        )
        return conn

    def try_acquire(self, holder: LockHolder) -> bool:
        with self._mutex:
            got = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]
            if not got:
                return False
            self._conn.execute(
                "INSERT INTO fabflows_lock_holders (lock_key, label, holder, backend_pid, acquired_at)"
                " VALUES (%s, %s, %s, pg_backend_pid(), now())"
                " ON CONFLICT (lock_key) DO UPDATE SET label = EXCLUDED.label,"
                " holder = EXCLUDED.holder, backend_pid = EXCLUDED.backend_pid,"
                " acquired_at = EXCLUDED.acquired_at",
                (self.key, self.label, holder.model_dump_json()),
            )
            self._held = True
        self._stop.clear()
        self._beat = threading.Thread(
            target=self._heartbeat, name=f"lock-heartbeat-{self.label}", daemon=True
        )
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        interval = min(10.0, self.dead_session_seconds / 4)
        while not self._stop.wait(interval):
            try:
                with self._mutex:
                    self._conn.execute("SELECT 1")
            except Exception:  # noqa: BLE001 - any failure means the session (and lock) may be gone
                _log.error(
                    "lock session of %s lost: the lock may be held by another run", self.label
                )
                self._lost.set()
                return

    def read_holder(self) -> LockHolder | None:
        with self._mutex:
            row = self._conn.execute(
                "SELECT h.holder FROM fabflows_lock_holders h"
                " JOIN pg_locks l ON l.pid = h.backend_pid AND l.locktype = 'advisory' AND l.granted"
                " WHERE h.lock_key = %s LIMIT 1",
                (self.key,),
            ).fetchone()
        if row is None:
            return None
        value = row[0]
        return LockHolder.model_validate(value if isinstance(value, dict) else json.loads(value))

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        if not self._held:
            return
        self._held = False
        try:
            with self._mutex:
                self._conn.execute(
                    "DELETE FROM fabflows_lock_holders WHERE lock_key = %s"
                    " AND backend_pid = pg_backend_pid()",
                    (self.key,),
                )
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        except Exception:  # noqa: BLE001 - closing the session releases the lock anyway
            _log.warning("unlock of %s failed; closing the session releases it", self.label)

    def lost(self) -> bool:
        return self._lost.is_set()

    def close(self) -> None:
        self.release()
        self._conn.close()


# --------------------------------------------------------------------------- the API


class HeldLock:
    """What ``environment_lock`` yields."""

    def __init__(self, label: str, backend: Backend, holder: LockHolder, waited: float):
        self.label = label
        self.holder = holder
        self.waited_seconds = waited
        self._backend = backend

    def check(self) -> None:
        """Raise LockLost if the lock is no longer held (postgres session ended)."""
        if self._backend.lost():
            raise LockLost(
                f"the lock on {self.label} was lost (lock database session ended); "
                "another run may now hold it: stop changing the environment"
            )


def _settings_of(config: FabulawsConfig | None) -> tuple[LockSettings, str]:
    if config is None:
        return LockSettings(), default_state_dir()
    return config.fabflows.lock, config.fabflows.state_dir


def make_backend(label: str, settings: LockSettings, state_dir: str) -> Backend:
    if settings.backend == "file":
        return FileBackend(label, state_dir)
    url = settings.postgres_url
    if settings.postgres_url_block:
        from prefect.blocks.system import Secret

        url = str(Secret.load(settings.postgres_url_block).get())
        from fabflows import logfilter

        logfilter.register_secret(url)
    assert url is not None  # LockSettings validates this
    return PostgresBackend(label, url, settings.dead_session_seconds)


def _in_flow_run() -> bool:
    """Cheap: a process that never imported prefect is not in a flow run (no 1 s import)."""
    if "prefect.context" not in sys.modules:
        return False
    from fabflows.report import in_flow_run

    return in_flow_run()


def _default_on_wait(label: str, holder: LockHolder | None, waited: float) -> None:
    text = holder.describe() if holder else "a run that has not said who it is yet"
    message = f"{label} is busy: held by {text}; waiting ({waited:.0f} s so far)"
    if _in_flow_run():
        from prefect.logging import get_run_logger

        get_run_logger().warning("%s", message)
    else:
        _log.warning("%s", message)


@contextmanager
def environment_lock(
    env: EnvironmentConfig | str,
    config: FabulawsConfig | None = None,
    *,
    timeout: float | None = None,
    poll: float | None = None,
    settings: LockSettings | None = None,
    state_dir: str | None = None,
    holder: LockHolder | None = None,
    on_wait: Callable[[str, LockHolder | None, float], None] | None = None,
) -> Iterator[HeldLock]:
    """Hold the lock of ``env`` (an EnvironmentConfig or a ``deployment/environment`` label).

    Args:
        env: The environment to lock.
        config: The loaded config (its ``fabflows.lock`` and ``state_dir``); None: defaults.
        timeout: Seconds to wait before EnvironmentBusy. Default: ``wait_timeout_minutes``.
        poll: Seconds between attempts. Default: ``poll_seconds``.
        settings, state_dir: Override the config's (tests, tools).
        holder: How this holder describes itself. Default: this process and its flow run.
        on_wait: Called with (label, holder or None, seconds waited) every 30 s while waiting and
            whenever the holder changes. Default: a warning in the run log.
    Raises:
        EnvironmentBusy: still held by someone else after ``timeout``.
    """
    label = env.label if isinstance(env, EnvironmentConfig) else env
    base_settings, base_dir = _settings_of(config)
    settings = settings or base_settings
    state_dir = state_dir or base_dir
    timeout = settings.wait_timeout_minutes * 60 if timeout is None else timeout
    poll = settings.poll_seconds if poll is None else poll
    on_wait = on_wait or _default_on_wait
    backend = make_backend(label, settings, state_dir)
    try:
        me = holder or current_holder(label)
        started = time.monotonic()
        last_told: float | None = None
        last_holder: str | None = None
        while not backend.try_acquire(me):
            waited = time.monotonic() - started
            other = backend.read_holder()
            key = other.model_dump_json() if other else None
            if last_told is None or waited - last_told >= WAIT_LOG_SECONDS or key != last_holder:
                on_wait(label, other, waited)
                last_told, last_holder = waited, key
            if waited >= timeout:
                raise EnvironmentBusy(
                    f"{label} is still locked after {waited:.0f} s by "
                    f"{other.describe() if other else 'an unknown holder'}"
                )
            time.sleep(poll)
        waited = time.monotonic() - started
        held = HeldLock(label, backend, me, waited)
        _announce(label, waited)
        try:
            yield held
        finally:
            backend.release()
    finally:
        backend.close()


def _announce(label: str, waited: float) -> None:
    if _in_flow_run():
        from prefect.logging import get_run_logger

        get_run_logger().info("holding the lock of %s (waited %.1f s)", label, waited)


def read_holder(
    env: EnvironmentConfig | str, config: FabulawsConfig | None = None
) -> LockHolder | None:
    """Who holds ``env``'s lock now (None: free). Used by chatops ``status``."""
    label = env.label if isinstance(env, EnvironmentConfig) else env
    settings, state_dir = _settings_of(config)
    backend = make_backend(label, settings, state_dir)
    try:
        if backend.try_acquire(_probe_holder(label)):
            backend.release()
            return None
        return backend.read_holder()
    finally:
        backend.close()


def _probe_holder(label: str) -> LockHolder:
    return LockHolder(
        label=label,
        flow_name="status probe",
        host=socket.gethostname(),
        pid=os.getpid(),
        since=datetime.now(UTC),
    )
