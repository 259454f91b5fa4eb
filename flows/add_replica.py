"""add-replica: launch a new db-replica and build it as a streaming replica of the db-primary."""

from __future__ import annotations

import time
from typing import ClassVar

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.procedures.db_servers import db_server
from fabflows.procedures.placement import (
    choose_zone,
    configured_placement,
    launch_or_find,
    launched_by_run,
    next_name,
    terminate_launched,
)
from fabflows.progress import Progress
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.aws.ec2 import Server, describe_servers
from tasks.aws.ec2_writes import tag_instances
from tasks.aws.launch import (
    LaunchSource,
    describe_availability_zones,
    describe_launch_source,
    describe_zone_subnets,
)
from tasks.postgres.failover import slot_for
from tasks.postgres.rebuild import database_bytes, prepare_primary_for, rebuild_replica
from tasks.postgres.replica_setup import (
    install_replication_password,
    remove_replica_slot,
    stop_postgres,
    wait_for_db_server,
)
from tasks.postgres.replication import describe_primary_replication, describe_replica_replication
from tasks.postgres.replication_logins import current_login
from tasks.postgres.server import DbServer
from tasks.ssh.database_settings import describe_database_settings

FLOW_NAME = "add-replica"
ROLE = "db-replica"
PENDING_ROLE = "db-replica-PENDING"
"""The role tag while the server is built: FabulAWS's ``<role>-PENDING``, which inventory (and so
every other runbook) leaves out until the last step tags it ``db-replica``."""
RECORD_TAG = "fabflows:add-replica"
"""On the launched instance from its launch on: the id of the run that launched it."""
DB_ROLES = ("db-primary", "db-replica")


class AddReplicaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    availability_zone: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]{1,32}$",
        description="Zone (letter, as in avail_zones, or full name); default: the one with the "
        "fewest database servers.",
    )
    launch_timeout_seconds: float = Field(default=600, gt=0, le=3600)
    copy_timeout_seconds: float = Field(default=3600, gt=0, le=86400)
    verify_timeout_seconds: float = Field(default=120, gt=0, le=3600)


class AddReplicaFacts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    primaries: list[DbServer] = Field(default_factory=list)
    primary_image: str | None = None
    primary_type: str | None = None
    source: LaunchSource | None = None
    region_zones: list[str] = Field(default_factory=list)
    configured_zones: list[str] = Field(
        default_factory=list, description="avail_zones, as full names (empty: not configured)."
    )
    configured_subnets: dict[str, str] = Field(default_factory=dict, description="zone -> subnet")
    vpc_subnets: dict[str, list[str]] = Field(default_factory=dict, description="zone -> subnets")
    db_servers: dict[str, str] = Field(
        default_factory=dict, description="database server name -> its zone"
    )
    names: list[str] = Field(default_factory=list, description="Name tags in use.")
    image_id: str | None = Field(default=None, description="instance_settings.ami")
    instance_type: str | None = Field(default=None, description="instance_types[env][db-replica]")
    app_servers: list[str] = Field(default_factory=list)
    app_replica_files: dict[str, list[str]] = Field(
        default_factory=dict, description="app server -> its files that name a db-replica"
    )
    app_unreadable: dict[str, str] = Field(default_factory=dict)


class AddReplicaPlan(RunbookPlan):
    DIGEST_EXCLUDE: ClassVar[set[str]] = set()

    primary: DbServer | None = None
    name: str = ""
    slot: str = ""
    availability_zone: str = ""
    subnet_id: str | None = None
    image_id: str = ""
    instance_type: str = ""
    security_group_ids: list[str] = Field(default_factory=list)


