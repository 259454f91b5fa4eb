"""Web server images (AMIs) made by fabflows: create from a running server, wait, list, prune.

Images fabflows makes carry the tags ``fabflows:environment`` (``deployment/environment``) and
``fabflows:source`` (the instance they were made from), plus the source's ``deployment``,
``environment`` and ``role`` tags, so they can be listed and pruned without touching any other image.
Names follow the original's ``<deployment>_<environment>_web_<UTC timestamp>``.
"""

from __future__ import annotations

import time
from datetime import datetime

from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, Field

from tasks.aws.session import aws_client
from tasks.plan import StepResult

ENVIRONMENT_TAG = "fabflows:environment"
SOURCE_TAG = "fabflows:source"


class ImageTimeout(TimeoutError):
    """An image did not become available in time (or failed); the message says which and how."""


class Image(BaseModel):
    """One image made by fabflows for an environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_id: str
    name: str
    state: str
    created: datetime | None = None
    snapshot_ids: list[str] = Field(default_factory=list)
    source_instance: str | None = None


def image_name(deployment: str, environment: str, now: datetime) -> str:
    """``<deployment>_<environment>_web_<YYYYmmddTHHMMSSZ>`` (pure)."""
    return f"{deployment}_{environment}_web_{now.strftime('%Y%m%dT%H%M%SZ')}"


def _image(data: dict) -> Image:
    tags = {t["Key"]: t["Value"] for t in data.get("Tags", [])}
    created = data.get("CreationDate")
    return Image(
        image_id=data["ImageId"],
        name=data.get("Name", ""),
        state=data.get("State", ""),
        created=datetime.fromisoformat(created.replace("Z", "+00:00")) if created else None,
        snapshot_ids=[
            b["Ebs"]["SnapshotId"]
            for b in data.get("BlockDeviceMappings", [])
            if b.get("Ebs", {}).get("SnapshotId")
        ],
        source_instance=tags.get(SOURCE_TAG),
    )


@task(name="list-images", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def list_images(creds: AwsCredentials, label: str) -> list[Image]:
    """fabflows' images of ``label`` (``deployment/environment``), oldest first."""
    ec2 = aws_client(creds, "ec2")
    images = ec2.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{ENVIRONMENT_TAG}", "Values": [label]}]
    )["Images"]
    out = [_image(i) for i in images]
    return sorted(out, key=lambda i: (i.created or datetime.min.replace(tzinfo=None), i.name))


class CreateImageResult(StepResult):
    """What create_image did."""

    image_id: str | None = Field(description="The image (None in a dry run).")
    name: str


@task(
    name="create-image",
    task_run_name="create-image-{instance_id}",
    retries=0,
    cache_policy=NO_CACHE,
)
def create_image(
    creds: AwsCredentials,
    instance_id: str,
    name: str,
    label: str,
    tags: dict[str, str],
    *,
    no_reboot: bool,
    dry_run: bool,
) -> CreateImageResult:
    """CreateImage of ``instance_id`` named ``name``; an image of that name already made is reused.

    Compensation: :func:`deregister_image` (the refresh prunes it when it is not used).
    """
    ec2 = aws_client(creds, "ec2")
    existing = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])[
        "Images"
    ]
    if existing:
        summary = f"image {name} exists: {existing[0]['ImageId']}"
        get_run_logger().info("%s", summary)
        return CreateImageResult(
            changed=False,
            dry_run=dry_run,
            summary=summary,
            image_id=existing[0]["ImageId"],
            name=name,
        )
    if dry_run:
        summary = f"Would create image {name} from {instance_id}"
        get_run_logger().info("%s", summary)
        return CreateImageResult(
            changed=True, dry_run=True, summary=summary, image_id=None, name=name
        )
    all_tags = {**tags, ENVIRONMENT_TAG: label, SOURCE_TAG: instance_id}
    all_tags.pop("Name", None)
    image_id = ec2.create_image(
        InstanceId=instance_id,
        Name=name,
        Description=f"fabflows deploy-serial of {label} from {instance_id}",
        NoReboot=no_reboot,
        TagSpecifications=[
            {"ResourceType": "image", "Tags": [{"Key": k, "Value": v} for k, v in all_tags.items()]}
        ],
    )["ImageId"]
    summary = f"Created image {name} ({image_id}) from {instance_id}"
    get_run_logger().info("%s", summary)
    return CreateImageResult(
        changed=True, dry_run=False, summary=summary, image_id=image_id, name=name
    )


@task(name="wait-for-image", task_run_name="wait-for-{image_id}", retries=0, cache_policy=NO_CACHE)
def wait_for_image(
    creds: AwsCredentials, image_id: str, *, timeout: float, poll: float = 5.0
) -> float:
    """Wait until ``image_id`` is available; return the seconds waited.

    Raises:
        ImageTimeout: still pending after ``timeout`` seconds, or the image failed.
    """
    ec2 = aws_client(creds, "ec2")
    started = time.monotonic()
    deadline = started + timeout
    state = "unknown"
    while True:
        try:
            images = ec2.describe_images(ImageIds=[image_id])["Images"]
            state = images[0]["State"] if images else "missing"
        except ClientError as exc:
            if "NotFound" not in str(exc):
                raise
            state = "missing"
        if state == "available":
            return time.monotonic() - started
        if state in ("failed", "error", "invalid", "deregistered"):
            raise ImageTimeout(f"image {image_id} is {state}")
        if time.monotonic() >= deadline:
            raise ImageTimeout(
                f"image {image_id} is still {state} after {timeout:.0f} s "
                "(fabflows.refresh.image_timeout_seconds)"
            )
        time.sleep(min(poll, max(0.05, deadline - time.monotonic())))


@task(
    name="deregister-image", task_run_name="deregister-{image_id}", retries=0, cache_policy=NO_CACHE
)
def deregister_image(creds: AwsCredentials, image_id: str, *, dry_run: bool) -> StepResult:
    """Deregister an image and delete its snapshots. **No compensation** (the image is gone).

    An image already gone is ``changed=False``.
    """
    ec2 = aws_client(creds, "ec2")
    try:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
    except ClientError as exc:
        if "NotFound" not in str(exc):
            raise
        images = []
    if not images:
        return StepResult(changed=False, dry_run=dry_run, summary=f"{image_id} is already gone")
    image = _image(images[0])
    if dry_run:
        return StepResult(
            changed=True,
            dry_run=True,
            summary=f"Would deregister {image.name} ({image_id}) and delete "
            f"{len(image.snapshot_ids)} snapshot(s)",
        )
    ec2.deregister_image(ImageId=image_id)
    for snapshot in image.snapshot_ids:
        try:
            ec2.delete_snapshot(SnapshotId=snapshot)
        except ClientError as exc:
            if "NotFound" not in str(exc):
                raise
    summary = (
        f"Deregistered {image.name} ({image_id}), deleted {len(image.snapshot_ids)} snapshot(s)"
    )
    get_run_logger().info("%s", summary)
    return StepResult(changed=True, dry_run=False, summary=summary)
