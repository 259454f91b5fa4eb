"""A small runbook on the engine for the engine's own tests: its "system" is a directory.

- ``suspended.json``: maintenance state (like suspended autoscaling processes): step
  ``suspend`` writes it, recording what was there before; its undo puts that back;
- ``data.txt``: data (like a database): step ``write-data`` appends the wanted lines; no undo;
- ``page``: the site is down while it exists (step ``page-on``, undone by removing it).

``fail_at`` makes a step raise after doing its work only when ``<dir>/broken-<step>`` exists, so a
test can break a step, then mend it and resume.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.errors import BadInput
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.runtime.plan import Change, RunbookPlan

NAME = "toy-switch"


class ToyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: str = Field(min_length=1)
    lines: list[str] = Field(default_factory=list)
    take_site_down: bool = False


class ToyFacts(BaseModel):
    suspended: list[str]
    data: list[str]
    page: bool


class ToyPlan(RunbookPlan):
    directory: str
    add_lines: list[str] = Field(default_factory=list)
    page: bool = False


def read(directory: Path) -> ToyFacts:
    s = directory / "suspended.json"
    d = directory / "data.txt"
    return ToyFacts(
        suspended=json.loads(s.read_text()) if s.exists() else [],
        data=d.read_text().splitlines() if d.exists() else [],
        page=(directory / "page").exists(),
    )


def _maybe_break(directory: Path, step: str) -> None:
    if (directory / f"broken-{step}").exists():
        raise RuntimeError(f"{step} is broken")


def plan_toy(facts: ToyFacts, params: ToyParams, env: EnvironmentConfig) -> ToyPlan:
    add = [x for x in params.lines if x not in facts.data]
    changes = []
    if add:
        changes.append(Change(target="suspended.json", action="suspend Launch", step="suspend"))
        if params.take_site_down:
            changes.append(Change(target="page", action="page on", step="page-on"))
        changes += [Change(target="data.txt", action=f"add {x}", step="write-data") for x in add]
    return ToyPlan(
        title=f"{NAME} on {env.label}",
        environment=env.label,
        changes=changes,
        downtime_seconds=1.0 if params.take_site_down and add else None,
        directory=params.directory,
        add_lines=add,
        page=params.take_site_down,
    )


class Toy(Runbook[ToyParams, ToyFacts, ToyPlan]):
    name = NAME
    Params = ToyParams
    plan_type = ToyPlan

    def validate(self, rc, params: ToyParams) -> None:  # noqa: ANN001
        if not Path(params.directory).is_dir():
            raise BadInput(f"--directory {params.directory}: no such directory")

    def window_required(self, env: EnvironmentConfig, params: ToyParams) -> bool:
        return params.take_site_down or env.protected

    def gather(self, scope: Scope, params: ToyParams) -> ToyFacts:
        return read(Path(params.directory))

    def plan(self, facts: ToyFacts, params: ToyParams, env: EnvironmentConfig) -> ToyPlan:
        return plan_toy(facts, params, env)

    def steps(self, plan: ToyPlan, params: ToyParams) -> list[Step]:
        d = Path(plan.directory)

        def suspend(scope: Scope) -> dict:
            before = read(d).suspended
            scope.record(before=before)
            (d / "suspended.json").write_text(json.dumps(sorted({*before, "Launch"})))
            _maybe_break(d, "suspend")
            return {"before": before}

        def resume(scope: Scope, data: dict) -> None:
            (d / "suspended.json").write_text(json.dumps(data.get("before", [])))

        def page_on(scope: Scope) -> None:
            (d / "page").write_text("down")
            _maybe_break(d, "page-on")

        def page_off(scope: Scope, data: dict) -> None:
            (d / "page").unlink(missing_ok=True)

        def write(scope: Scope) -> dict:
            have = read(d).data
            with (d / "data.txt").open("a") as f:
                for line in plan.add_lines:
                    if line not in have:
                        f.write(line + "\n")
                        _maybe_break(d, "write-data")
            return {"added": plan.add_lines}

        out = [Step("suspend", suspend, resume)]
        if plan.page:
            out.append(Step("page-on", page_on, page_off, site_down=True))

        def unwrite(scope: Scope, data: dict) -> None:
            keep = [x for x in read(d).data if x not in plan.add_lines]
            (d / "data.txt").write_text("".join(x + "\n" for x in keep))

        out.append(Step("write-data", write, unwrite, auto_undo=False))
        if plan.page:
            out.append(Step("page-off", lambda s: page_off(s, {}), no_undo="ends the page"))
        out.append(Step("resume", lambda s: resume(s, s.results["suspend"]), no_undo="ends it"))
        return out

    def verify(self, scope: Scope, plan: ToyPlan, params: ToyParams) -> list[str]:
        facts = read(Path(plan.directory))
        missing = [x for x in plan.add_lines if x not in facts.data]
        return [f"missing {x}" for x in missing] + (["page still on"] if facts.page else [])


RUNBOOK = Toy()


@flow(name=NAME)
def toy_switch(
    environment: str,
    directory: str,
    lines: list[str] | None = None,
    take_site_down: bool = False,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """A toy runbook for the engine's tests.

    Args:
        environment: Environment.
        directory: The toy system's directory.
        lines: Lines the data file must have.
        take_site_down: Put the page on around the data step.
        deployment: Deployment.
        config: Config path.
        dry_run: Only plan.
        window_override_reason: Why outside the window.
    """
    args = dict(locals())
    args["lines"] = lines or []
    return execute(RUNBOOK, args)
