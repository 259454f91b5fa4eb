"""The runbook engine: every runbook runs the same guarded phases, in the same order.

A runbook declares what is particular to it and the engine does everything else::

    class RestartApp(Runbook[RestartAppParams, AppFacts, RestartAppPlan]):
        name = "restart-app"
        Params = RestartAppParams
        plan_type = RestartAppPlan
        may_take_site_down = False      # True: the window gate applies to every apply

        def gather(self, scope, params): ...             # read tasks only
        def plan(self, facts, params, env): ...          # pure: facts in, plan out
        def steps(self, plan, params): ...               # [Step(name, apply, undo, site_down)]
        def verify(self, scope, plan, params): ...       # problems after the steps

    @flow(name="restart-app")
    def restart_app(environment: str, ..., dry_run: bool = True) -> RunbookReport:
        '''The runbook page.'''
        return execute(RUNBOOK, locals())

The order (no runbook calls a gate itself):

1. validate the parameters and the environment (``prevalidate``: the CLI calls it before a Prefect
   run exists; bad input is ``BadInput``, exit 2);
2. record who started it;
3. the window: a runbook that may take the site down, or any apply in a protected environment,
   is refused outside the environment's windows (a dry run only says so);
4. gather → plan (pure) → publish the plan; a plan with problems stops here (``BadInput``);
5. a dry run stops here;
6. approval, when the plan is destructive in a protected environment (bound to the plan's digest);
7. the environment's lock → gather again → refuse if the plan's digest changed;
8. the steps, each through the step guard (it must fit what is left of the window) and the journal
   (before and after, with the data its undo needs); on failure the steps that hold maintenance
   state are undone (``auto_undo``), data-changing ones are left for ``recover``/``resume``;
9. verify; 10. the run summary, always.

A read-only runbook (``read_only = True``: describe-environment, upgrade-status, watchdog) goes
through 1, 2 and 4 (its plan is what it read; plan problems still stop it) and 10: no window,
approval, lock or journal. Its ``read_result`` is what the flow returns.

Refusals (outside the window, approval rejected, environment busy, plan changed) end the run
CANCELLED with the reason as its message; the CLI exits 3.
"""

from __future__ import annotations

import inspect
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config import ConfigError, EnvironmentConfig
from fabflows import audit, boundaries, guard
from fabflows.errors import BadInput, Refused
from fabflows.report import artifact_key, publish_markdown, text_table
from fabflows.runbook import RunContext, load_context
from fabflows.runtime.journal import Journal, JournalEntry
from fabflows.runtime.plan import RunbookPlan, diff_lines

COMMON_PARAMS = ("environment", "deployment", "config", "dry_run", "window_override_reason")

ParamsT = TypeVar("ParamsT", bound=BaseModel)
FactsT = TypeVar("FactsT")
PlanT = TypeVar("PlanT", bound=RunbookPlan)


class PlanChanged(Refused):
    """The environment changed between the plan (maybe approved) and the apply."""


class ResumeRefused(Refused):
    """The environment no longer matches the journal of the run to resume."""


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Step:
    """One named step of a runbook.

    ``apply(scope)`` does it and returns what its undo needs (a dict or a pydantic model; recorded
    in the journal). A step that must record its undo data *before* writing calls
    ``scope.record(...)`` first. ``undo(scope, data)`` puts back what apply changed, from the
    recorded data; it must be safe to call twice and after a partial apply. A step without undo
    says why in ``no_undo``.
    """

    name: str
    apply: Callable[[Scope], Any]
    undo: Callable[[Scope, dict[str, Any]], Any] | None = None
    no_undo: str = ""
    site_down: bool = False
    auto_undo: bool = True
    """True: maintenance state (upgrade page, suspended processes, stopped programs), undone
    automatically when the run fails. False: a data-changing step, left for recover/resume."""
    expected: timedelta | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        if self.undo is None and not self.no_undo:
            raise TypeError(f"step {self.name!r} has no undo: say why in no_undo")


