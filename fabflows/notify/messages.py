"""Pure: the text of each notification, from facts gathered elsewhere (no Prefect, no I/O).

Every message is a subject line and a few ``label: value`` lines. Nothing here reads parameters or
blocks: a message says which run, where, who, what happened and what is left, never a value.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

EVENT_OF_STATE = {"FAILED": "failed", "CRASHED": "crashed", "CANCELLED": "cancelled"}
APPROVAL_TIMEOUT_PREFIX = "no approval for "


class RunFacts(BaseModel):
    """What a notification says about one flow run."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    run_name: str
    flow: str
    environment: str = Field(description="deployment/environment, or '?' when unknown")
    started_by: str
    state: str = Field(description="State type: FAILED, CRASHED, PAUSED, RUNNING, ...")
    state_message: str = ""
    link: str
    auto_scheduled: bool = False
    dry_run: bool | None = None
    failing_step: str | None = None
    left: list[str] = Field(default_factory=list, description="The journal's open steps.")
    journal_state: str | None = None
    recovery: str | None = Field(
        default=None,
        description="What was done about a crashed run's maintenance state (recover_on_crash): "
        "the recovery run started, or how to start it by hand.",
    )


class Notice(BaseModel):
    """One message to send."""

    model_config = ConfigDict(frozen=True)

    event: str = Field(description="failed, crashed, cancelled, approval, window, slow, ...")
    key: str = Field(description="Sent once per key.")
    subject: str
    lines: list[tuple[str, str]]

    def render(self) -> str:
        return "\n".join(f"{label}: {value}" for label, value in self.lines)


def _minutes(delta: timedelta | None) -> str:
    if delta is None:
        return "unknown"
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60} s"


def _base(f: RunFacts) -> list[tuple[str, str]]:
    return [
        ("Flow", f.flow),
        ("Environment", f.environment),
        ("Started by", f.started_by),
    ]


def ended_notice(f: RunFacts) -> Notice | None:
    """FAILED / CRASHED / CANCELLED (an approval timeout is a CANCELLED run said as such)."""
    event = EVENT_OF_STATE.get(f.state)
    if event is None:
        return None
    timed_out = event == "cancelled" and f.state_message.startswith(APPROVAL_TIMEOUT_PREFIX)
    what = "approval timed out, rejected" if timed_out else f.state
    lines = _base(f)
    lines.append(("State", f.state))
    if f.failing_step:
        lines.append(("Failing step", f.failing_step))
    lines.append(("Message", _short(f.state_message) or "(none)"))
    if f.journal_state is None:
        left = "nothing (no journal: it applied nothing)"
    else:
        left = ", ".join(f.left) if f.left else "nothing"
    lines.append(("Left behind", left))
    if f.recovery:
        lines.append(("Recovery", f.recovery))
    if f.left:
        lines.append(("To recover", f"fabflows recover -e {f.environment.split('/')[-1]}"))
    lines.append(("Run", f"{f.run_name} {f.link}"))
    return Notice(
        event="approval-timeout" if timed_out else event,
        key=f"{f.run_id}-ended",
        subject=f"fabflows: {f.flow} on {f.environment}: {what}",
        lines=lines,
    )


def success_notice(f: RunFacts) -> Notice:
    lines = [*_base(f), ("State", f.state), ("Run", f"{f.run_name} {f.link}")]
    return Notice(
        event="success",
        key=f"{f.run_id}-ended",
        subject=f"fabflows: scheduled {f.flow} on {f.environment} completed",
        lines=lines,
    )


class ApprovalFacts(BaseModel):
    model_config = ConfigDict(frozen=True)

    plan_summary: str = ""
    expected_downtime: str = "unknown"
    requested_by: str = "unknown"
    rejects_at: datetime | None = None


def approval_notice(f: RunFacts, a: ApprovalFacts, *, reminder: bool) -> Notice:
    lines = [
        *_base(f),
        ("Asked by", a.requested_by),
        ("Expected downtime", a.expected_downtime),
        ("Plan", a.plan_summary or "(see the run's artifacts)"),
    ]
    if a.rejects_at is not None:
        lines.append(("Rejected automatically at", f"{a.rejects_at:%Y-%m-%d %H:%M:%S} UTC"))
    lines.append(("Approve or reject", f"{f.run_name} {f.link} (Resume)"))
    return Notice(
        event="approval",
        key=f"{f.run_id}-approval-{'reminder' if reminder else 'pending'}",
        subject=(
            f"fabflows: {'REMINDER: ' if reminder else ''}approval needed for {f.flow} on "
            f"{f.environment}"
        ),
        lines=lines,
    )


def window_notice(f: RunFacts, window_end: datetime, now: datetime) -> Notice:
    lines = [
        *_base(f),
        ("Window closes", f"{window_end:%Y-%m-%d %H:%M %Z} (in {_minutes(window_end - now)})"),
        ("Holds the environment", "yes (its lock)"),
        ("Run", f"{f.run_name} {f.link}"),
    ]
    return Notice(
        event="window",
        key=f"{f.run_id}-window",
        subject=f"fabflows: {f.flow} still holds {f.environment} as its window closes",
        lines=lines,
    )


def slow_notice(f: RunFacts, usual: timedelta, running_for: timedelta, factor: float) -> Notice:
    lines = [
        *_base(f),
        ("Running for", _minutes(running_for)),
        ("Usual duration", f"{_minutes(usual)} (alert at {factor:g}x)"),
        ("Run", f"{f.run_name} {f.link}"),
    ]
    return Notice(
        event="slow",
        key=f"{f.run_id}-slow",
        subject=f"fabflows: {f.flow} on {f.environment} is slow",
        lines=lines,
    )


def watchdog_notice(environment: str, kind: str, finding: str, action: str, link: str) -> Notice:
    return Notice(
        event="watchdog",
        key=f"watchdog-{environment}-{kind}-{finding}",
        subject=f"fabflows watchdog: {environment}: {finding}",
        lines=[
            ("Environment", environment),
            ("Found", finding),
            ("What it is", kind),
            ("Action", action),
            ("Watchdog run", link),
        ],
    )


def plan_summary(approval_markdown: str, max_lines: int = 15) -> tuple[str, str, str]:
    """(plan, expected downtime, requested by) from the approval request's markdown."""
    downtime = requested = "unknown"
    plan: list[str] = []
    in_plan = False
    for line in approval_markdown.splitlines():
        if "**Expected downtime:**" in line:
            downtime = line.split("**Expected downtime:**", 1)[1].strip()
        elif "**Requested by:**" in line:
            requested = line.split("**Requested by:**", 1)[1].strip()
        elif line.strip() == "### Plan":
            in_plan = True
        elif in_plan and line.startswith("Tick **approve**"):
            break
        elif in_plan and line.strip():
            plan.append(line.rstrip())
    if len(plan) > max_lines:
        plan = plan[:max_lines] + [f"… ({len(plan) - max_lines} more lines in the run's artifacts)"]
    return "\n" + "\n".join(plan) if plan else "", downtime, requested


def _short(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"
