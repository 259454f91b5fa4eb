"""deploy-serial: bring every web server to a new image, one surge at a time, never below capacity."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows import boundaries
from fabflows.errors import BadInput
from fabflows.procedures.deploy_serial_plan import (
    BLOCKING_PROCESSES,
    FLOW_NAME,
    IMAGE_STEP,
    PRUNE_STEP,
    TEMPLATE_STEP,
    DeploySerialPlan,
    InstanceImage,
    Replacement,
    plan_deploy_serial,
    resolve_version,
    surge_step,
)
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from tasks.aws.autoscaling import AutoScalingGroup, describe_auto_scaling_group
from tasks.aws.images import Image, create_image, deregister_image, list_images, wait_for_image
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
from tasks.http.probe import HttpProbe, check_site_up

__all__ = [
    "BLOCKING_PROCESSES",
    "DeploySerialPlan",
    "InstanceImage",
    "RefreshFailed",
    "Replacement",
    "deploy_serial",
    "plan_deploy_serial",
    "resolve_version",
]


class DeploySerialParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source_instance: str | None = Field(default=None, description="Instance to image.")
    keep_images: int | None = Field(default=None, description="Images and versions kept.")


class RefreshFailed(RuntimeError):
    """The refresh stopped. ``instances`` says who runs what (before the surge was undone)."""

    def __init__(self, message: str, instances: list[InstanceImage]):
        self.instances = instances
        table = "; ".join(
            f"{i.instance_id} {i.lifecycle_state} {i.image_id}{' (new)' if i.new else ''}"
            for i in instances
        )
        super().__init__(f"{message}. Instances now: {table}")


@dataclass
class GroupFacts:
    group: AutoScalingGroup
    instances: list[GroupInstance]
    versions: list[TemplateVersion]
    images: list[Image]
    keep: int


# --------------------------------------------------------------------------- helpers


def _instances_now(rc: RunContext, group: str, image_id: str | None) -> list[InstanceImage]:
    return [
        InstanceImage(
            instance_id=i.instance_id,
            lifecycle_state=i.lifecycle_state,
            image_id=i.image_id,
            address=i.private_ip_address,
            new=image_id is not None and i.image_id == image_id,
        )
        for i in describe_group_instances(rc.creds, group)
    ]


def _runs_image(rc: RunContext, group: str, image_id: str) -> bool:
    """Does an instance of the group that is not on its way out run ``image_id``?"""
    return any(
        i.image_id == image_id
        and not i.lifecycle_state.startswith("Terminat")
        and i.state not in ("shutting-down", "terminated")
        for i in describe_group_instances(rc.creds, group)
    )


def _image_id(scope: Scope) -> str | None:
    """The image this run made: from this run's step, or the journal (a resumed run)."""
    made = scope.results.get(IMAGE_STEP)
    if isinstance(made, dict) and made.get("image_id"):
        return made["image_id"]
    entry = scope.journal.entry(scope.run_id) if scope.journal is not None else None
    rec = entry.step(IMAGE_STEP) if entry is not None else None
    return rec.data.get("image_id") if rec is not None else None


def _probe(scope: Scope) -> None:
    """Count the site's non-200 answers from the first step to verify (none without a site URL)."""
    if getattr(scope, "_deploy_probe", None) is None and scope.env.site_url:
        probe = HttpProbe(scope.env.site_url).start()
        scope._deploy_probe = probe  # type: ignore[attr-defined]
        scope.on_close(lambda: _stop_probe(scope))


def _stop_probe(scope: Scope) -> None:
    probe = getattr(scope, "_deploy_probe", None)
    if probe is not None:
        scope._deploy_probe = None  # type: ignore[attr-defined]
        summary = probe.stop()
        scope.details["probe"] = summary.model_dump(mode="json")
        scope.details["Site probe"] = summary.describe()


def _targets(rc: RunContext, group: str) -> Targets:
    g = describe_auto_scaling_group(rc.creds, group)
    assert g is not None
    return Targets(load_balancer_names=g.load_balancer_names, target_group_arns=g.target_group_arns)


# --------------------------------------------------------------------------- the steps


