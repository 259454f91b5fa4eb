"""Images made by fabflows, against moto: create (reused by name), wait, list, deregister."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.runbook import load_context
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed
from tasks.aws.images import (
    ImageTimeout,
    create_image,
    deregister_image,
    image_name,
    list_images,
    wait_for_image,
)


@pytest.fixture
def ctx(aws, tmp_path):
    path = write_config(tmp_path, fabflows=moto_section(aws.endpoint))
    seed(
        aws.endpoint,
        load_config(path),
        ["staging"],
        "10.97.0.0/24",
        (f"10.97.0.{n}" for n in itertools.count(200)),
    )
    return load_context("staging", config=str(path))


def test_image_rhythm(ctx) -> None:
    ec2 = ctx.creds.get_client("ec2")
    iid = ec2.describe_instances()["Reservations"][0]["Instances"][0]["InstanceId"]
    name = image_name("myproject", "staging", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert name == "myproject_staging_web_20260102T030405Z"
    with disable_run_logger():
        dry = create_image.fn(
            ctx.creds, iid, name, "myproject/staging", {"Name": "x"}, no_reboot=True, dry_run=True
        )
        assert (
            dry.changed
            and dry.image_id is None
            and list_images.fn(ctx.creds, "myproject/staging") == []
        )
        made = create_image.fn(
            ctx.creds,
            iid,
            name,
            "myproject/staging",
            {"role": "web"},
            no_reboot=True,
            dry_run=False,
        )
        assert made.changed and made.image_id
        assert wait_for_image.fn(ctx.creds, made.image_id, timeout=5, poll=0.1) >= 0
        again = create_image.fn(
            ctx.creds, iid, name, "myproject/staging", {}, no_reboot=True, dry_run=False
        )
        assert not again.changed and again.image_id == made.image_id
        (listed,) = list_images.fn(ctx.creds, "myproject/staging")
        assert listed.source_instance == iid and listed.snapshot_ids
        assert list_images.fn(ctx.creds, "myproject/production") == []
        assert deregister_image.fn(ctx.creds, made.image_id, dry_run=True).changed
        assert deregister_image.fn(ctx.creds, made.image_id, dry_run=False).changed
        assert not deregister_image.fn(ctx.creds, made.image_id, dry_run=False).changed
        with pytest.raises(ImageTimeout):
            wait_for_image.fn(ctx.creds, made.image_id, timeout=0.2, poll=0.1)
