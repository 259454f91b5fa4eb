"""promote-replica: the db-primary is gone; a replica becomes the primary and the app follows."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.errors import BadInput
from fabflows.procedures.db_servers import db_server
from fabflows.procedures.promote_plan import (
    DECOMMISSIONED_ROLE,
    DECOMMISSIONED_TAG,
    AppServer,
    DbNode,
    FenceTarget,
    PromoteFacts,
    PromoteReplicaPlan,
    old_primary,
    plan_promote_replica,
)
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.upgrade_mode import load_upgrade_pages, process_tag, server_url, ssh_options
from tasks.aws.autoscaling import UpgradeModeRecord
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.ec2_writes import tag_instances
from tasks.http.probe import join_url
from tasks.http.write_check import check_app_writes
from tasks.postgres.failover import (
    StandbyState,
    allow_replication,
    describe_standby,
    fence_postgres,
    follow_primary,
    probe_from_here,
    probe_from_replica,
    promote_standby,
)
from tasks.postgres.replication_logins import current_login
from tasks.postgres.server import DbServer
from tasks.ssh.database_settings import describe_database_settings, repoint_database
from tasks.ssh.fleet import FleetHost
from tasks.ssh.upgrade_mode import disable_upgrade_pages, enable_upgrade_pages

FLOW_NAME = "promote-replica"
DB_ROLES = ("db-primary", "db-replica", DECOMMISSIONED_ROLE)


class PromoteReplicaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replica: str | None = Field(
        default=None, description="Name or instance id; default: least lag."
    )
    primary_is_lost: bool = False
    write_check_path: str = Field(default="/write-check", pattern=r"^/[A-Za-z0-9_./-]*$")
    verify_timeout_seconds: float = Field(default=60, gt=0, le=900)


def _standby(scope: Scope, server: DbServer) -> tuple[StandbyState | None, str]:
    try:
        return describe_standby.fn(scope.pool, server), ""
    except Exception as exc:  # noqa: BLE001 - an unreadable server is a fact the plan weighs
        scope.pool.discard(server.address)
        return None, " ".join(f"{type(exc).__name__}: {exc}".split())[:160]


def gather_promote(scope: Scope) -> PromoteFacts:
    env = scope.env
    servers = describe_servers(scope.rc.creds, env.deployment, env.environment, None)
    servers += describe_servers(
        scope.rc.creds, env.deployment, env.environment, [DECOMMISSIONED_ROLE]
    )
    live = [s for s in servers if s.state not in ("terminated", "shutting-down")]
    db = [s for s in live if s.role in DB_ROLES]
    opts = ssh_options(scope.rc)
    with ThreadPoolExecutor(8) as ex:
        states = list(ex.map(lambda s: _standby(scope, db_server(s, env)), db))
        nodes = [
            DbNode(server=db_server(s, env), role=s.role, tags=s.tags, standby=st, error=err)
            for s, (st, err) in zip(db, states, strict=True)
        ]
        old = old_primary(nodes)
        reach_f = []
        if old is not None:
            reach_f.append(ex.submit(probe_from_here.fn, opts, old.server))
            reach_f += [
                ex.submit(probe_from_replica.fn, scope.pool, n.server, old.server)
                for n in nodes
                if n.role == "db-replica" and n.standby is not None
            ]
        back = {
            n.name: ex.submit(probe_from_here.fn, opts, n.server)
            for n in nodes
            if n.fenced_before and (old is None or n.name != old.name)
        }
        apps = [s for s in live if s.role in ("web", "worker") and s.state == "running"]
        groups = env.supervisor_groups

        def app(s: Server) -> AppServer:
            host = FleetHost(
                name=s.name or s.instance_id,
                address=s.address(env.address_attribute),
                role=s.role,
                instance_id=s.instance_id,
            )
            found = describe_database_settings.fn(
                scope.pool, host.name, host.address, env.home, env.environment
            )
            hosts = sorted({h for hs in found.addresses.values() for h in hs})
            # pgbouncer re-reads its config on HUP (new server connections go to the new host);
            # gunicorn replaces its workers on HUP (its socket stays open, old sessions close);
            # the worker restarts
            own = "HUP:" + groups["web"] if s.role == "web" else groups["celery"]
            return AppServer(
                host=host, groups=["HUP:" + groups["pgbouncer"], own], database_hosts=hosts
            )

        app_servers = list(ex.map(app, apps))
        reach = [f.result() for f in reach_f]
        comebacks = {k: f.result() for k, f in back.items()}
    others = {}
    for s in live:
        if s.role not in DB_ROLES:
            others[s.name or s.instance_id] = s.role
            others[s.instance_id] = s.role
    return PromoteFacts(
        nodes=nodes, others=others, reach=reach, comebacks=comebacks, apps=app_servers
    )


# --------------------------------------------------------------------------- steps


def _page_on(plan: PromoteReplicaPlan):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        scope.record(hosts=[h.model_dump() for h in plan.page])
        pages = load_upgrade_pages(scope.rc.config)
        record = UpgradeModeRecord(
            run=scope.run_id, flow=FLOW_NAME, since=datetime.now(UTC), by=process_tag()
        )
        result = enable_upgrade_pages(
            plan.page, scope.pool, scope.env.nginx_root, pages, record, dry_run=False
        )
        if result.failed:
            raise RuntimeError(result.summary())
        return {"summary": result.summary()}

    return apply


def _page_off(plan: PromoteReplicaPlan):  # noqa: ANN202
    def apply(scope: Scope, data: dict | None = None) -> dict[str, str]:
        result = disable_upgrade_pages(plan.page, scope.pool, scope.env.nginx_root, dry_run=False)
        if result.failed:
            raise RuntimeError(result.summary())
        return {"summary": result.summary()}

    return apply


def _fence(plan: PromoteReplicaPlan, target: FenceTarget):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        done = []
        if target.stop_postgres:
            done.append(fence_postgres(scope.pool, target.server, dry_run=False).summary)
        if target.tag and plan.new is not None:
            record = {
                "run": scope.run_id,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "was": "db-primary",
                "promoted": plan.new.instance_id,
            }
            tags = {"role": DECOMMISSIONED_ROLE, DECOMMISSIONED_TAG: json.dumps(record)}
            tag_instances(scope.rc.creds, [target.server.instance_id or ""], tags, dry_run=False)
            done.append(f"{target.server.name} tagged {DECOMMISSIONED_ROLE}")
        return {"summary": "; ".join(done)}

    return apply


def _promote(plan: PromoteReplicaPlan):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        assert plan.new is not None
        promoted = promote_standby(scope.pool, plan.new, dry_run=False)
        # the other replicas keep the login they stream with (rotate-credentials alternates two)
        role = current_login(scope.pool, plan.new, scope.env.home)
        opened = allow_replication(scope.pool, plan.new, plan.open_for, dry_run=False, role=role)
        return {"summary": f"{promoted.summary}; {opened.summary}"}

    return apply


def _retag(plan: PromoteReplicaPlan):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        assert plan.new is not None
        iid = plan.new.instance_id or ""
        return {
            "summary": tag_instances(
                scope.rc.creds, [iid], {"role": "db-primary"}, dry_run=False
            ).summary
        }

    return apply


def _repoint(plan: PromoteReplicaPlan, app: AppServer):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        assert plan.old is not None and plan.new is not None
        result = repoint_database(
            scope.pool,
            app.host.name,
            app.host.address,
            home=scope.env.home,
            environment=scope.env.environment,
            old=plan.old.db_address,
            new=plan.new.db_address,
            groups=app.groups,
            dry_run=False,
        )
        return {"summary": result.summary}

    return apply


def _follow(plan: PromoteReplicaPlan, replica: DbServer):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        assert plan.new is not None
        return {"summary": follow_primary(scope.pool, replica, plan.new, dry_run=False).summary}

    return apply


def _finish(plan: PromoteReplicaPlan):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        assert plan.old is not None and plan.new is not None
        record = {"run": scope.run_id, "promoted": plan.new.instance_id, "done": True}
        tags = {"role": DECOMMISSIONED_ROLE, DECOMMISSIONED_TAG: json.dumps(record)}
        tag_instances(scope.rc.creds, [plan.old.instance_id or ""], tags, dry_run=False)
        return {"summary": f"failover from {plan.old.name} to {plan.new.name} done"}

    return apply


FORWARD = "forward only: finish it with `fabflows resume RUN_ID` (a promotion cannot be undone)"


class PromoteReplica(Runbook[PromoteReplicaParams, PromoteFacts, PromoteReplicaPlan]):
    name = FLOW_NAME
    Params = PromoteReplicaParams
    plan_type = PromoteReplicaPlan

    def validate(self, rc: RunContext, params: PromoteReplicaParams) -> None:
        if rc.env.protected and not params.primary_is_lost:
            raise BadInput(
                f"{FLOW_NAME}: {rc.env.label} is protected: say primary_is_lost "
                "(--primary-is-lost) to confirm the db-primary is lost"
            )

    def gather(self, scope: Scope, params: PromoteReplicaParams) -> PromoteFacts:
        return gather_promote(scope)

    def plan(
        self, facts: PromoteFacts, params: PromoteReplicaParams, env: EnvironmentConfig
    ) -> PromoteReplicaPlan:
        return plan_promote_replica(
            facts, replica=params.replica, primary_is_lost=params.primary_is_lost, env=env
        )

    def steps(self, plan: PromoteReplicaPlan, params: PromoteReplicaParams) -> list[Step]:
        down = bool(plan.page)
        out: list[Step] = []
        if plan.page:
            out.append(Step("upgrade-page-on", _page_on(plan), _page_off(plan), site_down=True))
        for t in plan.fence:
            out.append(
                Step(
                    f"fence-{t.server.name}",
                    _fence(plan, t),
                    no_undo=FORWARD,
                    site_down=down,
                    auto_undo=False,
                )
            )
        if plan.promote and plan.new is not None:
            out.append(
                Step(
                    f"promote-{plan.new.name}",
                    _promote(plan),
                    no_undo=FORWARD,
                    site_down=down,
                    auto_undo=False,
                )
            )
        if plan.retag and plan.new is not None:
            out.append(
                Step(
                    f"retag-{plan.new.name}",
                    _retag(plan),
                    no_undo=FORWARD,
                    site_down=down,
                    auto_undo=False,
                )
            )
        for a in plan.apps:
            out.append(
                Step(
                    f"repoint-{a.step_key}",
                    _repoint(plan, a),
                    no_undo=FORWARD,
                    site_down=down,
                    auto_undo=False,
                )
            )
        if plan.page:
            out.append(
                Step(
                    "upgrade-page-off",
                    _page_off(plan),
                    no_undo="it ends the upgrade page",
                    site_down=True,
                )
            )
        for r in plan.follow:
            out.append(Step(f"follow-{r.name}", _follow(plan, r), no_undo=FORWARD, auto_undo=False))
        if plan.finish:
            out.append(Step("finish-failover", _finish(plan), no_undo=FORWARD, auto_undo=False))
        return out

    def verify(
        self, scope: Scope, plan: PromoteReplicaPlan, params: PromoteReplicaParams
    ) -> list[str]:
        problems: list[str] = []
        if plan.new is None:
            return problems
        now = describe_standby.fn(scope.pool, plan.new)
        if now.in_recovery:
            problems.append(f"{plan.new.name} is still in recovery")
        deadline = time.monotonic() + params.verify_timeout_seconds
        for r in plan.follow:
            while True:
                st = describe_standby.fn(scope.pool, r)
                ok = st.receiver_status == "streaming" and st.sender_host == plan.new.db_address
                if ok or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if not ok:
                problems.append(
                    f"{r.name} does not stream from {plan.new.name} "
                    f"(receiver {st.receiver_status}, from {st.sender_host})"
                )
        if plan.promote or plan.apps:
            settings = scope.rc.config.fabflows.upgrade
            urls = [
                join_url(server_url(settings, a.host), params.write_check_path)
                for a in plan.apps
                if a.host.role == "web"
            ]
            checks = check_app_writes(urls, timeout=params.verify_timeout_seconds)
            problems += [f"the app does not write: {c.describe()}" for c in checks if not c.ok]
        return problems


RUNBOOK = PromoteReplica()


@flow(name=FLOW_NAME, log_prints=False)
def promote_replica(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    replica: str | None = None,
    primary_is_lost: bool = False,
    write_check_path: str = "/write-check",
    verify_timeout_seconds: float = 60,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Promote a replica when the db-primary is gone, and point the app and the other replicas
    at it.

    **When to run:** the db-primary's server is dead or unreachable for good (the troubleshooting
    guide's `promote_replica`). Not for a primary that answers: that is a switchover.

    **Preflight (gather):** the primary must be unreachable by SSH (a checked login) and by
    PostgreSQL (its protocol's SSLRequest) from this machine, and by SSH (TCP) and `pg_isready`
    from every replica, or the run is refused before any change. `primary_is_lost` overrides
    that, and is required in a protected environment. The replica is the one with the least lag
    (most WAL received and replayed), or `replica` (name or instance id): an unknown name, a
    server that is not a db-replica or not in recovery is refused before any change.

    **What it does, in order:** the upgrade page on the web servers (the app cannot reach a
    primary anyway); fence the old primary (if SSH and PostgreSQL answer: PostgreSQL stopped and
    `standby.signal` left so it restarts read-only; always: role tag `decommissioned` with a
    `fabflows:decommissioned` record naming the replica promoted in its place; never deleted);
    `pg_promote` the replica and let it accept the other replicas (pg_hba and a slot each); role
    tag `db-primary`; every web and worker server's pgbouncer config and app settings re-pointed
    then pgbouncer reloaded, gunicorn's workers replaced (HUP) and the worker restarted;
    upgrade page off; the other replicas follow the new
    primary; the failover marked done. Verify: the new primary takes writes, the replicas stream
    from it, and a POST to the app's write-check page (`write_check_path`) on every web server
    answers 200.

    **A primary that comes back** (its server started again) is found by the next run: a fenced
    primary that answers and takes writes is fenced again, even when there is nothing to promote.

    **Blast radius:** the site shows the upgrade page from the start until the app servers point
    at the new primary. Writes the old primary had not sent to the replica are lost (the plan
    shows how far the replica had replayed).

    **Dry run** (default): the reachability proof, the chosen replica and every change.

    **Rolls back:** no. A promoted replica cannot go back; after a crash, `fabflows recover` takes
    the upgrade page off and reports the rest, and `fabflows resume RUN_ID` (or running this
    again: it plans only what is left, from the fence record) finishes the failover.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Pass false (CLI: --apply) to fail over.
        replica: The replica to promote (name or instance id); default: the one with least lag.
        primary_is_lost: Fail over even if the primary still answers (fenced first); required
            in a protected environment.
        write_check_path: The app's page that saves a row on POST (verification).
        verify_timeout_seconds: How long verification waits for writes and streaming.
        window_override_reason: Run outside the maintenance window, for this recorded reason.
    """
    return execute(RUNBOOK, locals())
