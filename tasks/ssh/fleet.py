"""Run one step over many hosts with rate control, like SSM's MaxConcurrency/MaxErrors.

Usage (inside a flow or task)::

    with ConnectionPool(opts) as pool:
        result = run_fleet(
            hosts, ensure_users_step, pool=pool,
            rate=RateControl(max_concurrency="25%", max_errors=0),
            dry_run=dry_run, name="update-sysadmin-users",
        )
    publish_fleet_result(result, key="update-sysadmin-users-staging")
    result.raise_for_errors()

- A *step* is ``step(remote: Remote, host: FleetHost) -> HostResult``. It reads with
  ``remote.read(...)`` and changes with ``remote.write(...)``; in a dry run the writes are recorded
  (``HostResult.commands``) and not run. The fleet fills in the host, the timing, the commands and
  ``dry_run``; a step only sets ``status``, ``message`` and optionally ``output``.
- Hosts start in order, at most ``max_concurrency`` at a time (a sliding window, not batches).
- Errors are failed hosts, unreachable ones included (refused, timed out, host key refused). When
  the errors exceed ``max_errors``, no new host starts; the running ones finish; the rest are
  ``skipped``, and :meth:`FleetResult.raise_for_errors` fails the run with a per-host report.
- Percentages are of the number of hosts: concurrency rounds up (at least 1), the error budget rounds
  down (``"10%"`` of 5 hosts is 0 errors allowed), as SSM and Ansible's ``max_fail_percentage`` do.
"""

from __future__ import annotations

import contextvars
import logging
import math
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal

import paramiko
from paramiko.ssh_exception import NoValidConnectionsError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.ssh.connection import ConnectionPool, HostKeyError
from tasks.ssh.remote import DEFAULT_COMMAND_TIMEOUT, CommandError, Remote

HostStatus = Literal["changed", "unchanged", "failed", "skipped"]

_PERCENT = re.compile(r"^(\d{1,3})%$")


class FleetError(RuntimeError):
    """A fleet run had failed hosts (or crossed its error threshold). The message is the report."""

    def __init__(self, result: FleetResult):
        self.result = result
        super().__init__(result.summary() + "\n" + result.text_report(failed_only=True))


# --------------------------------------------------------------------------- pure parts


