"""stop-environment's and start-environment's runbook plans (pure): the power plans of
:mod:`fabflows.procedures.environment_power` as changes by step, with the saving."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field

from fabflows.procedures.environment_power import PowerPlan, ServerAction
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.pricing import SavingsReport


def _label(s: ServerAction) -> str:
    return f"{s.name} ({s.instance_id})" if s.name and s.name != s.instance_id else s.instance_id


def stop_step_names(plan: PowerPlan) -> list[str]:
    """Pure: the steps of a stop plan, in order (each one undone by its part of a start)."""
    out = []
    if plan.group is not None and plan.group.target is not None:
        out.append("scale-web-group-to-zero")
    if plan.quiet:
        out.append("quiet-workers")
    for p in plan.phases:
        if p.ids("stop"):
            out.append(f"stop-{p.role}")
        if p.ids("terminate"):
            out.append(f"terminate-{p.role}")
    return out


def start_step_names(plan: PowerPlan) -> list[str]:
    """Pure: the steps of a start plan, in order."""
    out = ["launch-cache"] if plan.cache_recreate is not None else []
    out += [f"start-{p.role}" for p in plan.phases if p.ids("start", "check")]
    if plan.group is not None and plan.group.recorded is not None:
        out.append("restore-web-group")
    if out:
        out += ["check-site", "clear-records"]
    return out


class StopPlan(RunbookPlan):
    """stop-environment's plan: the power plan and what the stopped capacity costs per hour."""

    power: PowerPlan
    usd_per_hour: float = Field(description="On-demand price of what the stop turns off.")

    def digest(self) -> str:  # the cache's record time is the planning time: not the plan
        data: dict[str, Any] = self.model_dump(
            mode="json", exclude={"power": {"cache_record": {"since"}}}
        )
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class StartPlan(RunbookPlan):
    """start-environment's plan: the power plan and the saving so far (not part of the digest)."""

    DIGEST_EXCLUDE = {"savings"}

    power: PowerPlan
    savings: SavingsReport | None = None

    def render_markdown(self) -> str:
        out = super().render_markdown()
        if self.savings is not None and self.savings.rows:
            out += "\n\n## Saved while stopped\n\n" + self.savings.markdown()
        return out

    def render_text(self) -> str:
        out = super().render_text()
        if self.savings is not None and self.savings.rows:
            roles = ", ".join(sorted({r.role for r in self.savings.rows}))
            out += f"\nsaved while stopped: about ${self.savings.total_usd:,.2f} ({roles})"
        return out


def stop_runbook_plan(plan: PowerPlan, usd_per_hour: float, title: str) -> StopPlan:
    """Pure: the runbook plan (changes by step) of a stop plan."""
    changes: list[Change] = []
    noops: list[str] = []
    g = plan.group
    if g is not None:
        if g.target is not None:
            changes.append(
                Change(
                    target=f"{g.auto_scaling_group_name} (web group)",
                    action="set " + "/".join(map(str, g.target)),
                    detail=f"{'/'.join(map(str, g.current))}: {g.reason}",
                    step="scale-web-group-to-zero",
                )
            )
        else:
            noops.append(f"{g.auto_scaling_group_name}: {g.reason}")
    for s in plan.quiet:
        changes.append(
            Change(target=_label(s), action="stop background services", step="quiet-workers")
        )
    for p in plan.phases:
        for s in p.servers:
            if s.action in ("stop", "terminate"):
                changes.append(
                    Change(
                        target=_label(s),
                        action=s.action,
                        detail=f"{s.role}, {s.instance_type}"
                        + (f": {s.reason}" if s.reason else ""),
                        step=f"{s.action}-{p.role}",
                    )
                )
            else:
                noops.append(f"{s.role} {_label(s)}: {s.reason or s.state}")
    notes = list(plan.warnings)
    if plan.queued_messages is not None:
        notes.append(f"queued messages on the cache: {sum(plan.queued_messages.values())}")
    notes.append(f"while stopped this saves about ${usd_per_hour:.3f} per hour (on-demand)")
    return StopPlan(
        title=title,
        environment=plan.environment,
        changes=changes,
        noops=noops,
        destructive=plan.cache_record is not None,
        downtime_seconds=None,
        problems=list(plan.problems),
        notes=notes,
        power=plan,
        usd_per_hour=usd_per_hour,
    )


def start_runbook_plan(plan: PowerPlan, savings: SavingsReport | None, title: str) -> StartPlan:
    """Pure: the runbook plan of a start plan; running servers are checked (a change too, so a
    start of a running environment still makes sure everything is in service)."""
    changes: list[Change] = []
    noops: list[str] = []
    if plan.cache_recreate is not None:
        r = plan.cache_recreate.record
        changes.append(
            Change(
                target=f"cache at {r.ip}",
                action="launch",
                detail=f"{r.type} from {plan.cache_recreate.launch_template}",
                step="launch-cache",
            )
        )
    for p in plan.phases:
        for s in p.servers:
            changes.append(
                Change(
                    target=_label(s),
                    action="start, bring into service"
                    if s.action == "start"
                    else "check in service",
                    detail=f"{s.role}, {s.instance_type}, {s.state}",
                    step=f"start-{p.role}",
                )
            )
    g = plan.group
    if g is not None and g.recorded is not None:
        changes.append(
            Change(
                target=f"{g.auto_scaling_group_name} (web group)",
                action=("set " + "/".join(map(str, g.target))) if g.target else "wait InService",
                detail=f"{'/'.join(map(str, g.current))}: {g.reason}",
                step="restore-web-group",
            )
        )
    elif g is not None:
        noops.append(f"{g.auto_scaling_group_name}: {g.reason}")
    if changes:
        changes.append(Change(target="web servers and site", action="check 200", step="check-site"))
        changes.append(
            Change(target="stop records", action="remove once in service", step="clear-records")
        )
    return StartPlan(
        title=title,
        environment=plan.environment,
        changes=changes,
        noops=noops,
        problems=list(plan.problems),
        notes=list(plan.warnings),
        power=plan,
        savings=savings,
    )
