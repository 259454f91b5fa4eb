"""update-newrelic-keys: key formats as a table; rolling, fast and a failed restart on real peers."""

from __future__ import annotations

import pytest
import requests
from pydantic import SecretStr

from blocks.secrets import ServerSecrets
from fabflows.errors import BadInput
from fabflows.testing.app_env import build_app_env
from fabflows.testing.elb_proxy import ElbProxy
from fabflows.testing.moto_server import MotoServer
from flows.update_newrelic_keys import newrelic_values, update_newrelic_keys
from tasks.ssh.fleet import FleetError

BLOCK = "myproject-staging-secrets"
NAMES = ["newrelic_license_key", "newrelic_api_key"]
GOOD_LICENSE = "0123456789abcdef0123456789abcdef01234567"
GOOD_API = "NRAK-ABCDEFGHIJKLMNOPQRSTUVWXYZ0"


@pytest.mark.parametrize(
    ("license_key", "api_key", "problem"),
    [
        (GOOD_LICENSE[:-1], GOOD_API, "39 characters"),
        ("z" * 40, GOOD_API, "40 characters"),
        (GOOD_LICENSE + " ", GOOD_API, "white space"),
        (GOOD_LICENSE, "NRAK-short", "newrelic_api_key"),
        (GOOD_LICENSE, None, "newrelic_api_key is not set"),
    ],
)
def test_bad_keys_are_refused_without_showing_them(license_key, api_key, problem) -> None:
    block = ServerSecrets(newrelic_license_key=SecretStr(license_key))
    if api_key:
        block.newrelic_api_key = SecretStr(api_key)
    with pytest.raises(BadInput, match=problem) as info:
        newrelic_values(block, BLOCK, NAMES)
    assert license_key.strip() not in str(info.value)


@pytest.mark.parametrize(
    "license_key",
    [GOOD_LICENSE, GOOD_LICENSE.upper(), "A1b2" * 9 + "NRAL", "eu01xx" + "0a" * 17],
)
def test_accepted_license_formats(license_key) -> None:
    block = ServerSecrets(
        newrelic_license_key=SecretStr(license_key), newrelic_api_key=SecretStr(GOOD_API)
    )
    assert sorted(newrelic_values(block, BLOCK, NAMES)) == sorted(NAMES)
    with pytest.raises(BadInput, match="no newrelic_license_key"):
        newrelic_values(block, BLOCK, ["smtp_password"])
    with pytest.raises(BadInput, match="does not exist"):
        newrelic_values(None, BLOCK, NAMES)


# --------------------------------------------------------------------------- real peers


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory):
    moto = MotoServer().start()
    proxy = ElbProxy(moto.endpoint, "myproject-staging-lb")
    extra = {"newrelic": {"drain_seconds": 0.5, "healthy_timeout_seconds": 30}}
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("nr"),
        site_url=proxy.url,
        rabbitmq=False,
        fabflows_extra=extra,
        prefix="nr",
    )
    proxy.start()
    block = ServerSecrets()
    for name, value in env.secrets.items():
        block.set(name, value)
    try:
        yield env, proxy, block
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()


def _run(env, **kw):
    return update_newrelic_keys(
        environment="staging", config=str(env.config_path), return_state=True, **kw
    )


def _infra(host) -> str:
    return host.exec(["cat", "/etc/newrelic-infra.yml"], check=False).stdout


def _pid(host, name: str) -> str:
    return host.exec(["supervisorctl", "pid", name], check=False).stdout.strip()


@pytest.mark.hosts
@pytest.mark.flow
def test_rolling_then_fast_with_measured_downtime(prefect_server, stack) -> None:
    env, proxy, block = stack
    # a malformed key: refused before anything changes
    bad = block.model_copy()
    bad.newrelic_license_key = SecretStr("x" * 40)
    bad.save(BLOCK, overwrite=True)
    state = _run(env, dry_run=False)
    assert state.is_failed() and "newrelic_license_key does not look like" in state.message
    with pytest.raises(BadInput):
        state.result()
    assert all("x" * 40 not in _infra(h) for h in env.hosts.values())

    block.set("newrelic_license_key", "1" * 40)
    block.save(BLOCK, overwrite=True)
    worker = env.by_role("worker")[0]
    before = _pid(worker, "newrelic-infra")
    state = _run(env, dry_run=False)
    assert state.is_completed(), state.message
    result = state.result()
    assert "rolling" in result.plan_text.splitlines()[0]
    assert result.details["non_200"] == 0, result.details["Users"]
    assert result.downtime_seconds is None
    assert all("1" * 40 in _infra(h) for h in env.hosts.values())
    web = env.by_role("web")[0]
    assert "1" * 40 in web.exec(["cat", "/home/deploy/services/newrelic-staging-web.ini"]).stdout
    assert _pid(worker, "newrelic-infra") != before

    block.set("newrelic_license_key", "2" * 40)
    block.save(BLOCK, overwrite=True)
    state = _run(env, dry_run=False, mode="fast")
    assert state.is_completed(), state.message
    result = state.result()
    steps = [s.name for s in result.steps]
    assert steps[steps.index("upgrade-on") :][:3] == [
        "upgrade-on",
        "apply-web-servers",
        "upgrade-off",
    ]
    assert result.downtime_seconds is not None and result.downtime_seconds > 0
    assert result.details["non_200"] > 0  # users got the 503 page meanwhile, and it is counted
    assert all("2" * 40 in _infra(h) for h in env.hosts.values())
    assert requests.get(proxy.url, timeout=5).status_code == 200


@pytest.mark.hosts
@pytest.mark.flow
def test_failed_agent_restart_puts_the_old_files_back(prefect_server, stack) -> None:
    env, proxy, block = stack
    worker = env.by_role("worker")[0]
    worker.exec(
        [
            "sh",
            "-c",
            "cat > /etc/supervisor/conf.d/30-newrelic-infra.conf; supervisorctl update >/dev/null",
        ],
        input="[program:newrelic-infra]\ncommand=/bin/sh -c 'grep -q 3333 /etc/newrelic-infra.yml "
        "&& exit 1; exec sleep 1000000'\nstartsecs=1\nstartretries=0\n",
    )
    old = _infra(worker)
    block.set("newrelic_license_key", "3" * 40)
    block.save(BLOCK, overwrite=True)
    state = _run(env, dry_run=False)
    assert state.is_failed() and "newrelic-infra" in state.message
    with pytest.raises(FleetError):
        state.result()
    assert all("3" * 40 not in _infra(h) for h in env.hosts.values())
    assert _infra(worker) == old
    assert (
        "RUNNING" in worker.exec(["supervisorctl", "status", "newrelic-infra"], check=False).stdout
    )
    assert requests.get(proxy.url, timeout=5).status_code == 200
