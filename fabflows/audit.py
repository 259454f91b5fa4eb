"""Who or what started a run, and the run-summary artifact.

Every fabflows run records its starter as a ``started-by:<kind>:<who>`` tag and in a run-summary
artifact with the plan, the outcome and the measured downtime::

    from fabflows import audit

    starter = audit.record_start(ctx.env)          # first thing in the flow (after load_context)
    ...
    audit.record_summary(ctx.env, plan_markdown=plan_md, outcome="completed", downtime=measured)

Kinds:

- ``slack`` / ``api`` / ``cli``: whoever creates the run puts the tag on it (chatops and
  ``fabflows run`` do; other API callers should pass ``tags=audit.started_by_tags("api", "<who>")``);
- ``schedule``: the run was created by the deployment's schedule (``auto_scheduled``);
- ``ui``: the Prefect UI's run dialogs set the initial state message ("Run from the Prefect UI…",
  or an empty one from the custom-run form, where API clients set none); Prefect OSS has no user
  accounts, so a UI run is recorded as ``ui:prefect-ui``;
- ``automation``: created by a Prefect automation;
- ``api:unidentified``: created through the API without a tag.
"""

from __future__ import annotations

import getpass
from datetime import timedelta
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig

STARTED_BY_PREFIX = "started-by:"

Kind = Literal["ui", "schedule", "slack", "api", "cli", "automation"]
KINDS: tuple[str, ...] = ("ui", "schedule", "slack", "api", "cli", "automation")


class Starter(BaseModel):
    """Who or what started a run."""

    model_config = ConfigDict(frozen=True)

    kind: Kind
    who: str = Field(description="Slack user, OS user, API caller, schedule or 'prefect-ui'.")
    detail: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.who}"

    @property
    def tag(self) -> str:
        return f"{STARTED_BY_PREFIX}{self.kind}:{self.who}"


