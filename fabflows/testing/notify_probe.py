"""A probe runbook on the engine for the notification tests (not registered): a "suspend" step
that holds maintenance state (a file; undone on failure), then a "work" step that sleeps and
may fail (data-like: left for recover). ``destructive`` makes its plan need approval in a
protected environment."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow
from pydantic import BaseModel, ConfigDict

from config import EnvironmentConfig
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.runtime.plan import Change, RunbookPlan

NAME = "notify-probe"


class ProbeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: str
    seconds: float = 0
    fail: bool = False
    destructive: bool = False


class ProbePlan(RunbookPlan):
    directory: str
    seconds: float = 0
    fail: bool = False


class Probe(Runbook[ProbeParams, dict, ProbePlan]):
    name = NAME
    Params = ProbeParams
    plan_type = ProbePlan

    def gather(self, scope: Scope, params: ProbeParams) -> dict:
        return {}

    def plan(self, facts: dict, params: ProbeParams, env: EnvironmentConfig) -> ProbePlan:
        return ProbePlan(
            title=f"{NAME} on {env.label}",
            environment=env.label,
            changes=[
                Change(target="probe", action="suspend", step="suspend"),
                Change(target="probe", action=f"work {params.seconds:g} s", step="work"),
            ],
            destructive=params.destructive,
            downtime_seconds=90 if params.destructive else None,
            directory=params.directory,
            seconds=params.seconds,
            fail=params.fail,
        )

    def steps(self, plan: ProbePlan, params: ProbeParams) -> list[Step]:
        d = Path(plan.directory)

        def suspend(scope: Scope) -> dict:
            (d / f"suspended-{scope.run_id}").write_text("on")
            return {}

        def resume(scope: Scope, data: dict) -> None:
            (d / f"suspended-{scope.run_id}").unlink(missing_ok=True)

        def work(scope: Scope) -> dict:
            (d / f"working-{scope.run_id}").write_text(str(os.getpid()))
            time.sleep(plan.seconds)
            if plan.fail:
                raise RuntimeError("the probe's work step failed as asked")
            return {}

        return [
            Step("suspend", suspend, resume),
            Step("work", work, no_undo="data-like", auto_undo=False),
        ]


RUNBOOK = Probe()


@flow(name=NAME)
def notify_probe(
    environment: str,
    directory: str,
    deployment: str | None = None,
    config: str | None = None,
    seconds: float = 0,
    fail: bool = False,
    destructive: bool = False,
    dry_run: bool = False,
) -> RunbookReport:
    """Suspend, then work for ``seconds`` (and fail if asked).

    Args:
        environment: Environment.
        directory: Where the probe keeps its files.
        deployment: Deployment.
        config: Config path (default: $FABFLOWS_CONFIG).
        seconds: How long the work step takes.
        fail: Make the work step fail.
        destructive: A destructive plan (approval in a protected environment).
        dry_run: Only plan.
    """
    return execute(RUNBOOK, locals())