def plan_add_replica(
    facts: AddReplicaFacts, params: AddReplicaParams, env: EnvironmentConfig
) -> AddReplicaPlan:
    """Pure: where the new replica goes, what it is launched from, or why not."""
    title = f"add-replica on {env.label}"
    chosen, subnet, problems, spread = choose_zone(
        wanted=params.availability_zone,
        env=env,
        region_zones=facts.region_zones,
        configured_zones=facts.configured_zones,
        configured_subnets=facts.configured_subnets,
        vpc_subnets=facts.vpc_subnets,
        source=facts.source,
        servers_by_zone=facts.db_servers,
    )
    if len(facts.primaries) != 1:
        problems.append(f"{len(facts.primaries)} running db-primary servers in {env.label}")
    image = facts.image_id or facts.primary_image
    itype = facts.instance_type or facts.primary_type
    if not image:
        problems.append("no image: instance_settings.ami is not set and the primary's is unknown")
    if not itype:
        problems.append(f"no instance type: instance_types.{env.environment}.{ROLE} is not set")
    if facts.app_replica_files:
        servers = ", ".join(sorted(facts.app_replica_files))
        problems.append(
            f"the app's settings name db-replicas ({servers}): adding one there is not "
            "automated; add the replica by hand or update the settings with a deploy"
        )
    if problems:
        return AddReplicaPlan(title=title, environment=env.label, problems=problems)
    assert chosen is not None and image and itype
    primary = facts.primaries[0]
    name = next_name(env, ROLE, facts.names)
    slot = slot_for(name)
    groups = list(facts.source.security_group_ids) if facts.source else []
    why = "as asked" if params.availability_zone else "the fewest database servers"
    changes = [
        Change(
            target=name,
            action=f"launch a {ROLE} in {chosen} ({why})",
            detail=f"{itype} from {image}"
            + (f" in {subnet}" if subnet else "")
            + (f", security groups {', '.join(groups)}" if groups else "")
            + f"; role tag {PENDING_ROLE} until built; database servers per zone: {spread}",
            step=f"launch-{name}",
        ),
        Change(
            target=name,
            action=f"build as a streaming replica of {primary.name} (pg_basebackup, slot {slot})",
            detail=f"replication password from {primary.name}'s secret file; "
            f"{primary.name} allows it (pg_hba) and keeps its WAL (slot)",
            step=f"build-{name}",
        ),
        Change(
            target=name,
            action=f"tag role {ROLE}",
            detail="inventory and the other runbooks see it from now on",
            step=f"tag-{name}",
        ),
    ]
    notes = [
        "the site stays up: the primary keeps serving; the base backup adds read load on it",
        "the app's settings name no db-replica"
        + (f" ({', '.join(facts.app_servers)})" if facts.app_servers else " (no app server)")
        + ": nothing to add there, no app server is touched",
    ]
    if facts.app_unreadable:
        notes.append(
            "app settings not read: "
            + "; ".join(f"{k}: {v}" for k, v in sorted(facts.app_unreadable.items()))
        )
    return AddReplicaPlan(
        title=title,
        environment=env.label,
        changes=changes,
        notes=notes,
        primary=primary,
        name=name,
        slot=slot,
        availability_zone=chosen,
        subnet_id=subnet,
        image_id=image,
        instance_type=itype,
        security_group_ids=groups,
    )


# --------------------------------------------------------------------------- gather


def gather_add_replica(scope: Scope) -> AddReplicaFacts:
    env, rc = scope.env, scope.rc
    extra = rc.config.model_extra or {}
    servers = describe_servers(rc.creds, env.deployment, env.environment, None)
    live = [s for s in servers if s.state not in ("terminated", "shutting-down")]
    primaries = [s for s in live if s.role == "db-primary" and s.state == "running"]
    source = describe_launch_source.fn(rc.creds, primaries[0].instance_id) if primaries else None
    configured, configured_subnets = configured_placement(extra, env.region)
    vpc_subnets = (
        describe_zone_subnets.fn(rc.creds, source.vpc_id) if source and source.vpc_id else {}
    )
    apps = [s for s in live if s.role in ("web", "worker") and s.state == "running"]
    replica_addresses = {
        a for s in live if s.role == ROLE for a in (s.private_ip_address, s.public_ip_address) if a
    }

    def read_app(s: Server) -> tuple[str, list[str] | None, str]:
        name = s.name or s.instance_id
        try:
            found = describe_database_settings.fn(
                scope.pool, name, s.address(env.address_attribute), env.home, env.environment
            )
        except Exception as exc:  # noqa: BLE001 - an unreadable server is reported in the plan
            scope.pool.discard(s.address(env.address_attribute))
            return name, None, " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        files = [f for f, hosts in found.addresses.items() if set(hosts) & replica_addresses]
        return name, files, ""

    # one after the other: a few servers, and a fresh process's first SSH logins in parallel
    # threads can race paramiko's own lazy imports
    app_reads = [read_app(s) for s in apps]
    return AddReplicaFacts(
        primaries=[db_server(s, env) for s in primaries],
        primary_image=primaries[0].image_id if primaries else None,
        primary_type=primaries[0].instance_type if primaries else None,
        source=source,
        region_zones=describe_availability_zones.fn(rc.creds),
        configured_zones=configured,
        configured_subnets=configured_subnets,
        vpc_subnets=vpc_subnets,
        db_servers={
            s.name or s.instance_id: s.availability_zone or "" for s in live if s.role in DB_ROLES
        },
        names=sorted({s.name for s in live if s.name}),
        image_id=rc.config.instance_settings.ami,
        instance_type=env.instance_types.get(ROLE),
        app_servers=sorted(name for name, _, _ in app_reads),
        app_replica_files={name: files for name, files, _ in app_reads if files},
        app_unreadable={name: err for name, files, err in app_reads if files is None},
    )


# --------------------------------------------------------------------------- steps


def _launched(scope: Scope) -> list[Server]:
    return launched_by_run(scope, RECORD_TAG)