def _create_image(plan: DeploySerialPlan):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, Any]:
        _probe(scope)
        rc, env = scope.rc, scope.env
        settings = rc.config.fabflows.refresh
        scope.record(image_name=plan.image_name)
        tags = {"deployment": env.deployment, "environment": env.environment, "role": "web"}
        made = create_image(
            rc.creds,
            plan.source_instance,
            plan.image_name,
            env.label,
            tags,
            no_reboot=not settings.reboot_for_image,
            dry_run=False,
        )
        # the image exists, the journal does not name it yet: the undo finds it by its name
        boundaries.reached(FLOW_NAME, IMAGE_STEP, "created")
        scope.record(image_name=plan.image_name, image_id=made.image_id)
        wait_for_image(
            rc.creds,
            made.image_id,
            timeout=settings.image_timeout_seconds,
            poll=settings.poll_seconds,
        )
        scope.details["image_id"] = made.image_id
        return {"image_id": made.image_id, "summary": f"image {plan.image_name} ({made.image_id})"}

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        """Deregister the image unless an instance of the group already runs it."""
        rc = scope.rc
        image_id = data.get("image_id")
        if image_id is None:
            found = [i for i in list_images(rc.creds, scope.env.label) if i.name == plan.image_name]
            image_id = found[0].image_id if found else None
        if image_id is None:
            return
        if _runs_image(rc, plan.auto_scaling_group, image_id):
            scope.log("keeping %s: instances of the group run it", image_id, level="warning")
            return
        deregister_image(rc.creds, image_id, dry_run=False)

    return apply, undo


def _new_template_version(plan: DeploySerialPlan):  # noqa: ANN202
    description = f"fabflows deploy-serial {plan.image_name}"

    def apply(scope: Scope) -> dict[str, Any]:
        rc = scope.rc
        image_id = _image_id(scope)
        if image_id is None:
            raise RuntimeError(f"no image recorded by {IMAGE_STEP}")
        group = describe_auto_scaling_group(rc.creds, plan.auto_scaling_group)
        assert group is not None
        versions = describe_launch_template_versions(rc.creds, plan.template)
        before = {
            "group_version_before": group.launch_template_version or "",
            "default_version_before": next(v.number for v in versions if v.default),
            "image_id": image_id,
        }
        scope.record(**before)
        version = create_launch_template_version(
            rc.creds, plan.template, plan.current_version, image_id, description, dry_run=False
        ).version
        assert version is not None
        scope.record(version=version)
        set_group_template_version(
            rc.creds, plan.auto_scaling_group, plan.template, str(version), version, dry_run=False
        )
        scope.details["template_version"] = version
        return {**before, "version": version, "summary": f"{plan.template} v{version}"}

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        """Point the group and the default back, delete the version(s) made for this image;
        nothing when an instance already runs the new image (it serves: the group keeps it)."""
        rc = scope.rc
        image_id = data.get("image_id")
        if image_id is None or "group_version_before" not in data:
            return
        group = plan.auto_scaling_group
        if _runs_image(rc, group, image_id):
            scope.log("keeping the new template version: instances run it", level="warning")
            return
        set_group_template_version(
            rc.creds,
            group,
            plan.template,
            data["group_version_before"],
            int(data["default_version_before"]),
            dry_run=False,
        )
        made = [
            v.number
            for v in describe_launch_template_versions(rc.creds, plan.template)
            if v.image_id == image_id and v.description == description
        ]
        if made:
            delete_launch_template_versions(rc.creds, plan.template, made, dry_run=False)

    return apply, undo


