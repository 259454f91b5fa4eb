"""Secret files rolled out to the servers as journaled engine steps (push-server-secrets and
update-newrelic-keys share it).

The steps, by mode (each named, journaled, undoable until ``commit``):

- ``stage``: every new file is put beside its target as ``<path>.fabflows-next`` (records which
  paths on which servers first; undo removes them). Backups an earlier dead run left on those
  paths are dropped first, so that an undo never takes them for this run's.
- ``rolling``: ``apply-other-servers`` (workers, cache, databases at once: swap in, restart), then
  one ``apply-web-<address>`` step per web server: out of the load balancers (Standby for the
  group's instances, deregistration for others; recorded first), swap in, restart, its own check,
  back in service.
- ``fast``: ``apply-other-servers``, ``upgrade-on`` (the 503 page, processes suspended),
  ``apply-web-servers`` (all at once), ``upgrade-off``.
- ``window`` (a password changes where it is checked): ``upgrade-on``, ``change-passwords``
  (``ALTER ROLE``, ``rabbitmqctl change_password``), ``apply-all-servers``, ``upgrade-off``.
- ``check-files`` (every file holds what the block renders to) and ``commit`` (drops the kept old
  files; no undo after it).

A swap keeps each live file as ``<path>.fabflows-prev`` (or marks with ``<path>.fabflows-absent``
that there was none); its undo puts them back and restarts the programs again. Once ``commit`` has
started, an undo of a swap finishes the commit instead (the new files stay, everywhere), so a run
killed anywhere ends, after ``fabflows recover``, with exactly the old files or exactly the new
ones. The journal gets paths, addresses and load-balancer memberships: never a value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, SecretStr

from blocks.secrets import LOGIN_NAMES
from config import EnvironmentConfig
from fabflows import logfilter
from fabflows.errors import BadInput
from fabflows.procedures.secret_files import (
    AuthChange,
    Contents,
    HostPlan,
    PushServerSecretsPlan,
    desired_contents,
    gather_auth,
    plan_push_server_secrets,
    resolve_specs,
    server_label,
    staged_files,
    verify_files,
)
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Runbook, Scope, Step
from tasks.aws.ec2 import describe_servers
from tasks.ssh.fleet import FleetHost, HostResult, RateControl, hosts_from_servers, run_fleet
from tasks.ssh.programs import restart_programs
from tasks.ssh.remote import Remote
from tasks.ssh.secrets import (
    FileSpec,
    Fingerprint,
    HostFiles,
    commit_secret_files,
    describe_secret_files,
    read_files,
    restore,
    restore_secret_files,
    secret_from_file,
    secret_path,
    stage_secret_files,
    swap_in,
)

COMMIT = "commit"


@dataclass
class SecretFacts:
    """What gather read (kept in memory: ``contents`` holds values and is never journaled)."""

    block_name: str
    names: list[str]
    specs: list[FileSpec]
    hosts: list[FleetHost]
    labels: dict[str, str]
    facts: list[HostFiles]
    desired: dict[str, dict[str, str]]
    app_programs: dict[str, list[str]]
    window_for: list[str]
    auth: list[AuthChange] = field(default_factory=list)


class SecretFilesRunbook(Runbook):
    """Gather, plan and steps shared by the runbooks that write secret files to the servers."""

    kinds: ClassVar[tuple[str, ...]] = ("app", "newrelic")
    change_passwords: ClassVar[bool] = True
    mode_param: ClassVar[str] = "restart_mode"

    # ------------------------------------------------------------------ what subclasses say

    def block_values(self, rc: RunContext) -> tuple[str, list[str], dict[str, SecretStr]]:
        """(block name, secret names written as files, their values), checked: BadInput."""
        raise NotImplementedError

    def mode(self, params: BaseModel) -> str:
        return getattr(params, self.mode_param)

    # ------------------------------------------------------------------ the engine's hooks

    def window_required(self, env: EnvironmentConfig, params: BaseModel) -> bool:
        # fast takes the site down (seconds of upgrade mode around the web restarts)
        return env.protected or self.mode(params) == "fast"

    def validate(self, rc: RunContext, params: BaseModel) -> None:
        self.block_values(rc)
        resolve_specs(rc, self.kinds)

    def gather(self, scope: Scope, params: BaseModel) -> SecretFacts:
        rc = scope.rc
        env = rc.env
        block_name, names, values = self.block_values(rc)
        for name, value in values.items():
            if name not in LOGIN_NAMES:
                logfilter.register_secret(value)
        specs = resolve_specs(rc, self.kinds)
        servers = describe_servers(rc.creds, env.deployment, env.environment, states=("running",))
        hosts = hosts_from_servers(servers, env.address_attribute)
        if not hosts:
            raise BadInput(f"{env.label} has no running server")
        labels = {h.address: server_label(h) for h in hosts}
        contents = desired_contents(env, hosts, names, specs, values, labels)
        fingerprint = Fingerprint()
        desired = {a: {p: fingerprint(c) for p, (_, c) in f.items()} for a, f in contents.items()}
        facts = describe_secret_files(
            scope.pool, hosts, {a: list(f) for a, f in contents.items()}, fingerprint
        )
        settings = rc.config.fabflows.secrets
        auth = (
            gather_auth(rc, scope.pool, hosts, names, values, labels)
            if self.change_passwords
            else []
        )
        return SecretFacts(
            block_name=block_name,
            names=names,
            specs=specs,
            hosts=hosts,
            labels=labels,
            facts=facts,
            desired=desired,
            app_programs=dict(settings.app_programs),
            window_for=list(settings.window_for) if self.change_passwords else [],
            auth=auth,
        )

    def plan(
        self, facts: SecretFacts, params: BaseModel, env: EnvironmentConfig
    ) -> PushServerSecretsPlan:
        return plan_push_server_secrets(
            env,
            facts.block_name,
            facts.names,
            facts.specs,
            facts.facts,
            facts.desired,
            facts.labels,
            facts.app_programs,
            facts.window_for,
            self.mode(params),  # type: ignore[arg-type]
            facts.auth,
            hosts=facts.hosts,
            flow_name=self.name,
        )

    def steps(self, plan: PushServerSecretsPlan, params: BaseModel) -> list[Step]:
        return rollout_steps(self, plan)


# --------------------------------------------------------------------------- helpers


def _contents(scope: Scope, runbook: SecretFilesRunbook, plan: PushServerSecretsPlan) -> Contents:
    """What the files must hold, rendered again from the block (in memory only)."""
    _, names, values = runbook.block_values(scope.rc)
    missing = [n for n in plan.names if n not in values]
    if missing:
        raise BadInput(f"block {plan.block_name} no longer has {', '.join(missing)}")
    for name, value in values.items():
        if name not in LOGIN_NAMES:
            logfilter.register_secret(value)
    hosts = [hp.fleet_host for hp in plan.hosts]
    labels = {hp.address: hp.host for hp in plan.hosts}
    return desired_contents(scope.env, hosts, plan.names, plan.specs, values, labels)


def _committing(scope: Scope) -> bool:
    """Has the run's commit started? Then undoing a swap finishes the commit instead."""
    if scope.journal is None:
        return False
    entry = scope.journal.entry(scope.run_id)
    rec = entry.step(COMMIT) if entry is not None else None
    return rec is not None and rec.state in ("started", "done", "failed")


