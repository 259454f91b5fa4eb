"""update-sysadmin-users' pure parts: the plan over the environment, its rendering, the batches.

The plan is what the engine publishes, journals and compares under the lock: per server what
changes (with the exact commands; keys only by type, size and digest), the servers that could
not be read, and the batches the apply goes through (one engine step per batch, so a resumed run
skips the batches already done).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig, FabulawsConfig
from fabflows.errors import BadInput
from fabflows.report import markdown_table, text_table
from fabflows.runtime.plan import Change as PlanChange
from fabflows.runtime.plan import RunbookPlan
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.ec2 import Server
from tasks.ssh.fleet import (
    FleetHost,
    FleetResult,
    RateControl,
    concurrency_for,
    server_label,
)
from tasks.ssh.remote import display
from tasks.ssh.users_plan import Change, HostFacts, SysadminUsersSpec, plan_host_users

FLOW_NAME = "update-sysadmin-users"
DESTRUCTIVE_ACTIONS = ("lock-account", "remove-account", "leave-group", "remove-keys")


class HostPlan(BaseModel):
    """What one server needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    role: str
    status: str = Field(description="would change / unchanged / unreachable / refused.")
    changes: list[Change] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    message: str = ""


class Batch(BaseModel):
    """Servers updated together, as one engine step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str
    hosts: list[FleetHost]


class UpdateSysadminUsersPlan(RunbookPlan):
    """The plan over the environment, as published before anything changes."""

    users: list[str]
    user_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per listed user, each key as type, size and SHA256 digest (never the key).",
    )
    deploy_user: str
    connect_user: str
    remove_unlisted: bool
    hosts: list[HostPlan]
    not_reached: list[str] = Field(
        default_factory=list, description="Servers not running: not updated (stale when started)."
    )
    image_note: str | None = Field(default=None, description="Autoscaling image staleness.")
    batches: list[Batch] = Field(default_factory=list, description="The apply's steps.")
    error_budget: int = Field(default=0, description="Failed servers tolerated (max_errors).")

    @property
    def changing(self) -> list[HostPlan]:
        return [h for h in self.hosts if h.changes]

    @property
    def blocked(self) -> list[HostPlan]:
        return [h for h in self.hosts if h.status in ("unreachable", "refused", "not read")]

    def blocked_lines(self) -> list[str]:
        return [
            f"{h.host} ({h.address}): "
            + (h.message if h.message.startswith(h.status) else f"{h.status}: {h.message}")
            for h in self.blocked
        ]

    def approved(self) -> dict[str, list[str]]:
        """Address -> change summaries: the apply step refuses hosts that drifted from this."""
        return {h.address: [c.summary for c in h.changes] for h in self.hosts}

    def rows(self) -> list[dict[str, object]]:  # type: ignore[override]
        return [
            {
                "host": h.host,
                "role": h.role,
                "address": h.address,
                "status": h.status,
                "changes": len(h.changes),
                "what": h.message,
            }
            for h in self.hosts
        ]

    def render_markdown(self) -> str:
        return render_plan(self) + f"\n\nPlan digest: `{self.digest()}`"

    def render_text(self) -> str:
        """The compact plan the terminal prints (keys by type, size and digest; no raw data)."""
        return render_plan(self, markdown=False) + f"\ndigest {self.digest()}"


# --------------------------------------------------------------------------- pure parts


def image_note(
    env: EnvironmentConfig,
    servers: Sequence[Server],
    group: AutoScalingGroup | None,
    changing: bool,
) -> str | None:
    """Web servers the autoscaling group launches later come from an image that lacks this change."""
    if not env.auto_scaling_group or not changing:
        return None
    images = sorted({s.image_id for s in servers if s.auto_scaling_group and s.image_id})
    template = (
        f"launch template {group.launch_template} (version {group.launch_template_version})"
        if group and group.launch_template
        else "its launch template"
    )
    return (
        f"Web servers launched later by autoscaling group {env.auto_scaling_group} start from "
        f"{template}, image {', '.join(images) or 'unknown'}, which still has the old sysadmin "
        "users: the image is STALE and needs a refresh (run deploy-serial). "
        "Until then, run this flow again after every scale-out."
    )


def batches_for(hosts: Sequence[FleetHost], changing: set[str], rate: RateControl) -> list[Batch]:
    """Pure: all running servers in order, cut into batches of ``max_concurrency``; a batch with a
    server that needs changes is a step, named after its first server (stable across a re-plan,
    so a resume finds the steps it did)."""
    size = concurrency_for(rate.max_concurrency, len(hosts))
    out = []
    for start in range(0, len(hosts), size):
        batch = list(hosts[start : start + size])
        todo = [h for h in batch if h.address in changing]
        if todo:
            first = batch[0]
            out.append(Batch(step=f"users-{first.instance_id or first.address}", hosts=todo))
    return out


def plan_update_sysadmin_users(
    env: EnvironmentConfig,
    spec: SysadminUsersSpec,
    servers: Sequence[Server],
    hosts: Sequence[FleetHost],
    gathered: FleetResult,
    group: AutoScalingGroup | None,
    rate: RateControl | None = None,
) -> UpdateSysadminUsersPlan:
    """Pure: per server, the changes that bring it to ``spec`` (from the facts read on it)."""
    rate = rate or RateControl()
    by_address = {r.address: r for r in gathered.results}
    rows: list[HostPlan] = []
    for host in hosts:
        read = by_address.get(host.address)
        base = {"host": host.label, "address": host.address, "role": host.role}
        if read is None or not isinstance(read.output, HostFacts):
            why = read.message if read is not None else "not read"
            status = "unreachable" if read is None or read.status != "skipped" else "not read"
            rows.append(HostPlan(**base, status=status, message=why))
            continue
        plan = plan_host_users(read.output, spec)
        if plan.errors:
            rows.append(
                HostPlan(**base, status="refused", notes=plan.notes, message="; ".join(plan.errors))
            )
            continue
        rows.append(
            HostPlan(
                **base,
                status="would change" if plan.changes else "unchanged",
                changes=plan.changes,
                notes=plan.notes,
                message="; ".join(plan.summaries()) or "already as listed",
            )
        )
    not_reached = [
        f"{server_label(s.name, s.instance_id)} ({s.state})"
        for s in servers
        if s.state != "running"
    ]
    changing = {r.address for r in rows if r.changes}
    batches = batches_for(hosts, changing, rate)
    step_of = {h.address: b.step for b in batches for h in b.hosts}
    budget = rate.error_budget(len(hosts))
    blocked = [r for r in rows if r.status in ("unreachable", "refused", "not read")]
    problems = []
    if len(blocked) > budget:
        not_read = sum(1 for h in blocked if h.status == "not read")
        problems.append(
            f"stopped before any change: {len(blocked) - not_read} server(s) unreachable or "
            f"refused, more than the {budget} tolerated"
            + (f" ({not_read} not read after that)" if not_read else "")
            + ":\n"
            + "\n".join(
                f"  {h.host} ({h.address}): "
                + (h.message if h.message.startswith(h.status) else f"{h.status}: {h.message}")
                for h in blocked
            )
        )
    return UpdateSysadminUsersPlan(
        title=f"update-sysadmin-users on {env.label}",
        environment=env.label,
        changes=[
            PlanChange(
                target=r.host, action=c.summary, detail=c.action, step=step_of.get(r.address, "")
            )
            for r in rows
            for c in r.changes
        ],
        destructive=any(c.action in DESTRUCTIVE_ACTIONS for r in rows for c in r.changes),
        problems=problems,
        users=[u.name for u in spec.users],
        user_keys={u.name: [k.describe() for k in u.public_keys] for u in spec.users},
        deploy_user=spec.deploy_user,
        connect_user=spec.connect_user,
        remove_unlisted=spec.remove_unlisted,
        hosts=rows,
        not_reached=not_reached,
        image_note=image_note(env, servers, group, bool(changing)),
        batches=batches,
        error_budget=budget,
    )


def render_plan(plan: UpdateSysadminUsersPlan, *, markdown: bool = True) -> str:
    """The users and their keys (type, size, digest), then the changes grouped by hosts that need
    the same ones, with commands. Markdown for the UI artifact, plain text for the terminal."""

    def heading(text: str, level: int) -> list[str]:
        if markdown:
            return ["#" * level + " " + text]
        return [text, ("=" if level == 1 else "-") * min(len(text), 80)]

    def bold(text: str) -> str:
        return f"**{text}**" if markdown else text

    def code(text: str) -> str:
        return f"`{text}`" if markdown else text

    out = [
        *heading(f"update-sysadmin-users on {plan.environment}", 1),
        "",
        f"{bold(f'Listed users ({len(plan.users)}):')} {', '.join(plan.users)}",
    ]
    for user in plan.users:
        for key in plan.user_keys.get(user, []):
            out.append(f"- {user}: {code(key)}")
    out += [
        f"{bold('Deploy user')} {code(plan.deploy_user)}: authorized_keys rebuilt from the listed "
        "keys" + (" plus fabflows' own key" if plan.connect_user == plan.deploy_user else ""),
        f"{bold('Accounts no longer listed:')} {'REMOVED' if plan.remove_unlisted else 'locked'} "
        "(only accounts fabflows manages)",
        "",
        markdown_table(plan.rows())
        if markdown
        else text_table(  # a terminal line per server: its changes are listed below
            [r | {"what": "listed below"} if r["changes"] else r for r in plan.rows()]
        ),
    ]
    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
    for h in plan.changing:
        key = (
            tuple(c.summary for c in h.changes),
            tuple(
                display(
                    ["sudo", "-n", "--", *c.argv], c.stdin.encode() if c.stdin is not None else None
                )
                for c in h.changes
            ),
        )
        groups.setdefault(key, []).append(h.host)
    for (summaries, commands), names in groups.items():
        out += ["", *heading(f"{', '.join(names)} ({len(names)} host(s))", 2), ""]
        out += [f"- {s}" for s in summaries]
        out += [
            "",
            f"Exact commands, run in this order as one {code('sudo -n -- sh -c')} batch per server "
            "that stops at the first failure (keys travel on stdin, shown by size and digest):",
            "",
        ]
        out += ["```sh", *commands, "```"] if markdown else [f"  {c}" for c in commands]
    notes = sorted({n for h in plan.hosts for n in h.notes})
    if notes or plan.not_reached or plan.image_note or plan.problems:
        out += ["", *heading("Notes", 2), ""]
        out += [f"- PROBLEM: {p}" for p in plan.problems]
        out += [f"- {n}" for n in notes]
        out += [f"- not updated (not running): {s}" for s in plan.not_reached]
        if plan.image_note:
            out.append(f"- {bold(plan.image_note)}")
    if len(plan.batches) > 1:
        out += ["", f"Steps ({len(plan.batches)}, servers in each): " + ", ".join(
            f"{b.step} ({len(b.hosts)})" for b in plan.batches
        )]  # fmt: skip
    return "\n".join(out)


def resolve_users_dir(users_dir: str | None, config: FabulawsConfig) -> Path:
    """The parameter, else the config's ``ssh_keys`` (FabulAWS's ``deployment/users/``)."""
    if users_dir:
        return Path(users_dir).expanduser()
    if config.ssh_keys:
        return Path(config.ssh_keys).expanduser()
    raise BadInput("no users directory: pass --users-dir DIR (or set ssh_keys in the config)")


def reserved_names(config: FabulawsConfig, env: EnvironmentConfig) -> list[str]:
    extra = config.model_extra or {}
    names = [env.deploy_user, *env.admin_groups]
    if isinstance(extra.get("webserver_user"), str):
        names.append(extra["webserver_user"])
    return names
