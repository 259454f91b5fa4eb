"""SIGKILL deploy-serial at step boundaries and in the middle of a surge (the new instance in
service, the old one still too: desired capacity one above), run recover-environment, and check
on the real peers (moto, a test host per instance behind the load balancer proxy) that the group
is at its desired capacity with every instance in service and answering, each instance either one
of the group's before or on the new image (a finished surge stays), and the launch template as
before unless an instance already runs the new image. A run killed while it made the image leaves
no image behind; one killed half-way through the prune is finished by recover (as planned).

One app stack serves the module; the cases run in order, each from where the previous left it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from prefect.settings import PREFECT_API_URL

from fabflows.testing import faults
from fabflows.testing.app_env import InstanceFollower, build_app_env, run_in_thread
from fabflows.testing.elb_proxy import ElbProxy
from fabflows.testing.moto_server import MotoServer
from flows.recover_environment import recover_environment

pytestmark = [pytest.mark.hosts, pytest.mark.flow]

GROUP = "myproject-staging-ag"
TEMPLATE = "myproject-staging-web"


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory):
    moto = MotoServer().start()
    proxy = ElbProxy(moto.endpoint, "myproject-staging-lb")
    extra = {"refresh": {"drain_seconds": 1, "poll_seconds": 0.5, "instance_timeout_seconds": 60}}
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("refresh-crash"),
        site_url=proxy.url,
        rabbitmq=False,
        fabflows_extra=extra,
        prefix="dc",
    )
    proxy.start()
    try:
        yield env
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


def _group(env) -> dict:
    return _clients(env)[1].describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])[
        "AutoScalingGroups"
    ][0]


def _images(env, ids: list[str]) -> dict[str, str]:
    ec2 = _clients(env)[0]
    out = {}
    for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
        for i in r["Instances"]:
            out[i["InstanceId"]] = (i["ImageId"], i["PrivateIpAddress"])
    return out


def _answers(address: str) -> str:
    try:
        with urllib.request.urlopen(f"http://{address}/", timeout=10) as resp:
            return str(resp.status)
    except Exception as exc:  # noqa: BLE001 - the answer is what is checked
        return f"{type(exc).__name__}: {exc}"


def _kill_at(
    env, follower: InstanceFollower, where: str, tmp_path: Path, options: list[str]
) -> None:
    """Run deploy-serial (applying, with ``options``) in a process of its own, following the
    instances it launches with test hosts, and SIGKILL it at ``where``."""
    marker = tmp_path / "paused"
    penv = dict(os.environ)
    penv.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        FABFLOWS_TEST_PAUSE_AT=f"deploy-serial/{where}",
        FABFLOWS_TEST_PAUSE_MARKER=str(marker),
        FABFLOWS_PROGRESS_BAR="0",
    )
    argv = [sys.executable, "-c", faults.CLI_CODE, "run", "deploy-serial", "-e", "staging"]
    argv += ["-c", str(env.config_path), "--apply", *options]
    proc = subprocess.Popen(
        argv,
        env=penv,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )

    def wait() -> None:
        deadline = time.monotonic() + 400
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before {where}: {proc.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, f"the run never reached {where}"
            time.sleep(0.1)

    try:
        follower.run_until(run_in_thread(wait), timeout=450)
    finally:
        with contextlib.suppress(ProcessLookupError):  # our own child's group, started above
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


matrix = pytest.mark.crash_matrix
KEEP_ONE = ["--keep-images", "1"]  # everything older than this run's image and version is pruned
CASES = [
    pytest.param("surge-{0}:surged", "before", [], id="mid-first-surge"),  # new and old serve
    pytest.param("surge-{1}:surged", "one replaced", [], id="mid-second-surge", marks=matrix),
    pytest.param("new-template-version:after", "before", [], id="after-template", marks=matrix),
    # the image made, its id not journaled yet: recover finds it by its name
    pytest.param("create-image:created", "before", [], id="mid-create-image", marks=matrix),
    pytest.param("create-image:after", "before", [], id="after-create-image", marks=matrix),
    # every instance replaced, the images pruned, the template versions not yet
    pytest.param("prune:images-pruned", "planned", KEEP_ONE, id="mid-prune", marks=matrix),
]
"""Mid-surge runs in ``make test``; the other kill points in ``make crash-matrix``."""


@pytest.mark.parametrize(("where", "expect", "options"), CASES)
def test_killed_then_recovered_is_at_capacity_as_before_or_as_planned(
    prefect_server, stack, tmp_path: Path, where: str, expect: str, options: list[str]
) -> None:
    env = stack
    ec2, _ = _clients(env)
    before = _group(env)
    old = sorted(i["InstanceId"] for i in before["Instances"])  # the plan's order
    old_images = _images(env, old)
    version_before = before["LaunchTemplate"]["Version"]  # "$Latest" at first
    newest_before = max(
        v["VersionNumber"]
        for v in ec2.describe_launch_template_versions(LaunchTemplateName=TEMPLATE)[
            "LaunchTemplateVersions"
        ]
    )
    follower = InstanceFollower(env, prefix="dk")
    _kill_at(env, follower, where.format(*old), tmp_path, options)
    killed = _group(env)
    if "surged" in where:
        assert killed["DesiredCapacity"] == 3, "killed mid-surge: one instance above desired"

    report = follower.run_until(
        run_in_thread(
            recover_environment,
            environment="staging",
            config=str(env.config_path),
            dry_run=False,
        ),
        timeout=300,
    )
    assert not report.left and not report.problems, report.render_text()
    again = recover_environment(environment="staging", config=str(env.config_path))
    assert again.outcome == "dry run: nothing to change", again.render_text()
    follower.tick()

    after = _group(env)
    now = [i["InstanceId"] for i in after["Instances"]]
    assert after["DesiredCapacity"] == 2
    assert [i["LifecycleState"] for i in after["Instances"]] == ["InService", "InService"]
    images = _images(env, now)
    assert all(_answers(addr) == "200" for _, addr in images.values()), images
    mine = [
        i["ImageId"]
        for i in ec2.describe_images(Owners=["self"])["Images"]
        if i["Name"].startswith("myproject_staging_web_")
        and i["ImageId"] not in {img for img, _ in old_images.values()}
    ]
    versions = ec2.describe_launch_template_versions(LaunchTemplateName=TEMPLATE)[
        "LaunchTemplateVersions"
    ]
    if expect == "before":  # exactly as before: instances, template, no new version or image
        assert sorted(now) == sorted(old)
        assert after["LaunchTemplate"]["Version"] == version_before
        assert max(v["VersionNumber"] for v in versions) == newest_before
        assert mine == []
    elif expect == "planned":  # every surge finished, the prune finished by recover
        assert not set(now) & set(old)
        (image,) = mine
        assert {img for img, _ in images.values()} == {image}
        left = [
            i["ImageId"]
            for i in ec2.describe_images(Owners=["self"])["Images"]
            if i["Name"].startswith("myproject_staging_web_")
        ]
        assert left == [image], "the older images pruned: this run's is the only one left"
        (current,) = versions  # the older versions pruned
        assert after["LaunchTemplate"]["Version"] == str(current["VersionNumber"])
        assert current["LaunchTemplateData"]["ImageId"] == image
    else:  # the first surge finished (as planned), the second undone (as before)
        assert old[0] not in now and old[1] in now
        (new,) = [i for i in now if i != old[0] and i != old[1]]
        (image,) = mine
        assert images[new][0] == image
        assert after["LaunchTemplate"]["Version"] != version_before
        current = next(
            v for v in versions if str(v["VersionNumber"]) == after["LaunchTemplate"]["Version"]
        )
        assert current["LaunchTemplateData"]["ImageId"] == image
