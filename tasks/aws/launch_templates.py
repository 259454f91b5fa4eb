"""The web group's launch template: versions for new images, the group's version, pruning.

- :func:`create_launch_template_version` makes a version like the group's current one with another
  image (compensation: :func:`delete_launch_template_versions`);
- :func:`set_group_template_version` points the group (and the template's default) at a version,
  recording the previous ones (compensation: the same task with the recorded versions);
- :func:`delete_launch_template_versions` removes old versions (never the default, nor one in
  use); **no compensation**.
"""

from __future__ import annotations

from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field

from tasks.aws.session import aws_client
from tasks.plan import StepResult


class TemplateVersion(BaseModel):
    """One version of a launch template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    number: int
    image_id: str | None
    default: bool
    created: datetime | None = None
    description: str = ""


@task(
    name="describe-launch-template-versions",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
)
def describe_launch_template_versions(
    creds: AwsCredentials, template: str
) -> list[TemplateVersion]:
    """Every version of ``template``, oldest first."""
    ec2 = aws_client(creds, "ec2")
    out = []
    for page in ec2.get_paginator("describe_launch_template_versions").paginate(
        LaunchTemplateName=template
    ):
        for v in page["LaunchTemplateVersions"]:
            out.append(
                TemplateVersion(
                    number=v["VersionNumber"],
                    image_id=v.get("LaunchTemplateData", {}).get("ImageId"),
                    default=v.get("DefaultVersion", False),
                    created=v.get("CreateTime"),
                    description=v.get("VersionDescription", "") or "",
                )
            )
    return sorted(out, key=lambda v: v.number)


class VersionResult(StepResult):
    """What create_launch_template_version did."""

    template: str
    version: int | None = Field(description="The new version (None in a dry run).")


@task(name="create-launch-template-version", retries=0, cache_policy=NO_CACHE)
def create_launch_template_version(
    creds: AwsCredentials,
    template: str,
    source_version: int,
    image_id: str,
    description: str,
    *,
    dry_run: bool,
) -> VersionResult:
    """A new version of ``template``: ``source_version`` with ``image_id``.

    A version with that image and description already there is reused (``changed=False``).
    """
    for v in describe_launch_template_versions.fn(creds, template):
        if v.image_id == image_id and v.description == description:
            return VersionResult(
                changed=False,
                dry_run=dry_run,
                summary=f"{template} v{v.number} already uses {image_id}",
                template=template,
                version=v.number,
            )
    if dry_run:
        return VersionResult(
            changed=True,
            dry_run=True,
            summary=f"Would create {template} version from v{source_version} with {image_id}",
            template=template,
            version=None,
        )
    version = aws_client(creds, "ec2").create_launch_template_version(
        LaunchTemplateName=template,
        SourceVersion=str(source_version),
        VersionDescription=description,
        LaunchTemplateData={"ImageId": image_id},
    )["LaunchTemplateVersion"]["VersionNumber"]
    summary = f"Created {template} v{version} (v{source_version} with {image_id})"
    get_run_logger().info("%s", summary)
    return VersionResult(
        changed=True, dry_run=False, summary=summary, template=template, version=version
    )


class GroupVersionResult(StepResult):
    """What set_group_template_version did, with the versions it found (the compensation)."""

    auto_scaling_group_name: str
    template: str
    group_version_before: str
    default_version_before: int


@task(name="set-group-template-version", retries=0, cache_policy=NO_CACHE)
def set_group_template_version(
    creds: AwsCredentials,
    auto_scaling_group_name: str,
    template: str,
    version: str,
    default_version: int,
    *,
    dry_run: bool,
) -> GroupVersionResult:
    """Point the group at ``version`` and make ``default_version`` the template's default."""
    asg = aws_client(creds, "autoscaling")
    ec2 = aws_client(creds, "ec2")
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[auto_scaling_group_name])[
        "AutoScalingGroups"
    ][0]
    before = (group.get("LaunchTemplate") or {}).get("Version", "")
    default_before = ec2.describe_launch_templates(LaunchTemplateNames=[template])[
        "LaunchTemplates"
    ][0]["DefaultVersionNumber"]
    changed = before != version or default_before != default_version
    if not changed:
        summary = f"{auto_scaling_group_name} already uses {template} v{version}"
    elif dry_run:
        summary = f"Would point {auto_scaling_group_name} at {template} v{version} (was {before})"
    else:
        if default_before != default_version:
            ec2.modify_launch_template(
                LaunchTemplateName=template, DefaultVersion=str(default_version)
            )
        if before != version:
            asg.update_auto_scaling_group(
                AutoScalingGroupName=auto_scaling_group_name,
                LaunchTemplate={"LaunchTemplateName": template, "Version": version},
            )
        summary = f"Pointed {auto_scaling_group_name} at {template} v{version} (was {before})"
    get_run_logger().info("%s", summary)
    return GroupVersionResult(
        changed=changed,
        dry_run=dry_run,
        summary=summary,
        auto_scaling_group_name=auto_scaling_group_name,
        template=template,
        group_version_before=before,
        default_version_before=default_before,
    )


@task(name="delete-launch-template-versions", retries=0, cache_policy=NO_CACHE)
def delete_launch_template_versions(
    creds: AwsCredentials, template: str, versions: list[int], *, dry_run: bool
) -> StepResult:
    """Delete old versions. **No compensation.** Refused versions (the default) are reported."""
    if not versions:
        return StepResult(changed=False, dry_run=dry_run, summary=f"{template}: nothing to prune")
    shown = ", ".join(f"v{v}" for v in versions)
    if dry_run:
        return StepResult(changed=True, dry_run=True, summary=f"Would delete {template} {shown}")
    answer = aws_client(creds, "ec2").delete_launch_template_versions(
        LaunchTemplateName=template, Versions=[str(v) for v in versions]
    )
    refused = answer.get("UnsuccessfullyDeletedLaunchTemplateVersions", [])
    if refused:
        detail = "; ".join(
            f"v{r['VersionNumber']}: {r.get('ResponseError', {}).get('Message', '')}"
            for r in refused
        )
        raise RuntimeError(f"{template}: could not delete {detail}")
    summary = f"Deleted {template} {shown}"
    get_run_logger().info("%s", summary)
    return StepResult(changed=True, dry_run=False, summary=summary)