def _paths(hps: list[HostPlan]) -> dict[str, list[str]]:
    return {hp.address: [f.path for f in hp.files] for hp in hps if hp.files}


def _details(scope: Scope) -> dict[str, Any]:
    details = getattr(scope, "details", None)
    if details is None:
        details = scope.__dict__.setdefault("details", {})
    return details


@contextmanager
def _probe(scope: Scope) -> Iterator[None]:
    """Poll the site URL during a step; add what users got to the run's details."""
    from tasks.http.probe import HttpProbe

    url = scope.env.site_url
    probe = HttpProbe(url).start() if url else None
    try:
        yield
    finally:
        if probe is not None:
            summary = probe.stop()
            d = _details(scope)
            d["probe_samples"] = d.get("probe_samples", 0) + summary.samples
            d["non_200"] = d.get("non_200", 0) + summary.non_200
            d["probe_downtime_s"] = round(
                d.get("probe_downtime_s", 0.0) + summary.total_downtime_s, 2
            )
            d["Users"] = (
                f"{url}: {d['non_200']} of {d['probe_samples']} polls not 200 "
                f"({d['probe_downtime_s']:.1f} s)"
            )


def _swap_step(by_address: dict[str, HostPlan], timeout: float, undo: bool):  # noqa: ANN202
    def step(remote: Remote, host: FleetHost) -> HostResult:
        hp = by_address[host.address]
        paths = [f.path for f in hp.files]
        if paths:
            (restore if undo else swap_in)(remote, paths)
        if hp.restart:
            restarted = restart_programs(remote, hp.restart, timeout)
            return HostResult(status="changed", message=restarted.message)
        return HostResult(status="changed", message="files " + ("restored" if undo else "live"))

    return step


