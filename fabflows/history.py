"""``fabflows runs`` and ``fabflows show RUN``: what the Prefect UI shows of past runs, in a terminal.

    fabflows runs [--environment staging] [--limit 20]
    fabflows show RUN          # a flow run id or name: state, its run summary and its plan

Everything comes from the Prefect API (the running ``fabflows server``, or $PREFECT_API_URL): the
environment from the run's ``env:`` tag, who started it from its ``started-by:`` tag
(``fabflows.audit``), the measured downtime from its run-summary artifact.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from fabflows.registry import FLOWS

ENV_TAG = "env:"
SUMMARY_PREFIX = "run-summary-"
_DOWNTIME = re.compile(r"\*\*Measured downtime:\*\*\s*(.+)")
PAGE = 200
SCAN_LIMIT = 1000
"""Runs read when an environment is given without its deployment and no config names it."""


class UnknownRun(LookupError):
    """No flow run has that id or name."""


def tag_value(tags: Iterable[str], prefix: str) -> str | None:
    return next((t[len(prefix) :] for t in tags if t.startswith(prefix)), None)


def downtime_from_summary(markdown: str | None) -> str | None:
    """The run summary's "Measured downtime" ("3.0 s", "none"), or None if it has none."""
    found = _DOWNTIME.search(markdown or "")
    return found.group(1).strip() if found else None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _duration(run: Any) -> float | None:
    if run.start_time is None:
        return None
    end = run.end_time or datetime.now(UTC)
    return (end - run.start_time).total_seconds()


def _local(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _who(tags: Sequence[str]) -> str:
    from fabflows import audit

    for tag in tags:
        starter = audit.parse_tag(tag)
        if starter is not None:
            return starter.label
    return "-"


def _summaries(client: Any, run_ids: list[UUID]) -> dict[UUID, str]:
    """The latest run-summary markdown of each run."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    if not run_ids:
        return {}
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=run_ids),
            key=ArtifactFilterKey(like_=SUMMARY_PREFIX + "%"),
        ),
        sort=ArtifactSort.CREATED_DESC,
    )
    out: dict[UUID, str] = {}
    for artifact in artifacts:
        if artifact.flow_run_id is not None:
            out.setdefault(artifact.flow_run_id, str(artifact.data or ""))
    return out


def recent_runs(
    client: Any,
    *,
    environment: str | None = None,
    limit: int = 20,
    flow_names: Sequence[str] = tuple(FLOWS),
) -> list[dict[str, str]]:
    """Rows for ``fabflows runs``, newest first.

    ``environment`` is a label (``myproject/staging``, matched exactly) or a bare environment name
    (matched on the label's last part).
    """
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterId,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    exact = environment if environment and "/" in environment else None
    run_filter = FlowRunFilter(
        start_time=FlowRunFilterStartTime(is_null_=False),
        tags=FlowRunFilterTags(all_=[ENV_TAG + exact]) if exact else None,
    )
    wanted = limit if exact or not environment else SCAN_LIMIT
    runs: list[Any] = []
    while len(runs) < wanted:  # the API gives at most PAGE runs per call
        asked = min(PAGE, wanted - len(runs))
        page = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(flow_names))),
            flow_run_filter=run_filter,
            sort=FlowRunSort.START_TIME_DESC,
            limit=asked,
            offset=len(runs),
        )
        runs += page
        if len(page) < asked:
            break
    if environment and not exact:
        runs = [
            r
            for r in runs
            if (tag_value(r.tags or [], ENV_TAG) or "").rpartition("/")[2] == environment
        ]
    runs = runs[:limit]
    flows = (
        {
            f.id: f.name
            for f in client.read_flows(
                flow_filter=FlowFilter(id=FlowFilterId(any_=list({r.flow_id for r in runs})))
            )
        }
        if runs
        else {}
    )
    summaries = _summaries(client, [r.id for r in runs])
    rows = []
    for run in runs:
        tags = list(run.tags or [])
        rows.append(
            {
                "run": run.name,
                "flow": flows.get(run.flow_id, "?"),
                "environment": tag_value(tags, ENV_TAG) or "-",
                "state": run.state.type.value if run.state else "-",
                "started by": _who(tags),
                "start": _local(run.start_time),
                "duration": format_duration(_duration(run)),
                "downtime": downtime_from_summary(summaries.get(run.id)) or "-",
            }
        )
    return rows


def find_run(client: Any, ref: str) -> Any:
    """A flow run by id, or the newest one by name. Raises UnknownRun."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    try:
        run_id = UUID(ref)
    except ValueError:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[ref])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=1,
        )
        if not runs:
            raise UnknownRun(f"no flow run named {ref!r}") from None
        return runs[0]
    try:
        return client.read_flow_run(run_id)
    except ObjectNotFound:
        raise UnknownRun(f"no flow run with id {ref}") from None


