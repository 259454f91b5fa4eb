"""rotate-credentials on real peers (moto, a forwarding load balancer, the Django app behind nginx
and pgbouncer on web/worker test hosts, PostgreSQL on the db-primary, RabbitMQ on the cache server):
the plan as a table; two rotations in a row (to the alternate logins and back) with the site
probed through the load balancer every 100 ms: no request fails, the app works on the new login,
and the old passwords no longer work; a run SIGKILLed mid-rollout and one killed after ``promote``,
then ``fabflows recover``: the app works and every server uses a login whose password it has."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import requests

from blocks.secrets import ServerSecrets
from fabflows import logfilter
from fabflows.procedures.credential_rotation import RotateCredentials as RotateCredentialsRunbook
from fabflows.procedures.credential_rotation import RotationFacts, plan_rotate_credentials
from fabflows.testing import faults
from fabflows.testing.app_env import AppEnv, build_app_env
from fabflows.testing.elb_proxy import ElbProxy
from fabflows.testing.moto_server import MotoServer
from fabflows.testing.rabbitmq import authenticates as broker_accepts
from fabflows.testing.replication_watch import ReplicationWatch
from fabflows.testing.replication_watch import psql as _sql
from flows.recover_environment import recover_environment
from flows.rotate_credentials import rotate_credentials
from tasks.http.probe import HttpProbe
from tasks.ssh.fleet import FleetHost
from tests.flows.test_no_secret_leaks import SentCommands

BLOCK = "myproject-staging-secrets"
PGPASS = "/var/lib/postgresql/.pgpass"
HOME = "/home/deploy"
DB = "myproject_staging"


# --------------------------------------------------------------------------- the plan (pure)


def _env():
    import yaml

    from config import resolve_environment
    from config.models import FabulawsConfig
    from fabflows.testing.configs import SAMPLE

    data = yaml.safe_load(SAMPLE.read_text())
    data.update(deploy_user="deploy", home=HOME, database_user="dbuser")
    return resolve_environment(FabulawsConfig.model_validate(data), "staging")


HOSTS = [
    FleetHost(name="db", address="10.0.0.1", role="db-primary"),
    FleetHost(name="cache", address="10.0.0.2", role="cache"),
    FleetHost(name="worker", address="10.0.0.3", role="worker"),
    FleetHost(name="web-a", address="10.0.0.4", role="web"),
    FleetHost(name="web-b", address="10.0.0.5", role="web"),
]


@pytest.mark.parametrize(
    ("active", "pending", "creds", "inactive", "problem"),
    [
        ({}, [], ["database", "broker"], {"database": "dbuser_alt", "broker": "deploy_alt"}, ""),
        (
            {"database_user": "dbuser_alt", "broker_user": "deploy_alt"},
            [],
            ["database", "broker"],
            {"database": "dbuser", "broker": "deploy"},
            "",
        ),
        ({"database_user": "dbuser_alt"}, [], ["database"], {"database": "dbuser"}, ""),
        ({}, ["database_password_pending"], ["database"], {"database": "dbuser_alt"}, "recover"),
        ({"database_user": "someone"}, [], ["database"], {}, "neither"),
    ],
)
def test_plan(active, pending, creds, inactive, problem) -> None:
    facts = RotationFacts(
        block_name=BLOCK,
        hosts=HOSTS,
        active=active,
        pending=pending,
        spec_paths={"web": ["/u.txt"], "worker": ["/u.txt"]},
    )
    plan = plan_rotate_credentials(facts, creds, _env())
    assert {c.kind: c.inactive for c in plan.credentials} == inactive
    assert (problem in " ".join(plan.problems)) if problem else not plan.problems
    if inactive:
        assert [b.step for b in plan.batches] == [
            "switch-other-servers",
            "switch-web-10.0.0.4",
            "switch-web-10.0.0.5",
        ]
        web = plan.batches[1].paths["10.0.0.4"]
        assert "/u.txt" in web and f"{HOME}/database_user" in web
        assert plan.downtime_seconds is None
        assert "********" in plan.render_text()


REPLICA = FleetHost(name="replica", address="10.0.0.6", role="db-replica")


@pytest.mark.parametrize(
    ("logins", "status", "block_user", "problem"),
    [
        ({"10.0.0.6": "replicator"}, {"10.0.0.6": "streaming"}, None, ""),
        ({"10.0.0.6": "replicator_alt"}, {"10.0.0.6": "streaming"}, "replicator_alt", ""),
        ({"10.0.0.6": "replicator_alt"}, {"10.0.0.6": "streaming"}, None, "streams as"),
        ({"10.0.0.6": "replicator"}, {"10.0.0.6": "stopping"}, None, "reset-replicas"),
    ],
)
def test_plan_replication(logins, status, block_user, problem) -> None:
    from fabflows.procedures.credential_rotation import default_credentials

    hosts = [*HOSTS, REPLICA]
    facts = RotationFacts(
        block_name=BLOCK,
        hosts=hosts,
        active={"replication_user": block_user} if block_user else {},
        pending=[],
        spec_paths={"web": ["/u.txt"]},
        replica_logins=logins,
        replica_status=status,
    )
    assert default_credentials(hosts) == ["database", "broker", "replication"]
    assert default_credentials(HOSTS) == ["database", "broker"]
    plan = plan_rotate_credentials(facts, default_credentials(hosts), _env())
    if problem:
        assert problem in " ".join(plan.problems)
        assert "replication" not in [c.kind for c in plan.credentials]
        return
    assert not plan.problems
    (repl,) = [c for c in plan.credentials if c.kind == "replication"]
    expected = "replicator" if block_user else "replicator_alt"
    assert (repl.active, repl.inactive) == (block_user or "replicator", expected)
    assert repl.checked_on == ["10.0.0.1"] and repl.followers == ["10.0.0.6"]
    assert [h.address for h in plan.replicas] == ["10.0.0.6"]
    steps = [s.name for s in RotateCredentialsRunbook().steps(plan, None)]
    assert steps[:3] == ["prepare", "switch-replica-10.0.0.6", "switch-other-servers"]
    assert steps[-3:] == ["promote", "retire", "commit"]
    # the replication pair goes to the database servers only
    others = plan.batches[0].paths
    assert f"{HOME}/replication_user" in others["10.0.0.6"]
    assert f"{HOME}/replication_password" in others["10.0.0.1"]
    assert f"{HOME}/replication_password" not in others["10.0.0.3"]
    assert not [p for p in plan.batches[1].paths["10.0.0.4"] if "replication" in p]
    assert f"stream as {expected}" in plan.render_text()
    # replication alone: no web server switches
    alone = plan_rotate_credentials(facts, ["replication"], _env())
    assert [b.step for b in alone.batches] == ["switch-other-servers"]
    assert {h.role for h in alone.batches[0].hosts} == {"db-primary", "db-replica"}


# --------------------------------------------------------------------------- real peers


@pytest.fixture(scope="module")
def stack(test_network, tmp_path_factory, prefect_server):
    moto = MotoServer().start()
    proxy = ElbProxy(moto.endpoint, "myproject-staging-lb")
    env = build_app_env(
        moto.endpoint,
        test_network,
        tmp_path_factory.mktemp("rotate"),
        site_url=proxy.url,
        rabbitmq=True,
        replicas=True,
        fabflows_extra={"newrelic": {"healthy_timeout_seconds": 30, "drain_seconds": 0.5}},
        prefix="rc",
    )
    proxy.start()
    block = ServerSecrets()
    for name, value in env.secrets.items():
        block.set(name, value)
    block.save(BLOCK, overwrite=True)
    try:
        yield env, proxy
    finally:
        proxy.stop()
        env.destroy()
        moto.stop()


def _block() -> dict[str, str]:
    block = ServerSecrets.load(BLOCK)
    return {n: block.get(n).get_secret_value() for n in block.names_set()}


def _db_accepts(env: AppEnv, user: str, password: str, dbname: str = DB) -> bool:
    try:
        psycopg.connect(
            host=env.db_host.ip, user=user, dbname=dbname, password=password, connect_timeout=5
        ).close()
    except psycopg.OperationalError as exc:
        assert "password authentication failed" in str(exc), exc
        return False
    return True


def _streaming(env: AppEnv) -> dict[str, str]:
    """replica address -> the login the primary serves it as (streaming ones only)."""
    out = _sql(
        env.db_host,
        "SELECT host(client_addr), usename FROM pg_stat_replication WHERE state = 'streaming'",
    )
    return dict(ln.split("|", 1) for ln in out.splitlines() if "|" in ln)


def _replication_hba(env: AppEnv) -> list[str]:
    hba = _sql(env.db_host, "SHOW hba_file")
    lines = env.db_host.exec(["cat", hba]).stdout.splitlines()
    return sorted(ln for ln in lines if ln.startswith("host") and " replication " in ln)


def _cache(env: AppEnv):
    (cache,) = env.by_role("cache")
    return cache


def _app_writes(env: AppEnv, proxy: ElbProxy) -> None:
    r = requests.get(proxy.url + "/", timeout=10)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    for web in env.by_role("web"):  # the lab's load balancer forwards GETs only
        r = requests.post(f"http://{web.ip}/write-check", data={"text": "rotated"}, timeout=10)
        assert r.status_code == 200, (r.status_code, r.text[:300])
        assert r.text.startswith("note ")
    assert r.status_code == 200 and r.text.startswith("note "), (r.status_code, r.text[:300])


def _servers_use(env: AppEnv, user: str) -> None:
    for host in env.by_role("web") + env.by_role("worker"):
        # no file (no rotation yet, or the first one undone): the config's login
        got = host.exec(
            ["sh", "-c", f"cat {HOME}/database_user 2>/dev/null || echo dbuser"]
        ).stdout.strip()
        assert got == user, host.name


def test_rotation_no_failed_request(stack) -> None:
    env, proxy = stack
    config = str(env.config_path)
    dry = rotate_credentials(environment="staging", config=config)
    assert dry.outcome != "failed", dry.render_text()
    replicas = env.by_role("db-replica")
    assert replicas and set(_streaming(env).values()) == {"replicator"}
    for step in ("prepare", "switch-other-servers", "promote", "retire"):
        assert step in dry.plan_text
    assert f"switch-replica-{replicas[0].ip}" in dry.plan_text
    assert env.replication_password not in dry.plan_text
    assert len({ln for ln in dry.plan_text.splitlines() if "switch-web-" in ln}) == 2
    for value in env.secrets.values():
        assert value not in dry.plan_text
    before = _block()
    old_repl_pw = env.replication_password  # the provisioned one (not in the block yet)
    hba_rounds = []
    for round_, (old_user, new_user, old_broker, new_broker) in enumerate(
        [
            ("dbuser", "dbuser_alt", "deploy", "deploy_alt"),
            ("dbuser_alt", "dbuser", "deploy_alt", "deploy"),
        ]
    ):
        old_repl, new_repl = ("replicator", "replicator_alt")[:: 1 if round_ == 0 else -1]
        probe = HttpProbe(proxy.url).start()
        try:
            watch = ReplicationWatch(env.db_host, [r.ip for r in replicas])
            with watch, SentCommands() as sent:
                report = rotate_credentials(environment="staging", config=config, dry_run=False)
        finally:
            summary = probe.stop()
        # replication never broke: each replica reconnected as the new login at once
        assert watch.samples > 20 and watch.logins == {old_repl, new_repl}, watch.logins
        print(f"round {round_}: not streaming at most {watch.longest_gap} s, lag {watch.max_lag} B")
        assert watch.worst_gap < 5.0, (round_, watch.longest_gap)
        assert watch.max_lag < 16 * 1024 * 1024, watch.max_lag
        assert [s.name for s in report.steps][-3:] == ["promote", "retire", "commit"]
        assert not report.problems, report.render_text()
        assert summary.samples > 20
        assert summary.non_200 == 0, (round_, summary)
        after = _block()
        assert after["database_user"] == new_user
        assert after["broker_user"] == new_broker
        assert not [n for n in after if n.endswith("_pending")]
        new_db, new_broker_pw = after["database_password"], after["broker_password"]
        assert new_db != before["database_password"]
        # the new login works, the old password is dead (on the old login)
        assert _db_accepts(env, new_user, new_db)
        assert not _db_accepts(env, old_user, before["database_password"])
        assert broker_accepts(_cache(env), new_broker, new_broker_pw)
        assert not broker_accepts(_cache(env), old_broker, before["broker_password"])
        # the replication login: the new password works, the old one is dead, every replica
        # streams as the new login and its files name it
        assert after["replication_user"] == new_repl
        new_repl_pw = after["replication_password"]
        assert new_repl_pw != old_repl_pw
        assert _db_accepts(env, new_repl, new_repl_pw, "postgres")
        assert not _db_accepts(env, old_repl, old_repl_pw, "postgres")
        assert _streaming(env) == dict.fromkeys((r.ip for r in replicas), new_repl)
        for host in [env.db_host, *replicas]:
            files = host.exec(
                ["cat", f"{HOME}/replication_user", f"{HOME}/replication_password"]
            ).stdout
            assert files == new_repl + new_repl_pw, host.name
        for r in replicas:
            assert f"user={new_repl} " in _sql(r, "SHOW primary_conninfo")
            assert new_repl_pw.replace(":", "\\:") in r.exec(["cat", PGPASS]).stdout
            assert "fabflows" not in r.exec(["ls", "-a", "/var/lib/postgresql"]).stdout
        hba_rounds.append(_replication_hba(env))
        # no password on any command line sent to a server, nor in the report
        for value in (new_db, new_broker_pw, new_repl_pw, old_repl_pw, before["database_password"]):
            assert not [c for c in sent.commands if value in c]
            assert value not in report.render_text()
        assert len(sent.commands) > 50
        old_repl_pw = new_repl_pw
        _servers_use(env, new_user)
        _app_writes(env, proxy)
        # passwords are masked in this process's logs from now on; login names are not secrets
        line = f"login {new_user} of {old_user}, broker {new_broker}: {new_db}"
        assert logfilter.redact(line) == (
            f"login {new_user} of {old_user}, broker {new_broker}: {logfilter.MASK}"
        )
        # no kept files left behind
        for host in env.hosts.values():
            listing = host.exec(
                ["sh", "-c", f"ls -a {HOME} {HOME}/services/pgbouncer"], check=False
            ).stdout
            assert "fabflows" not in listing, host.name
        before = after
    # the second run rotated and added nothing: the same pg_hba lines, each once
    assert hba_rounds[0] == hba_rounds[1] == sorted(set(hba_rounds[1]))
    assert len(hba_rounds[1]) == 2 * len(replicas)
    # what the app created as the alternate login belongs to the group role
    owners = env.db_host.exec(
        [
            "sudo", "-u", "postgres", "psql", "-XAt", "-d", DB, "-c",
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace",
        ]
    ).stdout.split()  # fmt: skip
    assert owners == ["dbuser"]


@pytest.mark.parametrize(
    "boundary",
    ["switch-other-servers", "web1", pytest.param("retire", marks=pytest.mark.crash_matrix)],
)  # make test keeps the kill points after the replicas moved and mid-rollout; the other runs in
# make crash-matrix
def test_sigkill_then_recover(stack, tmp_path: Path, boundary: str) -> None:
    env, proxy = stack
    before = _block()
    old_user = before.get("database_user", "dbuser")
    old_repl = before.get("replication_user", "replicator")
    if boundary.startswith("web"):
        webs = sorted(h.ip for h in env.by_role("web"))
        boundary = f"switch-web-{webs[int(boundary[3:])]}"
    faults.run_until_paused(
        "rotate-credentials",
        boundary,
        ["-e", "staging", "-c", str(env.config_path), "--apply"],
        tmp_path / "paused",
        timeout=240,
        env={"FABFLOWS_PROGRESS_BAR": "0"},
    )
    report = recover_environment(environment="staging", config=str(env.config_path), dry_run=False)
    assert not report.problems, report.render_text()
    after = _block()
    assert not [n for n in after if n.endswith("_pending")]
    user, password = after.get("database_user", "dbuser"), after["database_password"]
    repl = after.get("replication_user", "replicator")
    if boundary == "retire":  # promote had run: finished forward
        assert user != old_user and repl != old_repl
        assert not _db_accepts(env, old_user, before["database_password"])
    else:  # back on the old login, whose password never changed
        assert user == old_user and password == before["database_password"]
        assert repl == old_repl
    # every replica streams as the block's replication login, with nothing left behind
    replicas = env.by_role("db-replica")
    assert _streaming(env) == dict.fromkeys((r.ip for r in replicas), repl)
    if "replication_password" in after:
        assert _db_accepts(env, repl, after["replication_password"], "postgres")
    for r in replicas:
        assert f"user={repl} " in _sql(r, "SHOW primary_conninfo")
        assert "fabflows" not in r.exec(["ls", "-a", "/var/lib/postgresql"]).stdout
    assert _db_accepts(env, user, password)
    _servers_use(env, user)
    _app_writes(env, proxy)
    for host in env.by_role("web") + env.by_role("worker"):
        status = host.exec(["supervisorctl", "status"], check=False).stdout
        assert all("RUNNING" in line for line in status.splitlines()), status
    journal = "\n".join(
        p.read_text()
        for p in sorted((Path(env.config_path).parent / "state" / "journal").rglob("*"))
        if p.is_file()
    )
    assert "switch-" in journal
    for value in (before["database_password"], password, after["broker_password"]):
        assert value not in journal
    for value in (env.replication_password, after.get("replication_password")):
        assert not value or value not in journal


def test_push_server_secrets_after_rotation(stack) -> None:
    """After rotate-credentials moved the app to ``dbuser_alt``, push-server-secrets pushes that
    login: its files and pgbouncer's userlist need no change (it used to render the userlist with
    the config's ``dbuser``, whose password is a throwaway), and a new database password goes to the login in
    use. A block holding a rotation's pending password is refused in one line."""
    from fabflows.errors import BadInput
    from flows.push_server_secrets import push_server_secrets

    env, proxy = stack
    config = str(env.config_path)
    if _block().get("database_user", "dbuser") == "dbuser":
        report = rotate_credentials(
            environment="staging", config=config, dry_run=False, credentials=["database"]
        )
        assert not report.problems, report.render_text()
    assert _block()["database_user"] == "dbuser_alt"
    dry = push_server_secrets(environment="staging", config=config)
    assert dry.outcome != "failed", dry.render_text()
    # the lab's servers never got the New Relic files: only those; the login's files and
    # pgbouncer's userlist already hold the block's login and password
    for name in ("userlist", "database_user", "database_password", "broker_"):
        assert name not in dry.plan_text, dry.plan_text
    # a new database password (set by hand in the block) changes dbuser_alt's
    block = ServerSecrets.load(BLOCK)
    block.set("database_password", "pushed pw'\"$x`Z9")
    block.save(BLOCK, overwrite=True)
    report = push_server_secrets(environment="staging", config=config, dry_run=False)
    assert not report.problems, report.render_text()
    assert "dbuser_alt" in report.plan_text
    assert _db_accepts(env, "dbuser_alt", "pushed pw'\"$x`Z9")
    assert not _db_accepts(env, "dbuser", "pushed pw'\"$x`Z9")
    _servers_use(env, "dbuser_alt")
    _app_writes(env, proxy)
    # an unfinished rotation: refused before anything is read from the servers
    block = ServerSecrets.load(BLOCK)
    block.set("database_password_pending", "left-over")
    block.save(BLOCK, overwrite=True)
    try:
        with pytest.raises(BadInput, match="database_password_pending .* `fabflows recover`"):
            push_server_secrets(environment="staging", config=config)
    finally:
        from fabflows.procedures.credential_rotation import drop_names

        block = ServerSecrets.load(BLOCK)
        drop_names(block, ["database_password_pending"])
        block.save(BLOCK, overwrite=True)


def test_reset_replicas_after_rotation(stack) -> None:
    """After the replication login was rotated, reset-replicas rebuilds a replica with the login
    in use (its base backup and WAL receiver read the rotated line of ``.pgpass``): it streams
    as that login again, and the old password still does not work."""
    from flows.reset_replicas import reset_replicas

    env, proxy = stack
    config = str(env.config_path)
    if _block().get("replication_user", "replicator") == "replicator":
        report = rotate_credentials(
            environment="staging", config=config, dry_run=False, credentials=["replication"]
        )
        assert not report.problems, report.render_text()
        assert [s.name for s in report.steps if s.name.startswith("switch-web")] == []
    block = _block()
    login, password = block["replication_user"], block["replication_password"]
    assert login == "replicator_alt"
    (replica,) = env.by_role("db-replica")
    report = reset_replicas(environment="staging", config=config, dry_run=False)
    assert not report.problems, report.render_text()
    assert "rebuilt from" in report.render_text()
    assert _streaming(env) == {replica.ip: login}
    assert f"user={login} " in _sql(replica, "SHOW primary_conninfo")
    assert _db_accepts(env, login, password, "postgres")
    assert not _db_accepts(env, "replicator", env.replication_password, "postgres")
    _app_writes(env, proxy)