def _swap(scope: Scope, hps: list[HostPlan], *, undo: bool, name: str) -> None:
    """Swap in (or restore) and restart on ``hps`` at once; raise naming the failed servers."""
    timeout = scope.rc.config.fabflows.newrelic.restart_timeout_seconds
    result = run_fleet(
        [hp.fleet_host for hp in hps],
        _swap_step({hp.address: hp for hp in hps}, timeout, undo),
        pool=scope.pool,
        rate=RateControl(max_concurrency="100%", max_errors="100%" if undo else 0),
        dry_run=False,
        name=name,
        command_timeout=timeout,
    )
    result.raise_for_errors()


def _finish_commit(scope: Scope, hps: list[HostPlan]) -> dict[str, str]:
    hosts = [hp.fleet_host for hp in hps if hp.files]
    if hosts:
        commit_secret_files(scope.pool, hosts, _paths(hps), dry_run=False).raise_for_errors()
    return {"summary": "commit had started: kept the new files"}


def _undo_swap(hps: list[HostPlan], name: str) -> Callable[[Scope, dict], Any]:
    def undo(scope: Scope, data: dict) -> Any:
        if _committing(scope):
            return _finish_commit(scope, hps)
        _swap(scope, hps, undo=True, name=f"restore-{name}")
        return None

    return undo


def _apply_all(hps: list[HostPlan], name: str) -> Callable[[Scope], dict]:
    def apply(scope: Scope) -> dict:
        scope.record(servers=[hp.address for hp in hps], paths=_paths(hps))
        with _probe(scope):
            _swap(scope, hps, undo=False, name=name)
        return {
            "servers": [hp.address for hp in hps],
            "summary": f"{len(hps)} server(s): files live, programs restarted",
        }

    return apply


# --------------------------------------------------------------------------- one web server


def _lb_targets(rc: RunContext):  # noqa: ANN202 - (Targets, group name, group members)
    from tasks.aws.autoscaling import describe_auto_scaling_group
    from tasks.aws.load_balancers import Targets, resolve_target_groups

    env = rc.env
    group = (
        describe_auto_scaling_group(rc.creds, env.auto_scaling_group)
        if env.auto_scaling_group
        else None
    )
    lbs = list(env.load_balancers)
    tgs = resolve_target_groups(rc.creds, env.target_groups) if env.target_groups else []
    if group is not None:
        lbs = sorted(set(lbs) | set(group.load_balancer_names))
        tgs = sorted(set(tgs) | set(group.target_group_arns))
    members = group.instance_ids if group is not None else []
    return (
        Targets(load_balancer_names=lbs, target_group_arns=tgs),
        group.auto_scaling_group_name if group else None,
        members,
    )


