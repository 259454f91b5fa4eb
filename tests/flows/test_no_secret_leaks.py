"""No secret value in Prefect logs, artifacts, flow parameters, states or exceptions, in the run
journals, in the notifications the notifier would send about the runs, nor in any test host's
process list, while every flow of the secrets work runs against real peers.

The values are distinctive (quotes, ``$``, backticks, spaces and a per-run tag), so a hit cannot be
a coincidence. The process lists of every host are sampled every 50 ms during the runs (``ps`` inside
each host), which catches a value on any command line, sudo's included. Redaction
(fabflows.logfilter) is deliberately not installed here: the values must never be logged at all.
"""

from __future__ import annotations

import asyncio
import shlex
import threading
import uuid

import psycopg
import pytest
import requests
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from blocks.secrets import ServerSecrets
from fabflows.testing.app_env import (
    InstanceFollower,
    build_app_env,
    default_secrets,
    run_in_thread,
)
from fabflows.testing.elb_proxy import ElbProxy
from fabflows.testing.moto_server import MotoServer
from fabflows.testing.rabbitmq import authenticates as broker_accepts
from flows.deploy_serial import deploy_serial
from flows.pull_server_secrets import pull_server_secrets
from flows.push_server_secrets import push_server_secrets
from flows.update_newrelic_keys import update_newrelic_keys

pytestmark = [pytest.mark.hosts, pytest.mark.flow]

BLOCK = "myproject-staging-secrets"
TAG = uuid.uuid4().hex[:6]


class ProcessLists:
    """Samples ``ps -eo args`` in every host until stopped."""

    def __init__(self, hosts, interval: float = 0.05):
        self.hosts = hosts
        self.interval = interval
        self.lines: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for host in list(self.hosts()):
                try:
                    out = host.exec(["ps", "-eo", "args"], check=False, timeout=5).stdout
                except Exception:  # noqa: BLE001 - a host being replaced
                    continue
                self.lines.update(out.splitlines())
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


class SentCommands:
    """Every command line sent over SSH (what the hosts' process lists show), recorded on our side.

    ``ps`` sampling can miss a command that lives a millisecond; this cannot. The original channel
    method still runs: nothing is replaced, the command is only copied on its way out.
    """

    def __init__(self):
        self.commands: list[str] = []

    def __enter__(self):
        import paramiko

        self._original = paramiko.Channel.exec_command
        recorder = self

        def exec_command(channel, command):  # noqa: ANN001, ANN202
            recorder.commands.append(command if isinstance(command, str) else command.decode())
            return recorder._original(channel, command)

        paramiko.Channel.exec_command = exec_command
        return self

    def __exit__(self, *exc):
        import paramiko

        paramiko.Channel.exec_command = self._original


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory):
    moto = MotoServer().start()
    proxy = ElbProxy(moto.endpoint, "myproject-staging-lb")
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("leaks"),
        site_url=proxy.url,
        secrets=default_secrets(TAG),
        fabflows_extra={
            "newrelic": {"drain_seconds": 0.3, "healthy_timeout_seconds": 30},
            "refresh": {"drain_seconds": 0.5, "poll_seconds": 0.5, "instance_timeout_seconds": 60},
        },
        prefix="lk",
    )
    proxy.start()
    try:
        yield env, proxy
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()


async def _all(read, **kwargs) -> list:  # noqa: ANN001
    """Every page of a Prefect read (the API answers 200 rows at most per call)."""
    out: list = []
    while True:
        page = await read(limit=200, offset=len(out), **kwargs)
        out += page
        if len(page) < 200:
            return out


def _everything_prefect_stored(run_ids: list) -> str:
    async def collect() -> str:
        parts: list[str] = []
        async with get_client() as client:
            runs = await _all(
                client.read_flow_runs,
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)),
            )
            assert len(runs) == len(run_ids)
            for run in runs:
                parts += [repr(run.parameters), repr(run.state.message if run.state else "")]
                parts.append(repr(run.tags))
                for state in await client.read_flow_run_states(run.id):
                    parts.append(repr(state.message))
            logs = await _all(
                client.read_logs, log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids))
            )
            assert logs, "no log recorded: the scan would not cover them"
            parts += [log.message for log in logs]
            for artifact in await _all(client.read_artifacts):
                parts += [repr(artifact.data), repr(artifact.description), repr(artifact.key)]
            task_runs = await _all(
                client.read_task_runs,
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)),
            )
            assert task_runs, "no task run recorded: the scan would not cover them"
            for task_run in task_runs:
                parts.append(repr(task_run.state.message if task_run.state else ""))
                parts.append(repr(task_run.name))
            parts.append(f"({len(logs)} logs)")
        return "\n".join(parts)

    return asyncio.run(collect())


def _notices(config_path: str, run_ids: list) -> list[str]:
    """Every notice the notifier could send about each run (ended or success, approval pending and
    its reminder, window closing, slow), built from the run's facts as the notifier reads them from
    the Prefect server and the journal: what a notification block would be given."""
    from datetime import UTC, datetime, timedelta

    from config import load_config
    from fabflows.notify import messages, notifier

    cfg = load_config(config_path)
    now = datetime.now(UTC)
    texts: list[str] = []
    with get_client(sync_client=True) as client:
        for run_id in run_ids:
            run = client.read_flow_run(run_id)
            env = notifier.environment_of(cfg, run)
            assert env is not None, run.parameters
            facts = notifier.run_facts(client, cfg, run, env)
            approval = notifier.approval_facts(client, run)
            notices = [
                messages.ended_notice(facts),
                messages.success_notice(facts),
                messages.approval_notice(facts, approval, reminder=False),
                messages.approval_notice(facts, approval, reminder=True),
                messages.window_notice(facts, now + timedelta(minutes=9), now),
                messages.slow_notice(facts, timedelta(seconds=40), timedelta(seconds=90), 1.5),
            ]
            texts += [f"{n.subject}\n{n.render()}" for n in notices if n is not None]
    return texts