class Runbook(Generic[ParamsT, FactsT, PlanT]):
    """What a runbook declares; see the module docstring."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    plan_type: ClassVar[type[RunbookPlan]]
    may_take_site_down: ClassVar[bool] = False
    """The window gate applies to every apply (not only in protected environments)."""
    read_only: ClassVar[bool] = False
    """Reads only: no window, approval, lock or journal (describe, status, watchdog). Its plan is
    what it read; the run ends after publishing it, with ``read_result`` as the flow's result."""

    def validate(self, rc: RunContext, params: ParamsT) -> None:
        """Reject bad input (``BadInput``) or refuse (``Refused``) before anything starts."""

    def window_required(self, env: EnvironmentConfig, params: ParamsT) -> bool:
        if self.read_only:
            return False
        return self.may_take_site_down or env.protected

    def approval_required(self, env: EnvironmentConfig, params: ParamsT, plan: PlanT) -> bool:
        """Destructive plans in protected environments (a runbook may also ask for it)."""
        from fabflows import approval

        return approval.approval_required(env, plan.destructive)

    def gather(self, scope: Scope, params: ParamsT) -> FactsT:
        raise NotImplementedError

    def plan(self, facts: FactsT, params: ParamsT, env: EnvironmentConfig) -> PlanT:
        raise NotImplementedError

    def steps(self, plan: PlanT, params: ParamsT) -> list[Step]:
        return []

    def verify(self, scope: Scope, plan: PlanT, params: ParamsT) -> list[str]:
        return []

    def read_outcome(self, plan: PlanT) -> str | None:
        """A read-only run's outcome in its summary (None: the engine's "dry run: ...")."""
        return None

    def read_result(self, scope: Scope, plan: PlanT, report: RunbookReport) -> Any:
        """What a read-only runbook's flow returns once the plan is published: the report, or
        what it read (its plan holds it). The place for its own artifacts and warnings."""
        return report


# --------------------------------------------------------------------------- the run's scope


class Scope:
    """What gather, steps, undo and verify get: the context, an SSH pool, the journal."""

    def __init__(
        self,
        rc: RunContext,
        *,
        runbook: str,
        run_id: str,
        journal: Journal | None = None,
        params: BaseModel | None = None,
    ):
        self.rc = rc
        self.env = rc.env
        self.runbook = runbook
        self.run_id = run_id
        self.journal = journal
        self.params = params
        self.step_name: str | None = None
        self.held: Any = None
        self.results: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        """What the runbook adds to the report's details (the engine shares its own dict here)."""
        self._pool: Any = None
        self._closers: list[Callable[[], Any]] = []

    @property
    def pool(self) -> Any:
        """An SSH connection pool (strict host keys), opened on first use, closed with the run."""
        if self._pool is None:
            from fabflows.upgrade_mode import ssh_options
            from tasks.ssh.connection import ConnectionPool

            self._pool = ConnectionPool(ssh_options(self.rc))
            self._pool.__enter__()
        return self._pool

    def record(self, **data: Any) -> None:
        """Journal what the current step's undo needs, before the step writes."""
        if self.journal is not None and self.step_name is not None:
            self.journal.step(self.run_id, self.step_name, "data", data=_plain(data))

    def log(self, message: str, *args: Any, level: str = "info") -> None:
        from fabflows.report import in_flow_run

        if in_flow_run():
            from prefect.logging import get_run_logger

            getattr(get_run_logger(), level)(message, *args)

    def on_close(self, fn: Callable[[], Any]) -> None:
        """Call ``fn`` when the run ends, however it ends (e.g. stop a probe the steps started)."""
        self._closers.append(fn)

    def close(self) -> None:
        while self._closers:
            try:
                self._closers.pop()()
            except Exception as exc:  # noqa: BLE001 - closing must not hide the run's outcome
                self.log("closing: %s", exc, level="warning")
        if self._pool is not None:
            self._pool.__exit__(None, None, None)
            self._pool = None


