"""Taking web servers out of the load balancers and putting them back (classic ELB and ELBv2).

Used by the rolling restart (update-newrelic-keys, push-server-secrets) and the rolling refresh
(deploy-serial). Each write records where the instance was registered before (``registered_in``), and
its compensation registers it back exactly there. Health waits have a timeout and name every instance
and load balancer that is not there yet.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field

from tasks.aws.session import aws_client
from tasks.plan import StepResult

IN_SERVICE = ("InService", "healthy")
"""Classic ELB and ELBv2 states that mean "gets traffic"."""

GONE = ("absent", "OutOfService", "unused", "draining", "unavailable")
"""States that mean "gets no new traffic" (absent: not registered at all)."""


class LoadBalancerTimeout(TimeoutError):
    """A health wait ran out of time; the message names what was not there yet."""


class Targets(BaseModel):
    """Where web servers are registered: classic load balancers and ELBv2 target groups."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    load_balancer_names: list[str] = Field(default_factory=list)
    target_group_arns: list[str] = Field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.load_balancer_names and not self.target_group_arns

    def label(self, target: str) -> str:
        return target.split("/")[-2] if target.startswith("arn:") else target


class MembershipResult(StepResult):
    """What (de)registering did, with where the instance was registered before."""

    instance_id: str
    registered_in: list[str] = Field(
        description="Load balancers and target group ARNs the instance was in before the task."
    )
    changed_in: list[str] = Field(description="Where it was (or would be) added or removed.")


def resolve_target_groups(creds: AwsCredentials, names_or_arns: Sequence[str]) -> list[str]:
    """Target group names (config) -> ARNs."""
    arns = [t for t in names_or_arns if t.startswith("arn:")]
    names = [t for t in names_or_arns if not t.startswith("arn:")]
    if names:
        elbv2 = aws_client(creds, "elbv2")
        for group in elbv2.describe_target_groups(Names=names)["TargetGroups"]:
            arns.append(group["TargetGroupArn"])
    return arns


def health_of(creds: AwsCredentials, instance_ids: Sequence[str], targets: Targets) -> dict:
    """``{(instance_id, load balancer or target group ARN): state}``; ``absent`` when not registered."""
    wanted = set(instance_ids)
    out: dict[tuple[str, str], str] = {}
    elb = aws_client(creds, "elb") if targets.load_balancer_names else None
    for name in targets.load_balancer_names:
        states = elb.describe_instance_health(LoadBalancerName=name)["InstanceStates"]
        seen = {s["InstanceId"]: s["State"] for s in states}
        for iid in wanted:
            out[(iid, name)] = seen.get(iid, "absent")
    elbv2 = aws_client(creds, "elbv2") if targets.target_group_arns else None
    for arn in targets.target_group_arns:
        descriptions = elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
        seen = {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in descriptions}
        for iid in wanted:
            out[(iid, arn)] = seen.get(iid, "absent")
    return out


def _summary(verb: str, instance_id: str, where: Sequence[str], targets: Targets) -> str:
    shown = ", ".join(targets.label(w) for w in where) or "nowhere"
    preposition = "from" if verb.endswith("deregister") or verb.startswith("Deregister") else "in"
    return f"{verb} {instance_id} {preposition} {shown}"


def _change_membership(
    creds: AwsCredentials,
    instance_id: str,
    targets: Targets,
    registered_in: list[str],
    places: list[str],
    *,
    register: bool,
    dry_run: bool,
) -> MembershipResult:
    """(De)register ``instance_id`` in ``places`` (classic ELB names and target group ARNs)."""
    verb = "register" if register else "deregister"
    if not places:
        summary = (
            f"{instance_id} is already registered"
            if register
            else f"{instance_id} is in no load balancer"
        )
    elif dry_run:
        summary = _summary(f"Would {verb}", instance_id, places, targets)
    else:
        for where in places:
            if where.startswith("arn:"):
                elbv2 = aws_client(creds, "elbv2")
                call = elbv2.register_targets if register else elbv2.deregister_targets
                call(TargetGroupArn=where, Targets=[{"Id": instance_id}])
            else:
                elb = aws_client(creds, "elb")
                call = (
                    elb.register_instances_with_load_balancer
                    if register
                    else elb.deregister_instances_from_load_balancer
                )
                call(LoadBalancerName=where, Instances=[{"InstanceId": instance_id}])
        summary = _summary(f"{verb.capitalize()}ed", instance_id, places, targets)
    get_run_logger().info("%s", summary)
    return MembershipResult(
        changed=bool(places),
        dry_run=dry_run,
        summary=summary,
        instance_id=instance_id,
        registered_in=registered_in,
        changed_in=places,
    )


@task(
    name="deregister-instance",
    task_run_name="deregister-{instance_id}",
    retries=0,
    cache_policy=NO_CACHE,
)
def deregister_instance(
    creds: AwsCredentials, instance_id: str, targets: Targets, *, dry_run: bool
) -> MembershipResult:
    """Take ``instance_id`` out of every load balancer and target group in ``targets``.

    Records where it was registered; :func:`register_instance` with ``registered_in`` puts it back.
    Not registered anywhere: ``changed=False``.
    """
    states = health_of(creds, [instance_id], targets)
    registered = [where for (_, where), state in states.items() if state != "absent"]
    return _change_membership(
        creds, instance_id, targets, registered, registered, register=False, dry_run=dry_run
    )


@task(
    name="register-instance",
    task_run_name="register-{instance_id}",
    retries=0,
    cache_policy=NO_CACHE,
)
def register_instance(
    creds: AwsCredentials,
    instance_id: str,
    targets: Targets,
    *,
    only: Sequence[str] | None = None,
    dry_run: bool,
) -> MembershipResult:
    """Register ``instance_id`` where it is missing (in ``only``, when given: the recorded places)."""
    states = health_of(creds, [instance_id], targets)
    before = [where for (_, where), state in states.items() if state != "absent"]
    missing = [
        where
        for (_, where), state in states.items()
        if state == "absent" and (only is None or where in only)
    ]
    return _change_membership(
        creds, instance_id, targets, before, missing, register=True, dry_run=dry_run
    )


@task(name="wait-for-load-balancers", cache_policy=NO_CACHE, retries=0)
def wait_for_load_balancers(
    creds: AwsCredentials,
    instance_ids: list[str],
    targets: Targets,
    want: Literal["in", "out"],
    *,
    timeout: float,
    poll: float = 2.0,
) -> float:
    """Wait until every instance is in service (``in``) or out of service (``out``) everywhere.

    Returns the seconds waited.

    Raises:
        LoadBalancerTimeout: not there after ``timeout`` seconds; names each instance, place and
            state that was still wrong.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        try:
            states = health_of(creds, instance_ids, targets)
        except ClientError as exc:
            raise RuntimeError(f"load balancer health could not be read: {exc}") from None
        wrong = {
            key: state
            for key, state in states.items()
            if (state not in IN_SERVICE if want == "in" else state in IN_SERVICE)
        }
        if not wrong:
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            detail = ", ".join(
                f"{iid} is {state} in {targets.label(where)}"
                for (iid, where), state in sorted(wrong.items())
            )
            raise LoadBalancerTimeout(
                f"after {timeout:.0f} s, not {'in' if want == 'in' else 'out of'} service: {detail}"
            )
        time.sleep(min(poll, max(0.05, deadline - time.monotonic())))