def _web_cycle(scope: Scope, hp: HostPlan, data: dict | None) -> dict:
    """Out of the load balancers, swap in (``data`` None) or restore, check it, back in service.

    Applying records the server's memberships before taking it out; undoing uses them to put it
    back exactly where it was.
    """
    from tasks.aws.instance_refresh import enter_standby, exit_standby
    from tasks.aws.load_balancers import (
        deregister_instance,
        health_of,
        register_instance,
        wait_for_load_balancers,
    )
    from tasks.http.probe import check_site_up

    rc = scope.rc
    settings = rc.config.fabflows.newrelic
    upgrade = rc.config.fabflows.upgrade
    undo = data is not None
    host = hp.fleet_host
    iid = host.instance_id
    targets, group, members = _lb_targets(rc)
    in_lb = bool(iid) and not targets.empty
    in_group = bool(group and iid in members)
    if undo:
        registered = data.get("registered")
    else:
        registered = None
        if in_lb and not in_group:
            states = health_of(rc.creds, [iid], targets)
            registered = [where for (_, where), state in states.items() if state != "absent"]
        scope.record(instance_id=iid, group=group if in_group else None, registered=registered)
    timeout = settings.healthy_timeout_seconds
    if in_lb:
        if in_group:
            enter_standby(rc.creds, group, iid, dry_run=False)
        else:
            deregister_instance(rc.creds, iid, targets, dry_run=False)
        try:
            wait_for_load_balancers(rc.creds, [iid], targets, "out", timeout=timeout, poll=0.5)
        except Exception as exc:
            if not undo:
                raise
            # putting the previous files back matters more than a clean drain
            scope.log("%s: %s; restoring it anyway", host.label, exc, level="error")
        time.sleep(settings.drain_seconds)
    back_in = False
    try:
        _swap(scope, [hp], undo=undo, name="restore" if undo else "apply")
        check_site_up(
            [upgrade.web_server_url.format(address=host.address)],
            upgrade.healthcheck_path,
            timeout=timeout,
        )
        back_in = True
    finally:
        if in_lb and (back_in or undo):
            if in_group:
                exit_standby(rc.creds, group, iid, dry_run=False)
            else:
                register_instance(rc.creds, iid, targets, only=registered, dry_run=False)
            wait_for_load_balancers(rc.creds, [iid], targets, "in", timeout=timeout, poll=0.5)
        elif in_lb:
            scope.log(
                "%s stays out of the load balancers: it failed; its undo puts the previous files "
                "back and returns it",
                host.label,
                level="error",
            )
    return {"summary": f"{host.label}: " + ("restored" if undo else "files live, back in service")}


def _web_step(hp: HostPlan) -> Step:
    def apply(scope: Scope) -> dict:
        with _probe(scope):
            return _web_cycle(scope, hp, None)

    def undo(scope: Scope, data: dict) -> Any:
        if _committing(scope):
            return _finish_commit(scope, [hp])
        return _web_cycle(scope, hp, dict(data))

    return Step(f"apply-web-{hp.address}", apply, undo)


# --------------------------------------------------------------------------- upgrade mode


def _upgrade_on(runbook_name: str) -> Callable[[Scope], dict]:
    def apply(scope: Scope) -> dict:
        from fabflows.upgrade_mode import enter_decision, load_upgrade_pages, turn_on

        rc = scope.rc
        decision, _ = enter_decision(rc, scope.pool, flow=runbook_name)
        scope.record(mode=decision.mode)
        pages = load_upgrade_pages(rc.config, rc.config_path)
        with _probe(scope):
            on = turn_on(rc, scope.pool, pages, decision.record, dry_run=False)
        return {
            "mode": decision.mode,
            "summary": f"upgrade mode on ({decision.mode}) on {len(on.web_servers)} web server(s)",
        }

    return apply


