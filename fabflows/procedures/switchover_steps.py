"""resize-environment's switchover of the primary: the steps, each journaled with its undo.

In order (names from :func:`fabflows.procedures.resize_plan.switchover_rows`):

- ``switchover-pause``: CHECKPOINT on the primary (its shutdown checkpoint then has little to
  write), wait until the replica that takes over streams and is caught up (at
  most ``CATCH_UP_BYTES`` behind: zero on a quiet site; exact zero lag is checked after the
  stop), then PAUSE the live database on every app server's pgbouncer (requests held, not
  refused; each host RESUMEs by itself after ``hold_seconds`` whatever happens). Undo: RESUME
  (the app pointed back first, if it was repointed) -- or, once the
  replica has been promoted, finish the switchover forward (:func:`finish_forward`), so neither a
  failure nor ``fabflows recover`` ever resumes the app onto a stopped primary;
- ``switchover-stop-<old>``: fast shutdown of the primary, its final LSN journaled; at the same
  time every app server's pgbouncer (and settings, wherever they name the old primary) is
  repointed at the replica, pgbouncer RELOADed while paused. Undo: start the old primary again --
  only while the replica has not been promoted (never two primaries); the pause's undo points
  the app back;
- ``switchover-promote-<new>``: once the replica has replayed past the final LSN, promote it
  (the wait and the promotion in one psql session on the replica). No undo: from here the switchover only goes forward;
- ``switchover-resume``: RESUME (the pause ends here);
- ``switchover-retag``: role tags swapped (inventory finds the new primary);
- ``switchover-rejoin-<old>``: the old primary, cleanly stopped, becomes a streaming replica of
  the new one (replication password, ``standby.signal``, ``primary_conninfo``);
- ``switchover-follow-<replica>``: other replicas stream from the new primary;
- then the old primary is resized as a db-replica, one at a time (resize-environment's step).
"""

from __future__ import annotations

import contextvars
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fabflows.procedures.resize_plan import ResizeChange, Switchover
from fabflows.procedures.server_service import journaled
from fabflows.runtime.engine import Scope, Step
from tasks.aws.ec2_writes import tag_instances
from tasks.postgres.failover import (
    allow_replication,
    describe_standby,
    follow_primary,
)
from tasks.postgres.replica_setup import install_replication_password
from tasks.postgres.replication import describe_primary_replication
from tasks.postgres.replication_logins import current_login
from tasks.postgres.server import DbServer
from tasks.postgres.switchover import (
    checkpoint,
    promote_once_replayed,
    rejoin_as_standby,
    start_postgres,
    stop_primary_cleanly,
)
from tasks.ssh.database_settings import repoint_database
from tasks.ssh.pgbouncer import pause_pgbouncer, reload_pgbouncer, resume_pgbouncer

FORWARD = (
    "a promotion cannot be undone: a failure or `fabflows recover` finishes the switchover "
    "forward (the pause step's undo repoints the app, resumes pgbouncer, rejoins the old primary)"
)
PAUSE_WAIT_SECONDS = 5.0
CATCH_UP_SECONDS = 60.0
CATCH_UP_BYTES = 1 << 20
"""Lag allowed when the pause starts (what the replica then replays while the app waits)."""
REPLAY_SECONDS = 30.0
STREAM_SECONDS = 60.0


def _wait(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:g} s")
        time.sleep(interval)


