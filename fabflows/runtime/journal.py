"""The run journal: what every applying run did, step by step, kept outside the worker.

Before and after each step the engine appends an event to the journal of the run. The journal
lives where the environment's lock lives, so it outlives the worker and the Prefect server and is
readable from any machine that can take the lock:

- ``file`` backend: ``<state_dir>/journal/<deployment>-<environment>/<run>.jsonl``, one JSON event a
  line, each write flushed and fsynced before the step goes on;
- ``postgres`` backend: rows of the ``fabflows_journal`` table in the lock database.

Events (``kind``): ``open`` (flow, environment, parameters without secrets, plan and its digest),
``step`` (a step's state: started, data, done, failed, undone, skipped), ``close`` (the run's end
state: done, failed, undone, refused). ``JournalEntry`` folds them into what ``recover`` and
``resume`` read: which steps were applied and not undone, and the data their undo needs.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from config import FabulawsConfig
from config.models import LockSettings, default_state_dir, slug

StepState = Literal["started", "done", "failed", "undone", "skipped"]
RunState = Literal["running", "done", "failed", "undone", "recovered"]


def _now() -> datetime:
    return datetime.now(UTC)


class StepRecord(BaseModel):
    """One step of a journaled run, as far as the journal knows."""

    model_config = ConfigDict(extra="forbid")

    name: str
    state: StepState
    data: dict[str, Any] = Field(default_factory=dict, description="What the step's undo needs.")
    site_down: bool = False
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = None

    @property
    def applied(self) -> bool:
        """Started or done and not undone: something of it may be in place."""
        return self.state in ("started", "done", "failed")

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return round((self.ended_at - self.started_at).total_seconds(), 2)


class JournalEntry(BaseModel):
    """A run as its journal tells it."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    flow: str
    environment: str = Field(description="deployment/environment")
    params: dict[str, Any] = Field(default_factory=dict)
    plan: dict[str, Any] = Field(default_factory=dict)
    plan_digest: str = ""
    resumes: str | None = Field(default=None, description="The run this one resumes, if any.")
    state: RunState = "running"
    host: str = ""
    pid: int = 0
    opened_at: datetime | None = None
    closed_at: datetime | None = None
    message: str | None = None
    steps: list[StepRecord] = Field(default_factory=list)

    def step(self, name: str) -> StepRecord | None:
        return next((s for s in self.steps if s.name == name), None)

    @property
    def open(self) -> bool:
        """Not closed as done/undone/recovered: something may be left to undo or finish."""
        return self.state in ("running", "failed")

    @property
    def applied(self) -> list[StepRecord]:
        """Steps whose effect may be in place, in the order they were started."""
        return [s for s in self.steps if s.applied]

    @property
    def done_steps(self) -> set[str]:
        return {s.name for s in self.steps if s.state in ("done", "skipped")}

    @property
    def needs_attention(self) -> bool:
        return self.open and bool(self.applied)

    def describe(self) -> str:
        applied = ", ".join(f"{s.name} ({s.state})" for s in self.applied) or "nothing applied"
        return f"{self.flow} run {self.run_id} on {self.environment} [{self.state}]: {applied}"


def fold(events: Iterable[dict[str, Any]]) -> JournalEntry | None:
    """Fold a run's events, oldest first, into its entry (None without an ``open`` event)."""
    entry: JournalEntry | None = None
    for ev in events:
        kind = ev.get("kind")
        at = datetime.fromisoformat(ev["at"]) if ev.get("at") else None
        if kind == "open":
            entry = JournalEntry(
                run_id=ev["run_id"],
                flow=ev["flow"],
                environment=ev["environment"],
                params=ev.get("params") or {},
                plan=ev.get("plan") or {},
                plan_digest=ev.get("plan_digest") or "",
                resumes=ev.get("resumes"),
                host=ev.get("host", ""),
                pid=ev.get("pid", 0),
                opened_at=at,
            )
            continue
        if entry is None:
            continue
        if kind == "step":
            rec = entry.step(ev["name"])
            if rec is None:
                rec = StepRecord(name=ev["name"], state=ev["state"])
                entry.steps.append(rec)
            state = ev["state"]
            if state == "data":
                rec.data.update(ev.get("data") or {})
                continue
            if state == "started" and rec.state in ("done", "skipped"):
                continue  # a resumed run re-announcing a done step changes nothing
            rec.state = state
            rec.data.update(ev.get("data") or {})
            rec.site_down = bool(ev.get("site_down", rec.site_down))
            if state == "started":
                rec.started_at, rec.ended_at, rec.error = at, None, None
            else:
                rec.ended_at = at
            if ev.get("error"):
                rec.error = ev["error"]
        elif kind == "close":
            entry.state = ev["state"]
            entry.closed_at = at
            entry.message = ev.get("message")
        elif kind == "reopen":
            entry.state = "running"
            entry.closed_at = None
            entry.host, entry.pid = ev.get("host", entry.host), ev.get("pid", entry.pid)
    return entry


class JournalBackend(Protocol):
    def append(self, run_id: str, event: dict[str, Any]) -> None: ...
    def events(self, run_id: str) -> list[dict[str, Any]]: ...
    def run_ids(self) -> list[str]: ...