def _upgrade_off(scope: Scope, data: dict) -> dict:
    from fabflows.upgrade_mode import turn_off

    if data.get("mode") == "joined":
        return {"summary": "upgrade mode belongs to begin-upgrade: left on for end-upgrade"}
    with _probe(scope):
        off = turn_off(scope.rc, scope.pool, dry_run=False)
    if off.problems:
        raise RuntimeError("upgrade mode not fully ended: " + "; ".join(off.problems))
    return {"summary": f"upgrade mode off on {len(off.web_servers)} web server(s)"}


# --------------------------------------------------------------------------- passwords


def _old_value(scope: Scope, address: str, name: str) -> SecretStr | None:
    """The value the servers held before: the kept old file if the swap is in, else the live one."""
    path = secret_path(scope.env.home, name)
    holder: dict[str, SecretStr | None] = {}

    def step(remote: Remote, host: FleetHost) -> HostResult:
        prev = path + ".fabflows-prev"
        got = read_files(remote, [prev, path])
        for candidate in (prev, path):
            _, content = got[candidate]
            if content is not None:
                holder["value"] = secret_from_file(content)
                break
        return HostResult(status="unchanged", message=f"read {name}")

    run_fleet(
        [FleetHost(name=address, address=address)],
        step,
        pool=scope.pool,
        rate=RateControl(max_concurrency=1),
        dry_run=True,
        name=f"read-previous-{name}",
    ).raise_for_errors()
    return holder.get("value")


def _passwords(runbook: SecretFilesRunbook, plan: PushServerSecretsPlan, undo: bool):  # noqa: ANN202
    """Apply (or undo) the password changes where they are checked; the values come from the
    block (new) and the servers' files (old), never from the journal. Applying records each
    secret's name before changing it; undoing changes back only those."""

    def run(scope: Scope, data: dict | None = None) -> dict:
        from fabflows.procedures.secret_files import change_broker_password
        from fabflows.upgrade_mode import ssh_options
        from tasks.postgres.roles import alter_role_password

        rc = scope.rc
        env = rc.env
        settings = rc.config.fabflows.secrets
        _, _, values = runbook.block_values(rc)
        if undo:
            touched = set((data or {}).get("changed", []))
            items = [a for a in reversed(plan.auth) if a.secret in touched]
        else:
            items = list(plan.auth)
        problems = []
        done: list[str] = []
        for a in items:
            if not undo:
                done.append(a.secret)
                scope.record(changed=list(done))
            new = values[a.secret]
            old = _old_value(scope, a.addresses[0], a.secret)
            if old is None:
                raise RuntimeError(f"{a.secret}: no file on {a.addresses[0]} to read it from")
            current, wanted = (new, old) if undo else (old, new)
            try:
                if a.secret == "database_password":
                    login = values.get("database_user")  # the login in use (rotations)
                    alter_role_password(
                        ssh_options(rc),
                        server=a.addresses[0],
                        role=login.get_secret_value() if login else env.database_user,
                        database=env.database_name,
                        port=settings.database_port,
                        current=current,
                        new=wanted,
                        dry_run=False,
                    )
                else:
                    hosts = [h.fleet_host for h in plan.hosts if h.address in a.addresses]
                    login = values.get("broker_user")  # the login in use (rotations)
                    user = (
                        login.get_secret_value()
                        if login
                        else (settings.broker_user or env.deploy_user)
                    )
                    change_broker_password(scope.pool, hosts, user, current, wanted, dry_run=False)
            except Exception as exc:
                if not undo:
                    raise
                problems.append(f"{a.secret}: {exc}")
        if problems:
            raise RuntimeError("; ".join(problems))
        verb = "changed back" if undo else "changed"
        names = [a.secret for a in items]
        return {"changed": names, "summary": f"{verb} where checked: " + ", ".join(names)}

    return run


# --------------------------------------------------------------------------- the steps


