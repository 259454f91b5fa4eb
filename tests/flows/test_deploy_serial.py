"""deploy-serial: the plan as tables; the refresh on real peers, where every instance the group
launches gets its own test host (provisioned as the image would be) behind a load balancer that
really forwards and health-checks."""

from __future__ import annotations

from datetime import UTC, datetime

import boto3
import pytest

from fabflows.cli import render_result
from fabflows.errors import BadInput, Refused
from fabflows.runtime.engine import RunbookReport, StepOutcome
from fabflows.testing.app_env import InstanceFollower, build_app_env, run_in_thread
from fabflows.testing.elb_proxy import CapacitySampler, ElbProxy
from fabflows.testing.moto_server import MotoServer
from flows.deploy_serial import RefreshFailed, deploy_serial, plan_deploy_serial
from tasks.aws.autoscaling import AutoScalingGroup
from tasks.aws.images import Image
from tasks.aws.instance_refresh import GroupInstance
from tasks.aws.launch_templates import TemplateVersion

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _staging():
    import yaml

    from config import resolve_environment
    from config.models import FabulawsConfig
    from fabflows.testing.configs import SAMPLE

    return resolve_environment(
        FabulawsConfig.model_validate(yaml.safe_load(SAMPLE.read_text())), "staging"
    )


def _group(**kw) -> AutoScalingGroup:
    base = dict(
        auto_scaling_group_name="ag",
        min_size=1,
        desired_capacity=2,
        max_size=4,
        launch_template="lt",
        launch_template_version="$Latest",
    )
    return AutoScalingGroup(**{**base, **kw})


def _inst(iid: str, state: str = "InService", hour: int = 1) -> GroupInstance:
    return GroupInstance(
        instance_id=iid,
        lifecycle_state=state,
        health_status="Healthy",
        image_id="ami-old",
        private_ip_address="10.0.0.1",
        state="running",
        launch_time=NOW.replace(hour=hour),
    )


VERSIONS = [TemplateVersion(number=n, image_id=f"ami-{n}", default=n == 1) for n in (1, 2, 3)]
IMAGES = [Image(image_id=f"ami-{n}", name=f"img{n}", state="available") for n in (1, 2, 3)]


def test_plan_picks_newest_source_and_prunes_beyond_keep() -> None:
    plan = plan_deploy_serial(
        _staging(),
        _group(),
        [_inst("i-a", hour=1), _inst("i-b", hour=5)],
        VERSIONS,
        IMAGES,
        2,
        None,
        NOW,
    )
    assert plan.source_instance == "i-b" and plan.current_version == 3
    assert [r.old_instance_id for r in plan.replacements] == ["i-a", "i-b"]
    assert plan.prune_versions == [1, 2] and [i.name for i in plan.prune_images] == ["img1", "img2"]
    assert plan.image_name == "myproject_staging_web_20261126T120000Z"
    keep3 = plan_deploy_serial(
        _staging(), _group(), [_inst("i-a"), _inst("i-b")], VERSIONS, IMAGES, 3, "i-a", NOW
    )
    assert keep3.prune_versions == [1] and [i.name for i in keep3.prune_images] == ["img1"]