def _plain(value: Any) -> dict[str, Any]:
    """A step's result as JSON-able data for the journal."""
    import json

    if value is None:
        return {}
    if isinstance(value, BaseModel):
        return json.loads(value.model_dump_json())
    if isinstance(value, dict):
        return json.loads(json.dumps(value, default=str))
    if isinstance(value, list) and all(isinstance(v, BaseModel) for v in value):
        return {"items": [json.loads(v.model_dump_json()) for v in value]}
    return {"value": json.loads(json.dumps(value, default=str))}


# --------------------------------------------------------------------------- the report


class StepOutcome(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    state: str = Field(description="done, skipped (already done), failed, undone, not run")
    seconds: float | None = None
    summary: str = ""
    site_down: bool = False


class RunbookReport(BaseModel):
    """What every engine run returns (and the CLI prints)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flow: str
    environment: str
    dry_run: bool
    outcome: str
    run_id: str = ""
    plan_text: str = ""
    plan_digest: str = ""
    changed: bool = False
    steps: list[StepOutcome] = Field(default_factory=list)
    undone: list[str] = Field(default_factory=list)
    left: list[str] = Field(default_factory=list, description="Applied and not undone on failure.")
    downtime_seconds: float | None = None
    seconds: float = 0.0
    problems: list[str] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)

    def render_text(self) -> str:
        lines = [self.plan_text, ""] if self.plan_text else []
        lines.append(self.outcome)
        if self.steps:
            rows = [
                {
                    "step": s.name,
                    "state": s.state,
                    "seconds": "" if s.seconds is None else f"{s.seconds:.1f}",
                    "result": s.summary,
                }
                for s in self.steps
            ]
            lines += ["", text_table(rows)]
        if self.undone:
            lines.append("undone: " + ", ".join(self.undone))
        if self.left:
            lines.append(
                "LEFT for `fabflows recover` / `fabflows resume "
                + self.run_id
                + "`: "
                + ", ".join(self.left)
            )
        if self.downtime_seconds is not None:
            lines.append(f"downtime: {self.downtime_seconds:.1f} s")
        return "\n".join(lines)


# --------------------------------------------------------------------------- phases


def split_args(runbook: Runbook, args: dict[str, Any]) -> tuple[dict[str, Any], BaseModel]:
    """The flow's arguments -> the common ones and the runbook's validated Params."""
    common = {k: args.get(k) for k in COMMON_PARAMS}
    own = {k: v for k, v in args.items() if k not in COMMON_PARAMS and k != "resume_of"}
    try:
        params = runbook.Params.model_validate(own)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "parameters"
        raise BadInput(f"{runbook.name}: {where}: {first['msg']}") from None
    return common, params


def load(runbook: Runbook, args: dict[str, Any]) -> tuple[RunContext, dict[str, Any], BaseModel]:
    """Phase 1: parameters and config, validated. Raises BadInput / Refused, changes nothing."""
    common, params = split_args(runbook, args)
    try:
        rc = load_context(common["environment"], common.get("deployment"), common.get("config"))
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    runbook.validate(rc, params)
    reason = common.get("window_override_reason")
    if reason is not None:
        try:
            guard.check_window(rc.env, override_reason=reason)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    return rc, common, params


def prevalidate(flow_fn: Callable[..., Any], args: dict[str, Any]) -> None:
    """What the CLI calls before creating a run: the same checks the engine makes first."""
    runbook = runbook_of(flow_fn)
    if runbook is not None:
        load(runbook, args)


def runbook_of(flow_or_fn: Any) -> Runbook | None:
    """The Runbook a flow runs (its module's ``RUNBOOK``), or None for a flow not on the engine."""
    fn = getattr(flow_or_fn, "fn", flow_or_fn)
    module = inspect.getmodule(fn)
    rb = getattr(module, "RUNBOOK", None)
    return rb if isinstance(rb, Runbook) else None


def window_gate(
    runbook: Runbook,
    env: EnvironmentConfig,
    params: BaseModel,
    *,
    dry_run: bool,
    override_reason: str | None,
    now: Any = None,
    required: bool | None = None,
) -> guard.WindowDecision:
    """Phase 3. Applying outside the window is refused (``guard.OutsideWindow``); a dry run only
    gets the decision (its plan says the apply would be refused now). ``required`` overrides what
    the runbook declares (the engine passes True once a plan expects downtime)."""
    if not (runbook.window_required(env, params) if required is None else required):
        return guard.WindowDecision(
            environment=env.label,
            allowed=True,
            checked_at=now or guard._now(),
            time_zone=env.time_zone,
            unrestricted=True,
        )
    if dry_run:
        return guard.check_window(env, now=now, override_reason=override_reason)
    return guard.require_window(
        env, override_reason=override_reason, now=now, flow_name=runbook.name
    )


def current_run_id() -> str:
    run = audit.current_flow_run()
    if run is not None:
        return str(run.id)
    import uuid

    return f"local-{uuid.uuid4()}"


def check_resume(entry: JournalEntry, steps: Sequence[Step]) -> list[str]:
    """Why the environment no longer matches the journal of the run to resume (empty: it does).

    Every step the plan has now must be one the journaled run planned; steps it did are skipped;
    a pending step the new plan no longer needs has been done some other way and is skipped too.
    """
    planned = {s.get("step") for s in entry.plan.get("changes", [])} | {s.name for s in entry.steps}
    planned |= set(entry.plan.get("step_names", []))
    new = [s.name for s in steps if s.name not in planned]
    if new:
        return [f"step {n!r} is not in the journaled plan" for n in new]
    return []


@contextmanager
def _timer() -> Iterator[Callable[[], float]]:
    started = time.monotonic()
    yield lambda: round(time.monotonic() - started, 2)


# --------------------------------------------------------------------------- execute


class _Run:
    """State of one execution, for the summary that is always published."""

    def __init__(self, runbook: Runbook, env: EnvironmentConfig, dry_run: bool, run_id: str):
        self.runbook = runbook
        self.env = env
        self.dry_run = dry_run
        self.run_id = run_id
        self.started = time.monotonic()
        self.plan: RunbookPlan | None = None
        self.outcomes: list[StepOutcome] = []
        self.undone: list[str] = []
        self.left: list[str] = []
        self.down_from: float | None = None
        self.down_until: float | None = None
        self.details: dict[str, Any] = {}
        self.problems: list[str] = []

    @property
    def downtime(self) -> float | None:
        if self.down_from is None:
            return None
        end = self.down_until if self.down_until is not None else time.monotonic()
        return round(end - self.down_from, 2)

    def report(self, outcome: str) -> RunbookReport:
        return RunbookReport(
            flow=self.runbook.name,
            environment=self.env.label,
            dry_run=self.dry_run,
            outcome=outcome,
            run_id=self.run_id,
            plan_text=self.plan.render_text() if self.plan else "",
            plan_digest=self.plan.digest() if self.plan else "",
            changed=bool(self.plan and self.plan.changed),
            steps=self.outcomes,
            undone=self.undone,
            left=self.left,
            downtime_seconds=self.downtime,
            seconds=round(time.monotonic() - self.started, 2),
            problems=self.problems,
            details=self.details,
        )

    def summary(self, outcome: str, starter: audit.Starter | None) -> None:
        details = dict(self.details)
        if self.outcomes:
            details["Steps"] = ", ".join(
                f"{s.name} {s.state}" + (f" {s.seconds:.1f}s" if s.seconds is not None else "")
                for s in self.outcomes
            )
        if self.undone:
            details["Undone"] = ", ".join(self.undone)
        if self.left:
            details["Left for recover/resume"] = ", ".join(self.left)
        if self.plan is not None:
            details["Plan digest"] = self.plan.digest()
        down = self.downtime
        audit.record_summary(
            self.env,
            outcome=outcome,
            plan_markdown=self.plan.render_markdown() if self.plan else "",
            downtime=None if down is None else timedelta(seconds=down),
            details=details,
            flow_name=self.runbook.name,
            starter=starter,
        )


def execute(runbook: Runbook, args: dict[str, Any], *, resume_of: JournalEntry | None = None):  # noqa: ANN201, C901
    """Run ``runbook`` with the flow's arguments (``locals()`` of the flow function)."""
    from prefect.states import Cancelled

    from fabflows import approval, lock

    rc, common, params = load(runbook, args)
    env = rc.env
    dry_run = bool(common.get("dry_run", True)) or runbook.read_only
    starter = audit.record_start(env)
    run_id = current_run_id()
    run = _Run(runbook, env, dry_run, run_id)
    journal = None if runbook.read_only else Journal.for_environment(env.label, rc.config)
    # Prefect's Retry of a failed run runs the same run id again: go on from its own journal.
    if resume_of is None and journal is not None and not dry_run:
        own = journal.entry(run_id)
        if own is not None and own.open:
            resume_of = own
    journal_id = resume_of.run_id if resume_of else run_id
    scope = Scope(rc, runbook=runbook.name, run_id=journal_id, journal=journal, params=params)
    scope.details = run.details
    outcome = "failed"
    try:
        # 3. window
        try:
            decision = window_gate(
                runbook,
                env,
                params,
                dry_run=dry_run,
                override_reason=common.get("window_override_reason"),
            )
        except guard.OutsideWindow as exc:
            outcome = f"refused: {exc}"
            return Cancelled(message=str(exc))
        # 4. gather, plan, publish
        facts = runbook.gather(scope, params)
        plan = runbook.plan(facts, params, env)
        run.plan = plan
        key = artifact_key(runbook.name, env.deployment, env.environment)
        publish_markdown(
            key + "-plan", plan.render_markdown(), f"{runbook.name} plan for {env.label}"
        )
        if plan.problems:
            run.problems = list(plan.problems)
            outcome = "refused: " + "; ".join(plan.problems)
            raise BadInput("; ".join(plan.problems))
        if (
            plan.changed
            and plan.downtime is not None
            and decision.unrestricted
            and not runbook.read_only
            and env.windows
        ):
            # the plan takes the site down although the parameters alone did not say so (e.g. a
            # password rotation chosen from what was gathered): the window applies all the same
            try:
                decision = window_gate(
                    runbook,
                    env,
                    params,
                    dry_run=dry_run,
                    override_reason=common.get("window_override_reason"),
                    required=True,
                )
            except guard.OutsideWindow as exc:
                outcome = f"refused: {exc}"
                return Cancelled(message=f"the plan expects downtime: {exc}")
        steps = runbook.steps(plan, params)
        # 5. dry run
        if dry_run:
            if not decision.allowed:
                run.details["Window"] = "applying now would be refused: " + decision.explain()
            outcome = "dry run: " + (
                f"would apply {len(steps)} step(s)" if plan.changed else "nothing to change"
            )
            if runbook.read_only:  # what it read is its plan: nothing more to do
                outcome = runbook.read_outcome(plan) or outcome
                return runbook.read_result(scope, plan, run.report(outcome))
            return run.report(outcome)
        if not plan.changed and resume_of is None:
            outcome = "nothing to change"
            return run.report(outcome)
        # 6. approval, bound to the digest
        approved_digest = plan.digest()
        if runbook.approval_required(env, params, plan):
            try:
                decision_ = approval.request_approval(
                    env,
                    rc.config,
                    plan_markdown=plan.render_markdown(),
                    expected_downtime=plan.downtime,
                    flow_name=runbook.name,
                )
            except approval.ApprovalRejected as exc:
                outcome = f"refused: {exc}"
                return exc.as_state()
            run.details["Approved by"] = f"{decision_.approver} (plan {approved_digest})"
        # 7. lock, gather again, refuse a changed plan (observers see the run just before)
        boundaries.reached(runbook.name, "lock", "before")
        try:
            lock_cm = lock.environment_lock(env, rc.config)
            held = lock_cm.__enter__()
        except lock.EnvironmentBusy as exc:
            outcome = f"refused: {exc}"
            return Cancelled(message=str(exc))
        try:
            scope.held = held
            facts = runbook.gather(scope, params)
            plan_now = runbook.plan(facts, params, env)
            if resume_of is None and plan_now.digest() != approved_digest:
                changed = diff_lines(plan.render_text(), plan_now.render_text())
                msg = (
                    f"the plan changed since it was made{' and approved' if 'Approved by' in run.details else ''}"
                    f" (digest {approved_digest} -> {plan_now.digest()}); nothing was applied. "
                    "What changed: " + " | ".join(changed[2:12] or ["(details only)"])
                )
                outcome = f"refused: {msg}"
                run.plan = plan_now
                return Cancelled(message=msg)
            plan = plan_now
            run.plan = plan
            steps = runbook.steps(plan, params)
            if resume_of is not None:
                why = check_resume(resume_of, steps)
                if why:
                    msg = (
                        f"cannot resume {resume_of.run_id}: the environment no longer matches its "
                        "journal: " + "; ".join(why)
                    )
                    outcome = f"refused: {msg}"
                    return Cancelled(message=msg)
            outcome = _apply(runbook, scope, run, journal, steps, plan, params, decision, resume_of)
            problems = runbook.verify(scope, plan, params)
            if problems:
                run.problems = problems
                outcome = "applied, but verification found: " + "; ".join(problems)
                raise RuntimeError(f"{runbook.name} on {env.label}: " + "; ".join(problems))
            return run.report(outcome)
        finally:
            lock_cm.__exit__(None, None, None)
    except guard.GuardStop as exc:
        outcome = f"stopped: {exc}"
        return exc.as_state()
    except BaseException as exc:
        if outcome == "failed" or not outcome.startswith(("refused", "applied")):
            outcome = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        scope.close()
        try:
            run.summary(outcome, starter)
        except Exception:  # noqa: BLE001 - the summary must not hide the run's own outcome
            scope.log(
                "could not publish the run summary: %s", traceback.format_exc(), level="warning"
            )


def _apply(
    runbook: Runbook,
    scope: Scope,
    run: _Run,
    journal: Journal | None,
    steps: list[Step],
    plan: RunbookPlan,
    params: BaseModel,
    decision: guard.WindowDecision,
    resume_of: JournalEntry | None,
) -> str:
    """Phase 8: the steps, journaled, under the step guard; undo maintenance state on failure."""
    assert journal is not None
    run_id = scope.run_id
    done: set[str] = set()
    if resume_of is not None:
        journal.reopen(run_id)
        done = resume_of.done_steps
        run.details["Resumes"] = resume_of.run_id
    else:
        journal.open_run(
            run_id,
            runbook.name,
            params=params.model_dump(mode="json"),
            plan={**plan.model_dump(mode="json"), "step_names": [s.name for s in steps]},
            plan_digest=plan.digest(),
        )
    step_guard = guard.StepGuard(decision, flow_name=runbook.name, env=scope.env)
    applied: list[Step] = []
    current: Step | None = None
    try:
        for step in steps:
            if step.name in done:
                run.outcomes.append(
                    StepOutcome(name=step.name, state="skipped", summary="done before")
                )
                continue
            if scope.held is not None:
                scope.held.check()
            step_guard.check(step.name, step.expected)
            current = step
            scope.step_name = step.name
            boundaries.reached(runbook.name, step.name, "before")
            journal.step(run_id, step.name, "started", site_down=step.site_down)
            if step.site_down and run.down_from is None:
                run.down_from = time.monotonic()
            with _timer() as elapsed:
                value = step.apply(scope)
            scope.results[step.name] = value
            if step.site_down:
                run.down_until = time.monotonic()
            elif run.down_from is not None and run.down_until is None:
                run.down_until = time.monotonic()
            journal.step(run_id, step.name, "done", data=_plain(value))
            boundaries.reached(runbook.name, step.name, "after")
            applied.append(step)
            current = None
            step_guard.history.record(step.name, elapsed())
            summary = (
                value.get("summary", "")
                if isinstance(value, dict)
                else getattr(value, "summary", "")
            )
            run.outcomes.append(
                StepOutcome(
                    name=step.name,
                    state="done",
                    seconds=elapsed(),
                    summary=summary if isinstance(summary, str) else "",
                    site_down=step.site_down,
                )
            )
        journal.close(run_id, "done")
        return f"applied {len(applied)} step(s)" + (
            f" (resumed {run.details['Resumes']})" if resume_of is not None else ""
        )
    except BaseException as exc:
        if current is not None:
            journal.step(run_id, current.name, "failed", error=f"{type(exc).__name__}: {exc}")
            run.outcomes.append(
                StepOutcome(name=current.name, state="failed", summary=str(exc)[:200])
            )
            applied.append(current)
        _undo_on_failure(runbook, scope, run, journal, applied, resume_of)
        raise


def undo_on_failure_enabled(env: EnvironmentConfig, config: Any) -> bool:
    settings = config.fabflows.environments.get(env.environment) if config else None
    return True if settings is None else settings.undo_on_failure


def _undo_on_failure(
    runbook: Runbook,
    scope: Scope,
    run: _Run,
    journal: Journal,
    applied: list[Step],
    resume_of: JournalEntry | None,
) -> None:
    """Undo, newest first, the applied steps that hold maintenance state; leave the others."""
    run_id = scope.run_id
    entry = journal.entry(run_id)
    enabled = undo_on_failure_enabled(scope.env, scope.rc.config)
    data_of = {s.name: s.data for s in (entry.steps if entry else [])}
    failures = []
    for step in reversed(applied):
        if not enabled or not step.auto_undo or step.undo is None:
            run.left.append(step.name)
            continue
        scope.step_name = step.name
        try:
            step.undo(scope, data_of.get(step.name, {}))
        except Exception as exc:  # noqa: BLE001 - keep undoing the others; report this one
            failures.append(f"{step.name}: {exc}")
            run.left.append(step.name)
            scope.log("undo of %s failed: %s", step.name, exc, level="error")
            continue
        journal.step(run_id, step.name, "undone")
        run.undone.append(step.name)
        scope.log("undone: %s", step.name, level="warning")
    if run.left:
        journal.close(run_id, "failed", "left: " + ", ".join(run.left))
    else:
        journal.close(run_id, "undone")
    if failures:
        run.details["Undo failures"] = "; ".join(failures)


# --------------------------------------------------------------------------- recovery support


def load_runbook(flow_name: str) -> Runbook:
    """The Runbook registered under ``flow_name`` (BadInput if unknown or not on the engine)."""
    import importlib

    from fabflows.registry import FLOWS

    if flow_name not in FLOWS:
        raise BadInput(f"unknown flow {flow_name!r}")
    module = importlib.import_module(FLOWS[flow_name].partition(":")[0])
    rb = getattr(module, "RUNBOOK", None)
    if not isinstance(rb, Runbook):
        raise BadInput(f"{flow_name} does not run on the runbook engine")
    return rb


@dataclass
class JournaledSteps:
    """A journaled run's steps rebuilt from its own params and plan (for undo/resume)."""

    entry: JournalEntry
    runbook: Runbook
    params: BaseModel
    plan: RunbookPlan
    steps: dict[str, Step] = field(default_factory=dict)


def rebuild(entry: JournalEntry) -> JournaledSteps:
    runbook = load_runbook(entry.flow)
    params = runbook.Params.model_validate(entry.params)
    plan_data = {k: v for k, v in entry.plan.items() if k != "step_names"}
    plan = runbook.plan_type.model_validate(plan_data)
    steps = {s.name: s for s in runbook.steps(plan, params)}
    return JournaledSteps(entry=entry, runbook=runbook, params=params, plan=plan, steps=steps)