def render_run(client: Any, run: Any, ui_url: str | None = None) -> str:
    """``fabflows show``: the run's state and message, its run summary and its plan."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort

    tags = list(run.tags or [])
    flow = client.read_flow(run.flow_id)
    state = run.state
    lines = [
        f"run:          {run.name} ({run.id})",
        f"flow:         {flow.name}",
        f"environment:  {tag_value(tags, ENV_TAG) or '-'}",
        f"state:        {state.type.value if state else '-'}"
        + (f" ({state.name})" if state and state.name.upper() != state.type.value else ""),
    ]
    if state and state.message:
        lines.append(f"message:      {state.message}")
    lines += [
        f"started by:   {_who(tags)}",
        f"start:        {_local(run.start_time)}",
        f"duration:     {format_duration(_duration(run))}",
    ]
    if ui_url:
        lines.append(f"UI:           {ui_url.rstrip('/')}/runs/flow-run/{run.id}")
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])),
        sort=ArtifactSort.CREATED_DESC,
    )
    latest: dict[str, Any] = {}
    for artifact in artifacts:  # newest first: one per key
        latest.setdefault(artifact.key or str(artifact.id), artifact)
    summary = next((a for k, a in latest.items() if k.startswith(SUMMARY_PREFIX)), None)
    plan = next((a for k, a in latest.items() if k.endswith("-plan")), None)
    shown: list[str] = []
    if summary is not None:
        lines += ["", str(summary.data or "").rstrip()]
        shown.append(summary.key)
    else:
        lines += ["", "(no run summary: the run ended before writing one)"]
    if plan is not None:
        plan_text = str(plan.data or "").strip()
        if plan_text and plan_text not in str(summary.data if summary else ""):
            lines += ["", "## Plan", "", plan_text]
        shown.append(plan.key)
    others = sorted(k for k in latest if k not in shown)
    if others:
        lines += ["", f"other artifacts (in the UI): {', '.join(others)}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    runs = subparsers.add_parser(
        "runs", help="recent runs: flow, environment, state, who, start, duration, downtime"
    )
    runs.add_argument(
        "--environment", "-e", help="staging, or deployment/environment (myproject/staging)"
    )
    runs.add_argument("--limit", "-n", type=int, default=20, help="default 20")
    runs.set_defaults(handler=cmd_runs)
    show = subparsers.add_parser("show", help="one run: its state, run summary and plan")
    show.add_argument("run", help="a flow run id or name (see `fabflows runs`)")
    show.set_defaults(handler=cmd_show)


@contextmanager
def _client() -> Iterator[Any]:
    """A Prefect client for the API `fabflows run` uses (a running server or $PREFECT_API_URL)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fabflows.cli import prefect_api_url

    url = prefect_api_url()
    if url is None:
        print(
            "fabflows: no Prefect server running; reading Prefect's local database "
            "(`fabflows server start` keeps a server and its history)",
            file=sys.stderr,
        )
    with (
        temporary_settings(updates={PREFECT_API_URL: url} if url else {}),
        get_client(sync_client=True) as client,
    ):
        yield client


def _ui_url() -> str | None:
    from prefect.settings import PREFECT_UI_URL

    value = PREFECT_UI_URL.value()
    return str(value) if value else None


def cmd_runs(args: argparse.Namespace) -> int:
    from fabflows.cli import EXIT_BAD_INPUT, EXIT_OK
    from fabflows.report import text_table

    if args.limit < 1:
        print("fabflows runs: --limit must be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    with _client() as client:
        rows = recent_runs(client, environment=args.environment, limit=args.limit)
    print(
        text_table(rows)
        if rows
        else "no fabflows runs" + (f" on {args.environment}" if args.environment else "")
    )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from fabflows.cli import EXIT_BAD_INPUT, EXIT_OK

    with _client() as client:
        try:
            run = find_run(client, args.run)
        except UnknownRun as exc:
            print(f"fabflows show: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(render_run(client, run, _ui_url()))
    return EXIT_OK
