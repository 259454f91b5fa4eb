"""reset-replicas: rebuild one or all db-replicas from the current db-primary (pg_basebackup)."""

from __future__ import annotations

import time
from typing import ClassVar

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.procedures.db_servers import db_server
from fabflows.progress import Progress
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.ec2 import describe_servers
from tasks.postgres.failover import describe_standby, slot_for
from tasks.postgres.rebuild import database_bytes, prepare_primary_for, rebuild_replica
from tasks.postgres.replication import describe_primary_replication, describe_replica_replication
from tasks.postgres.replication_logins import current_login
from tasks.postgres.server import DbServer, remote_for

FLOW_NAME = "reset-replicas"
DEFAULT_DATA_DIRECTORY = "/var/lib/postgresql/15/main"


class ResetReplicasParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: list[str] | None = Field(
        default=None, description="Names or instance ids; default: every db-replica."
    )
    verify_timeout_seconds: float = Field(default=120, gt=0, le=3600)
    copy_timeout_seconds: float = Field(default=3600, gt=0, le=86400)


class ReplicaTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server: DbServer
    slot: str
    data_directory: str
    state: str = Field(description="streaming, not streaming, not a replica, or unreadable.")


class ResetFacts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    primaries: list[DbServer] = Field(default_factory=list)
    replicas: list[ReplicaTarget] = Field(default_factory=list)
    others: dict[str, str] = Field(default_factory=dict, description="name/id -> role")


class ResetReplicasPlan(RunbookPlan):
    DIGEST_EXCLUDE: ClassVar[set[str]] = set()

    primary: DbServer | None = None
    targets: list[ReplicaTarget] = Field(default_factory=list)


def plan_reset_replicas(
    facts: ResetFacts, params: ResetReplicasParams, env: EnvironmentConfig
) -> ResetReplicasPlan:
    """Pure: which replicas are rebuilt from which primary, or why not."""
    title = f"reset-replicas on {env.label}"
    problems: list[str] = []
    if len(facts.primaries) != 1:
        problems.append(f"{len(facts.primaries)} running db-primary servers in {env.label}")
    targets = list(facts.replicas)
    if params.replicas:
        targets = []
        for wanted in params.replicas:
            found = [r for r in facts.replicas if wanted in (r.server.name, r.server.instance_id)]
            if found:
                targets += [t for t in found if t not in targets]
            elif wanted in facts.others:
                problems.append(f"{wanted} is a {facts.others[wanted]} server, not a db-replica")
            else:
                problems.append(f"unknown replica {wanted!r}: no server of {env.label} has it")
    if not targets and not problems:
        problems.append(f"no db-replica in {env.label}")
    if problems:
        return ResetReplicasPlan(title=title, environment=env.label, problems=problems)
    primary = facts.primaries[0]
    changes = [
        Change(
            target=f"{t.server.name} ({t.server.instance_id})",
            action=f"rebuild from {primary.name} (pg_basebackup, slot {t.slot})",
            detail=f"now {t.state}; data directory {t.data_directory} is replaced",
            step=f"rebuild-{t.server.name}",
        )
        for t in targets
    ]
    return ResetReplicasPlan(
        title=title,
        environment=env.label,
        changes=changes,
        destructive=True,
        notes=["the site stays up: the app uses only the primary"],
        primary=primary,
        targets=targets,
    )


def _target(scope: Scope, server: DbServer) -> ReplicaTarget:
    try:
        st = describe_standby.fn(scope.pool, server)
    except Exception:  # noqa: BLE001 - PostgreSQL down on a broken replica: read what we can
        st = None
    slot = st.slot_name if st and st.slot_name else slot_for(server.name)
    try:
        out = remote_for(scope.pool, server).read(
            ["sh", "-c", "ls -d /var/lib/postgresql/*/main | tail -n 1"], sudo=True
        )
        data_directory = out.stdout.strip() or DEFAULT_DATA_DIRECTORY
    except Exception:  # noqa: BLE001 - unreachable: the step will say so
        data_directory = DEFAULT_DATA_DIRECTORY
    if st is None:
        state = "unreadable"
    elif not st.in_recovery:
        state = "not a replica"
    else:
        state = "streaming" if st.receiver_status == "streaming" else "not streaming"
    return ReplicaTarget(server=server, slot=slot, data_directory=data_directory, state=state)


