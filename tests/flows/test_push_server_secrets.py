"""push-server-secrets: the plan as tables; the flow on a whole environment of real peers (moto, the
Django app behind nginx and pgbouncer on web/worker hosts, PostgreSQL, a load balancer that really
forwards) with a real secrets block. The database and broker rotation (ALTER ROLE, RabbitMQ, the
site still reading its database) runs in tests/flows/test_no_secret_leaks.py, on the same kind of
environment with RabbitMQ, so the suite builds it once."""

from __future__ import annotations

import pytest
import requests

from blocks.secrets import ServerSecrets
from fabflows.testing.app_env import build_app_env
from fabflows.testing.elb_proxy import ElbProxy
from fabflows.testing.moto_server import MotoServer
from flows.push_server_secrets import AuthChange, plan_push_server_secrets, push_server_secrets
from tasks.ssh.fleet import FleetError
from tasks.ssh.secrets import FileFact, HostFiles, resolve_files, secret_path

BLOCK = "myproject-staging-secrets"
HOME = "/home/deploy"


def _staging():
    import yaml

    from config import resolve_environment
    from config.models import FabulawsConfig
    from fabflows.testing.configs import SAMPLE

    data = yaml.safe_load(SAMPLE.read_text())
    data.update(deploy_user="deploy", home=HOME)
    return resolve_environment(FabulawsConfig.model_validate(data), "staging")


def _facts(address: str, role: str, files: dict[str, tuple[str | None, str, int]]) -> HostFiles:
    return HostFiles(
        host=address,
        address=address,
        role=role,
        files=[
            FileFact(path=p, exists=fp is not None, owner=o, group=o, mode=m, fingerprint=fp)
            for p, (fp, o, m) in files.items()
        ],
    )


APP = {"web": ["{environment}-web"], "worker": ["{environment}-celery"]}


@pytest.mark.parametrize(
    ("current", "wanted", "auth", "mode", "restart", "changes"),
    [
        # same everywhere: nothing to do
        ({"smtp": ("a", "deploy", 0o600)}, {"smtp": "a"}, [], "rolling", [], []),
        # a new value: file updated, app restarted rolling
        (
            {"smtp": ("a", "deploy", 0o600)},
            {"smtp": "b"},
            [],
            "rolling",
            ["staging-web"],
            ["update"],
        ),
        # wrong mode only: rewritten, nothing restarted
        ({"smtp": ("a", "deploy", 0o644)}, {"smtp": "a"}, [], "rolling", [], ["owner/mode"]),
        # missing: created
        ({"smtp": (None, None, None)}, {"smtp": "a"}, [], "rolling", ["staging-web"], ["create"]),
        # userlist re-rendered: pgbouncer too
        (
            {"userlist": ("a", "deploy", 0o600)},
            {"userlist": "b"},
            [],
            "rolling",
            ["staging-pgbouncer", "staging-web"],
            ["update"],
        ),
        # the database password changes where it is checked: a window
        (
            {"db": ("a", "deploy", 0o600)},
            {"db": "b"},
            [AuthChange(secret="database_password", where="db", what="ALTER ROLE")],
            "window",
            ["staging-web"],
            ["update"],
        ),
    ],
)
def test_plan(current, wanted, auth, mode, restart, changes) -> None:
    env = _staging()
    specs = resolve_files(None, env)
    paths = {
        "smtp": secret_path(HOME, "smtp_password"),
        "db": secret_path(HOME, "database_password"),
        "userlist": "/home/deploy/services/pgbouncer/userlist-staging.txt",
    }
    facts = [_facts("10.0.0.5", "web", {paths[k]: v for k, v in current.items()})]
    desired = {"10.0.0.5": {paths[k]: v for k, v in wanted.items()}}
    plan = plan_push_server_secrets(
        env,
        BLOCK,
        ["database_password", "smtp_password"],
        specs,
        facts,
        desired,
        {"10.0.0.5": "web-1"},
        APP,
        ["database_password", "broker_password"],
        "rolling",
        auth,
    )
    host = plan.hosts[0]
    assert [f.change for f in host.files] == changes
    assert host.restart == restart
    assert plan.mode == mode
    assert plan.noop is (not changes and not auth)