def parse_limit(value: int | str, *, what: str) -> tuple[int, bool]:
    """``5`` -> (5, False); ``"25%"`` -> (25, True). Raises ValueError naming ``what``."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a number or a percentage")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: {value} is negative")
        return value, False
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text), False
        m = _PERCENT.match(text)
        if m:
            pct = int(m.group(1))
            if pct > 100:
                raise ValueError(f"{what}: {value!r} is more than 100%")
            return pct, True
    raise ValueError(f"{what}: {value!r} is not a number (5) or a percentage (25%)")


def concurrency_for(value: int | str, hosts: int) -> int:
    """Hosts running at once: a number (capped at ``hosts``) or a percentage rounded up; at least 1."""
    n, pct = parse_limit(value, what="max_concurrency")
    if n == 0:
        raise ValueError("max_concurrency: must be at least 1 (or 1%)")
    limit = math.ceil(n * hosts / 100) if pct else n
    return max(1, min(limit, max(hosts, 1)))


def error_budget_for(value: int | str, hosts: int) -> int:
    """Errors tolerated: a number, or a percentage of ``hosts`` rounded down."""
    n, pct = parse_limit(value, what="max_errors")
    return math.floor(n * hosts / 100) if pct else n


def threshold_crossed(errors: int, budget: int) -> bool:
    """The run stops starting hosts once errors exceed the budget (0 allowed: the first error stops)."""
    return errors > budget


class RateControl(BaseModel):
    """How fast a step fans out over hosts, and how many failures stop it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrency: int | str = Field(
        default="25%",
        description="Hosts at once: a number (5) or a percentage of the hosts (25%), at least 1.",
    )
    max_errors: int | str = Field(
        default=0,
        description="Failed hosts tolerated before no new host starts: a number or a percentage "
        "(rounded down). 0: the first failure stops the rollout.",
    )

    @field_validator("max_concurrency", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> Any:
        concurrency_for(v, 100)
        return v

    @field_validator("max_errors", mode="before")
    @classmethod
    def _errors(cls, v: Any) -> Any:
        parse_limit(v, what="max_errors")
        return v

    def concurrency(self, hosts: int) -> int:
        return concurrency_for(self.max_concurrency, hosts)

    def error_budget(self, hosts: int) -> int:
        return error_budget_for(self.max_errors, hosts)


# --------------------------------------------------------------------------- models


class FleetHost(BaseModel):
    """A host a step runs on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Display name (the Name tag, or the address).")
    address: str = Field(description="Address to connect to.")
    role: str = Field(default="", description="Server role, if known.")
    instance_id: str | None = Field(default=None, description="EC2 instance id, if known.")

    @property
    def label(self) -> str:
        """How plans and reports name this host: the name, with the instance id when known (two
        servers may share a Name tag)."""
        return server_label(self.name, self.instance_id)


def server_label(name: str | None, instance_id: str | None) -> str:
    """``web-1 (i-0abc…)``: a server's name with its instance id, or whichever of them is known."""
    if not instance_id or name == instance_id:
        return name or instance_id or ""
    return f"{name} ({instance_id})" if name else instance_id


class HostResult(BaseModel):
    """What a step did (or would do) on one host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: HostStatus = Field(description="changed / unchanged / failed / skipped.")
    message: str = Field(default="", description="One line for operators.")
    host: str = Field(default="", description="Host name (filled in by the fleet).")
    address: str = Field(default="", description="Address (filled in by the fleet).")
    role: str = Field(default="", description="Role (filled in by the fleet).")
    duration_s: float = Field(default=0.0, description="Wall time on this host (fleet).")
    dry_run: bool = Field(default=False, description="Writes were only shown (fleet).")
    commands: list[str] = Field(
        default_factory=list, description="Write commands run, or shown in a dry run (fleet)."
    )
    output: Any = Field(default=None, description="Step-specific data (facts read), not shown.")

    @property
    def label(self) -> str:
        """``would change`` in a dry run, else the status."""
        if self.dry_run and self.status == "changed":
            return "would change"
        return self.status


class FleetResult(BaseModel):
    """A step's outcome over all hosts, in host order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dry_run: bool
    max_concurrency: int = Field(description="Hosts run at once.")
    error_budget: int = Field(description="Errors tolerated before stopping.")
    stopped: bool = Field(description="The error threshold was crossed and hosts were skipped.")
    duration_s: float
    results: list[HostResult]

    def by_status(self, status: HostStatus) -> list[HostResult]:
        return [r for r in self.results if r.status == status]

    @property
    def failed(self) -> list[HostResult]:
        return self.by_status("failed")

    @property
    def changed(self) -> list[HostResult]:
        return self.by_status("changed")

    @property
    def ok(self) -> bool:
        """No host failed or was skipped."""
        return not any(r.status in ("failed", "skipped") for r in self.results)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("changed", "unchanged", "failed", "skipped")}
        for r in self.results:
            out[r.status] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        changed = "would change" if self.dry_run else "changed"
        text = (
            f"{self.name}: {len(self.results)} hosts, {c['changed']} {changed}, "
            f"{c['unchanged']} unchanged, {c['failed']} failed, {c['skipped']} skipped "
            f"in {self.duration_s:.1f} s (max {self.max_concurrency} at once, "
            f"{self.error_budget} errors tolerated)"
        )
        if self.stopped:
            text += "; STOPPED: error threshold crossed, remaining hosts not started"
        return text

    def rows(self) -> list[dict[str, Any]]:
        """Table rows: host, role, address, status, duration_s, changes, message."""
        return [
            {
                "host": r.host,
                "role": r.role,
                "address": r.address,
                "status": r.label,
                "duration_s": round(r.duration_s, 2),
                "commands": len(r.commands),
                "message": r.message,
            }
            for r in self.results
        ]

    def text_report(self, failed_only: bool = False) -> str:
        lines = []
        for r in self.results:
            if failed_only and r.status not in ("failed", "skipped"):
                continue
            lines.append(f"  {r.host} ({r.address}): {r.label}: {r.message}")
        return "\n".join(lines)

    def raise_for_errors(self) -> None:
        """Raise FleetError with the per-host report if any host failed or was skipped."""
        if not self.ok:
            raise FleetError(self)


Step = Callable[[Remote, FleetHost], HostResult]


# --------------------------------------------------------------------------- running


UNREACHABLE_ERRORS = (
    NoValidConnectionsError,
    TimeoutError,
    socket.timeout,
    paramiko.SSHException,
    ConnectionError,
    EOFError,
    OSError,
)


def _describe_unreachable(exc: BaseException) -> str:
    if isinstance(exc, NoValidConnectionsError):
        return "unreachable: connection refused (sshd down?)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"unreachable: timed out ({exc or 'no answer'})"
    if isinstance(exc, paramiko.AuthenticationException):
        return f"authentication failed: {exc}"
    text = str(exc) or type(exc).__name__
    return f"unreachable: {text}"


def _run_host(
    host: FleetHost,
    step: Step,
    pool: ConnectionPool,
    dry_run: bool,
    command_timeout: float,
    logger: logging.Logger | logging.LoggerAdapter,
) -> HostResult:
    started = time.monotonic()
    commands: list[str] = []
    try:
        conn = pool.get(host.address)
    except HostKeyError as exc:
        result = HostResult(status="failed", message=f"host key refused: {exc}")
    except paramiko.AuthenticationException as exc:
        result = HostResult(status="failed", message=f"authentication failed: {exc}")
    except UNREACHABLE_ERRORS as exc:
        result = HostResult(status="failed", message=_describe_unreachable(exc))
    else:
        remote = Remote(
            conn=conn,
            host=host.name,
            dry_run=dry_run,
            command_timeout=command_timeout,
            channel_timeout=pool.opts.connect_timeout,
        )
        commands = remote.commands
        try:
            result = step(remote, host)
            if not isinstance(result, HostResult):
                raise TypeError(f"step returned {type(result).__name__}, not HostResult")
        except CommandError as exc:
            if exc.timed_out:
                pool.discard(host.address)
            result = HostResult(status="failed", message=str(exc))
        except UNREACHABLE_ERRORS as exc:
            pool.discard(host.address)
            result = HostResult(status="failed", message=_describe_unreachable(exc))
        except Exception as exc:  # a step's own error: fail this host, count it, go on
            result = HostResult(status="failed", message=f"{type(exc).__name__}: {exc}")
    result = result.model_copy(
        update={
            "host": host.label,
            "address": host.address,
            "role": host.role,
            "duration_s": time.monotonic() - started,
            "dry_run": dry_run,
            "commands": list(commands) if not result.commands else result.commands,
        }
    )
    level = logging.WARNING if result.status == "failed" else logging.INFO
    logger.log(
        level,
        "%s (%s): %s in %.2f s%s",
        host.label,
        host.address,
        result.label,
        result.duration_s,
        f": {result.message}" if result.message else "",
    )
    return result


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow/task run
        return logging.getLogger("fabflows.fleet")