def _rebuild(plan: ResetReplicasPlan, target: ReplicaTarget, params: ResetReplicasParams):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        assert plan.primary is not None
        # the login replicas stream with now (rotate-credentials alternates two): its line is
        # in the replica's .pgpass
        role = current_login(scope.pool, plan.primary, scope.env.home)
        prepare_primary_for(
            scope.pool,
            plan.primary,
            target.server.db_address,
            target.slot,
            dry_run=False,
            role=role,
        )
        total = database_bytes(scope.pool, plan.primary)
        progress = Progress(
            f"{FLOW_NAME}-{target.server.name}",
            total=total,
            unit="B",
            description=f"Rebuilding {target.server.name} from {plan.primary.name}",
        )
        result = rebuild_replica(
            scope.pool,
            target.server,
            plan.primary,
            target.slot,
            dry_run=False,
            data_directory=target.data_directory,
            on_progress=progress.update,
            timeout=params.copy_timeout_seconds,
            role=role,
        )
        progress.finish()
        return {"summary": result.summary}

    return apply


class ResetReplicas(Runbook[ResetReplicasParams, ResetFacts, ResetReplicasPlan]):
    name = FLOW_NAME
    Params = ResetReplicasParams
    plan_type = ResetReplicasPlan

    def gather(self, scope: Scope, params: ResetReplicasParams) -> ResetFacts:
        env = scope.env
        servers = [
            s
            for s in describe_servers(scope.rc.creds, env.deployment, env.environment, None)
            if s.state == "running"
        ]
        primaries = [db_server(s, env) for s in servers if s.role == "db-primary"]
        replicas = [_target(scope, db_server(s, env)) for s in servers if s.role == "db-replica"]
        others = {}
        for s in servers:
            if s.role != "db-replica":
                others[s.name or s.instance_id] = s.role
                others[s.instance_id] = s.role
        return ResetFacts(primaries=primaries, replicas=replicas, others=others)

    def plan(
        self, facts: ResetFacts, params: ResetReplicasParams, env: EnvironmentConfig
    ) -> ResetReplicasPlan:
        return plan_reset_replicas(facts, params, env)

    def steps(self, plan: ResetReplicasPlan, params: ResetReplicasParams) -> list[Step]:
        return [
            Step(
                f"rebuild-{t.server.name}",
                _rebuild(plan, t, params),
                no_undo="the replica's old data directory is gone once the copy starts; "
                "`fabflows resume RUN_ID` rebuilds it again",
                auto_undo=False,
            )
            for t in plan.targets
        ]

    def verify(
        self, scope: Scope, plan: ResetReplicasPlan, params: ResetReplicasParams
    ) -> list[str]:
        assert plan.primary is not None
        problems = []
        deadline = time.monotonic() + params.verify_timeout_seconds
        for t in plan.targets:
            while True:
                lsn = describe_primary_replication.fn(scope.pool, plan.primary).current_lsn
                r = describe_replica_replication.fn(scope.pool, t.server, lsn)
                if r.state == "streaming" and r.lag_bytes == 0:
                    break
                if time.monotonic() > deadline:
                    problems.append(
                        f"{t.server.name} is {r.state}, {r.lag_bytes} bytes behind "
                        f"{plan.primary.name} after {params.verify_timeout_seconds:.0f} s"
                    )
                    break
                time.sleep(0.3)
        return problems


RUNBOOK = ResetReplicas()


@flow(name=FLOW_NAME, log_prints=False)
def reset_replicas(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    replicas: list[str] | None = None,
    verify_timeout_seconds: float = 120,
    copy_timeout_seconds: float = 3600,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Rebuild db-replicas from the current db-primary (the troubleshooting guide's
    `reset_slaves`), while the site stays up.

    **When to run:** a replica stopped streaming and cannot catch up (the WAL it needs was
    removed, its data is damaged), or after a failover to turn the old primary into a replica
    again (tag it db-replica first).

    **What it does:** per replica, one step: on the primary, a `pg_hba.conf` replication line
    for it; on the replica, PostgreSQL stopped, the data directory emptied, its slot dropped on
    the primary (inactive once the replica is stopped), `pg_basebackup -R -X stream -C -S <slot> -c fast` from the primary (run
    detached on the replica, its progress shown as bytes copied against the primary's size, with
    the time left), PostgreSQL started as a standby. Verify: each rebuilt replica streams from
    the primary with zero lag (bytes behind the primary's current LSN).

    **Blast radius:** the replicas being rebuilt serve nothing meanwhile (reports or read-only
    queries pointed at them fail); the primary sends a full copy (`-c fast` checkpoints at once).
    The site stays up: the app uses only the primary.

    **Dry run** (default): the primary, each replica to rebuild, its state, slot and data
    directory.

    **Rolls back:** no: the old data directory is gone once the copy starts. A failed or killed
    run leaves that replica stopped or half copied (reported); `fabflows resume RUN_ID` rebuilds
    it again, skipping the replicas already done.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Pass false (CLI: --apply) to rebuild.
        replicas: Replicas to rebuild (names or instance ids); default: every db-replica.
        verify_timeout_seconds: How long verification waits for streaming with zero lag.
        copy_timeout_seconds: How long one base backup may take.
        window_override_reason: Run outside the maintenance window, for this recorded reason.
    """
    return execute(RUNBOOK, locals())