def test_terminal_prints_the_plan_and_what_runs_where() -> None:
    """`fabflows run deploy-serial` prints the plan as the UI shows it (not a YAML dump); after a
    refresh, the steps: the image, the template version, which instance replaced which."""
    plan = plan_deploy_serial(
        _staging(), _group(), [_inst("i-a"), _inst("i-b", hour=5)], VERSIONS, IMAGES, 2, None, NOW
    )
    report = RunbookReport(
        flow="deploy-serial", environment="myproject/staging", dry_run=True,
        outcome="dry run: would apply 5 step(s)", plan_text=plan.render_text(),
    )  # fmt: skip
    dry = render_result(report)
    assert dry.splitlines()[0].startswith("myproject/staging: refresh 2 web server(s) of ag")
    assert dry.splitlines()[-1] == "dry run: would apply 5 step(s)"
    assert "i-a (10.0.0.1, ami-old)" in dry and "prune images img1" in dry
    assert "surge-i-a" in dry and "surge-i-b" in dry  # the steps, by the instance they replace
    assert "**" not in dry and "|" not in dry and "replacements:" not in dry  # text, not YAML
    assert plan.render_markdown().startswith("**myproject/staging: refresh 2 web server(s) of `ag`")
    assert [c.step for c in plan.changes] == [
        "create-image", "new-template-version", "surge-i-a", "surge-i-b", "prune"
    ]  # fmt: skip
    later = plan.model_copy(update={"image_name": "myproject_staging_web_20261126T120500Z"})
    assert later.digest() == plan.digest()  # planned again under the lock: the same plan
    done = report.model_copy(
        update={
            "dry_run": False,
            "outcome": "applied 5 step(s)",
            "steps": [
                StepOutcome(name="create-image", state="done", seconds=40.0,
                            summary="image myproject_staging_web_20261126T120000Z (ami-new)"),
                StepOutcome(name="new-template-version", state="done", summary="lt v4"),
                StepOutcome(name="surge-i-a", state="done", summary="i-a -> i-c"),
                StepOutcome(name="surge-i-b", state="done", summary="i-b -> i-d"),
            ],
        }
    )  # fmt: skip
    text = render_result(done)
    assert "i-a -> i-c" in text and "i-b -> i-d" in text and "lt v4" in text
    assert "(ami-new)" in text and "True" not in text


@pytest.mark.parametrize(
    ("group", "instances", "source", "error", "match"),
    [
        ({"max_size": 2}, ["i-a", "i-b"], None, BadInput, "no room for one more"),
        ({"suspended_processes": ["Launch"]}, ["i-a", "i-b"], None, Refused, "Launch suspended"),
        ({}, ["i-a", ("i-b", "Standby")], None, Refused, "i-b Standby"),
        ({}, ["i-a"], None, Refused, "1 instance"),
        ({}, ["i-a", "i-b"], "i-zz", BadInput, "not an InService instance"),
        ({"launch_template_version": None}, ["i-a", "i-b"], None, BadInput, "no launch template"),
    ],
)
def test_refusals_before_anything_changes(group, instances, source, error, match) -> None:
    insts = [_inst(*i) if isinstance(i, tuple) else _inst(i) for i in instances]
    with pytest.raises(error, match=match):
        plan_deploy_serial(_staging(), _group(**group), insts, VERSIONS, IMAGES, 3, source, NOW)


# --------------------------------------------------------------------------- real peers


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory):
    moto = MotoServer().start()
    proxy = ElbProxy(moto.endpoint, "myproject-staging-lb")
    extra = {"refresh": {"drain_seconds": 1, "poll_seconds": 0.5, "instance_timeout_seconds": 60}}
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("refresh"),
        site_url=proxy.url,
        rabbitmq=False,
        fabflows_extra=extra,
        prefix="ds",
    )
    proxy.start()
    try:
        yield env, proxy
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()


def _clients(env):
    kw = dict(
        endpoint_url=env.endpoint,
        region_name="us-east-1",
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )
    return boto3.client("ec2", **kw), boto3.client("autoscaling", **kw)


