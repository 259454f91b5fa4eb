"""deploy-serial: bring every web server to a new image, one surge at a time, never below capacity."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows import approval, audit, lock
from fabflows.errors import BadInput, Refused
from fabflows.report import artifact_key, markdown_table, publish_markdown, text_table
from fabflows.runbook import RunContext, load_context
from tasks.aws.autoscaling import AutoScalingGroup, describe_auto_scaling_group
from tasks.aws.images import (
    Image,
    create_image,
    deregister_image,
    image_name,
    list_images,
    wait_for_image,
)
from tasks.aws.instance_refresh import (
    GroupInstance,
    describe_group_instances,
    enter_standby,
    exit_standby,
    set_desired_capacity,
    terminate_group_instance,
    wait_for_new_instance,
)
from tasks.aws.launch_templates import (
    TemplateVersion,
    create_launch_template_version,
    delete_launch_template_versions,
    describe_launch_template_versions,
    set_group_template_version,
)
from tasks.aws.load_balancers import Targets, wait_for_load_balancers
from tasks.http.probe import HttpProbe, ProbeSummary, check_site_up

BLOCKING_PROCESSES = ("Launch", "Terminate", "AddToLoadBalancer", "HealthCheck")
"""Suspended, these would stop the surge (no launch), keep old instances (no terminate) or leave new
ones out of the load balancers."""


class Replacement(BaseModel):
    """One old instance replaced by one new one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    old_instance_id: str
    old_image_id: str | None
    old_address: str | None


class DeploySerialPlan(BaseModel):
    """The plan of deploy-serial."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    auto_scaling_group: str
    template: str
    current_version: int = Field(description="The template version the group launches now.")
    source_instance: str
    source_address: str | None
    image_name: str
    desired: int
    max_size: int
    replacements: list[Replacement]
    prune_images: list[Image] = Field(default_factory=list)
    prune_versions: list[int] = Field(default_factory=list)
    keep: int

    def render_markdown(self) -> str:
        return self._render(markdown=True)

    def render_text(self) -> str:
        """The same plan for the terminal: plain text and a fixed-width table."""
        return self._render(markdown=False)

    def _render(self, *, markdown: bool) -> str:
        def code(text: str) -> str:
            return f"`{text}`" if markdown else text

        rows = [
            {
                "step": i + 1,
                "add": "1 new instance (new image), wait until it serves",
                "then remove": f"{r.old_instance_id} ({r.old_address or '-'}, {r.old_image_id or '-'})",
            }
            for i, r in enumerate(self.replacements)
        ]
        title = (
            f"{self.environment}: refresh {len(self.replacements)} web server(s) of "
            f"{code(self.auto_scaling_group)} onto a new image, one at a time with surge"
        )
        out = [
            f"**{title}**" if markdown else title,
            "",
            f"- image {code(self.image_name)} from {self.source_instance} ({self.source_address})",
            f"- launch template {code(self.template)}: new version from v{self.current_version} "
            "(the group and the template's default point at it)",
            f"- capacity: desired {self.desired}, up to {self.desired + 1} during each step "
            f"(max {self.max_size}); never below {self.desired} serving",
            f"- keep {self.keep} image(s)/version(s); prune images "
            f"{', '.join(i.name for i in self.prune_images) or 'none'}, versions "
            f"{', '.join(f'v{v}' for v in self.prune_versions) or 'none'}",
            "",
            markdown_table(rows) if markdown else text_table(rows),
        ]
        return "\n".join(out)


class InstanceImage(BaseModel):
    """Which image one instance runs (the report after the run, good or bad)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance_id: str
    lifecycle_state: str
    image_id: str | None
    address: str | None
    new: bool = Field(description="Runs the image this run made.")


