"""What recover and resume read: runs whose journal is open and whose holder is dead.

A run holds its environment's lock for as long as it applies steps, so a journal left open by a
run that no longer holds the lock belongs to a dead run (SIGKILL, lost worker, crashed server).
Under the lock (recover's apply) every other open journal is a dead run's.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from config import FabulawsConfig
from fabflows import lock
from fabflows.runtime.engine import rebuild
from fabflows.runtime.journal import Journal, JournalEntry

RECOVER_FLOW = "recover-environment"


class StepToUndo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    flow: str
    step: str
    state: str = Field(description="What the journal says: started, done or failed.")
    data: dict = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"undo-{self.run_id[:8]}-{self.step}"


class DeadRun(BaseModel):
    """A dead run's journal: what recover will undo and what it leaves (with why)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    flow: str
    state: str
    undo: list[StepToUndo] = Field(default_factory=list, description="Newest first.")
    left: list[str] = Field(
        default_factory=list, description="Applied steps recover does not undo, with why."
    )

    def describe(self) -> str:
        parts = [f"{self.flow} run {self.run_id} ({self.state})"]
        if self.undo:
            parts.append("undo " + ", ".join(s.step for s in self.undo))
        if self.left:
            parts.append("left: " + "; ".join(self.left))
        return ": ".join(parts[:1]) + (" — " + "; ".join(parts[1:]) if parts[1:] else "")


def holder_run_id(label: str, config: FabulawsConfig | None) -> str | None:
    """The flow run id holding the environment's lock now (None: free or not a flow run)."""
    holder = lock.read_holder(label, config)
    return holder.flow_run_id if holder else None


def dead_runs(
    journal: Journal,
    config: FabulawsConfig | None,
    exclude: str | None = None,
    maintenance_only: bool = False,
) -> tuple[list[DeadRun], list[JournalEntry], list[str]]:
    """(dead engine runs to recover, dead recover runs, runs still alive) of the journal."""
    alive_id = holder_run_id(journal.label, config)
    out: list[DeadRun] = []
    recovers: list[JournalEntry] = []
    alive: list[str] = []
    for entry in journal.open_entries(exclude=exclude):
        if alive_id is not None and entry.run_id == alive_id:
            alive.append(f"{entry.flow} run {entry.run_id} is still running (holds the lock)")
            continue
        if entry.flow == RECOVER_FLOW:
            recovers.append(entry)
            continue
        out.append(plan_dead_run(entry, maintenance_only))
    return out, recovers, alive


def plan_dead_run(entry: JournalEntry, maintenance_only: bool = False) -> DeadRun:
    """Which of a dead run's applied steps can be undone (newest first), and which are left.

    ``maintenance_only``: undo only steps that hold maintenance state (``auto_undo``), as an
    automatic recovery does; data-changing steps are left for a person (recover or resume)."""
    undo: list[StepToUndo] = []
    left: list[str] = []
    try:
        steps = rebuild(entry).steps
    except Exception as exc:  # noqa: BLE001 - a journal we cannot read back is reported, not fatal
        return DeadRun(
            run_id=entry.run_id,
            flow=entry.flow,
            state=entry.state,
            left=[f"{s.name}: cannot rebuild the run's steps ({exc})" for s in entry.applied],
        )
    for rec in reversed(entry.applied):
        step = steps.get(rec.name)
        if step is None:
            left.append(f"{rec.name}: no longer a step of {entry.flow}")
        elif maintenance_only and not step.auto_undo:
            left.append(
                f"{rec.name}: changes data; left for `fabflows recover --apply` or "
                f"`fabflows resume {entry.run_id}`"
            )
        elif step.undo is None:
            left.append(
                f"{rec.name}: {step.no_undo} (finish it with `fabflows resume {entry.run_id}`)"
            )
        else:
            undo.append(
                StepToUndo(
                    run_id=entry.run_id,
                    flow=entry.flow,
                    step=rec.name,
                    state=rec.state,
                    data=rec.data,
                )
            )
    return DeadRun(run_id=entry.run_id, flow=entry.flow, state=entry.state, undo=undo, left=left)
