"""add-server: a new worker, or a replacement cache server with every app server pointed at it."""

from __future__ import annotations

from typing import ClassVar

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig
from fabflows.errors import BadInput
from fabflows.procedures.placement import (
    choose_zone,
    configured_placement,
    launch_or_find,
    launched_by_run,
    next_name,
    terminate_launched,
)
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
from tasks.ssh.app_servers import (
    describe_cache_settings,
    describe_settings_files,
    group_states,
    repoint_cache,
    start_role_programs,
    stop_role_programs,
    wait_for_server,
    write_settings_files,
)

FLOW_NAME = "add-server"
ROLES = ("worker", "cache")
OTHER_ROLES = {
    "web": "web servers are the autoscaling group's (resize-environment)",
    "db-primary": "use promote-replica",
    "db-replica": "use add-replica",
}
RECORD_TAG = "fabflows:add-server"
"""On the launched instance from its launch on: the id of the run that launched it."""
DECOMMISSIONED = "cache-decommissioned"
"""The old cache's role tag once replaced: inventory (every runbook) no longer finds it."""
APP_ROLES = ("web", "worker")


def pending(role: str) -> str:
    """The role tag while the server is made ready: inventory leaves ``<role>-PENDING`` out."""
    return f"{role}-PENDING"


class AddServerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(pattern=r"^[a-z0-9-]{1,32}$", description="worker or cache.")
    availability_zone: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]{1,32}$",
        description="Zone (letter of avail_zones, or full name); default: the one with the "
        "fewest servers of the role.",
    )
    replace: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,128}$",
        description="cache: the failed cache server (Name or instance id); default: the only one.",
    )
    cache_ports: list[int] = Field(
        default_factory=lambda: [5672], description="cache: ports its brokers answer on."
    )
    launch_timeout_seconds: float = Field(default=600, gt=0, le=3600)


