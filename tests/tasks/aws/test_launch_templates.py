"""Launch template versions against moto (with DeleteLaunchTemplateVersions added by moto_fidelity)."""

from __future__ import annotations

import itertools

import pytest
from prefect.logging import disable_run_logger

from config import load_config
from fabflows.runbook import load_context
from fabflows.testing import moto_fidelity
from fabflows.testing.configs import moto_section, write_config
from sandbox.aws_seed import seed
from tasks.aws.launch_templates import (
    create_launch_template_version,
    delete_launch_template_versions,
    describe_launch_template_versions,
    set_group_template_version,
)

LT, GROUP = "myproject-staging-web", "myproject-staging-ag"


@pytest.fixture
def ctx(aws, tmp_path):
    moto_fidelity.apply()
    path = write_config(tmp_path, fabflows=moto_section(aws.endpoint))
    seed(
        aws.endpoint,
        load_config(path),
        ["staging"],
        "10.96.0.0/24",
        (f"10.96.0.{n}" for n in itertools.count(200)),
    )
    return load_context("staging", config=str(path))


def test_version_group_and_prune_rhythm(ctx) -> None:
    with disable_run_logger():
        (v1,) = describe_launch_template_versions.fn(ctx.creds, LT)
        assert v1.default and v1.number == 1
        assert (
            create_launch_template_version.fn(
                ctx.creds, LT, 1, "ami-new", "d", dry_run=True
            ).version
            is None
        )
        made = create_launch_template_version.fn(ctx.creds, LT, 1, "ami-new", "d", dry_run=False)
        assert made.changed and made.version == 2
        assert not create_launch_template_version.fn(
            ctx.creds, LT, 1, "ami-new", "d", dry_run=False
        ).changed
        pointed = set_group_template_version.fn(ctx.creds, GROUP, LT, "2", 2, dry_run=False)
        assert (
            pointed.changed
            and pointed.group_version_before == "$Latest"
            and pointed.default_version_before == 1
        )
        assert not set_group_template_version.fn(
            ctx.creds, GROUP, LT, "2", 2, dry_run=False
        ).changed
        # compensation: back to what was recorded
        back = set_group_template_version.fn(ctx.creds, GROUP, LT, "$Latest", 1, dry_run=False)
        assert back.changed and back.group_version_before == "2"
        with pytest.raises(RuntimeError, match="default version cannot be deleted"):
            delete_launch_template_versions.fn(ctx.creds, LT, [1], dry_run=False)
        set_group_template_version.fn(ctx.creds, GROUP, LT, "2", 2, dry_run=False)
        assert delete_launch_template_versions.fn(ctx.creds, LT, [1], dry_run=False).changed
        assert [v.number for v in describe_launch_template_versions.fn(ctx.creds, LT)] == [2]