# --------------------------------------------------------------------------- real peers


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory):
    moto = MotoServer().start()
    proxy = ElbProxy(moto.endpoint, "myproject-staging-lb")
    extra = {
        "newrelic": {"drain_seconds": 0.5, "healthy_timeout_seconds": 30},
        "secrets": {
            "app_programs": {
                "web": ["{environment}-web", "secretcheck"],
                "worker": ["{environment}-celery"],
            }
        },
    }
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("push"),
        site_url=proxy.url,
        fabflows_extra=extra,
        prefix="ps",
    )
    proxy.start()
    try:
        yield env, proxy
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()


def _save(values: dict[str, str]) -> None:
    block = ServerSecrets()
    for name, value in values.items():
        block.set(name, value)
    block.save(BLOCK, overwrite=True)


def _run(env, **kw):
    return push_server_secrets(
        environment="staging", config=str(env.config_path), return_state=True, **kw
    )


def _file(host, name: str) -> str:
    return host.exec(["cat", f"{HOME}/{name}"]).stdout


def _pids(env) -> dict[str, str]:
    return {
        h.name: h.exec(
            ["sh", "-c", "supervisorctl pid staging-web:staging-server"], check=False
        ).stdout
        for h in env.by_role("web")
    }


def _leftovers(env) -> list[str]:
    out = []
    for h in env.hosts.values():
        found = h.exec(
            ["sh", "-c", f"ls -a {HOME} {HOME}/services/pgbouncer /etc | grep fabflows"],
            check=False,
        )
        out += [f"{h.name}:{line}" for line in found.stdout.split()]
    return out


@pytest.mark.hosts
@pytest.mark.flow
def test_noop_then_rolling_rotation_without_a_single_error(prefect_server, stack) -> None:
    env, proxy = stack
    _save(env.secrets)
    state = _run(env, dry_run=False)
    assert state.is_completed(), state.message
    result = state.result()
    # the default files (pgbouncer userlist as the app has it, New Relic files) get rendered once
    assert result.outcome.startswith("applied") or result.outcome == "nothing to change"

    new = dict(env.secrets, smtp_password="n3w smtp'\"$x`y`")
    _save(new)
    dry = _run(env).result()
    assert dry.dry_run and "rolling" in dry.plan_text.splitlines()[0]
    assert "push smtp_password from block" in dry.plan_text
    assert all(
        _file(h, "smtp_password") == env.secrets["smtp_password"] for h in env.hosts.values()
    )

    before = _pids(env)
    state = _run(env, dry_run=False)
    assert state.is_completed(), state.message
    report = state.result()
    names = [s.name for s in report.steps]
    assert names[0] == "stage" and names[-2:] == ["check-files", "commit"]
    assert sum(n.startswith("apply-web-") for n in names) == 2  # one web server at a time
    assert all(s.state == "done" for s in report.steps) and not report.undone
    assert report.details["probe_samples"] > 20
    assert report.details["non_200"] == 0, report.details["Users"]
    assert report.downtime_seconds is None
    assert all(_file(h, "smtp_password") == new["smtp_password"] for h in env.hosts.values())
    assert all(before[k] != v for k, v in _pids(env).items())
    assert _leftovers(env) == []
    env.secrets.update(new)


@pytest.mark.hosts
@pytest.mark.flow
def test_failed_restart_rolls_everything_back(prefect_server, stack) -> None:
    env, proxy = stack
    web2 = env.by_role("web")[1]
    web2.exec(
        ["sh", "-c", "cat > /etc/supervisor/conf.d/70-check.conf; supervisorctl update >/dev/null"],
        input="[program:secretcheck]\ncommand=/bin/sh -c 'grep -q BAD /home/deploy/smtp_password "
        "&& exit 1; exec sleep 1000000'\nstartsecs=1\nstartretries=0\n",
    )
    new = dict(env.secrets, smtp_password="BAD-value-9")
    _save(new)
    state = _run(env, dry_run=False)
    assert state.is_failed()
    assert web2.name in state.message or web2.ip in state.message
    assert all(
        _file(h, "smtp_password") == env.secrets["smtp_password"] for h in env.hosts.values()
    )
    assert _leftovers(env) == []
    r = requests.get(proxy.url, timeout=5)
    assert r.status_code == 200
    assert len(proxy.backends) == 2  # web2 is back in the load balancer
    with pytest.raises(FleetError):
        state.result()
    _save(env.secrets)
