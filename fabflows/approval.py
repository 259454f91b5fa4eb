"""Approval of destructive runs in protected environments.

After publishing its plan and before applying it, a destructive flow calls::

    from fabflows import approval

    if approval.approval_required(ctx.env, destructive=True):
        decision = approval.request_approval(
            ctx.env, ctx.config,
            plan_markdown=render_plan(plan),          # what will change, where
            expected_downtime=timedelta(minutes=10),  # None: no downtime
        )
    # ApprovalRejected (rejected, or no decision before the timeout): nothing was applied;
    #     return exc.as_state()   -> the run ends CANCELLED with who rejected and why

The run pauses (``pause_flow_run`` with the ``Approval`` form). It is resumed from:

- the Prefect UI: the run page's "Resume" button shows the form (approve yes/no, your name, reason)
  with the plan as its description;
- the API: ``POST /api/flow_runs/<id>/resume`` with
  ``{"run_input": {"approve": true, "approver": "alice", "reason": "..."}}`` (check the body's
  ``status``: a bad input answers HTTP 200 with ``REJECT``);
- Slack: the approve/reject buttons posted by chatops (the approver is the verified Slack user).

No decision within ``fabflows.approval.timeout_minutes`` rejects the run. Every decision is logged,
tagged on the run (``approved-by:<who>`` / ``rejected-by:<who>``) and published as the
``approval-<flow>-<deployment>-<environment>`` artifact.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from prefect.input import RunInput
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig, FabulawsConfig
from config.models import ApprovalSettings

TIMEOUT_APPROVER = "timeout"
AWAITING_TAG = "awaiting-approval"
"""On a run while it waits for a decision (removed however the wait ends)."""
APPROVAL_REQUIRED_TAG = "approval:required"
"""Put on a run by its creator (chatops does, for protected environments): any apply needs approval."""


class Approval(RunInput):
    """The form shown when resuming a paused run."""

    approve: bool = Field(description="Apply this plan? Leave unticked to reject.")
    approver: str = Field(
        min_length=2, max_length=100, description="Your name (recorded with the decision)."
    )
    reason: str = Field(default="", max_length=500, description="Why (recorded).")


class ApprovalDecision(BaseModel):
    """A recorded decision."""

    model_config = ConfigDict(frozen=True)

    approved: bool
    approver: str
    reason: str = ""
    decided_at: datetime
    waited_seconds: float

    @property
    def verdict(self) -> Literal["approved", "rejected"]:
        return "approved" if self.approved else "rejected"


class ApprovalRejected(RuntimeError):
    """The plan was rejected, or nobody decided in time. Nothing has been applied."""

    def __init__(self, decision: ApprovalDecision, environment: str):
        self.decision = decision
        if decision.approver == TIMEOUT_APPROVER:
            text = (
                f"no approval for {environment} within {decision.waited_seconds:.0f} s: rejected "
                "(nothing was applied)"
            )
        else:
            text = f"{environment}: plan rejected by {decision.approver}" + (
                f": {decision.reason}" if decision.reason else ""
            )
        super().__init__(text)

    def as_state(self):  # noqa: ANN201 - prefect State
        from prefect.states import Cancelled

        return Cancelled(message=str(self))


def approval_required(env: EnvironmentConfig, destructive: bool) -> bool:
    """Does applying this plan need approval?

    Destructive plans in protected environments (production by default) do; so does any apply of a
    run tagged ``approval:required`` (runs started from Slack in protected environments).
    """
    if destructive and env.protected:
        return True
    from fabflows import audit

    run = audit.current_flow_run()
    return bool(run is not None and APPROVAL_REQUIRED_TAG in (run.tags or []))


def describe_request(
    env: EnvironmentConfig,
    flow_name: str,
    plan_markdown: str,
    expected_downtime: timedelta | None,
    requested_by: str | None,
) -> str:
    """The markdown shown with the form (and in Slack): what will change, where, downtime."""
    downtime = (
        "none expected"
        if expected_downtime is None
        else f"about {int(expected_downtime.total_seconds() // 60)} min "
        f"{int(expected_downtime.total_seconds() % 60)} s"
    )
    return "\n".join(
        [
            f"## Approve {flow_name} on {env.label}?",
            "",
            f"- **Where:** {env.label}" + (" (production)" if env.is_production else ""),
            f"- **Expected downtime:** {downtime}",
            f"- **Requested by:** {requested_by or 'unknown'}",
            "",
            "### Plan",
            "",
            plan_markdown,
            "",
            "Tick **approve** and give your name to apply; leave it unticked to reject.",
        ]
    )


def request_approval(
    env: EnvironmentConfig,
    config: FabulawsConfig | None = None,
    *,
    plan_markdown: str,
    expected_downtime: timedelta | None,
    flow_name: str | None = None,
    timeout: timedelta | None = None,
    poll: timedelta | None = None,
) -> ApprovalDecision:
    """Pause the current run until someone approves or rejects the plan.

    Args:
        env: The environment the plan changes.
        config: The loaded config (approval timeout, Slack webhook); None: defaults.
        plan_markdown: The plan: what will change, where.
        expected_downtime: Expected downtime (None: none).
        flow_name: Default: the current flow's name.
        timeout: Default: ``fabflows.approval.timeout_minutes``.
        poll: How often the paused run checks for a decision. Default: ``poll_seconds``.
    Returns:
        The approving decision.
    Raises:
        ApprovalRejected: rejected, or no decision before the timeout (recorded either way).
        RuntimeError: called outside a flow run.
    """
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.logging import get_run_logger

    from fabflows import audit
    from fabflows.report import artifact_key, publish_markdown

    run = audit.current_flow_run()
    if run is None:
        raise RuntimeError("request_approval needs a flow run (it pauses the run)")
    logger = get_run_logger()
    settings = config.fabflows.approval if config else ApprovalSettings()
    timeout = timeout or timedelta(minutes=settings.timeout_minutes)
    poll = poll or timedelta(seconds=settings.poll_seconds)
    name = flow_name or audit.current_flow_name() or "flow"
    starter = audit.current_starter()
    description = describe_request(
        env, name, plan_markdown, expected_downtime, starter.label if starter else None
    )
    key = artifact_key("approval", name, env.deployment, env.environment)
    publish_markdown(key + "-request", description, f"Approval requested for {env.label}")
    audit.add_run_tags([AWAITING_TAG])
    if config is not None and config.fabflows.chatops.webhook_block:
        from fabflows.chatops import notify

        try:
            notify.post_approval_request(config, env, run, name, description)
        except Exception:  # noqa: BLE001 - Slack being down must not block UI/API approval
            logger.warning("could not post the approval request to Slack", exc_info=True)
    # a warning: shown in the terminal without --verbose, and in the run's logs in the UI
    logger.warning("%s", where_to_approve(run, name, env, timeout))
    started = datetime.now(UTC)
    from fabflows.notify import inprocess

    inprocess.watch_approval()  # the approval notice as soon as the run is PAUSED
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(description=description, reason=""),
            timeout=max(1, int(timeout.total_seconds())),
            poll_interval=max(1, int(poll.total_seconds())),
        )
        decision = ApprovalDecision(
            approved=answer.approve,
            approver=answer.approver.strip(),
            reason=answer.reason.strip(),
            decided_at=datetime.now(UTC),
            waited_seconds=(datetime.now(UTC) - started).total_seconds(),
        )
    except FlowPauseTimeout:
        _unpause(run.id)
        decision = ApprovalDecision(
            approved=False,
            approver=TIMEOUT_APPROVER,
            reason=f"no decision within {timeout}",
            decided_at=datetime.now(UTC),
            waited_seconds=(datetime.now(UTC) - started).total_seconds(),
        )
    finally:
        # decided, timed out, Ctrl-C, cancelled or crashed: nobody is asked any more
        _remove_run_tag(run.id, AWAITING_TAG)
    _record(env, name, key, decision)
    if not decision.approved:
        raise ApprovalRejected(decision, env.label)
    return decision


def where_to_approve(run: Any, flow_name: str, env: EnvironmentConfig, timeout: timedelta) -> str:
    """What the terminal shows during the wait: the run, its UI page and the API call."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_UI_URL

    from fabflows.logfilter import redact

    api = redact(str(PREFECT_API_URL.value() or "")).rstrip("/")
    ui = redact(str(PREFECT_UI_URL.value() or "")).rstrip("/")
    body = {"run_input": {"approve": True, "approver": "<your name>", "reason": "<why>"}}
    auth = ' -u "$PREFECT_API_AUTH_STRING"' if PREFECT_API_AUTH_STRING.value() else ""
    lines = [
        f"waiting for approval of {flow_name} on {env.label} (timeout {timeout}): "
        f"resume run {run.name} ({run.id}) from the UI, the API or Slack",
    ]
    if ui:
        lines.append(f"  UI:  {ui}/runs/flow-run/{run.id}  (Resume)")
    if api:
        lines.append(
            f"  API: curl -X POST{auth} {api}/flow_runs/{run.id}/resume "
            f"-H 'Content-Type: application/json' -d '{json.dumps(body)}'"
            "  (approve: false rejects)"
        )
    return "\n".join(lines)