def _save(values: dict[str, str]) -> None:
    block = ServerSecrets()
    for name, value in values.items():
        block.set(name, value)
    block.save(BLOCK, overwrite=True)


def test_no_secret_anywhere(prefect_server, prefect_server_all_services, stack) -> None:
    env, proxy = stack
    config = str(env.config_path)
    old = dict(env.secrets)
    new = default_secrets(TAG + "n")
    new["newrelic_license_key"] = ("fedcba9876543210fedcba9876543210" + TAG + "ab")[:40]
    keys = [(TAG * 7)[:40], (TAG[::-1] * 7)[:40]]
    states = []
    with SentCommands() as sent, ProcessLists(lambda: list(env.hosts.values())) as ps:
        # pull: the block from the servers (dry run, then for real)
        states.append(pull_server_secrets(environment="staging", config=config, return_state=True))
        states.append(
            pull_server_secrets(
                environment="staging", config=config, dry_run=False, return_state=True
            )
        )
        # push: rotate every secret (database and broker passwords where they are checked too)
        _save(new)
        states.append(push_server_secrets(environment="staging", config=config, return_state=True))
        states.append(
            push_server_secrets(
                environment="staging", config=config, dry_run=False, return_state=True
            )
        )
        assert states[-1].is_completed(), states[-1].message
        rotation = states[-1].result()
        assert "window" in rotation.plan_text.splitlines()[0]
        assert "change-passwords" in [s.name for s in rotation.steps]
        for secret in ("database_password", "broker_password"):
            assert f"changed where checked: {secret}" in rotation.plan_text
        # rotated where they are checked, and the site (Django -> pgbouncer -> PostgreSQL) works
        db = env.db_host
        psycopg.connect(
            host=db.ip, user="dbuser", dbname="myproject_staging",
            password=new["database_password"], connect_timeout=5,
        ).close()  # fmt: skip
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                host=db.ip, user="dbuser", dbname="myproject_staging",
                password=old["database_password"], connect_timeout=5,
            ).close()  # fmt: skip
        assert broker_accepts(env.by_role("cache")[0], "deploy", new["broker_password"])
        page = requests.get(proxy.url, timeout=5)
        assert page.status_code == 200 and "latest order" in page.text
        # update-newrelic-keys: a new license key, rolling, then another one, fast
        for key, mode in ((keys[0], "rolling"), (keys[1], "fast")):
            _save(dict(new, newrelic_license_key=key))
            states.append(
                update_newrelic_keys(
                    environment="staging",
                    config=config,
                    dry_run=False,
                    mode=mode,
                    return_state=True,
                )
            )
        # a failure: the database no longer accepts what the servers hold -> exception + rollback
        env.db_host.exec(["sh", "-c", "printf 'wrong-pw-x' > /home/deploy/database_password"])
        _save(dict(new, database_password=old["database_password"], newrelic_license_key=keys[1]))
        states.append(
            push_server_secrets(
                environment="staging", config=config, dry_run=False, return_state=True
            )
        )
        # deploy-serial: new image, web servers replaced (their new hosts carry the secret files)
        follower = InstanceFollower(env, prefix="lf")
        future = run_in_thread(
            deploy_serial, environment="staging", config=config, dry_run=False, return_state=True
        )
        states.append(follower.run_until(future, timeout=600))
    expected = [True, True, True, True, True, True, False, True]
    assert [s.is_completed() for s in states] == expected, [s.message for s in states]
    assert "refuses dbuser with both" in states[6].message
    assert ps.samples > 50

    run_ids = [s.state_details.flow_run_id for s in states]
    stored = _everything_prefect_stored(run_ids)
    assert len(stored) > 10_000  # logs, artifacts and states were really read
    notices = _notices(config, run_ids)
    failed = [n for n in notices if n.startswith("fabflows: push-server-secrets on ")]
    # the failed rotation's notice carries its state message, failing step and journal facts
    assert any("refuses dbuser with both" in n and "Failing step:" in n for n in failed), failed
    # per run: success, approval pending and reminder, window, slow; and the failed run's ended
    assert len(notices) == 5 * len(run_ids) + 1, [n.splitlines()[0] for n in notices]
    messages = "\n\n".join(notices)
    processes = "\n".join(sorted(ps.lines))
    journal_dir = env.config_path.parent / "state" / "journal"
    journal = "\n".join(p.read_text() for p in sorted(journal_dir.rglob("*")) if p.is_file())
    assert "change-passwords" in journal  # the runs' journals were really read
    commands = "\n".join(sent.commands)
    assert len(sent.commands) > 100 and "supervisorctl restart" in commands
    assert "supervisorctl" in processes or "rabbitmqctl" in processes or "sudo" in processes
    leaks = [
        (name, where)
        for values in (old, new, {"license_2": keys[0], "license_3": keys[1]})
        for name, value in values.items()
        for form in {value, shlex.quote(value)}  # as typed, and as a shell word on a command line
        for where, text in (
            ("prefect", stored),
            ("process lists", processes),
            ("commands sent over SSH", commands),
            ("run journals", journal),
            ("notification messages", messages),
        )
        if form in text
    ]
    assert sorted(set(leaks)) == []