def started_by_tags(kind: Kind, who: str) -> list[str]:
    """Tags to put on a run you create (``create_flow_run_from_deployment(tags=...)``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown starter kind {kind!r}; one of {', '.join(KINDS)}")
    who = who.strip().replace(",", " ")
    if not who:
        raise ValueError("who started the run must be named")
    return [f"{STARTED_BY_PREFIX}{kind}:{who}"]


def parse_tag(tag: str) -> Starter | None:
    if not tag.startswith(STARTED_BY_PREFIX):
        return None
    kind, _, who = tag[len(STARTED_BY_PREFIX) :].partition(":")
    if kind not in KINDS or not who:
        return None
    return Starter(kind=kind, who=who)  # type: ignore[arg-type]


def identify_starter(
    tags: list[str],
    auto_scheduled: bool,
    deployment_id: UUID | None,
    first_state_message: str | None,
    created_by_type: str | None = None,
    created_by_name: str | None = None,
) -> Starter:
    """Pure: who started a run, from what the run itself records."""
    for tag in tags:
        starter = parse_tag(tag)
        if starter is not None:
            return starter
    if auto_scheduled:
        return Starter(kind="schedule", who="deployment-schedule")
    if first_state_message is not None and (
        first_state_message == "" or first_state_message.startswith("Run from the Prefect UI")
    ):
        # the UI's quick run says "Run from the Prefect UI with defaults"; its custom-run form sends
        # an empty message; API clients (Python client, REST without a state) send none (None)
        return Starter(kind="ui", who="prefect-ui", detail=first_state_message or "custom run form")
    if created_by_type and created_by_type.upper() == "AUTOMATION":
        return Starter(kind="automation", who=created_by_name or "automation")
    if deployment_id is None:
        return Starter(kind="cli", who=_os_user(), detail="flow called in-process")
    return Starter(kind="api", who="unidentified", detail="created through the API without a tag")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in a container
        return "unknown"


# --------------------------------------------------------------------------- inside a flow run


def current_flow_run() -> Any | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow_run if ctx else None


def current_flow_name() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow.name if ctx and ctx.flow else None


def current_starter() -> Starter | None:
    """The starter of the current flow run (None outside a run)."""
    run = current_flow_run()
    if run is None:
        return None
    from prefect.client.orchestration import get_client

    first_message = None
    with get_client(sync_client=True) as client:
        fresh = client.read_flow_run(run.id)
        if fresh.deployment_id is not None:
            states = client.read_flow_run_states(run.id)
            states.sort(key=lambda s: s.timestamp)
            first_message = states[0].message if states else None
    created = getattr(fresh, "created_by", None)
    return identify_starter(
        list(fresh.tags or []),
        bool(fresh.auto_scheduled),
        fresh.deployment_id,
        first_message,
        getattr(created, "type", None),
        getattr(created, "display_value", None),
    )


def add_run_tags(tags: list[str]) -> None:
    """Add tags to the current flow run (no-op outside a run)."""
    run = current_flow_run()
    if run is None:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        fresh = client.read_flow_run(run.id)
        merged = list(dict.fromkeys([*(fresh.tags or []), *tags]))
        if merged != list(fresh.tags or []):
            client.update_flow_run(run.id, tags=merged)


def record_start(env: EnvironmentConfig) -> Starter:
    """Tag the current run with who started it (UI, schedule, Slack user, API caller) and log it.

    Outside a flow run (plain function call) returns a ``cli`` starter.
    """
    starter = current_starter()
    if starter is None:
        return Starter(kind="cli", who=_os_user(), detail="no flow run")
    add_run_tags([starter.tag, f"env:{env.label}"])
    from prefect.logging import get_run_logger

    get_run_logger().info("%s started by %s", env.label, starter.label)
    from fabflows.notify import inprocess, ordering

    if starter.kind == "schedule":
        # automations see a just-scheduled run's events only once its first state has one
        done = ordering.confirm_scheduled_state(current_flow_run().id)
        if done:
            get_run_logger().info("%s", done)
    inprocess.watch_this_run()  # its checks and its failure notice, without waiting for a worker
    return starter


def record_summary(
    env: EnvironmentConfig,
    *,
    outcome: str,
    plan_markdown: str = "",
    downtime: timedelta | None = None,
    details: dict[str, Any] | None = None,
    flow_name: str | None = None,
    starter: Starter | None = None,
) -> str:
    """Publish the ``run-summary-<flow>-<deployment>-<environment>`` markdown artifact.

    Args:
        env: The environment the run worked on.
        outcome: What happened, e.g. "completed", "dry run", "rejected", "stopped: window closing".
        plan_markdown: The plan as published (what would change, where, expected downtime).
        downtime: Measured downtime (None: the run caused none).
        details: Extra facts (approval, window override, counts) shown as a list.
        flow_name: Default: the current flow's name.
        starter: Default: looked up from the current run.
    Returns:
        The markdown published (also returned outside a flow run, for the CLI).
    """
    from fabflows.report import artifact_key, in_flow_run, publish_markdown

    name = flow_name or current_flow_name() or "flow"
    starter = starter or current_starter()
    lines = [
        f"# {name} on {env.label}: {outcome}",
        "",
        f"- **Started by:** {starter.label if starter else 'unknown'}"
        + (f" ({starter.detail})" if starter and starter.detail else ""),
        f"- **Outcome:** {outcome}",
        f"- **Measured downtime:** {_downtime(downtime)}",
    ]
    run = current_flow_run()
    if run is not None:
        lines.append(f"- **Flow run:** {run.name} (`{run.id}`)")
    for key, value in (details or {}).items():
        lines.append(f"- **{key}:** {value}")
    if plan_markdown:
        lines += ["", "## Plan", "", plan_markdown]
    text = "\n".join(lines)
    if in_flow_run():
        publish_markdown(
            artifact_key("run-summary", name, env.deployment, env.environment),
            text,
            f"Run summary of {name} on {env.label}",
        )
    return text


def _downtime(downtime: timedelta | None) -> str:
    if downtime is None:
        return "none"
    return f"{downtime.total_seconds():.1f} s"