class DeploySerialResult(BaseModel):
    """What deploy-serial did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: DeploySerialPlan
    dry_run: bool
    image_id: str | None = None
    template_version: int | None = None
    replaced: dict[str, str] = Field(default_factory=dict, description="old -> new instance id.")
    instances: list[InstanceImage] = Field(default_factory=list)
    duration_s: float | None = None
    probe: ProbeSummary | None = None
    pruned: list[str] = Field(default_factory=list)
    outcome: str = ""

    def render_text(self) -> str:
        """What the terminal prints: the outcome, what runs where, then the plan."""
        out = [f"deploy-serial {self.plan.environment}: {self.outcome or 'done'}"]
        if not self.dry_run:
            out.append(
                f"image {self.image_id}, launch template version v{self.template_version}; "
                f"{len(self.replaced)} instance(s) replaced"
                + (f" in {self.duration_s:.0f} s" if self.duration_s is not None else "")
            )
            out += [f"  {old} -> {new}" for old, new in self.replaced.items()]
            if self.probe:
                out.append(f"site probe: {self.probe.describe()}")
            out.append(f"pruned: {', '.join(self.pruned) or 'none'}")
            if self.instances:
                out += ["", text_table([i.model_dump() for i in self.instances])]
        out += ["", self.plan.render_text()]
        return "\n".join(out)


class RefreshFailed(RuntimeError):
    """The refresh stopped; the group is at its desired capacity. ``instances`` says who runs what."""

    def __init__(self, message: str, instances: list[InstanceImage]):
        self.instances = instances
        table = "; ".join(
            f"{i.instance_id} {i.lifecycle_state} {i.image_id}{' (new)' if i.new else ''}"
            for i in instances
        )
        super().__init__(f"{message}. Instances now: {table}")


# --------------------------------------------------------------------------- pure


def resolve_version(spec: str | None, versions: list[TemplateVersion]) -> int:
    """``$Latest`` / ``$Default`` / ``"3"`` -> a version number (pure)."""
    if not versions:
        raise BadInput("the launch template has no version")
    if spec in (None, "", "$Latest"):
        return versions[-1].number
    if spec == "$Default":
        return next(v.number for v in versions if v.default)
    return int(spec)


def plan_deploy_serial(
    env: EnvironmentConfig,
    group: AutoScalingGroup,
    instances: list[GroupInstance],
    versions: list[TemplateVersion],
    images: list[Image],
    keep: int,
    source: str | None,
    now: datetime,
) -> DeploySerialPlan:
    """Pure: check the group can surge, pick the source, list replacements and what to prune.

    Raises:
        BadInput: the group cannot do a surge refresh (no template, no room above desired, unknown
            source instance).
        Refused: the group is not in a state to start (suspended processes, instances not InService).
    """
    name = group.auto_scaling_group_name
    if not group.launch_template or group.launch_template_version is None:
        raise BadInput(f"{name} has no launch template (launch configurations are not supported)")
    suspended = [p for p in group.suspended_processes if p in BLOCKING_PROCESSES]
    if suspended:
        raise Refused(
            f"{name} has {', '.join(suspended)} suspended (upgrade mode?): end it first "
            "(end-upgrade), a surge refresh needs them"
        )
    not_ready = [i for i in instances if i.lifecycle_state != "InService"]
    if not_ready:
        raise Refused(
            f"{name} has instances not InService: "
            + ", ".join(f"{i.instance_id} {i.lifecycle_state}" for i in not_ready)
            + " (a previous run may have left one in Standby: exit-standby it, or wait)"
        )
    if len(instances) != group.desired_capacity:
        raise Refused(
            f"{name} has {len(instances)} instance(s) for a desired capacity of "
            f"{group.desired_capacity}: wait until it settles"
        )
    if group.desired_capacity + 1 > group.max_size:
        raise BadInput(
            f"{name}: max size {group.max_size} leaves no room for one more instance above the "
            f"desired {group.desired_capacity}; raise MaxSize to at least {group.desired_capacity + 1}"
        )
    if not instances:
        raise BadInput(f"{name} has no instance to make the image from")
    if source is not None:
        chosen = next((i for i in instances if i.instance_id == source), None)
        if chosen is None:
            raise BadInput(
                f"source_instance {source} is not an InService instance of {name} "
                f"({', '.join(i.instance_id for i in instances)})"
            )
    else:
        newest = max(i.launch_time or datetime.min.replace(tzinfo=UTC) for i in instances)
        chosen = next(
            i for i in instances if (i.launch_time or datetime.min.replace(tzinfo=UTC)) == newest
        )
    current = resolve_version(group.launch_template_version, versions)
    # after a successful run the new version (the default then) and the newest keep-1 older ones
    # stay, and the images they or fabflows' newest keep-1 images use
    older = sorted(v.number for v in versions)
    keep_versions = set(older[-(keep - 1) :]) if keep > 1 else set()
    prune_versions = [n for n in older if n not in keep_versions]
    kept_versions_images = {v.image_id for v in versions if v.number in keep_versions}
    keep_images = {i.image_id for i in images[-(keep - 1) :]} if keep > 1 else set()
    prune_images = [
        i
        for i in images
        if i.image_id not in keep_images and i.image_id not in kept_versions_images
    ]
    return DeploySerialPlan(
        environment=env.label,
        auto_scaling_group=name,
        template=group.launch_template,
        current_version=current,
        source_instance=chosen.instance_id,
        source_address=chosen.private_ip_address,
        image_name=image_name(env.deployment, env.environment, now),
        desired=group.desired_capacity,
        max_size=group.max_size,
        replacements=[
            Replacement(
                old_instance_id=i.instance_id,
                old_image_id=i.image_id,
                old_address=i.private_ip_address,
            )
            for i in instances
        ],
        prune_images=prune_images,
        prune_versions=sorted(prune_versions),
        keep=keep,
    )


# --------------------------------------------------------------------------- the steps


def _instances_now(ctx: RunContext, group: str, image_id: str | None) -> list[InstanceImage]:
    return [
        InstanceImage(
            instance_id=i.instance_id,
            lifecycle_state=i.lifecycle_state,
            image_id=i.image_id,
            address=i.private_ip_address,
            new=image_id is not None and i.image_id == image_id,
        )
        for i in describe_group_instances(ctx.creds, group)
    ]


def _server_url(ctx: RunContext, address: str | None) -> str:
    return ctx.config.fabflows.upgrade.web_server_url.format(address=address)


def _remove_surge(ctx: RunContext, group: str, known: list[str], desired: int) -> None:
    """Compensation of a surge step: take out instances that are not ``known``; desired back."""
    logger = get_run_logger()
    for inst in describe_group_instances(ctx.creds, group):
        if inst.instance_id not in known:
            logger.warning("removing %s: it never served", inst.instance_id)
            if inst.lifecycle_state == "Standby":
                terminate_group_instance(
                    ctx.creds, group, inst.instance_id, decrement=False, dry_run=False
                )
            else:
                terminate_group_instance(
                    ctx.creds, group, inst.instance_id, decrement=True, dry_run=False
                )
    set_desired_capacity(ctx.creds, group, desired, dry_run=False)


@flow(name="deploy-serial", log_prints=False)
def deploy_serial(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    source_instance: str | None = None,
    keep_images: int | None = None,
) -> DeploySerialResult:
    """Bring every web server of the autoscaling group to a new image, with surge capacity.

    The original built a whole new server for the image, refreshed one instance at a time with no
    surge (capacity N-1 during each replacement), fixed sleeps (45 s, 120 s) and polls with no
    timeout, and never pruned launch configurations or AMIs. Here:

    1. **Image:** CreateImage of an up-to-date web server (the newest, or `source_instance`), no
       reboot unless `fabflows.refresh.reboot_for_image`; wait with a timeout.
    2. **Template:** a new launch template version (the group's current one with the new image);
       the group and the template's default point at it.
    3. **Surge, one at a time:** desired + 1 launches a new instance; wait until it is InService,
       in every load balancer and answers 200 itself (each wait with a timeout and an error naming
       what is missing); only then the old one goes to Standby (out of the load balancers), drains
       and is terminated. Capacity never drops below desired.
    4. **Prune** fabflows' images and template versions beyond `fabflows.refresh.keep_images`.

    **When to run:** at the end of any procedure that changes web servers' packages, files or keys
    (push-server-secrets, update-newrelic-keys, upgrade-packages), so new instances carry them.

    **Blast radius:** the web group's instances (all replaced), one new image, one new template
    version; old images/versions beyond the kept number are deleted (no undo for those). No
    downtime: a probe on the site URL counts any non-200 answer and the run reports it.

    **Dry run shows:** the source server, the image name, the replacements in order, the capacity
    and what would be pruned. Refusals (suspended processes, Standby instances, no room above
    desired) come before anything changes.

    **Rollback:** a new instance that does not serve in time is terminated and desired capacity
    set back; if no old instance was replaced yet, the group goes back to its previous template
    version. The run fails with the list of which instance runs which image; instances already
    replaced stay on the new image (they served). A run killed outright leaves at most one extra
    instance or one old instance in Standby, both visible in describe-environment.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Set false to refresh.
        source_instance: Instance to image (default: the group's newest InService instance).
        keep_images: Images and template versions kept (default: fabflows.refresh.keep_images).
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    audit.record_start(env)
    settings = ctx.config.fabflows.refresh
    keep = keep_images if keep_images is not None else settings.keep_images
    if keep < 1:
        raise BadInput(f"keep_images must be at least 1 (got {keep})")
    if not env.auto_scaling_group:
        raise BadInput(f"{env.label} has no autoscaling group in config (auto_scaling_groups)")
    group = describe_auto_scaling_group(ctx.creds, env.auto_scaling_group)
    if group is None:
        raise BadInput(f"autoscaling group {env.auto_scaling_group} does not exist")
    instances = describe_group_instances(ctx.creds, group.auto_scaling_group_name)
    versions = (
        describe_launch_template_versions(ctx.creds, group.launch_template)
        if group.launch_template and group.launch_template_version is not None
        else []
    )
    images = list_images(ctx.creds, env.label)
    plan = plan_deploy_serial(
        env, group, instances, versions, images, keep, source_instance, datetime.now(UTC)
    )
    key = artifact_key("deploy-serial", env.deployment, env.environment)
    plan_md = plan.render_markdown()
    publish_markdown(key + "-plan", plan_md, f"Refresh plan for {env.label}")
    logger.info("%s", plan_md)
    if dry_run:
        audit.record_summary(env, outcome="dry run", plan_markdown=plan_md)
        return DeploySerialResult(plan=plan, dry_run=True, outcome="dry run")
    if approval.approval_required(env, destructive=True):
        approval.request_approval(env, ctx.config, plan_markdown=plan_md, expected_downtime=None)

    name = group.auto_scaling_group_name
    targets = Targets(
        load_balancer_names=group.load_balancer_names, target_group_arns=group.target_group_arns
    )
    timeout = settings.instance_timeout_seconds
    poll = settings.poll_seconds
    started = time.monotonic()
    probe = HttpProbe(env.site_url).start() if env.site_url else None
    image_id: str | None = None
    version: int | None = None
    replaced: dict[str, str] = {}
    known = [i.instance_id for i in instances]
    try:
        with lock.environment_lock(env, ctx.config):
            tags = {"deployment": env.deployment, "environment": env.environment, "role": "web"}
            made = create_image(
                ctx.creds,
                plan.source_instance,
                plan.image_name,
                env.label,
                tags,
                no_reboot=not settings.reboot_for_image,
                dry_run=False,
            )
            image_id = made.image_id
            wait_for_image(ctx.creds, image_id, timeout=settings.image_timeout_seconds, poll=poll)
            version = create_launch_template_version(
                ctx.creds,
                plan.template,
                plan.current_version,
                image_id,
                f"fabflows deploy-serial {plan.image_name}",
                dry_run=False,
            ).version
            pointed = set_group_template_version(
                ctx.creds, name, plan.template, str(version), version, dry_run=False
            )
            try:
                for step, old in enumerate(plan.replacements, 1):
                    logger.info(
                        "step %d/%d: surge, then remove %s",
                        step,
                        len(plan.replacements),
                        old.old_instance_id,
                    )
                    set_desired_capacity(ctx.creds, name, plan.desired + 1, dry_run=False)
                    try:
                        new = wait_for_new_instance(
                            ctx.creds, name, known, timeout=timeout, poll=poll
                        )
                        if not targets.empty:
                            wait_for_load_balancers(
                                ctx.creds,
                                [new.instance_id],
                                targets,
                                "in",
                                timeout=timeout,
                                poll=poll,
                            )
                        check_site_up(
                            [_server_url(ctx, new.private_ip_address)],
                            ctx.config.fabflows.upgrade.healthcheck_path,
                            timeout=timeout,
                        )
                    except Exception:
                        _remove_surge(ctx, name, known, plan.desired)
                        raise
                    known.append(new.instance_id)
                    enter_standby(ctx.creds, name, old.old_instance_id, dry_run=False)
                    try:
                        if not targets.empty:
                            wait_for_load_balancers(
                                ctx.creds,
                                [old.old_instance_id],
                                targets,
                                "out",
                                timeout=timeout,
                                poll=poll,
                            )
                        time.sleep(settings.drain_seconds)
                    except Exception:
                        exit_standby(ctx.creds, name, old.old_instance_id, dry_run=False)
                        raise
                    terminate_group_instance(
                        ctx.creds, name, old.old_instance_id, decrement=False, dry_run=False
                    )
                    replaced[old.old_instance_id] = new.instance_id
            except Exception:
                if not replaced:
                    # nothing runs the new image: launch the old one again from now on
                    set_group_template_version(
                        ctx.creds,
                        name,
                        plan.template,
                        pointed.group_version_before,
                        pointed.default_version_before,
                        dry_run=False,
                    )
                raise
            pruned = []
            for image in plan.prune_images:
                if deregister_image(ctx.creds, image.image_id, dry_run=False).changed:
                    pruned.append(image.name)
            if plan.prune_versions:
                delete_launch_template_versions(
                    ctx.creds, plan.template, plan.prune_versions, dry_run=False
                )
                pruned += [f"{plan.template} v{v}" for v in plan.prune_versions]
    except Exception as exc:
        summary = probe.stop() if probe else None
        now = _instances_now(ctx, name, image_id)
        publish_markdown(
            key + "-instances",
            markdown_table([i.model_dump() for i in now]),
            f"Instances of {name} after the failed refresh",
        )
        audit.record_summary(
            env,
            outcome="failed",
            plan_markdown=plan_md,
            details={"replaced": len(replaced), "probe": summary.describe() if summary else "-"},
        )
        raise RefreshFailed(
            f"refresh of {name} stopped after {len(replaced)} replacement(s): {exc}", now
        ) from exc
    summary = probe.stop() if probe else None
    now = _instances_now(ctx, name, image_id)
    wrong = [i for i in now if not i.new or i.lifecycle_state != "InService"]
    if wrong or len(now) != plan.desired:
        raise RefreshFailed(f"after the refresh {name} is not all on {image_id}", now)
    if not targets.empty:
        wait_for_load_balancers(
            ctx.creds, [i.instance_id for i in now], targets, "in", timeout=timeout, poll=poll
        )
    result = DeploySerialResult(
        plan=plan,
        dry_run=False,
        image_id=image_id,
        template_version=version,
        replaced=replaced,
        instances=now,
        duration_s=round(time.monotonic() - started, 3),
        probe=summary,
        pruned=pruned,
        outcome="completed",
    )
    rows = [i.model_dump() for i in now]
    publish_markdown(
        key + "-result",
        f"**{len(replaced)} instance(s) replaced in {result.duration_s:.0f} s; "
        f"{summary.describe() if summary else 'no site URL probed'}**\n\n" + markdown_table(rows),
        f"Refresh of {env.label}",
    )
    logger.info("%s", text_table(rows))
    audit.record_summary(
        env,
        outcome="completed",
        plan_markdown=plan_md,
        details={
            "image": f"{plan.image_name} ({image_id})",
            "duration": f"{result.duration_s:.0f} s",
            "users": summary.describe() if summary else "not probed (no site URL)",
            "pruned": ", ".join(pruned) or "none",
        },
    )
    return result