def run_fleet(
    hosts: Sequence[FleetHost],
    step: Step,
    *,
    pool: ConnectionPool,
    rate: RateControl,
    dry_run: bool,
    name: str,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
) -> FleetResult:
    """Run ``step`` on every host, at most ``rate.max_concurrency`` at once; never raises for hosts.

    Args:
        hosts: hosts in the order they should start (duplicates by address are refused).
        step: ``step(remote, host) -> HostResult``; its exceptions fail that host only.
        pool: where connections come from (reused within the run, closed by the caller).
        rate: concurrency and error threshold.
        dry_run: writes are recorded and not run (no default, on purpose).
        name: what this step is, for the report.
        command_timeout: seconds any one command may take before the host counts as failed.

    Returns:
        FleetResult; call ``raise_for_errors()`` to fail the run on failed or skipped hosts.
    """
    hosts = list(hosts)
    seen: set[str] = set()
    for h in hosts:
        if h.address in seen:
            raise ValueError(f"{name}: host address {h.address} is listed twice")
        seen.add(h.address)
    started = time.monotonic()
    concurrency = rate.concurrency(len(hosts))
    budget = rate.error_budget(len(hosts))
    logger = _logger()
    results: dict[int, HostResult] = {}
    pending = deque(enumerate(hosts))
    running: dict[Future[HostResult], int] = {}
    errors = 0
    stopped = False
    if hosts:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fleet") as pool_exec:
            while pending or running:
                while pending and len(running) < concurrency and not stopped:
                    index, host = pending.popleft()
                    ctx = (
                        contextvars.copy_context()
                    )  # keeps Prefect's run context (logger) in threads
                    future = pool_exec.submit(
                        ctx.run, _run_host, host, step, pool, dry_run, command_timeout, logger
                    )
                    running[future] = index
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    result = future.result()
                    results[index] = result
                    if result.status == "failed":
                        errors += 1
                        if not stopped and threshold_crossed(errors, budget):
                            stopped = True
                            logger.error(
                                "%s: %d error(s), more than the %d tolerated: no new host starts",
                                name,
                                errors,
                                budget,
                            )
    for index, host in pending:
        results[index] = HostResult(
            status="skipped",
            message=f"not started: {errors} error(s) crossed the threshold of {budget}",
            host=host.label,
            address=host.address,
            role=host.role,
            dry_run=dry_run,
        )
    return FleetResult(
        name=name,
        dry_run=dry_run,
        max_concurrency=concurrency,
        error_budget=budget,
        stopped=stopped,
        duration_s=time.monotonic() - started,
        results=[results[i] for i in range(len(hosts))],
    )


# --------------------------------------------------------------------------- reporting


def render_fleet_markdown(result: FleetResult, show_commands: bool = True) -> str:
    """Markdown: a summary line, the table, and (optionally) the exact commands per host."""
    from fabflows.report import markdown_table

    out = [f"**{result.summary()}**", "", markdown_table(result.rows())]
    if show_commands:
        for r in result.results:
            if not r.commands:
                continue
            verb = "would run" if r.dry_run else "ran"
            out += ["", f"**{r.host}** ({r.address}) {verb}:", "```sh", *r.commands, "```"]
    return "\n".join(out)


def publish_fleet_result(result: FleetResult, key: str, show_commands: bool = True) -> None:
    """Publish the per-host table (and the commands as markdown) as artifacts of the current run."""
    from fabflows.report import artifact_key, publish_markdown, publish_table

    key = artifact_key(key)
    publish_table(key, result.rows(), result.summary())
    if show_commands and any(r.commands for r in result.results):
        publish_markdown(
            key + "-commands", render_fleet_markdown(result), f"{result.name}: commands per host"
        )


def hosts_from_servers(servers: Sequence[Any], address_attribute: str) -> list[FleetHost]:
    """FleetHosts from ``tasks.aws.ec2.Server`` objects, addressed by config's address attribute."""
    return [
        FleetHost(
            name=s.name or s.instance_id,
            address=s.address(address_attribute),
            role=s.role,
            instance_id=s.instance_id,
        )
        for s in servers
    ]