@pytest.mark.hosts
@pytest.mark.flow
def test_refresh_with_surge_serves_throughout_and_prunes(prefect_server, stack) -> None:
    env, proxy = stack
    ec2, asg = _clients(env)
    old_ids = sorted(i for i, r in env.roles.items() if r == "web")
    # an older image made by fabflows for this environment, to be pruned (keep_images=1)
    stale = ec2.create_image(
        InstanceId=old_ids[0],
        Name="myproject_staging_web_old",
        TagSpecifications=[
            {
                "ResourceType": "image",
                "Tags": [{"Key": "fabflows:environment", "Value": "myproject/staging"}],
            }
        ],
    )["ImageId"]
    dry = deploy_serial(environment="staging", config=str(env.config_path), keep_images=1)
    assert dry.dry_run and dry.outcome == "dry run: would apply 5 step(s)", dry.render_text()
    assert all(f"surge-{i}" in dry.plan_text for i in old_ids)
    assert "prune images myproject_staging_web_old," in dry.plan_text

    follower = InstanceFollower(env, prefix="dn")
    with CapacitySampler(proxy) as capacity:
        future = run_in_thread(
            deploy_serial,
            environment="staging",
            config=str(env.config_path),
            dry_run=False,
            keep_images=1,
            return_state=True,
        )
        state = follower.run_until(future, timeout=600)
    assert follower.errors == []
    assert state.is_completed(), state.message
    result = state.result()
    replaced = result.details["replaced"]
    assert sorted(replaced) == old_ids
    instances = result.details["instances"]
    assert all(i["new"] and i["lifecycle_state"] == "InService" for i in instances)
    assert len(instances) == 2
    assert result.details["probe"]["non_200"] == 0, result.details["Site probe"]
    text = result.render_text()
    assert all(f"{old} -> {new}" in text for old, new in replaced.items())
    assert min(capacity.seen) >= 2, "capacity dropped below desired"
    assert max(capacity.seen) == 3
    assert sorted(follower.destroyed) == old_ids and len(follower.started) == 2
    group = asg.describe_auto_scaling_groups()["AutoScalingGroups"][0]
    version = result.details["template_version"]
    assert group["DesiredCapacity"] == 2 and group["LaunchTemplate"]["Version"] == str(version)
    versions = ec2.describe_launch_template_versions(LaunchTemplateName="myproject-staging-web")
    assert [v["VersionNumber"] for v in versions["LaunchTemplateVersions"]] == [version]
    assert stale not in {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]}


@pytest.mark.hosts
@pytest.mark.flow
def test_new_instance_that_never_serves_is_removed_and_nothing_else_changes(
    prefect_server, stack, monkeypatch
) -> None:
    env, proxy = stack
    ec2, asg = _clients(env)
    before = asg.describe_auto_scaling_groups()["AutoScalingGroups"][0]
    old_ids = sorted(i["InstanceId"] for i in before["Instances"])
    follower = InstanceFollower(env, prefix="dx")
    # the new image is broken: hosts start, but nothing is provisioned (no site, no health check)
    monkeypatch.setattr(InstanceFollower, "provision", lambda *a, **k: None)
    import yaml

    data = yaml.safe_load(env.config_path.read_text())
    data["fabflows"]["refresh"]["instance_timeout_seconds"] = 8
    config = env.config_path.with_name("short.yaml")
    config.write_text(yaml.safe_dump(data))
    with CapacitySampler(proxy) as capacity:
        future = run_in_thread(
            deploy_serial,
            environment="staging",
            config=str(config),
            dry_run=False,
            return_state=True,
        )
        state = follower.run_until(future, timeout=300)
    assert state.is_failed()
    assert "stopped after 0 replacement(s)" in state.message
    for iid in old_ids:
        assert iid in state.message
    with pytest.raises(RefreshFailed):
        state.result()
    after = asg.describe_auto_scaling_groups()["AutoScalingGroups"][0]
    assert sorted(i["InstanceId"] for i in after["Instances"]) == old_ids
    assert after["DesiredCapacity"] == 2
    assert after["LaunchTemplate"]["Version"] == before["LaunchTemplate"]["Version"]
    assert min(capacity.seen) >= 2
    # the failed surge's new version and image are gone too: exactly as before
    versions = ec2.describe_launch_template_versions(LaunchTemplateName="myproject-staging-web")
    assert all(
        not (v.get("VersionDescription") or "").startswith("fabflows deploy-serial")
        or v["VersionNumber"] <= int(before["LaunchTemplate"]["Version"])
        for v in versions["LaunchTemplateVersions"]
    )