class FileJournal:
    """Append-only JSON lines under the state directory, fsynced event by event."""

    def __init__(self, label: str, state_dir: str | os.PathLike[str]):
        self.directory = Path(state_dir).expanduser() / "journal" / slug(label)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, run_id: str) -> Path:
        return self.directory / f"{slug(run_id)}.jsonl"

    def append(self, run_id: str, event: dict[str, Any]) -> None:
        line = (json.dumps(event, default=str, separators=(",", ":")) + "\n").encode()
        fd = os.open(self._path(run_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def events(self, run_id: str) -> list[dict[str, Any]]:
        path = self._path(run_id)
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash mid-write: the events before it stand
        return out

    def run_ids(self) -> list[str]:
        paths = sorted(self.directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
        return [p.stem for p in paths]


_DDL = """
CREATE TABLE IF NOT EXISTS fabflows_journal (
    seq bigserial PRIMARY KEY,
    label text NOT NULL,
    run_id text NOT NULL,
    event jsonb NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fabflows_journal_run ON fabflows_journal (label, run_id, seq)
"""


class PostgresJournal:
    """Rows of ``fabflows_journal`` in the lock database (every machine sees the same journal)."""

    def __init__(self, label: str, url: str):
        self.label = label
        self.url = url
        with self._connect() as conn:
            # concurrent first users: serialise the CREATE on an advisory transaction lock
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x0FAB_10C,))
            for statement in _DDL.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def _connect(self):  # noqa: ANN202 - psycopg.Connection
        import psycopg

        return psycopg.connect(self.url, autocommit=False, connect_timeout=10)

    def append(self, run_id: str, event: dict[str, Any]) -> None:
        from psycopg.types.json import Jsonb

        with self._connect() as conn:
            conn.execute(
                "INSERT INTO fabflows_journal (label, run_id, event) VALUES (%s, %s, %s)",
                (self.label, run_id, Jsonb(json.loads(json.dumps(event, default=str)))),
            )

    def events(self, run_id: str) -> list[dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT event FROM fabflows_journal WHERE label = %s AND run_id = %s ORDER BY seq",
                (self.label, run_id),
            ).fetchall()
        return [r[0] for r in rows]

    def run_ids(self) -> list[str]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT run_id FROM fabflows_journal WHERE label = %s "
                "GROUP BY run_id ORDER BY min(seq)",
                (self.label,),
            ).fetchall()
        return [r[0] for r in rows]


def make_journal_backend(
    label: str, settings: LockSettings, state_dir: str
) -> FileJournal | PostgresJournal:
    """The journal beside the lock: same backend, same place."""
    if settings.backend == "file":
        return FileJournal(label, state_dir)
    url = settings.postgres_url
    if settings.postgres_url_block:
        from prefect.blocks.system import Secret

        from fabflows import logfilter

        url = str(Secret.load(settings.postgres_url_block).get())
        logfilter.register_secret(url)
    assert url is not None  # LockSettings validates this
    return PostgresJournal(label, url)


class Journal:
    """The journal of one environment: write a run's events, read any run's entry."""

    def __init__(self, label: str, backend: JournalBackend):
        self.label = label
        self.backend = backend

    @classmethod
    def for_environment(cls, label: str, config: FabulawsConfig | None) -> Journal:
        settings = config.fabflows.lock if config else LockSettings()
        state_dir = config.fabflows.state_dir if config else default_state_dir()
        return cls(label, make_journal_backend(label, settings, state_dir))

    # ---------------------------------------------------------------- writing

    def _append(self, run: str, kind: str, **fields: Any) -> None:
        self.backend.append(run, {"kind": kind, "at": _now().isoformat(), **fields})

    def open_run(
        self,
        run_id: str,
        flow: str,
        *,
        params: dict[str, Any],
        plan: dict[str, Any],
        plan_digest: str,
        resumes: str | None = None,
    ) -> None:
        self._append(
            run_id,
            "open",
            run_id=run_id,
            flow=flow,
            environment=self.label,
            params=params,
            plan=plan,
            plan_digest=plan_digest,
            resumes=resumes,
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    def reopen(self, run_id: str) -> None:
        """A run retried under the same id (Prefect's Retry) goes on with its own journal."""
        self._append(run_id, "reopen", host=socket.gethostname(), pid=os.getpid())

    def step(
        self,
        run_id: str,
        name: str,
        state: StepState | Literal["data"],
        *,
        data: dict[str, Any] | None = None,
        error: str | None = None,
        site_down: bool = False,
    ) -> None:
        fields: dict[str, Any] = {"name": name, "state": state}
        if data:
            fields["data"] = data
        if error:
            fields["error"] = error[:2000]
        if site_down:
            fields["site_down"] = True
        self._append(run_id, "step", **fields)

    def close(self, run_id: str, state: RunState, message: str | None = None) -> None:
        self._append(run_id, "close", state=state, message=(message or "")[:2000] or None)

    # ---------------------------------------------------------------- reading

    def entry(self, run_id: str) -> JournalEntry | None:
        return fold(self.backend.events(run_id))

    def entries(self) -> list[JournalEntry]:
        out = []
        for run_id in self.backend.run_ids():
            entry = self.entry(run_id)
            if entry is not None:
                out.append(entry)
        return out

    def open_entries(self, exclude: str | None = None) -> list[JournalEntry]:
        """Runs that applied something and never closed it (newest last)."""
        return [e for e in self.entries() if e.needs_attention and e.run_id != exclude]
