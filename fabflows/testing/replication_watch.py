"""Watching streaming replication from the primary while a flow runs (tests and benches).

:class:`ReplicationWatch` polls the primary's ``pg_stat_replication`` every 100 ms in a thread
(``psql`` as ``postgres`` inside the test host) and keeps, per replica, the longest time it was
not streaming, the largest replay lag in bytes, and which logins served the replicas.
"""

from __future__ import annotations

import threading
import time

from sandbox.testhosts import TestHost

QUERY = (
    "SELECT host(client_addr), usename, "
    "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint "
    "FROM pg_stat_replication WHERE state = 'streaming'"
)


def psql(host: TestHost, query: str) -> str:
    """One query as the postgres superuser in ``host``; unaligned output."""
    return host.exec(
        ["runuser", "-u", "postgres", "--", "psql", "-XAtq", "-d", "postgres", "-c", query]
    ).stdout.strip()


class ReplicationWatch:
    """Context manager: samples the primary's replication every ``interval`` seconds."""

    def __init__(self, primary: TestHost, replicas: list[str], interval: float = 0.1):
        self.primary = primary
        self.replicas = list(replicas)
        self.interval = interval
        self.longest_gap = dict.fromkeys(self.replicas, 0.0)
        self.max_lag = 0
        self.samples = 0
        self.logins: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="replication-watch")

    @property
    def worst_gap(self) -> float:
        """The longest any replica was not streaming (seconds; inf: still down at the end)."""
        return max(self.longest_gap.values(), default=0.0)

    def _run(self) -> None:
        down_since: dict[str, float] = {}
        while not self._stop.is_set():
            out = psql(self.primary, QUERY)
            now = time.monotonic()
            seen = {}
            for line in out.splitlines():
                address, login, lag = line.split("|")
                seen[address] = login
                self.max_lag = max(self.max_lag, int(lag))
            self.logins |= set(seen.values())
            for r in self.replicas:
                if r in seen:
                    if r in down_since:
                        self.longest_gap[r] = max(self.longest_gap[r], now - down_since.pop(r))
                else:
                    down_since.setdefault(r, now)
            self.samples += 1
            self._stop.wait(self.interval)
        for r in down_since:  # still down at the end
            self.longest_gap[r] = float("inf")

    def __enter__(self) -> ReplicationWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