def _parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` at once, each in a thread with the run's context (its logger); results in
    order, the first failure raised once all have ended."""
    with ThreadPoolExecutor(len(calls)) as ex:
        futures = [ex.submit(contextvars.copy_context().run, c) for c in calls]
    return [f.result() for f in futures]


def _hosts(sw: Switchover) -> list:  # noqa: ANN202 - FleetHost
    return [a.host for a in sw.apps]


def caught_up(scope: Scope, sw: Switchover) -> bool:
    """The replica that takes over streams from the primary with at most ``CATCH_UP_BYTES`` left
    to replay (zero on a quiet site; a busy one may never show exactly zero between two reads).
    Zero lag itself is checked after the stop: the promotion waits until the replica has replayed
    past the primary's final record, which a stopped primary cannot move any more."""
    seen = describe_primary_replication.fn(scope.pool, sw.old)
    return any(
        s.client_addr == sw.new.db_address
        and s.lag_bytes is not None
        and 0 <= s.lag_bytes <= CATCH_UP_BYTES
        for s in seen.streaming
    )


def promoted(scope: Scope, sw: Switchover) -> bool:
    """The new primary has left recovery (from then on, the switchover only goes forward)."""
    return not describe_standby.fn(scope.pool, sw.new).in_recovery


def pause(scope: Scope, sw: Switchover) -> str:
    env = scope.env
    result = pause_pgbouncer.fn(
        _hosts(sw),
        scope.pool,
        env.home,
        env.environment,
        sw.database,
        dry_run=False,
        wait=PAUSE_WAIT_SECONDS,
        hold=sw.hold_seconds,
    )
    if not result.ok:
        resume(scope, sw)
        result.raise_for_errors()
    return result.summary()


def resume(scope: Scope, sw: Switchover) -> str:
    env = scope.env
    result = resume_pgbouncer.fn(
        _hosts(sw), scope.pool, env.home, env.environment, sw.database, dry_run=False
    )
    result.raise_for_errors()
    return result.summary()


def retag(scope: Scope, sw: Switchover) -> str:
    creds = scope.rc.creds
    tag_instances(creds, [sw.new.instance_id or ""], {"role": "db-primary"}, dry_run=False)
    tag_instances(creds, [sw.old.instance_id or ""], {"role": "db-replica"}, dry_run=False)
    return f"{sw.new.name} tagged db-primary, {sw.old.name} db-replica"


def repoint(scope: Scope, sw: Switchover, *, back: bool = False) -> str:
    """Every app server at once (the app waits under the pause meanwhile): its files name the
    new primary (promote-replica's ``repoint_database``, no program restarted), then pgbouncer
    RELOADs through its admin console (always: a run killed between the two is finished by the
    next). ``back``: the compensation, to the old primary again (only while the new one has not
    been promoted)."""
    env = scope.env
    old, new = (sw.new, sw.old) if back else (sw.old, sw.new)

    def one(app) -> str:  # noqa: ANN001
        moved = repoint_database.fn(
            scope.pool,
            app.host.name,
            app.host.address,
            home=env.home,
            environment=env.environment,
            old=old.db_address,
            new=new.db_address,
            groups=[],
            dry_run=False,
        )
        reloaded = reload_pgbouncer.fn(
            [app.host], scope.pool, env.home, env.environment, dry_run=False
        )
        reloaded.raise_for_errors()
        return (
            f"{app.host.name}: {'now names ' + new.db_address if moved.changed else moved.summary}"
        )

    if not sw.apps:
        return "no app server"
    done = _parallel(*[lambda app=app: one(app) for app in sw.apps])
    return "; ".join(done) + ", pgbouncer reloaded"


def rejoin(scope: Scope, sw: Switchover) -> str:
    env = scope.env
    pool = scope.pool
    # the login the replicas stream with now (rotate-credentials alternates two)
    role = current_login(pool, sw.new, env.home)
    allow_replication(pool, sw.new, sw.open_for, dry_run=False, role=role)
    install_replication_password(
        pool, sw.new, sw.old, home=env.home, owner=env.deploy_user, dry_run=False, role=role
    )
    done = rejoin_as_standby(pool, sw.old, sw.new, sw.old_slot, dry_run=False, role=role)

    def streaming() -> bool:
        st = describe_standby.fn(pool, sw.old)
        return st.receiver_status == "streaming" and st.sender_host == sw.new.db_address

    _wait(f"{sw.old.name} does not stream from {sw.new.name}", streaming, STREAM_SECONDS, 0.5)
    return f"{done.summary}; streaming"


def follow(scope: Scope, sw: Switchover, replica: DbServer) -> str:
    return follow_primary(scope.pool, replica, sw.new, dry_run=False).summary


def finish_forward(scope: Scope, sw: Switchover) -> str:
    """After the promotion, whatever is left, in order (each part is a no-op when done): repoint,
    RESUME, retag, rejoin the old primary, the other replicas follow. Repointing and RESUME come
    first: they end the pause; a rejoin that fails is reported (reset-replicas rebuilds it)."""
    done = [repoint(scope, sw), resume(scope, sw), retag(scope, sw)]
    problems = []
    try:
        done.append(rejoin(scope, sw))
    except Exception as exc:  # noqa: BLE001 - reported below; the app is already back
        problems.append(f"{sw.old.name} not rejoined: {exc}")
    for r in sw.followers:
        try:
            done.append(follow(scope, sw, r))
        except Exception as exc:  # noqa: BLE001 - reported below
            problems.append(f"{r.name} does not follow: {exc}")
    if problems:
        raise RuntimeError(
            "switchover finished forward (app repointed, pgbouncer resumed), but: "
            + "; ".join(problems)
            + " (rebuild them with reset-replicas)"
        )
    return "; ".join(done)


def keep_after_promotion(step: Step, sw: Switchover) -> Step:
    """The resize of the replica that takes over: undone (previous type back, a stop and start)
    only while it has not been promoted; once it is the primary it keeps its new type (undoing
    that would stop the primary)."""
    undo = step.undo
    assert undo is not None

    def guarded(scope: Scope, data: dict[str, Any]) -> None:
        if promoted(scope, sw):
            scope.log("%s is the primary now: it keeps its new type", sw.new.name, level="warning")
            return
        undo(scope, data)

    return dataclasses.replace(step, undo=guarded)


# Inside the pause (from PAUSE to RESUME) the tasks run through ``.fn``: Prefect's task-run
# bookkeeping costs a round trip to its API per call, time every held request waits.


def switchover_steps(
    sw: Switchover,
    change: ResizeChange,
    *,
    resize_as_replica: Callable[[ResizeChange], Step],
    start_probe: Callable[[Scope], None],
    stop_probe: Callable[[Scope], str],
) -> list[Step]:
    """The switchover's steps, then the old primary's resize as a replica (when its type
    changes). ``start_probe``/``stop_probe``: the site probe around the pause (resize's)."""
    old, new = sw.old, sw.new
    stop_name = f"switchover-stop-{old.name}"

    def pause_apply(scope: Scope) -> dict[str, Any]:
        # the shutdown checkpoint then writes only what changed since: the stop is shorter
        checkpoint.fn(scope.pool, old, dry_run=False)
        _wait(
            f"{new.name} is not streaming from {old.name} with zero lag",
            lambda: caught_up(scope, sw),
            CATCH_UP_SECONDS,
            0.3,
        )
        scope.record(hosts=[h.name for h in _hosts(sw)], database=sw.database)
        start_probe(scope)
        started = time.monotonic()
        summary = pause(scope, sw)
        scope.details["pause_seconds"] = round(time.monotonic() - started, 2)
        scope.details["switchover_started"] = time.monotonic()
        return {"summary": summary}

    def pause_undo(scope: Scope, data: dict[str, Any]) -> None:
        if promoted(scope, sw):
            scope.log(
                "%s was promoted: finishing the switchover forward", new.name, level="warning"
            )
            finish_forward(scope, sw)
        else:  # the app back at the old primary (no-op unless repointed already), then RESUME
            repoint(scope, sw, back=True)
            resume(scope, sw)
        stop_probe(scope)

    def stop_apply(scope: Scope) -> dict[str, Any]:
        # the stop and the repointing at once: pgbouncer holds every query until RESUME, so the
        # app reaches no server meanwhile (before the promotion, the pause's undo points it back)
        result, moved = _parallel(
            lambda: stop_primary_cleanly.fn(scope.pool, old, dry_run=False),
            lambda: repoint(scope, sw),
        )
        return {"summary": f"{result.summary}; {moved}", "final_lsn": result.final_lsn}

    def stop_undo(scope: Scope, data: dict[str, Any]) -> None:
        if promoted(scope, sw):  # never two primaries: the pause's undo finishes forward
            scope.log("%s stays stopped: %s was promoted", old.name, new.name, level="warning")
            return
        start_postgres(scope.pool, old, dry_run=False)

    def promote_apply(scope: Scope) -> dict[str, Any]:
        final = journaled(scope, stop_name).get("final_lsn") or ""
        if not final:
            raise RuntimeError(f"no final LSN journaled for {old.name}: not promoting")
        # the replay wait and the promotion in one round trip (already promoted: a no-op)
        done = promote_once_replayed.fn(
            scope.pool, new, final, dry_run=False, replay_seconds=REPLAY_SECONDS
        )
        return {"summary": done.summary, "final_lsn": final}

    def resume_apply(scope: Scope) -> dict[str, Any]:
        summary = resume(scope, sw)
        began = scope.details.pop("switchover_started", None)
        if isinstance(began, float):
            scope.details["switchover_seconds"] = round(time.monotonic() - began, 2)
        return {"summary": summary + stop_probe(scope)}

    out = [
        Step("switchover-pause", pause_apply, pause_undo, site_down=True),
        Step(stop_name, stop_apply, stop_undo, site_down=True),
        Step(
            f"switchover-promote-{new.name}",
            promote_apply,
            no_undo=FORWARD,
            site_down=True,
            auto_undo=False,
        ),
        Step("switchover-resume", resume_apply, no_undo="it ends the pause", site_down=True),
        Step(
            "switchover-retag",
            lambda scope: {"summary": retag(scope, sw)},
            no_undo=FORWARD,
            auto_undo=False,
        ),
        Step(
            f"switchover-rejoin-{old.name}",
            lambda scope: {"summary": rejoin(scope, sw)},
            no_undo=FORWARD,
            auto_undo=False,
        ),
    ]
    for r in sw.followers:
        out.append(
            Step(
                f"switchover-follow-{r.name}",
                lambda scope, r=r: {"summary": follow(scope, sw, r)},
                no_undo=FORWARD,
                auto_undo=False,
            )
        )
    if change.wanted_type != change.current_type:
        out.append(
            resize_as_replica(
                change.model_copy(update={"role": "db-replica", "strategy": "one-at-a-time"})
            )
        )
    return out