def rollout_steps(runbook: SecretFilesRunbook, plan: PushServerSecretsPlan) -> list[Step]:
    """The plan's steps (rebuilt the same from the journal: names, paths, servers only)."""
    changing = plan.changing
    if not changing and not plan.auth:
        return []
    web = [hp for hp in changing if hp.role == "web"]
    others = [hp for hp in changing if hp.role != "web"]
    staged = [hp for hp in changing if hp.files]

    def stage(scope: Scope) -> dict:
        paths = _paths(staged)
        scope.record(paths=paths)
        contents = _contents(scope, runbook, plan)
        hosts = [hp.fleet_host for hp in staged]
        # backups an earlier dead run left on these paths would be taken for this run's
        commit_secret_files(scope.pool, hosts, paths, dry_run=False).raise_for_errors()
        files = {hp.address: staged_files(scope.env, hp, contents) for hp in staged}
        stage_secret_files(scope.pool, hosts, files, dry_run=False).raise_for_errors()
        count = sum(len(p) for p in paths.values())
        return {"paths": paths, "summary": f"staged {count} file(s) on {len(hosts)} server(s)"}

    def unstage(scope: Scope, data: dict) -> Any:
        if _committing(scope):
            return _finish_commit(scope, staged)
        hosts = [hp.fleet_host for hp in staged]
        restore_secret_files(scope.pool, hosts, _paths(staged), dry_run=False).raise_for_errors()
        return None

    steps = [Step("stage", stage, unstage)]

    def upgrade_on() -> Step:
        return Step("upgrade-on", _upgrade_on(runbook.name), _upgrade_off, site_down=True)

    def upgrade_off() -> Step:
        return Step(
            "upgrade-off",
            lambda scope: _upgrade_off(scope, scope.results.get("upgrade-on") or {}),
            no_undo="it ends upgrade mode (the undo of upgrade-on does the same)",
            site_down=True,
        )

    if plan.mode == "window":
        steps.append(upgrade_on())
        if plan.auth:
            steps.append(
                Step(
                    "change-passwords",
                    _passwords(runbook, plan, undo=False),
                    _passwords(runbook, plan, undo=True),
                    site_down=True,
                )
            )
        if changing:
            steps.append(
                Step(
                    "apply-all-servers",
                    _apply_all(changing, "apply-all-servers"),
                    _undo_swap(changing, "apply-all-servers"),
                    site_down=True,
                )
            )
        steps.append(upgrade_off())
    else:
        if others:
            steps.append(
                Step(
                    "apply-other-servers",
                    _apply_all(others, "apply-other-servers"),
                    _undo_swap(others, "apply-other-servers"),
                )
            )
        if web and plan.mode == "fast":
            steps.append(upgrade_on())
            steps.append(
                Step(
                    "apply-web-servers",
                    _apply_all(web, "apply-web-servers"),
                    _undo_swap(web, "apply-web-servers"),
                    site_down=True,
                )
            )
            steps.append(upgrade_off())
        else:
            steps += [_web_step(hp) for hp in web]

    def check(scope: Scope) -> dict:
        contents = _contents(scope, runbook, plan)
        fingerprint = Fingerprint()
        hosts = [hp.fleet_host for hp in plan.hosts]
        after = describe_secret_files(
            scope.pool, hosts, {a: list(f) for a, f in contents.items()}, fingerprint
        )
        wrong = verify_files(after, contents, fingerprint, scope.env.deploy_user)
        if wrong:
            raise RuntimeError("after the rollout: " + "; ".join(wrong))
        return {"summary": f"{len(hosts)} server(s) hold the block's files"}

    def commit(scope: Scope) -> dict:
        _finish_commit(scope, staged)
        return {"summary": "kept old files dropped"}

    steps.append(Step("check-files", check, no_undo="reads only"))
    steps.append(Step(COMMIT, commit, no_undo="drops the kept old files: the new ones stay"))
    return steps