def _remove_run_tag(flow_run_id: Any, tag: str) -> None:
    """Best effort: an unreachable API must not replace the exception that ended the wait."""
    from prefect.client.orchestration import get_client
    from prefect.logging import get_run_logger

    try:
        with get_client(sync_client=True) as client:
            tags = list(client.read_flow_run(flow_run_id).tags or [])
            if tag in tags:
                client.update_flow_run(flow_run_id, tags=[t for t in tags if t != tag])
    except Exception as exc:  # noqa: BLE001 - reported; the run's own outcome matters more
        get_run_logger().warning("could not remove the %s tag: %s", tag, exc)


def _unpause(flow_run_id: object) -> None:
    """Back to RUNNING after a pause timeout, so the flow can clean up and end with its own state.

    (Left PAUSED, the server turns the flow's final state into FAILED "never resumed" and would
    refuse new task runs of an undo path.)
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(
            flow_run_id, Running(message="approval timed out: rejected"), force=True
        )


def _record(env: EnvironmentConfig, flow_name: str, key: str, decision: ApprovalDecision) -> None:
    from prefect.logging import get_run_logger

    from fabflows import audit
    from fabflows.report import publish_markdown

    who = decision.approver.replace(",", " ")
    audit.add_run_tags([f"{decision.verdict}-by:{who}"])
    text = "\n".join(
        [
            f"# {flow_name} on {env.label}: {decision.verdict}",
            "",
            f"- **Decision:** {decision.verdict}",
            f"- **By:** {decision.approver}",
            f"- **Reason:** {decision.reason or '-'}",
            f"- **At:** {decision.decided_at.isoformat(timespec='seconds')}",
            f"- **Waited:** {decision.waited_seconds:.0f} s",
        ]
    )
    publish_markdown(key, text, f"Approval decision for {env.label}")
    logger = get_run_logger()
    if decision.approved:
        logger.info("plan approved by %s (%s)", decision.approver, decision.reason or "no reason")
    else:
        logger.warning("plan rejected by %s (%s)", decision.approver, decision.reason or "-")