def _new_server(scope: Scope, plan: AddReplicaPlan) -> DbServer:
    found = [s for s in _launched(scope) if s.state == "running"]
    if not found:
        raise RuntimeError(f"no running instance launched by run {scope.run_id} for {plan.name}")
    return db_server(found[0], scope.env)


def _launch(plan: AddReplicaPlan, params: AddReplicaParams):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        timeout = params.launch_timeout_seconds
        server, summary = launch_or_find(
            scope, plan, role_tag=PENDING_ROLE, record_tag=RECORD_TAG, timeout=timeout
        )
        new = db_server(server, scope.env)
        wait_for_db_server(scope.pool, new, timeout=timeout)
        return {"instance_id": server.instance_id, "address": new.address, "summary": summary}

    return apply


def _terminate(plan: AddReplicaPlan):  # noqa: ANN202
    def undo(scope: Scope, data: dict | None = None) -> dict[str, str]:
        return terminate_launched(scope, plan.name, RECORD_TAG, data)

    return undo


def _build(plan: AddReplicaPlan, params: AddReplicaParams):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        assert plan.primary is not None
        new = _new_server(scope, plan)
        scope.record(slot=plan.slot, address=new.db_address, instance_id=new.instance_id)
        pool, primary = scope.pool, plan.primary
        data_directory = wait_for_db_server(pool, new, timeout=params.launch_timeout_seconds)
        # the login replicas stream with now (rotate-credentials alternates two)
        role = current_login(pool, primary, scope.env.home)
        install_replication_password(
            pool,
            primary,
            new,
            home=scope.env.home,
            owner=scope.env.deploy_user,
            dry_run=False,
            role=role,
        )
        prepare_primary_for(pool, primary, new.db_address, plan.slot, dry_run=False, role=role)
        progress = Progress(
            f"{FLOW_NAME}-{plan.name}",
            total=database_bytes(pool, primary),
            unit="B",
            description=f"Copying {primary.name} to {plan.name}",
        )
        result = rebuild_replica(
            pool,
            new,
            primary,
            plan.slot,
            dry_run=False,
            data_directory=data_directory,
            on_progress=progress.update,
            timeout=params.copy_timeout_seconds,
            role=role,
        )
        progress.finish()
        return {
            "slot": plan.slot,
            "address": new.db_address,
            "instance_id": new.instance_id or "",
            "summary": result.summary,
        }

    return apply


def _unbuild(plan: AddReplicaPlan):  # noqa: ANN202
    def undo(scope: Scope, data: dict | None = None) -> dict[str, str]:
        assert plan.primary is not None
        data = data or {}
        done = []
        running = [s for s in _launched(scope) if s.state == "running"]
        if running:
            new = db_server(running[0], scope.env)
            try:  # a replica that is stopped cannot take its slot back while it is dropped
                done.append(stop_postgres(scope.pool, new, dry_run=False).summary)
            except Exception as exc:  # noqa: BLE001 - unreachable: the slot's sender is ended
                scope.pool.discard(new.address)
                scope.log("could not stop PostgreSQL on %s: %s", new.name, exc, level="warning")
        address = data.get("address") or (
            db_server(running[0], scope.env).db_address if running else None
        )
        role = current_login(scope.pool, plan.primary, scope.env.home)
        result = remove_replica_slot(
            scope.pool, plan.primary, plan.slot, address, dry_run=False, role=role
        )
        done.append(result.summary)
        return {"summary": "; ".join(done)}

    return undo


def _tag(plan: AddReplicaPlan, role: str):  # noqa: ANN202
    def apply(scope: Scope, data: dict | None = None) -> dict[str, str]:
        ids = [s.instance_id for s in _launched(scope)]
        if not ids:
            return {"summary": f"no instance of {plan.name} to tag"}
        result = tag_instances(scope.rc.creds, ids, {"role": role}, dry_run=False)
        return {"summary": result.summary}

    return apply