def _surge(plan: DeploySerialPlan, index: int, old: Replacement):  # noqa: ANN202
    name = plan.auto_scaling_group
    step = surge_step(old.old_instance_id)

    def apply(scope: Scope) -> dict[str, Any]:
        _probe(scope)
        rc = scope.rc
        settings = rc.config.fabflows.refresh
        timeout, poll = settings.instance_timeout_seconds, settings.poll_seconds
        targets = _targets(rc, name)
        image_id = _image_id(scope)
        known = [i.instance_id for i in describe_group_instances(rc.creds, name)]
        if old.old_instance_id not in known:
            return {"summary": f"{old.old_instance_id} is no longer in the group"}
        data: dict[str, Any] = {"known": known, "desired": plan.desired, "old": old.old_instance_id}
        scope.record(**data)  # before the surge: the undo removes any instance not known
        try:
            set_desired_capacity(rc.creds, name, plan.desired + 1, dry_run=False)
            new = wait_for_new_instance(rc.creds, name, known, timeout=timeout, poll=poll)
            data["new"] = new.instance_id
            scope.record(new=new.instance_id)
            if not targets.empty:
                wait_for_load_balancers(
                    rc.creds, [new.instance_id], targets, "in", timeout=timeout, poll=poll
                )
            check_site_up(
                [rc.config.fabflows.upgrade.web_server_url.format(address=new.private_ip_address)],
                rc.config.fabflows.upgrade.healthcheck_path,
                timeout=timeout,
            )
        except Exception as exc:
            raise RefreshFailed(
                f"refresh of {name} stopped after {index} replacement(s): {exc}",
                _instances_now(rc, name, image_id),
            ) from exc
        boundaries.reached(FLOW_NAME, step, "surged")  # the new one serves, the old one too
        enter_standby(rc.creds, name, old.old_instance_id, dry_run=False)
        if not targets.empty:
            wait_for_load_balancers(
                rc.creds, [old.old_instance_id], targets, "out", timeout=timeout, poll=poll
            )
        time.sleep(settings.drain_seconds)
        terminate_group_instance(
            rc.creds, name, old.old_instance_id, decrement=False, dry_run=False
        )
        replaced = scope.details.setdefault("replaced", {})
        replaced[old.old_instance_id] = new.instance_id
        return {**data, "summary": f"{old.old_instance_id} -> {new.instance_id}"}

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        """A half-done surge: the old instance back in service, the instances it launched
        terminated, desired capacity as before. A finished one (the old instance gone) stays."""
        rc = scope.rc
        if "known" not in data:
            return  # killed before the surge began
        now = describe_group_instances(rc.creds, name)
        olds = {i.instance_id: i for i in now}
        if data["old"] not in olds:
            return  # replaced: the new instance serves
        if olds[data["old"]].lifecycle_state == "Standby":
            exit_standby(rc.creds, name, data["old"], dry_run=False)
        for inst in now:
            if inst.instance_id not in data["known"]:
                scope.log("removing %s: the surge is undone", inst.instance_id, level="warning")
                terminate_group_instance(
                    rc.creds,
                    name,
                    inst.instance_id,
                    decrement=inst.lifecycle_state != "Standby",
                    dry_run=False,
                )
        set_desired_capacity(rc.creds, name, int(data["desired"]), dry_run=False)

    return apply, undo


def _prune(plan: DeploySerialPlan):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, Any]:
        rc = scope.rc
        pruned = [
            image.name
            for image in plan.prune_images
            if deregister_image(rc.creds, image.image_id, dry_run=False).changed
        ]
        boundaries.reached(FLOW_NAME, PRUNE_STEP, "images-pruned")  # the versions still to go
        if plan.prune_versions:
            have = {v.number for v in describe_launch_template_versions(rc.creds, plan.template)}
            gone = [v for v in plan.prune_versions if v in have]
            if gone:
                delete_launch_template_versions(rc.creds, plan.template, gone, dry_run=False)
            pruned += [f"{plan.template} v{v}" for v in gone]
        scope.details["pruned"] = ", ".join(pruned) or "none"
        return {"summary": "pruned " + (", ".join(pruned) or "nothing")}

    def finish(scope: Scope, data: dict[str, Any]) -> None:
        """What is deleted cannot come back, so a half-done prune is finished instead: the
        planned images no instance of the group runs, the planned versions the group and the
        template's default do not use (checked again now: recovery may come much later)."""
        rc = scope.rc
        group = describe_auto_scaling_group(rc.creds, plan.auto_scaling_group)
        assert group is not None
        for image in plan.prune_images:
            if _runs_image(rc, plan.auto_scaling_group, image.image_id):
                scope.log("not pruning %s: instances run it", image.image_id, level="warning")
                continue
            deregister_image(rc.creds, image.image_id, dry_run=False)
        versions = describe_launch_template_versions(rc.creds, plan.template)
        used = {v.number for v in versions if v.default}
        if group.launch_template_version and group.launch_template_version.isdigit():
            used.add(int(group.launch_template_version))
        have = {v.number for v in versions}
        gone = [v for v in plan.prune_versions if v in have and v not in used]
        if gone:
            delete_launch_template_versions(rc.creds, plan.template, gone, dry_run=False)

    return apply, finish


