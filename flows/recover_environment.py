"""recover-environment: undo or finish what dead runs left behind, from their journals."""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.errors import BadInput
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute, rebuild
from fabflows.runtime.plan import Change, RunbookPlan
from fabflows.runtime.recovery import DeadRun, StepToUndo, dead_runs
from fabflows.upgrade_mode import current_run
from tasks.ssh.staged_secrets import StagedLeftovers

FLOW_NAME = "recover-environment"
STAGED_STEP = "remove-staged-secret-files"


class RecoverParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    maintenance_only: bool = False


class RecoverFacts(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    dead: list[DeadRun] = Field(default_factory=list)
    dead_recovers: list[str] = Field(default_factory=list)
    alive: list[str] = Field(default_factory=list)
    reload: Any = None
    reload_note: str | None = None
    staged: list[StagedLeftovers] = Field(default_factory=list)
    staged_notes: list[str] = Field(default_factory=list)


class RecoverPlan(RunbookPlan):
    """What recover-environment will undo, finish or leave."""

    dead: list[DeadRun] = Field(default_factory=list)
    dead_recovers: list[str] = Field(default_factory=list)
    reload_repairs: list[str] = Field(default_factory=list)
    staged: list[StagedLeftovers] = Field(
        default_factory=list, description="Secret-file rollout leftovers no journal claims."
    )


def plan_recover_environment(facts: RecoverFacts, env: EnvironmentConfig) -> RecoverPlan:
    """Pure: one change per step to undo (newest first, run by run), and the reload repairs."""
    changes: list[Change] = []
    notes = list(facts.alive)
    for run in facts.dead:
        for s in run.undo:
            changes.append(
                Change(
                    target=f"{run.flow} run {run.run_id[:8]}",
                    action=f"undo {s.step}",
                    detail=f"journal: {s.state}",
                    step=s.key,
                )
            )
        notes += [f"{run.flow} run {run.run_id}: left {x}" for x in run.left]
    repairs = list(facts.reload.lines()) if facts.reload is not None and facts.reload.needed else []
    if repairs:
        changes.append(
            Change(
                target=f"{env.label} database and app",
                action="repair a dead reload-production-db",
                detail="; ".join(repairs),
                step="repair-reload",
            )
        )
    for server in facts.staged:
        changes.append(
            Change(
                target=server.host,
                action="remove secret-file rollout leftovers no journal claims (none is live)",
                detail=", ".join(server.paths),
                step=STAGED_STEP,
            )
        )
    if facts.reload_note:
        notes.append(facts.reload_note)
    notes += facts.staged_notes
    if facts.dead_recovers and changes:
        notes.append(f"closes the journals of {len(facts.dead_recovers)} dead recover run(s)")
    return RecoverPlan(
        title=f"recover-environment on {env.label}",
        environment=env.label,
        changes=changes,
        noops=[] if changes else ["no dead run left anything to undo"],
        notes=notes,
        dead=facts.dead,
        dead_recovers=facts.dead_recovers,
        reload_repairs=repairs,
        staged=facts.staged,
    )


def _undo_step(item: StepToUndo) -> Step:
    def apply(scope: Scope) -> dict[str, str]:
        assert scope.journal is not None
        entry = scope.journal.entry(item.run_id)
        if entry is None:
            raise RuntimeError(f"the journal of run {item.run_id} is gone")
        rec = entry.step(item.step)
        if rec is None or not rec.applied:
            return {"summary": f"{item.step} of {item.run_id[:8]} already undone"}
        js = rebuild(entry)
        step = js.steps[item.step]
        assert step.undo is not None
        child = Scope(
            scope.rc, runbook=item.flow, run_id=item.run_id, journal=scope.journal, params=js.params
        )
        child._pool = scope._pool
        try:
            step.undo(child, rec.data)
        finally:
            scope._pool = child._pool  # opened by the undo: closed with this run
        scope.journal.step(item.run_id, item.step, "undone")
        after = scope.journal.entry(item.run_id)
        if after is not None and not after.applied:
            scope.journal.close(item.run_id, "recovered", f"recovered by {scope.run_id}")
        return {"summary": f"undid {item.step} of {item.flow} run {item.run_id[:8]}"}

    return Step(item.key, apply, no_undo="recovery: it puts things back itself", summary="")


class RecoverEnvironment(Runbook[RecoverParams, RecoverFacts, RecoverPlan]):
    name = FLOW_NAME
    Params = RecoverParams
    plan_type = RecoverPlan

    def gather(self, scope: Scope, params: RecoverParams) -> RecoverFacts:
        assert scope.journal is not None
        dead, recovers, alive = dead_runs(
            scope.journal,
            scope.rc.config,
            exclude=scope.run_id,
            maintenance_only=params.maintenance_only,
        )
        facts = RecoverFacts(dead=dead, dead_recovers=[e.run_id for e in recovers], alive=alive)
        facts.reload, facts.reload_note = _reload_leftovers(scope)
        facts.staged, facts.staged_notes = _staged_leftovers(scope)
        return facts

    def plan(
        self, facts: RecoverFacts, params: RecoverParams, env: EnvironmentConfig
    ) -> RecoverPlan:
        return plan_recover_environment(facts, env)

    def steps(self, plan: RecoverPlan, params: RecoverParams) -> list[Step]:
        out = [_undo_step(s) for run in plan.dead for s in run.undo]
        if plan.reload_repairs:
            out.append(
                Step("repair-reload", _apply_reload_repairs, no_undo="a repair puts things back")
            )
        if plan.staged:
            out.append(
                Step(
                    STAGED_STEP,
                    _remove_staged,
                    no_undo="removes copies that are not live: the live files stay as they are",
                )
            )
        if plan.dead_recovers and out:
            ids = list(plan.dead_recovers)

            def close(scope: Scope) -> dict[str, str]:
                assert scope.journal is not None
                for run_id in ids:
                    scope.journal.close(run_id, "recovered", f"superseded by {scope.run_id}")
                return {"summary": f"closed {len(ids)} dead recover journal(s)"}

            out.append(Step("close-dead-recover-journals", close, no_undo="bookkeeping"))
        return out

    def verify(self, scope: Scope, plan: RecoverPlan, params: RecoverParams) -> list[str]:
        facts = self.gather(scope, params)
        again = plan_recover_environment(facts, scope.env)
        return [f"still left: {c.target}: {c.action}" for c in again.changes]


def _reload_leftovers(scope: Scope) -> tuple[Any, str | None]:
    """A dead reload-production-db's leftovers, found on the systems (None when there is no
    running database server to look at: nothing of a reload can be left there)."""
    from fabflows.procedures import reload_recovery

    try:
        state = reload_recovery.gather_target_state(scope.rc, scope.pool)
    except BadInput as exc:
        return None, f"reload leftovers not checked: {exc}"
    except Exception as exc:  # noqa: BLE001 - the journaled undo must not wait on the database
        return None, f"reload leftovers could not be checked ({type(exc).__name__}: {exc})"
    run, _ = current_run()
    _, target_db, _, _, app, upgrade = state
    return reload_recovery.recovery_for(scope.rc, target_db, app, upgrade, run), None


def _staged_leftovers(scope: Scope) -> tuple[list[StagedLeftovers], list[str]]:
    """Secret-file rollout leftovers that no open journal claims (the journaled undos take care of
    the rest); not judged while another run holds the environment (they may be its own)."""
    from fabflows import lock
    from fabflows.procedures.staged_secrets import gather_staged_leftovers
    from fabflows.runtime.engine import current_run_id

    holder = lock.read_holder(scope.env, scope.rc.config)
    if holder is not None and holder.flow_run_id not in (scope.run_id, current_run_id()):
        return [], [f"staged secret files not checked: {holder.describe()} holds the environment"]
    assert scope.journal is not None
    try:
        found, unread = gather_staged_leftovers(
            scope.rc, scope.pool, scope.journal.open_entries(exclude=scope.run_id)
        )
    except BadInput as exc:
        return [], [f"staged secret files not checked: {exc}"]
    except Exception as exc:  # noqa: BLE001 - the journaled undo must not wait on the servers
        return [], [f"staged secret files could not be checked ({type(exc).__name__}: {exc})"]
    return found, [f"staged secret files not checked on {u}: it could not be read" for u in unread]


def _remove_staged(scope: Scope) -> dict[str, Any]:
    """Remove what is still left now (the undos before may have removed some of it)."""
    from tasks.ssh.fleet import FleetHost
    from tasks.ssh.staged_secrets import remove_staged_secret_files

    found, _ = _staged_leftovers(scope)
    if not found:
        return {"summary": "no staged secret files left"}
    hosts = [FleetHost(name=s.host, address=s.address) for s in found]
    paths = {s.address: s.paths for s in found}
    result = remove_staged_secret_files(scope.pool, hosts, paths, dry_run=False)
    result.raise_for_errors()
    count = sum(len(p) for p in paths.values())
    return {"summary": f"removed {count} staged secret file(s) on {len(hosts)} server(s)"}


def _apply_reload_repairs(scope: Scope) -> dict[str, Any]:
    from fabflows.procedures import reload_recovery

    target, target_db, web, workers, app, upgrade = reload_recovery.gather_target_state(
        scope.rc, scope.pool
    )
    run, _ = current_run()
    found = reload_recovery.recovery_for(scope.rc, target_db, app, upgrade, run)
    repaired = reload_recovery.apply_recovery(
        scope.rc, scope.pool, target, scope.env.database_name, found, web + workers, dry_run=False
    )
    return {"summary": "; ".join(repaired) or "nothing left to repair"}


RUNBOOK = RecoverEnvironment()


@flow(name=FLOW_NAME, log_prints=False)
def recover_environment(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    maintenance_only: bool = False,
) -> RunbookReport:
    """Undo or finish what dead runs left behind (SIGKILL, lost worker, crashed server).

    **When to run:** when a run died (the watchdog or `upgrade-status` says so), before using the
    environment again; `fabflows recover -e ENV` is the same from a terminal. Safe at any time and
    safe to kill and run again: what is already put back is skipped.

    **What it finds:** every run whose journal (kept beside the environment's lock, outside the
    worker) says it applied steps and never finished or undid them, and whose run no longer holds
    the lock. A run still holding it is left alone. Also what a dead reload-production-db left on
    the systems themselves (a copy still running, side databases, a half-done swap, a stopped app),
    and secret files a rollout staged or kept on the servers that no journal accounts for
    (`<path>.fabflows-next`, `.fabflows-prev`, `.fabflows-absent`, `~/.fabflows-stage-*`).

    **What it does,** newest step first, run by run: each applied step that has an undo is undone
    from the data the run journaled before changing anything (the autoscaling processes exactly as
    they were, the upgrade page off, programs started again, staged files removed). A step that
    has no undo (upgrading packages, a data copy) is left and named, with the `fabflows resume
    RUN_ID` that finishes it. Staged secret files no journal claims are removed (none is live: the
    servers keep the files they run with).

    **Blast radius:** only what the dead runs changed.

    **Dry run** (default): the plan, run by run, step by step.

    **Rolls back:** it is itself journaled; killed half-way, the next recover run goes on.

    Args:
        environment: Environment to recover (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show what would be undone (default). Set false (CLI --apply) to recover.
        maintenance_only: Undo only maintenance state (upgrade page, suspended processes,
            stopped programs, staged files) and leave data-changing steps: what the automatic
            recovery of a crashed run does (recover_on_crash, and the watchdog's).
    """
    return execute(RUNBOOK, locals())
