"""deploy-serial's pure parts: the refusals, the plan (one step per surge) and its rendering.

The plan names everything the steps need (group, template, the version the group launches now,
the source instance, the image name, the instances to replace in order, what to prune), so the
journal's copy rebuilds the steps for ``recover`` and ``resume``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.errors import BadInput, Refused
from fabflows.report import markdown_table, text_table
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.images import Image, image_name
from tasks.aws.instance_refresh import GroupInstance
from tasks.aws.launch_templates import TemplateVersion

FLOW_NAME = "deploy-serial"
IMAGE_STEP = "create-image"
TEMPLATE_STEP = "new-template-version"
PRUNE_STEP = "prune"

BLOCKING_PROCESSES = ("Launch", "Terminate", "AddToLoadBalancer", "HealthCheck")
"""Suspended, these would stop the surge (no launch), keep old instances (no terminate) or leave new
ones out of the load balancers."""


class Replacement(BaseModel):
    """One old instance replaced by one new one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    old_instance_id: str
    old_image_id: str | None
    old_address: str | None


def surge_step(old_instance_id: str) -> str:
    return f"surge-{old_instance_id}"


class DeploySerialPlan(RunbookPlan):
    """The plan of deploy-serial."""

    DIGEST_EXCLUDE: ClassVar[set[str]] = {"image_name"}
    """The image name carries the time of the plan: planning again under the lock is the same plan."""

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
        return self._render(markdown=True) + f"\n\nPlan digest: `{self.digest()}`"

    def render_text(self) -> str:
        """The same plan for the terminal: plain text and a fixed-width table."""
        return self._render(markdown=False) + f"\ndigest {self.digest()}"

    def _render(self, *, markdown: bool) -> str:
        def code(text: str) -> str:
            return f"`{text}`" if markdown else text

        rows = [
            {
                "step": surge_step(r.old_instance_id),
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
    replacements = [
        Replacement(
            old_instance_id=i.instance_id,
            old_image_id=i.image_id,
            old_address=i.private_ip_address,
        )
        for i in instances
    ]
    changes = [
        Change(target=chosen.instance_id, action="create an image", step=IMAGE_STEP),
        Change(
            target=f"launch template {group.launch_template}",
            action=f"new version from v{current}, group and default point at it",
            step=TEMPLATE_STEP,
        ),
    ] + [
        Change(
            target=r.old_instance_id,
            action="surge: one new instance serves, then this one goes",
            detail=f"{r.old_address or '-'}, {r.old_image_id or '-'}",
            step=surge_step(r.old_instance_id),
        )
        for r in replacements
    ]
    if prune_images or prune_versions:
        changes.append(
            Change(
                target=f"{len(prune_images)} image(s), {len(prune_versions)} template version(s)",
                action="prune (no undo)",
                step=PRUNE_STEP,
            )
        )
    return DeploySerialPlan(
        title=f"deploy-serial on {env.label}",
        environment=env.label,
        changes=changes,
        destructive=True,
        auto_scaling_group=name,
        template=group.launch_template,
        current_version=current,
        source_instance=chosen.instance_id,
        source_address=chosen.private_ip_address,
        image_name=image_name(env.deployment, env.environment, now),
        desired=group.desired_capacity,
        max_size=group.max_size,
        replacements=replacements,
        prune_images=prune_images,
        prune_versions=sorted(prune_versions),
        keep=keep,
    )