class DeploySerial(Runbook[DeploySerialParams, GroupFacts, DeploySerialPlan]):
    name = FLOW_NAME
    Params = DeploySerialParams
    plan_type = DeploySerialPlan

    def validate(self, rc: RunContext, params: DeploySerialParams) -> None:
        keep = params.keep_images
        if keep is not None and keep < 1:
            raise BadInput(f"keep_images must be at least 1 (got {keep})")
        if not rc.env.auto_scaling_group:
            raise BadInput(
                f"{rc.env.label} has no autoscaling group in config (auto_scaling_groups)"
            )

    def gather(self, scope: Scope, params: DeploySerialParams) -> GroupFacts:
        rc, env = scope.rc, scope.env
        assert env.auto_scaling_group
        group = describe_auto_scaling_group(rc.creds, env.auto_scaling_group)
        if group is None:
            raise BadInput(f"autoscaling group {env.auto_scaling_group} does not exist")
        instances = describe_group_instances(rc.creds, group.auto_scaling_group_name)
        versions = (
            describe_launch_template_versions(rc.creds, group.launch_template)
            if group.launch_template and group.launch_template_version is not None
            else []
        )
        keep = params.keep_images or rc.config.fabflows.refresh.keep_images
        return GroupFacts(group, instances, versions, list_images(rc.creds, env.label), keep)

    def plan(
        self, facts: GroupFacts, params: DeploySerialParams, env: EnvironmentConfig
    ) -> DeploySerialPlan:
        return plan_deploy_serial(
            env,
            facts.group,
            facts.instances,
            facts.versions,
            facts.images,
            facts.keep,
            params.source_instance,
            datetime.now(UTC),
        )

    def steps(self, plan: DeploySerialPlan, params: DeploySerialParams) -> list[Step]:
        image_apply, image_undo = _create_image(plan)
        version_apply, version_undo = _new_template_version(plan)
        out = [
            Step(IMAGE_STEP, image_apply, image_undo),
            Step(TEMPLATE_STEP, version_apply, version_undo),
        ]
        for index, old in enumerate(plan.replacements):
            apply, undo = _surge(plan, index, old)
            out.append(Step(surge_step(old.old_instance_id), apply, undo))
        if plan.prune_images or plan.prune_versions:
            prune_apply, prune_finish = _prune(plan)
            # deleted images and versions cannot be brought back: recovery finishes the prune
            # (as planned) instead; never automatically (it changes data)
            out.append(Step(PRUNE_STEP, prune_apply, prune_finish, auto_undo=False))
        return out

    def verify(self, scope: Scope, plan: DeploySerialPlan, params: DeploySerialParams) -> list[str]:
        """Every instance of the group on the new image, InService and in every load balancer."""
        rc = scope.rc
        name = plan.auto_scaling_group
        image_id = _image_id(scope)
        now = _instances_now(rc, name, image_id)
        _stop_probe(scope)
        scope.details["instances"] = [i.model_dump(mode="json") for i in now]
        wrong = [i for i in now if not i.new or i.lifecycle_state != "InService"]
        if wrong or len(now) != plan.desired:
            return [str(RefreshFailed(f"after the refresh {name} is not all on {image_id}", now))]
        targets = _targets(rc, name)
        if not targets.empty:
            settings = rc.config.fabflows.refresh
            wait_for_load_balancers(
                rc.creds,
                [i.instance_id for i in now],
                targets,
                "in",
                timeout=settings.instance_timeout_seconds,
                poll=settings.poll_seconds,
            )
        return []


RUNBOOK = DeploySerial()


@flow(name=FLOW_NAME, log_prints=False)
def deploy_serial(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    source_instance: str | None = None,
    keep_images: int | None = None,
    window_override_reason: str | None = None,
) -> RunbookReport:
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

    **Steps** (journaled, each recording what its undo needs before it writes): `create-image`,
    `new-template-version`, one `surge-<old instance id>` per web server (the new instance is in
    service before the old one goes; the instance ids known before the surge are recorded
    before desired capacity goes up), then `prune`.

    **Rollback:** a surge that fails (a new instance that does not serve in time) is undone: the
    instances it launched are terminated, an old instance in Standby comes back, desired capacity
    is set back; if no old instance was replaced yet, the group and the template's default go back
    to their previous template version, the new version is deleted and the image deregistered.
    The run fails with the list of which instance runs which image; instances already replaced
    stay on the new image (they served). A run killed outright is undone the same way by
    `fabflows recover` (recover-environment) from its journal: a run killed while it made the
    image leaves no image behind (found by its name if the journal does not have its id yet).
    Pruning has no undo: what is deleted is gone, so `fabflows recover` finishes a half-done prune
    (images no instance runs, versions the group does not use), leaving the group as planned.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Set false to refresh.
        source_instance: Instance to image (default: the group's newest InService instance).
        keep_images: Images and template versions kept (default: fabflows.refresh.keep_images).
        window_override_reason: Run outside the maintenance window (protected environments), for
            this recorded reason.
    """
    return execute(RUNBOOK, locals())