class AddReplica(Runbook[AddReplicaParams, AddReplicaFacts, AddReplicaPlan]):
    name = FLOW_NAME
    Params = AddReplicaParams
    plan_type = AddReplicaPlan

    def gather(self, scope: Scope, params: AddReplicaParams) -> AddReplicaFacts:
        return gather_add_replica(scope)

    def plan(
        self, facts: AddReplicaFacts, params: AddReplicaParams, env: EnvironmentConfig
    ) -> AddReplicaPlan:
        return plan_add_replica(facts, params, env)

    def steps(self, plan: AddReplicaPlan, params: AddReplicaParams) -> list[Step]:
        if not plan.changes:
            return []
        return [
            Step(
                f"launch-{plan.name}",
                _launch(plan, params),
                _terminate(plan),
                auto_undo=False,
            ),
            Step(f"build-{plan.name}", _build(plan, params), _unbuild(plan), auto_undo=False),
            Step(f"tag-{plan.name}", _tag(plan, ROLE), _tag(plan, PENDING_ROLE), auto_undo=False),
        ]

    def verify(self, scope: Scope, plan: AddReplicaPlan, params: AddReplicaParams) -> list[str]:
        assert plan.primary is not None
        new = _new_server(scope, plan)
        deadline = time.monotonic() + params.verify_timeout_seconds
        while True:
            lsn = describe_primary_replication.fn(scope.pool, plan.primary).current_lsn
            r = describe_replica_replication.fn(scope.pool, new, lsn)
            if r.state == "streaming" and r.lag_bytes == 0:
                break
            if time.monotonic() > deadline:
                return [
                    f"{new.name} is {r.state}, {r.lag_bytes} bytes behind {plan.primary.name} "
                    f"after {params.verify_timeout_seconds:.0f} s"
                ]
            time.sleep(0.3)
        env = scope.env
        listed = describe_servers.fn(scope.rc.creds, env.deployment, env.environment, [ROLE])
        if new.instance_id not in {s.instance_id for s in listed}:
            return [f"{new.name} ({new.instance_id}) is not listed as a {ROLE}"]
        return []


RUNBOOK = AddReplica()


@flow(name=FLOW_NAME, log_prints=False)
def add_replica(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    availability_zone: str | None = None,
    launch_timeout_seconds: float = 600,
    copy_timeout_seconds: float = 3600,
    verify_timeout_seconds: float = 120,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Launch a new db-replica and build it as a streaming replica of the db-primary (the
    troubleshooting guide's `fab new:<deployment>,<environment>,db-replica,<AZ>` followed by the
    replica's setup), while the site stays up.

    **When to run:** a replica was lost (terminated, its server failed, it was promoted), or the
    environment needs one more for reads or for a later failover.

    **Preconditions:** one running db-primary whose secret file `<home>/replication_password`
    holds the replication role's password (what provisioning or a sandbox build wrote); the
    environment's image (`instance_settings.ami`, else the primary's image) is a database
    server's (PostgreSQL installed). The zone: `availability_zone` (a letter of `avail_zones`
    or a full name) or, by default, the zone of `avail_zones` (all the region's zones when that
    is not set) with the fewest database servers (ties: the first listed) and, in a VPC, a
    subnet (`subnets`, else one of the primary's VPC in that zone). A zone that does not exist
    in the region, or is not one of the environment's, is refused before anything is created.

    **What it does, in order:** `launch-<name>`: one instance from the image, of
    `instance_types[env][db-replica]` (else the primary's type), with the primary's security
    groups, tagged `Name`, `deployment`, `environment`, `role=db-replica-PENDING` (so nothing
    else finds it yet) and `fabflows:add-replica=<run id>`; waits until it runs and answers SSH.
    `build-<name>`: the replication password copied from the primary's secret file to the new
    server's and its postgres user's `.pgpass` (on stdin only); the primary allows it
    (`pg_hba.conf`) and a base backup copies the primary into it (`pg_basebackup -R -X stream -C
    -S <slot> -c fast`, as reset-replicas does, with progress); it starts as a standby.
    `tag-<name>`: role `db-replica`. The app servers: when their settings name no db-replica
    (FabulAWS's app uses only the primary), the plan says so and none is touched; settings that
    name replicas are refused (adding one there is not automated). Verify: the new replica
    streams from the primary with zero lag, and inventory lists it as a db-replica.

    **Blast radius:** one new instance (billed from its launch); the primary sends a full copy
    (`-c fast` checkpoints at once) and keeps WAL for the new slot. The site stays up.

    **Dry run** (default): the zone chosen and why (database servers per zone), the image,
    instance type, subnet and security groups, the name and slot, and what the app servers need.

    **Rolls back:** a failed or killed run is left as it is (the failing step is named);
    `fabflows recover` takes it all back, newest first: the role tag back to pending, PostgreSQL
    stopped on the new server and its slot and `pg_hba.conf` line removed on the primary, the
    instance terminated (found by its `fabflows:add-replica` tag even if the run died before
    recording it). `fabflows resume RUN_ID` finishes it instead: the instance it launched is
    reused, a half-built replica is built again.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Pass false (CLI: --apply) to launch and build.
        availability_zone: Zone for the new replica (`e` or `us-east-1e`); default: the
            environment's zone with the fewest database servers.
        launch_timeout_seconds: How long the new instance may take to run and answer SSH.
        copy_timeout_seconds: How long the base backup may take.
        verify_timeout_seconds: How long verification waits for streaming with zero lag.
        window_override_reason: Run outside the maintenance window, for this recorded reason.
    """
    return execute(RUNBOOK, locals())
