"""add-server on real peers: a new worker launched in moto gets its test host (the ``app`` image),
the flow writes its settings as its peers have them and starts its programs; a failed cache is
replaced (RabbitMQ on the new host), every app server pointed at the new address while the app
answers through the load balancer, the old cache retagged and kept; bad input is refused before
anything is created; a run SIGKILLed at a step boundary is taken back by recover; the pure plan.

One stack for the module (moto, a db-primary, one web server behind the load balancer, a worker,
a cache running RabbitMQ). The app servers' settings name the cache by address (``BROKER_HOST``,
``CELERY_BROKER_URL``), as FabulAWS's do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from config import load_config, resolve_environment
from fabflows.errors import BadInput
from fabflows.runtime.journal import Journal
from fabflows.testing.app_env import HOME, InstanceFollower, build_app_env, run_in_thread
from fabflows.testing.elb_proxy import ElbProxy
from fabflows.testing.failover_lab import ec2_of, role_ids, tags_of
from fabflows.testing.faults import run_until_paused
from fabflows.testing.moto_server import MotoServer
from flows.add_server import (
    DECOMMISSIONED,
    AddServerFacts,
    AddServerParams,
    Target,
    add_server,
    distinct_names,
    plan_add_server,
)
from flows.recover_environment import recover_environment
from tasks.aws.launch import LaunchSource

SETTINGS = f"{HOME}/www/staging/code_root/fabapp/local_settings.py"

# --------------------------------------------------------------------------- the plan (pure)


@pytest.fixture(scope="module")
def staging_env(tmp_path_factory):  # noqa: ANN001, ANN201
    from fabflows.testing.configs import write_config

    path = write_config(tmp_path_factory.mktemp("as-plan"), {})
    return resolve_environment(load_config(path), "staging")


def _t(name: str, role: str, ip: str) -> Target:
    return Target(name=name, instance_id=f"i-{name}", address=ip, private_address=ip, role=role)


def _facts(**kw) -> AddServerFacts:  # noqa: ANN003
    base = dict(
        source=LaunchSource(instance_id="i-w", subnet_id="subnet-a", vpc_id="vpc-1"),
        source_image="ami-w",
        source_type="m1.small",
        region_zones=["us-east-1a", "us-east-1b", "us-east-1c"],
        configured_zones=["us-east-1a", "us-east-1b"],
        vpc_subnets={"us-east-1a": ["subnet-a"], "us-east-1b": ["subnet-b"]},
        role_servers={"w": "us-east-1a"},
        names=["myproject_staging_worker", "myproject_staging_cache"],
        caches=[_t("c", "cache", "10.0.0.9")],
        apps=[_t("w", "worker", "10.0.0.2"), _t("web", "web", "10.0.0.3")],
        app_cache_files={"w": ["/s.py"], "web": ["/s.py"]},
    )
    return AddServerFacts(**(base | kw))


@pytest.mark.parametrize(
    ("role", "facts", "kw", "problem"),
    [
        ("worker", {}, {}, None),
        ("cache", {}, {}, None),
        ("web", {}, {}, "is not add-server's: web servers are the autoscaling group's"),
        ("db-replica", {}, {}, "use add-replica"),
        ("mailer", {}, {}, "unknown role 'mailer'"),
        ("worker", {}, {"availability_zone": "z"}, "'us-east-1z' does not exist"),
        ("worker", {}, {"availability_zone": "c"}, "is not one of myproject/staging's zones"),
        ("cache", {"caches": []}, {}, "0 cache servers"),
        ("cache", {}, {"replace": "x"}, "no cache server 'x'"),
        ("cache", {"app_unreadable": {"w": "down"}}, {}, "app settings not read"),
        ("worker", {"apps": []}, {}, "no running web or worker server"),
    ],
)
def test_add_server_plan(staging_env, role, facts, kw, problem) -> None:  # noqa: ANN001
    plan = plan_add_server(_facts(**facts), AddServerParams(role=role, **kw), staging_env)
    if problem:
        assert any(problem in p for p in plan.problems), plan.problems
        assert not plan.changes
        return
    assert not plan.problems, plan.problems
    assert plan.availability_zone == "us-east-1b"  # a has the worker
    name = f"myproject_staging_{role}_2"
    steps = [c.step for c in plan.changes]
    if role == "worker":
        assert plan.settings_from and plan.settings_from.name == "w"
        assert steps == [f"launch-{name}", f"settings-{name}", f"start-{name}", f"tag-{name}"]
        assert not plan.destructive
    else:
        assert steps == [f"launch-{name}", "point-web", "point-w", "retire-c", f"tag-{name}"]
        assert plan.destructive
        assert any("are lost" in n for n in plan.notes)


def test_add_server_cache_plan_tells_apart_servers_sharing_a_name(staging_env) -> None:  # noqa: ANN001
    """An autoscaling group gives all its web servers one Name tag: each still gets its own
    point step (the journal knows steps by name) and its own settings files."""
    webs = [_t("web", "web", "10.0.0.3"), _t("web", "web", "10.0.0.4")]
    webs = [webs[0], webs[1].model_copy(update={"instance_id": "i-web2"})]
    apps = distinct_names([_t("w", "worker", "10.0.0.2"), *webs])
    assert [a.name for a in apps] == ["w", "web-i-web", "web-i-web2"]
    assert distinct_names(apps) == apps  # already distinct: unchanged
    files = {a.name: [f"/{a.instance_id}.py"] for a in apps}
    plan = plan_add_server(
        _facts(apps=apps, app_cache_files=files), AddServerParams(role="cache"), staging_env
    )
    points = [c for c in plan.changes if c.step.startswith("point-")]
    assert [c.step for c in points] == ["point-web-i-web", "point-web-i-web2", "point-w"]
    assert "/i-web2.py" in points[1].detail and "/i-web.py" not in points[1].detail


# --------------------------------------------------------------------------- real peers


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory, prefect_server):  # noqa: ANN001, ANN201
    moto = MotoServer().start()
    proxy = ElbProxy(moto.endpoint, "myproject-staging-lb")
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("addsrv"),
        site_url=proxy.url,
        rabbitmq=True,
        replicas=False,
        prefix="as",
        web_count=1,
    )
    proxy.start()
    try:
        (cache,) = env.by_role("cache")
        for host in env.by_role("web") + env.by_role("worker"):
            host.exec(
                ["sh", "-c", 'cat >> "$1"', "sh", SETTINGS],
                input=f'BROKER_HOST = "{cache.ip}"\n'
                f'CELERY_BROKER_URL = "amqp://deploy@{cache.ip}:5672/myproject_staging"\n',
            )
        yield env, proxy
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()


def _instances(env) -> dict[str, str]:  # noqa: ANN001
    reservations = ec2_of(env).describe_instances()["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in reservations for i in r["Instances"]}


def _status(host) -> dict[str, str]:  # noqa: ANN001
    out = host.exec(["sh", "-c", "supervisorctl status || true"]).stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}


def _site_ok(proxy: ElbProxy) -> None:
    # the app's home page reads the database (the lab's load balancer forwards GETs only)
    r = requests.get(proxy.url, timeout=10)
    assert r.status_code == 200, (r.status_code, r.text[:300])


@pytest.mark.hosts
@pytest.mark.flow
def test_add_server_dry_run_and_bad_input(stack) -> None:  # noqa: ANN001
    env, _ = stack
    cfg = str(env.config_path)
    before = _instances(env)
    dry = add_server(environment="staging", role="worker", config=cfg)
    assert "launch a worker in us-east-1c (the fewest worker servers)" in dry.plan_text
    name = "myproject_staging_worker_2"
    steps = re.findall(r"^((?:launch|settings|start|tag)-\S+)\s", dry.plan_text, re.M)
    assert steps == [f"{s}-{name}" for s in ("launch", "settings", "start", "tag")], dry.plan_text
    assert dry.dry_run and dry.outcome.startswith("dry run: would apply 4 step(s)")
    cache_dry = add_server(environment="staging", role="cache", config=cfg)
    assert "are lost" in cache_dry.plan_text and "retire-" in cache_dry.plan_text
    assert SETTINGS in cache_dry.plan_text  # the files naming the old cache, per app server
    for kw, message in [
        ({"role": "mailer"}, "unknown role 'mailer'"),
        ({"role": "web"}, "role 'web' is not add-server's"),
        ({"role": "db-primary"}, "use promote-replica"),
        ({"role": "worker", "availability_zone": "us-east-1z"}, "'us-east-1z' does not exist"),
        ({"role": "worker", "availability_zone": "a"}, "'us-east-1a' is not one of"),
    ]:
        with pytest.raises(BadInput, match=re.escape(message)):
            add_server(environment="staging", config=cfg, dry_run=False, **kw)
    with pytest.raises(BadInput, match="unknown environment 'nowhere'"):
        add_server(environment="nowhere", role="worker", config=cfg, dry_run=False)
    from prefect.settings import PREFECT_API_URL

    cli = subprocess.run(
        [sys.executable, "-m", "fabflows.cli", "run", "add-server", "-e", "staging", "-c", cfg]
        + ["--role", "mailer", "--apply"],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value())),
        cwd=Path(__file__).resolve().parents[2],
    )
    assert cli.returncode == 2, cli.stderr
    lines = [line for line in cli.stderr.splitlines() if "add-server" in line]
    assert len(lines) == 1 and "unknown role 'mailer'" in lines[0], cli.stderr
    assert _instances(env) == before  # nothing was created


@pytest.mark.hosts
@pytest.mark.flow
def test_add_server_worker(stack) -> None:  # noqa: ANN001
    env, _ = stack
    cfg = str(env.config_path)
    (cache,) = env.by_role("cache")
    # zone e: where the test network's subnet is (c's spare subnet has no test hosts)
    follower = InstanceFollower(env, prefix="aw")
    future = run_in_thread(
        add_server,
        environment="staging",
        role="worker",
        config=cfg,
        dry_run=False,
        availability_zone="e",
    )
    report = follower.run_until(future, timeout=600)
    assert not follower.errors, follower.errors
    name = "myproject_staging_worker_2"
    assert [(s.name, s.state) for s in report.steps] == [
        (f"{s}-{name}", "done") for s in ("launch", "settings", "start", "tag")
    ], report.render_text()
    (new_iid,) = follower.started
    assert tags_of(env, new_iid)["role"] == "worker"
    assert new_iid in role_ids(env, "worker")
    new = env.hosts[new_iid]
    status = _status(new)
    assert status["staging-celery:staging-celery-main"] == "RUNNING", status
    assert status["staging-pgbouncer"] == "RUNNING", status
    # its settings are its peers': the same cache address
    assert f'BROKER_HOST = "{cache.ip}"' in new.exec(["cat", SETTINGS]).stdout


@pytest.mark.hosts
@pytest.mark.flow
def test_add_server_replaces_cache(stack) -> None:  # noqa: ANN001
    env, proxy = stack
    cfg = str(env.config_path)
    (old_iid,) = role_ids(env, "cache")
    old_ip = env.hosts[old_iid].ip
    env.hosts[old_iid].exec(["sh", "-c", "supervisorctl stop all >/dev/null || true"])  # failed
    apps = [iid for iid in role_ids(env, "web") + role_ids(env, "worker")]
    follower = InstanceFollower(env, prefix="ac")
    future = run_in_thread(
        add_server,
        environment="staging",
        role="cache",
        config=cfg,
        dry_run=False,
        availability_zone="e",
    )
    report = follower.run_until(future, timeout=600)
    assert not follower.errors, follower.errors
    assert all(s.state == "done" for s in report.steps), report.render_text()
    assert len([s for s in report.steps if s.name.startswith("point-")]) == len(apps)
    (new_iid,) = follower.started
    new_ip = env.hosts[new_iid].ip
    assert role_ids(env, "cache") == [new_iid]
    assert tags_of(env, old_iid)["role"] == DECOMMISSIONED
    assert _instances(env)[old_iid] == "running"  # retagged, never terminated
    for iid in apps:
        text = env.hosts[iid].exec(["cat", SETTINGS]).stdout
        assert f'BROKER_HOST = "{new_ip}"' in text and old_ip not in text, text
        assert f"@{new_ip}:5672/" in text
    _site_ok(proxy)


# --------------------------------------------------------------------------- SIGKILL, then recover

DEFAULT_KILL_POINT = "start"
"""make test runs this one (the worker launched with its settings, programs not restarted)."""


@pytest.mark.hosts
@pytest.mark.flow
@pytest.mark.parametrize(
    "kind",
    [
        k if k == DEFAULT_KILL_POINT else pytest.param(k, marks=pytest.mark.crash_matrix)
        for k in ("launch:after", "settings", "start", "tag")
    ],
)
def test_add_server_sigkill_then_recover(stack, kind, tmp_path: Path) -> None:  # noqa: ANN001
    """The run SIGKILLed at a step boundary; recover terminates the instance it launched (found by
    its record tag) and leaves the workers as they were."""
    env, proxy = stack
    cfg = str(env.config_path)
    workers_before = role_ids(env, "worker")
    dry = add_server(environment="staging", role="worker", config=cfg, availability_zone="e")
    (name,) = re.findall(r"^launch-(\S+)\s", dry.plan_text, re.M)
    step, _, when = kind.partition(":")
    target = f"{step}-{name}" + (":after" if when else "")
    follower = InstanceFollower(env, prefix="ak")
    killed = run_in_thread(
        run_until_paused,
        "add-server",
        target,
        ["-e", "staging", "-c", cfg, "--role", "worker", "--availability-zone", "e", "--apply"],
        tmp_path / "paused",
        300,
    )
    follower.run_until(killed, timeout=360)
    assert not follower.errors, follower.errors
    (new_iid,) = follower.started
    assert tags_of(env, new_iid)["role"] == "worker-PENDING"
    assert new_iid not in role_ids(env, "worker")
    journal = Journal.for_environment("myproject/staging", load_config(cfg))
    (entry,) = [e for e in journal.open_entries() if e.flow == "add-server"]
    found = recover_environment(environment="staging", config=cfg, dry_run=False)
    assert f"undo launch-{name}" in found.plan_text, found.plan_text
    assert entry.run_id[:8] in found.plan_text
    follower.tick()
    assert _instances(env)[new_iid] in ("shutting-down", "terminated")
    assert new_iid not in env.hosts
    assert role_ids(env, "worker") == workers_before
    assert not journal.open_entries(), journal.open_entries()
    _site_ok(proxy)


@pytest.mark.hosts
@pytest.mark.flow
@pytest.mark.crash_matrix
@pytest.mark.parametrize("kind", ["launch:after", "point:1", "retire", "tag"])
def test_add_server_cache_sigkill_then_recover(stack, kind, tmp_path: Path) -> None:  # noqa: ANN001
    """A cache replacement SIGKILLed at a step boundary (``point:1``: mid-rollout, the first app
    server already on the new cache, the others not); recover points every app server back at
    the cache they had, gives the old cache its role back and terminates the new one."""
    env, proxy = stack
    cfg = str(env.config_path)
    (old_iid,) = role_ids(env, "cache")
    old_ip = env.hosts[old_iid].ip
    apps = role_ids(env, "web") + role_ids(env, "worker")
    dry = add_server(environment="staging", role="cache", config=cfg, availability_zone="e")
    steps = re.findall(r"^((?:launch|point|retire|tag)-\S+)\s", dry.plan_text, re.M)
    points = [s for s in steps if s.startswith("point-")]
    assert len(points) == len(apps) >= 2, dry.plan_text
    step, _, when = kind.partition(":")
    if step == "point":
        target, first = points[int(when)], points[0].removeprefix("point-")
    else:
        target = next(s for s in steps if s.startswith(f"{step}-")) + (":after" if when else "")
        first = None
    follower = InstanceFollower(env, prefix="kc")
    killed = run_in_thread(
        run_until_paused,
        "add-server",
        target,
        ["-e", "staging", "-c", cfg, "--role", "cache", "--availability-zone", "e", "--apply"],
        tmp_path / "paused",
        300,
    )
    follower.run_until(killed, timeout=360)
    assert not follower.errors, follower.errors
    (new_iid,) = follower.started
    new_ip = env.hosts[new_iid].ip
    assert tags_of(env, new_iid)["role"] == "cache-PENDING"
    settings = {iid: env.hosts[iid].exec(["cat", SETTINGS]).stdout for iid in apps}
    on_new = [iid for iid, text in settings.items() if f'BROKER_HOST = "{new_ip}"' in text]
    if first is not None:  # the kill came mid-rollout: one app server moved, the rest not
        assert [tags_of(env, iid)["Name"] for iid in on_new] == [first], settings
    else:
        assert on_new == (apps if step in ("retire", "tag") else []), settings
    if step == "tag":
        assert tags_of(env, old_iid)["role"] == DECOMMISSIONED
    journal = Journal.for_environment("myproject/staging", load_config(cfg))
    (entry,) = [e for e in journal.open_entries() if e.flow == "add-server"]
    found = recover_environment(environment="staging", config=cfg, dry_run=False)
    assert entry.run_id[:8] in found.plan_text, found.plan_text
    assert f"undo {steps[0]}" in found.plan_text, found.plan_text
    follower.tick()
    assert _instances(env)[new_iid] in ("shutting-down", "terminated")
    assert new_iid not in env.hosts
    assert role_ids(env, "cache") == [old_iid]
    assert tags_of(env, old_iid)["role"] == "cache"
    for iid in apps:
        text = env.hosts[iid].exec(["cat", SETTINGS]).stdout
        assert f'BROKER_HOST = "{old_ip}"' in text and new_ip not in text, (iid, text)
    assert not journal.open_entries(), journal.open_entries()
    _site_ok(proxy)