class Target(BaseModel):
    """A server the run touches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    instance_id: str
    address: str = Field(description="Where SSH reaches it.")
    private_address: str = Field(description="What settings name.")
    role: str = ""


class AddServerFacts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: LaunchSource | None = None
    source_image: str | None = None
    source_type: str | None = None
    region_zones: list[str] = Field(default_factory=list)
    configured_zones: list[str] = Field(default_factory=list)
    configured_subnets: dict[str, str] = Field(default_factory=dict)
    vpc_subnets: dict[str, list[str]] = Field(default_factory=dict)
    role_servers: dict[str, str] = Field(
        default_factory=dict, description="server of the role -> its zone"
    )
    names: list[str] = Field(default_factory=list)
    image_id: str | None = None
    instance_type: str | None = None
    caches: list[Target] = Field(default_factory=list)
    apps: list[Target] = Field(default_factory=list)
    app_cache_files: dict[str, list[str]] = Field(
        default_factory=dict, description="app server -> its settings files naming the old cache"
    )
    app_unreadable: dict[str, str] = Field(default_factory=dict)


class AddServerPlan(RunbookPlan):
    DIGEST_EXCLUDE: ClassVar[set[str]] = set()

    role: str = ""
    name: str = ""
    availability_zone: str = ""
    subnet_id: str | None = None
    image_id: str = ""
    instance_type: str = ""
    security_group_ids: list[str] = Field(default_factory=list)
    settings_from: Target | None = None
    old_cache: Target | None = None
    apps: list[Target] = Field(default_factory=list, description="cache: app servers to repoint")


def role_problem(role: str) -> str | None:
    """Why add-server does not add a ``role`` server, or None (pure)."""
    if role in ROLES:
        return None
    if role in OTHER_ROLES:
        return f"role {role!r} is not add-server's: {OTHER_ROLES[role]}"
    return f"unknown role {role!r} (add-server adds: {', '.join(ROLES)})"


def plan_add_server(
    facts: AddServerFacts, params: AddServerParams, env: EnvironmentConfig
) -> AddServerPlan:
    """Pure: where the new server goes, what it is launched from, what else changes, or why not."""
    role = params.role
    title = f"add-server {role} on {env.label}"
    problems = [p for p in [role_problem(role)] if p]
    chosen, subnet, zone_problems, spread = choose_zone(
        wanted=params.availability_zone,
        env=env,
        region_zones=facts.region_zones,
        configured_zones=facts.configured_zones,
        configured_subnets=facts.configured_subnets,
        vpc_subnets=facts.vpc_subnets,
        source=facts.source,
        servers_by_zone=facts.role_servers,
    )
    problems += zone_problems
    image = facts.image_id or facts.source_image
    itype = facts.instance_type or facts.source_type
    if not image:
        problems.append("no image: instance_settings.ami is not set and no server's is known")
    if not itype:
        problems.append(f"no instance type: instance_types.{env.environment}.{role} is not set")
    old: Target | None = None
    settings_from: Target | None = None
    if role == "worker":
        peers = sorted(facts.apps, key=lambda t: (t.role != "worker", t.name))
        settings_from = peers[0] if peers else None
        if settings_from is None:
            problems.append("no running web or worker server to copy the app's settings from")
    if role == "cache":
        if params.replace:
            found = [c for c in facts.caches if params.replace in (c.name, c.instance_id)]
            if not found:
                listed = ", ".join(c.name for c in facts.caches) or "none"
                problems.append(f"no cache server {params.replace!r} (cache servers: {listed})")
        else:
            found = list(facts.caches)
            if len(found) != 1:
                problems.append(
                    f"{len(found)} cache servers in {env.label}: name the failed one (replace)"
                )
        old = found[0] if len(found) == 1 else None
        if facts.app_unreadable:
            problems.append(
                "app settings not read (every app server must be reconfigured): "
                + "; ".join(f"{k}: {v}" for k, v in sorted(facts.app_unreadable.items()))
            )
    if problems:
        return AddServerPlan(title=title, environment=env.label, problems=problems, role=role)
    assert chosen and image and itype
    name = next_name(env, role, facts.names)
    groups = list(facts.source.security_group_ids) if facts.source else []
    why = "as asked" if params.availability_zone else f"the fewest {role} servers"
    changes = [
        Change(
            target=name,
            action=f"launch a {role} in {chosen} ({why})",
            detail=f"{itype} from {image}"
            + (f" in {subnet}" if subnet else "")
            + (f", security groups {', '.join(groups)}" if groups else "")
            + f"; role tag {pending(role)} until ready; {role} servers per zone: {spread}",
            step=f"launch-{name}",
        )
    ]
    notes: list[str] = []
    apps: list[Target] = []
    if role == "worker":
        assert settings_from is not None
        changes += [
            Change(
                target=name,
                action=f"write the app's settings as {settings_from.name} has them",
                detail="local_settings.py and the pgbouncer config (database and cache addresses)",
                step=f"settings-{name}",
            ),
            Change(
                target=name,
                action="start its programs",
                detail=", ".join(f"{g}:*" for g in _groups(env, "worker")) + " under supervisor",
                step=f"start-{name}",
            ),
        ]
        notes.append("the site stays up; no other server is touched")
    else:
        assert old is not None
        apps = sorted(facts.apps, key=lambda t: (t.role, t.name))
        for app in apps:
            files = facts.app_cache_files.get(app.name, [])
            changes.append(
                Change(
                    target=app.name,
                    action=f"point the app's settings at the new cache (was {old.private_address})",
                    detail=(", ".join(files) if files else "no settings file names the old cache")
                    + "; then "
                    + ", ".join(_app_groups(env, app.role))
                    + " restarted (HUP: gracefully)",
                    step=f"point-{app.name}",
                )
            )
        changes.append(
            Change(
                target=old.name,
                action=f"retag role {DECOMMISSIONED} (never terminated)",
                detail=f"{old.instance_id} stays for a look at its disk; inventory leaves it out",
                step=f"retire-{old.name}",
            )
        )
        notes += [
            f"messages queued on {old.name} ({old.private_address}) are lost: RabbitMQ/Redis "
            "cannot move to another address and a failed server's queues cannot be read; tasks "
            "queued there must be queued again",
            "rolling: one app server at a time (web: gunicorn reloaded gracefully; worker: "
            "celery restarted); the site stays up, background tasks wait for the new cache",
        ]
    changes.append(
        Change(
            target=name,
            action=f"tag role {role}",
            detail="inventory and the other runbooks see it from now on",
            step=f"tag-{name}",
        )
    )
    return AddServerPlan(
        title=title,
        environment=env.label,
        changes=changes,
        notes=notes,
        destructive=role == "cache",
        role=role,
        name=name,
        availability_zone=chosen,
        subnet_id=subnet,
        image_id=image,
        instance_type=itype,
        security_group_ids=groups,
        settings_from=settings_from,
        old_cache=old,
        apps=apps,
    )


def _groups(env: EnvironmentConfig, role: str) -> list[str]:
    g = env.supervisor_groups
    return [g["celery"], g["pgbouncer"]] if role == "worker" else []


def _app_groups(env: EnvironmentConfig, role: str) -> list[str]:
    g = env.supervisor_groups
    return [f"HUP:{g['web']}"] if role == "web" else [g["celery"]]


# --------------------------------------------------------------------------- gather


def _target(s: Server, env: EnvironmentConfig) -> Target:
    address = s.address(env.address_attribute)
    return Target(
        name=s.name or s.instance_id,
        instance_id=s.instance_id,
        address=address,
        private_address=s.private_ip_address or address,
        role=s.role,
    )


def distinct_names(targets: list[Target]) -> list[Target]:
    """The servers, those that share a Name tag (an autoscaling group gives all its web servers
    one) named ``<name>-<instance id>``: a step per server and the facts per server must tell
    them apart (the journal knows a step by its name)."""
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.name] = counts.get(t.name, 0) + 1
    return [
        t.model_copy(update={"name": f"{t.name}-{t.instance_id}"}) if counts[t.name] > 1 else t
        for t in targets
    ]


def gather_add_server(scope: Scope, params: AddServerParams) -> AddServerFacts:
    env, rc = scope.env, scope.rc
    role = params.role
    extra = rc.config.model_extra or {}
    servers = describe_servers(rc.creds, env.deployment, env.environment, None)
    live = [s for s in servers if s.state not in ("terminated", "shutting-down")]
    running = [s for s in live if s.state == "running"]
    like = [s for s in running if s.role == role] or [s for s in running if s.role in APP_ROLES]
    like = like or running
    source = describe_launch_source.fn(rc.creds, like[0].instance_id) if like else None
    configured_zones, configured_subnets = configured_placement(extra, env.region)
    apps = distinct_names([_target(s, env) for s in running if s.role in APP_ROLES])
    caches = distinct_names([_target(s, env) for s in live if s.role == "cache"])
    cache_files: dict[str, list[str]] = {}
    unreadable: dict[str, str] = {}
    old = [c for c in caches if params.replace in (None, c.name, c.instance_id)]
    if role == "cache" and len(old) == 1:
        for app in apps:
            try:
                cache_files[app.name] = describe_cache_settings.fn(
                    scope.pool,
                    app.name,
                    app.address,
                    env.home,
                    env.environment,
                    old[0].private_address,
                )
            except Exception as exc:  # noqa: BLE001 - an unreadable server is a plan problem
                scope.pool.discard(app.address)
                unreadable[app.name] = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
    return AddServerFacts(
        source=source,
        source_image=like[0].image_id if like else None,
        source_type=like[0].instance_type if like else None,
        region_zones=describe_availability_zones.fn(rc.creds),
        configured_zones=configured_zones,
        configured_subnets=configured_subnets,
        vpc_subnets=(
            describe_zone_subnets.fn(rc.creds, source.vpc_id) if source and source.vpc_id else {}
        ),
        role_servers={
            s.name or s.instance_id: s.availability_zone or "" for s in live if s.role == role
        },
        names=sorted({s.name for s in live if s.name}),
        image_id=rc.config.instance_settings.ami,
        instance_type=env.instance_types.get(role),
        caches=caches,
        apps=apps,
        app_cache_files=cache_files,
        app_unreadable=unreadable,
    )


# --------------------------------------------------------------------------- steps


def _launched(scope: Scope) -> list[Server]:
    return launched_by_run(scope, RECORD_TAG)


def _new_server(scope: Scope, plan: AddServerPlan) -> Target:
    found = [s for s in _launched(scope) if s.state == "running"]
    if not found:
        raise RuntimeError(f"no running instance launched by run {scope.run_id} for {plan.name}")
    return _target(found[0], scope.env)


def _launch(plan: AddServerPlan, params: AddServerParams):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        server, summary = launch_or_find(
            scope,
            plan,
            role_tag=pending(plan.role),
            record_tag=RECORD_TAG,
            timeout=params.launch_timeout_seconds,
        )
        new = _target(server, scope.env)
        waited = wait_for_server(
            scope.pool,
            new.name,
            new.address,
            groups=_groups(scope.env, plan.role),
            ports=params.cache_ports if plan.role == "cache" else [],
            timeout=params.launch_timeout_seconds,
        )
        return {
            "instance_id": server.instance_id,
            "address": new.address,
            "summary": f"{summary}; ready in {waited} s",
        }

    return apply


def _terminate(plan: AddServerPlan):  # noqa: ANN202
    def undo(scope: Scope, data: dict | None = None) -> dict[str, str]:
        return terminate_launched(scope, plan.name, RECORD_TAG, data)

    return undo


def _settings(plan: AddServerPlan):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        assert plan.settings_from is not None
        env, src = scope.env, plan.settings_from
        new = _new_server(scope, plan)
        files = describe_settings_files(
            scope.pool, src.name, src.address, env.home, env.environment
        )
        if not files:
            raise RuntimeError(f"{src.name} has no app settings files to copy")
        result = write_settings_files(
            scope.pool, new.name, new.address, files, owner=env.deploy_user, dry_run=False
        )
        return {"summary": result.summary}

    return apply


def _settings_undo(scope: Scope, data: dict | None = None) -> dict[str, str]:
    """Nothing to put back: the files are the new server's own, gone when launch's undo
    terminates it (so recover can close the run)."""
    return {"summary": "settings left to the new server (its termination removes them)"}


def _start(plan: AddServerPlan):  # noqa: ANN202
    def apply(scope: Scope) -> dict[str, str]:
        new = _new_server(scope, plan)
        groups = _groups(scope.env, plan.role)
        return {
            "summary": start_role_programs(
                scope.pool, new.name, new.address, groups, dry_run=False
            ).summary
        }

    def undo(scope: Scope, data: dict | None = None) -> dict[str, str]:
        running = [s for s in _launched(scope) if s.state == "running"]
        if not running:
            return {"summary": f"no running {plan.name}"}
        new = _target(running[0], scope.env)
        groups = _groups(scope.env, plan.role)
        return {
            "summary": stop_role_programs(
                scope.pool, new.name, new.address, groups, dry_run=False
            ).summary
        }

    return apply, undo


def _point(plan: AddServerPlan, app: Target):  # noqa: ANN202
    def run(scope: Scope, to_new: bool) -> dict[str, str]:
        assert plan.old_cache is not None
        new = _new_server(scope, plan).private_address
        old = plan.old_cache.private_address
        scope.record(old=old, new=new)
        result = repoint_cache(
            scope.pool,
            app.name,
            app.address,
            home=scope.env.home,
            environment=scope.env.environment,
            old=old if to_new else new,
            new=new if to_new else old,
            groups=_app_groups(scope.env, app.role),
            dry_run=False,
        )
        return {"summary": result.summary}

    def apply(scope: Scope) -> dict[str, str]:
        return run(scope, True)

    def undo(scope: Scope, data: dict | None = None) -> dict[str, str]:
        return run(scope, False)

    return apply, undo


def _tag_ids(scope: Scope, ids: list[str], role: str, what: str) -> dict[str, str]:
    if not ids:
        return {"summary": f"no instance of {what} to tag"}
    return {"summary": tag_instances(scope.rc.creds, ids, {"role": role}, dry_run=False).summary}


def _tag(plan: AddServerPlan, role: str):  # noqa: ANN202
    def apply(scope: Scope, data: dict | None = None) -> dict[str, str]:
        return _tag_ids(scope, [s.instance_id for s in _launched(scope)], role, plan.name)

    return apply


def _retag_old(plan: AddServerPlan, role: str):  # noqa: ANN202
    def apply(scope: Scope, data: dict | None = None) -> dict[str, str]:
        assert plan.old_cache is not None
        return _tag_ids(scope, [plan.old_cache.instance_id], role, plan.old_cache.name)

    return apply


class AddServer(Runbook[AddServerParams, AddServerFacts, AddServerPlan]):
    name = FLOW_NAME
    Params = AddServerParams
    plan_type = AddServerPlan

    def validate(self, rc, params: AddServerParams) -> None:  # noqa: ANN001
        super().validate(rc, params)
        problem = role_problem(params.role)
        if problem:
            raise BadInput(problem)

    def gather(self, scope: Scope, params: AddServerParams) -> AddServerFacts:
        return gather_add_server(scope, params)

    def plan(
        self, facts: AddServerFacts, params: AddServerParams, env: EnvironmentConfig
    ) -> AddServerPlan:
        return plan_add_server(facts, params, env)

    def steps(self, plan: AddServerPlan, params: AddServerParams) -> list[Step]:
        if not plan.changes:
            return []
        name = plan.name
        steps = [Step(f"launch-{name}", _launch(plan, params), _terminate(plan), auto_undo=False)]
        if plan.role == "worker":
            start, stop = _start(plan)
            steps += [
                Step(
                    f"settings-{name}",
                    _settings(plan),
                    _settings_undo,
                    auto_undo=False,
                ),
                Step(f"start-{name}", start, stop, auto_undo=False),
            ]
        else:
            assert plan.old_cache is not None
            for app in plan.apps:
                apply, undo = _point(plan, app)
                steps.append(Step(f"point-{app.name}", apply, undo, auto_undo=False))
            old = plan.old_cache
            steps.append(
                Step(
                    f"retire-{old.name}",
                    _retag_old(plan, DECOMMISSIONED),
                    _retag_old(plan, "cache"),
                    auto_undo=False,
                )
            )
        steps.append(
            Step(
                f"tag-{name}",
                _tag(plan, plan.role),
                _tag(plan, pending(plan.role)),
                auto_undo=False,
            )
        )
        return steps

    def verify(self, scope: Scope, plan: AddServerPlan, params: AddServerParams) -> list[str]:
        env = scope.env
        new = _new_server(scope, plan)
        listed = describe_servers.fn(scope.rc.creds, env.deployment, env.environment, [plan.role])
        ids = {s.instance_id for s in listed}
        problems = []
        if new.instance_id not in ids:
            problems.append(f"{new.name} ({new.instance_id}) is not listed as a {plan.role}")
        if plan.role == "worker":
            groups = _groups(env, "worker")
            states = group_states(scope.pool, new.name, new.address, groups)
            down = [f"{k} {v}" for k, v in states.items() if v != "RUNNING"]
            if down or not states:
                problems.append(f"{new.name}: not running: {', '.join(down) or 'no programs'}")
            return problems
        assert plan.old_cache is not None
        if plan.old_cache.instance_id in ids:
            problems.append(f"{plan.old_cache.name} is still listed as a cache")
        for app in plan.apps:
            still = describe_cache_settings.fn(
                scope.pool,
                app.name,
                app.address,
                env.home,
                env.environment,
                plan.old_cache.private_address,
            )
            if still:
                problems.append(f"{app.name}: {', '.join(still)} still name the old cache")
        return problems


RUNBOOK = AddServer()


@flow(name=FLOW_NAME, log_prints=False)
def add_server(
    environment: str,
    role: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    availability_zone: str | None = None,
    replace: str | None = None,
    cache_ports: list[int] | None = None,
    launch_timeout_seconds: float = 600,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Add a server of a persistent role other than the database's: a new `worker`, or a
    replacement `cache` server for one that failed (the troubleshooting guide's
    `fab new:<deployment>,<environment>,<role>,<AZ>` and the hand steps after it).

    **When to run:** `worker`: more background capacity, or a worker was lost. `cache`: the cache
    server (RabbitMQ, Redis) failed; neither can change address, so a new one is launched and
    every app server is reconfigured to it.

    **Preconditions:** the environment's image (`instance_settings.ami`, else a running server's)
    has the role's software (a worker: the app and its supervisor programs; a cache: its brokers,
    started at boot). The zone: `availability_zone` (a letter of `avail_zones` or a full name) or,
    by default, the environment's zone with the fewest servers of the role (ties: the first
    listed), with a subnet in a VPC. `web` (the autoscaling group's), `db-primary`/`db-replica`
    (promote-replica, add-replica), unknown roles and zones that do not exist or are not the
    environment's are refused before anything is created (exit 2). `cache`: exactly one cache
    server, or the one named by `replace`; every app server's settings readable.

    **What it does, in order:** `launch-<name>`: one instance of `instance_types[env][role]`
    (else a running server's type) with the security groups of a server of the role, tagged
    `Name`, `deployment`, `environment`, `role=<role>-PENDING` (inventory leaves it out) and
    `fabflows:add-server=<run id>`; waits until it runs, answers SSH and (worker) supervisor knows
    its programs or (cache) its broker ports answer. Worker: `settings-<name>`: the app's
    settings (`local_settings.py`, pgbouncer config; on stdin) as a running worker (else a web
    server) has them, so it names the same database and cache; `start-<name>`: its supervisor
    groups (celery, pgbouncer) restarted on those settings and RUNNING. Cache: `point-<app>` per
    app server, one at a time: every address of the old cache in its `local_settings.py`
    rewritten to the new one's, then celery restarted or gunicorn reloaded (HUP);
    `retire-<old>`: the old cache retagged `role=cache-decommissioned`, never terminated.
    `tag-<name>`: role `<role>`. Verify: inventory lists the new server under its role (and not
    the old cache); a worker's programs RUNNING; no app setting names the old cache.

    **Blast radius:** one new instance. Cache: the messages queued on the failed cache are lost
    (the plan says so; tasks queued there must be queued again); background tasks wait until
    their worker is pointed at the new cache; the site stays up (gunicorn reloads gracefully).

    **Dry run** (default): the zone and why (servers of the role per zone), image, type, subnet,
    security groups and name; for a cache, each app server's files naming the old cache and the
    loss of its queues.

    **Rolls back:** a failed or killed run is left as it is (the failing step is named);
    `fabflows recover` takes it back newest first: the new server's role tag back to pending,
    the old cache tagged `cache` again, app servers pointed back at the old address, a worker's
    programs stopped, the instance terminated (found by its `fabflows:add-server` tag even if the
    run died before recording it). `fabflows resume RUN_ID` finishes it instead.

    Args:
        environment: Environment (e.g. staging).
        role: worker or cache.
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Pass false (CLI: --apply) to launch.
        availability_zone: Zone (`e` or `us-east-1e`); default: the fewest servers of the role.
        replace: cache: the failed cache server (Name or instance id); default: the only one.
        cache_ports: cache: the ports its brokers answer on (default 5672, RabbitMQ).
        launch_timeout_seconds: How long the new instance may take to run and be ready.
        window_override_reason: Run outside the maintenance window, for this recorded reason.
    """
    args = dict(locals())
    if args["cache_ports"] is None:
        args.pop("cache_ports")
    return execute(RUNBOOK, args)
