"""reload-production-db's steps for the runbook engine: what each applies and how it is undone.

Every step is rebuilt from the plan alone (the journal keeps the plan and the parameters), so
``recover`` and ``resume`` get the same steps as the run that died. Undo reads the systems before
changing anything (the databases' markers, the upgrade-mode record, the app's stop marker), so it
is right after a partial apply and safe to run twice:

- the side database (create-side, copy, verify-copy, mask, analyze): kill the copy, drop the side
  database while it is still this run's side database;
- upgrade-mode-on: pages off and the recorded processes resumed, if this run still holds it;
- stop-app: the app started again (the app's stop marker says where);
- swap: the previous database put back, while the live one is this run's and its migrations are
  not confirmed (marker ``swapped``); once ``migrated`` the new database stays;
- pgbouncer-pause (the pause path): RESUME on every app server (a no-op where not paused). The
  pause is journaled (the hosts recorded) before it starts, so recover-environment RESUMEs a
  pgbouncer a killed run left paused; each pgbouncer also RESUMEs by itself after
  ``pause_hold_seconds``.

Migrations and the drop of previous databases change data: they are never undone automatically.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr

from config import resolve_environment
from config.models import ReloadProductionDbSettings
from fabflows import boundaries
from fabflows.errors import BadInput
from fabflows.procedures.reload_plan import FLOW_NAME, ReloadPlan
from fabflows.procedures.reload_recovery import _app_groups, _groups, apply_recovery, undo_swap
from fabflows.report import artifact_key
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Scope, Step
from fabflows.upgrade_mode import (
    enter_decision,
    gather_upgrade_status,
    load_upgrade_pages,
    server_url,
    turn_off,
    turn_on,
)
from tasks.aws.session import make_credentials
from tasks.http.probe import HttpProbe
from tasks.postgres.copy import (
    read_database_password,
    start_copy,
    stop_copy,
    wait_for_copy,
)
from tasks.postgres.databases import (
    analyze_database,
    count_rows,
    create_database,
    describe_databases,
    drop_database,
    mark_database,
    swap_databases,
)
from tasks.postgres.masking import check_masking, mask_database
from tasks.postgres.migrations import list_applied_migrations
from tasks.postgres.names import Marker, now_text, previous_name, previous_of
from tasks.postgres.server import DbServer
from tasks.ssh.app import AppStopRecord, run_migrations, start_app, stop_app
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.pgbouncer import pause_pgbouncer, resume_pgbouncer

SIDE_UNDO = "it only changes the side database, which create-side's undo drops"


def settings_of(rc: RunContext) -> ReloadProductionDbSettings:
    return rc.config.fabflows.reload_production_db


def source_context(
    rc: RunContext,
    source_environment: str | None,
    source_deployment: str | None,
    config_file: str | None = None,
) -> RunContext:
    """The source environment's context, from the run's own config (ConfigError if unknown)."""
    settings = settings_of(rc)
    env = resolve_environment(
        rc.config,
        source_environment or settings.source_environment,
        source_deployment or rc.env.deployment,
    )
    return RunContext(
        config=rc.config, env=env, creds=make_credentials(rc.config.fabflows.aws, env.region)
    )


def source_password(
    src: RunContext,
    settings: ReloadProductionDbSettings,
    pool: ConnectionPool,
    source: DbServer,
) -> SecretStr:
    """The source database's password: a Prefect Secret block, or the source server's file."""
    if settings.source_password_block:
        from prefect.blocks.system import Secret

        value = Secret.load(settings.source_password_block).get()
        return SecretStr(str(value))
    path = f"{src.env.home.rstrip('/')}/{settings.source_password_file}"
    return read_database_password(pool, source, path)


def code_root_of(rc: RunContext) -> str:
    settings = settings_of(rc)
    env = rc.env
    return settings.code_root or f"{env.home.rstrip('/')}/www/{env.environment}/code_root"


def _marker(scope: Scope, plan: ReloadPlan) -> Marker:
    return Marker(
        run=scope.run_id, live=plan.live, state="side", source=plan.source, since=now_text()
    )


def _data(scope: Scope, step: str) -> dict[str, Any]:
    """What an earlier step of this run returned: this process's result, else the journal's."""
    value = scope.results.get(step)
    if isinstance(value, dict):
        return value
    if scope.journal is not None:
        entry = scope.journal.entry(scope.run_id)
        rec = entry.step(step) if entry else None
        if rec is not None:
            return rec.data
    return {}


class ReloadSteps:
    """The steps of one reload plan (closures over the plan and the parameters)."""

    def __init__(
        self,
        plan: ReloadPlan,
        *,
        source_environment: str | None,
        source_deployment: str | None,
        config_file: str | None,
        probe: bool,
    ):
        self.plan = plan
        self.source_environment = source_environment
        self.source_deployment = source_deployment
        self.config_file = config_file
        self.probe = probe

    @property
    def app_hosts(self):  # noqa: ANN201 - list[FleetHost]
        return self.plan.web + self.plan.workers

    # ---------------------------------------------------------------- the side database

    def recover(self, scope: Scope) -> dict[str, Any]:
        p = self.plan
        scope.log("repairing a dead run's leftovers: %s", "; ".join(p.recovery.lines()))
        done = apply_recovery(
            scope.rc,
            scope.pool,
            p.target_server,
            p.live,
            p.recovery,
            self.app_hosts,
            dry_run=False,
        )
        return {"summary": "; ".join(done) or "nothing left to repair", "recovered": done}

    def start_probe(self, scope: Scope) -> None:
        """Poll what users get through the first web server every 100 ms until the run ends."""
        if not self.probe or not self.plan.web or getattr(scope, "probe", None) is not None:
            return
        url = server_url(scope.rc.config.fabflows.upgrade, self.plan.web[0])
        probe = HttpProbe(url).start()
        scope.probe = probe  # type: ignore[attr-defined]
        scope.on_close(lambda: probe.stop() if getattr(scope, "probe", None) else None)

    def create_side(self, scope: Scope) -> dict[str, Any]:
        p = self.plan
        self.start_probe(scope)
        scope.record(side=p.side)
        r = create_database(
            scope.pool,
            p.target_server,
            p.side,
            scope.env.database_user,
            _marker(scope, p),
            dry_run=False,
        )
        return {"summary": r.summary}

    def drop_side(self, scope: Scope, data: dict[str, Any]) -> None:
        """Kill the copy and drop the side database, if it is still this run's side database."""
        p = self.plan
        pool = scope.pool
        stop_copy(pool, p.target_server, p.side, dry_run=False)
        db = describe_databases(pool, p.target_server).get(p.side)
        if db is None:
            return
        marker = db.marker
        if marker is not None and marker.run != scope.run_id:
            scope.log("%s belongs to run %s: left", p.side, marker.run, level="warning")
            return
        drop_database(pool, p.target_server, p.side, dry_run=False)

    def copy(self, scope: Scope) -> dict[str, Any]:
        p = self.plan
        env = scope.env
        settings = settings_of(scope.rc)
        src = source_context(
            scope.rc, self.source_environment, self.source_deployment, self.config_file
        )
        password = source_password(src, settings, scope.pool, p.source_server)
        started = time.monotonic()
        job = start_copy(
            scope.pool,
            p.target_server,
            p.source_server,
            p.source_database,
            src.env.database_user,
            password,
            p.side,
            p.tables,
            dry_run=False,
        )
        # a boundary inside the step: the copy runs on the target, the flow only follows it
        boundaries.reached(FLOW_NAME, "copy-running", "before")
        result = wait_for_copy(
            scope.pool,
            p.target_server,
            job,
            p.source_bytes,
            timeout=settings.copy_timeout_minutes * 60,
            progress_key=artifact_key("reload-copy", env.deployment, env.environment),
            started_at=started,
        )
        scope.details["Copy"] = (
            f"{result.source_bytes / 1e6:,.1f} MB in {result.seconds:.1f} s "
            f"({result.mb_per_s:.1f} MB/s)"
        )
        scope.details["copy_seconds"] = result.seconds
        scope.details["snapshot_counts"] = dict(result.snapshot_counts)
        return {
            "summary": scope.details["Copy"],
            "seconds": result.seconds,
            "snapshot_counts": dict(result.snapshot_counts),
        }

    def stop_copy(self, scope: Scope, data: dict[str, Any]) -> None:
        self.drop_side(scope, data)

    def verify_copy(self, scope: Scope) -> dict[str, Any]:
        p = self.plan
        snapshot = _data(scope, "copy").get("snapshot_counts")
        if snapshot is None:
            raise RuntimeError("the copy's snapshot counts are not in the journal")
        counts = count_rows(scope.pool, p.target_server, p.side, p.tables)
        if counts != snapshot:
            raise RuntimeError(
                f"the copy's row counts differ from the source's snapshot: copy {counts}, "
                f"source {snapshot}"
            )
        return {"summary": f"{len(counts)} table(s) match the snapshot"}

    def mask(self, scope: Scope) -> dict[str, Any]:
        p = self.plan
        masking = settings_of(scope.rc).masking
        if masking.statements:
            mask_database(
                scope.pool,
                p.target_server,
                p.side,
                list(masking.statements),
                scope.env.database_user,
                dry_run=False,
            )
        if masking.checks:
            check_masking(scope.pool, p.target_server, p.side, list(masking.checks))
        return {
            "summary": f"{len(masking.statements)} statement(s), {len(masking.checks)} check(s)"
        }

    def analyze(self, scope: Scope) -> dict[str, Any]:
        r = analyze_database(scope.pool, self.plan.target_server, self.plan.side, dry_run=False)
        return {"summary": r.summary}

    # ---------------------------------------------------------------- the short window

    def upgrade_mode_on(self, scope: Scope) -> dict[str, Any]:
        pages = load_upgrade_pages(scope.rc.config, self.config_file)
        decision, _ = enter_decision(scope.rc, scope.pool, flow=FLOW_NAME)
        scope.record(mode=decision.mode, run=decision.record.run)
        if decision.mode == "joined":
            scope.log("%s: %s", scope.env.label, decision.reason, level="warning")
            return {"mode": "joined", "run": decision.record.run, "summary": decision.reason}
        started = time.monotonic()
        on = turn_on(scope.rc, scope.pool, pages, decision.record, dry_run=False)
        return {
            "mode": decision.mode,
            "run": decision.record.run,
            "summary": f"{len(on.web_servers)} web server(s) in upgrade mode "
            f"({time.monotonic() - started:.1f} s)",
        }

    def upgrade_mode_undo(self, scope: Scope, data: dict[str, Any]) -> None:
        """Pages off and the recorded processes resumed, when this run (still) holds upgrade mode."""
        run = data.get("run")
        if not run or data.get("mode") == "joined":
            return
        status = gather_upgrade_status(scope.rc, scope.pool)
        holder = status.holder
        if holder is not None and holder.run != run:
            scope.log("upgrade mode is held by run %s: left", holder.run, level="warning")
            return
        if holder is None and not status.in_upgrade_mode:
            return
        off = turn_off(scope.rc, scope.pool, dry_run=False)
        if off.problems:
            raise RuntimeError("upgrade mode not fully ended: " + "; ".join(off.problems))

    def stop_app(self, scope: Scope) -> dict[str, Any]:
        env = scope.env
        scope.record(hosts=[h.name for h in self.app_hosts])
        stopped = stop_app(
            self.app_hosts,
            scope.pool,
            _app_groups(env),
            env.home,
            AppStopRecord(run=scope.run_id, flow=FLOW_NAME, groups=[], since=now_text()),
            dry_run=False,
        )
        stopped.raise_for_errors()
        return {"summary": stopped.summary()}

    def start_app(self, scope: Scope, data: dict[str, Any] | None = None) -> dict[str, Any]:
        env = scope.env
        started = start_app(self.app_hosts, scope.pool, _groups(env), env.home, dry_run=False)
        started.raise_for_errors()
        return {"summary": started.summary()}

    def swap(self, scope: Scope) -> dict[str, Any]:
        p = self.plan
        previous = previous_name(p.live, datetime.now(UTC))
        scope.record(previous=previous)
        marker = _marker(scope, p)
        r = swap_databases(
            scope.pool,
            p.target_server,
            p.live,
            p.side,
            previous,
            marker.moved("swapped", previous=previous),
            marker.moved("previous"),
            dry_run=False,
        )
        return {"previous": previous, "swapped": r.swapped, "summary": r.summary}

    def pgbouncer_pause(self, scope: Scope) -> dict[str, Any]:
        """The copy's migrations checked against the plan's, then PAUSE on every app server."""
        p = self.plan
        applied = list_applied_migrations(scope.pool, p.target_server, p.side)
        if applied != p.source_migrations:
            raise RuntimeError(
                f"the migrations of {p.side} differ from those the plan decided on (the source "
                "was migrated during the copy?): nothing paused; run again, the plan will decide anew"
            )
        env = scope.env
        scope.record(hosts=[h.name for h in self.app_hosts], database=p.live)
        started = time.monotonic()
        paused = pause_pgbouncer(
            self.app_hosts,
            scope.pool,
            env.home,
            env.environment,
            p.live,
            dry_run=False,
            wait=p.pause_wait_seconds,
            hold=p.pause_hold_seconds,
        )
        if not paused.ok:
            self.pgbouncer_resume(scope)
            paused.raise_for_errors()
        seconds = time.monotonic() - started
        scope.details["pause_seconds"] = round(seconds, 2)
        return {"summary": f"{len(paused.results)} pgbouncer(s) paused in {seconds:.2f} s"}

    def pgbouncer_resume(self, scope: Scope, data: dict[str, Any] | None = None) -> dict[str, Any]:
        env = scope.env
        resumed = resume_pgbouncer(
            self.app_hosts, scope.pool, env.home, env.environment, self.plan.live, dry_run=False
        )
        resumed.raise_for_errors()
        return {"summary": resumed.summary()}

    def undo_swap(self, scope: Scope, data: dict[str, Any]) -> None:
        if undo_swap(scope.pool, self.plan.target_server, self.plan.live, scope.run_id):
            scope.log("put the previous database back as %s", self.plan.live, level="warning")

    def migrate(self, scope: Scope) -> dict[str, Any]:
        p = self.plan
        settings = settings_of(scope.rc)
        live = describe_databases(scope.pool, p.target_server).get(p.live)
        marker = live.marker if live else None
        if marker is None or marker.run != scope.run_id or marker.state != "swapped":
            raise RuntimeError(
                f"{p.live} is not this run's new database awaiting its migrations "
                f"(marker: {marker})"
            )
        migration = run_migrations(
            p.workers[0],
            scope.pool,
            list(settings.migrate_command),
            p.code_root,
            dry_run=False,
            timeout=settings.migrate_timeout_minutes * 60,
        )
        mark_database(
            scope.pool,
            p.target_server,
            p.live,
            marker.moved("migrated", previous=marker.previous),
            dry_run=False,
        )
        scope.details["migrations_seconds"] = migration.seconds
        return {
            "summary": f"{migration.seconds:.1f} s on {migration.host}",
            "previous": marker.previous,
        }

    def upgrade_mode_off(self, scope: Scope) -> dict[str, Any]:
        data = _data(scope, "upgrade-mode-on")
        if data.get("mode") == "joined":
            return {"summary": "left on: begin-upgrade holds upgrade mode until end-upgrade"}
        off = turn_off(scope.rc, scope.pool, dry_run=False)
        if off.problems:
            raise RuntimeError("upgrade mode not fully ended: " + "; ".join(off.problems))
        return {"summary": f"{len(off.web_servers)} web server(s) serving again"}

    # ---------------------------------------------------------------- after the window

    def verify(self, scope: Scope) -> dict[str, Any]:
        p = self.plan
        counts = count_rows(scope.pool, p.target_server, p.live, p.tables)
        scope.details["live_counts"] = counts
        return {"summary": f"{len(counts)} table(s) counted in {p.live}", "counts": counts}

    def cleanup(self, scope: Scope) -> dict[str, Any]:
        p = self.plan
        settings = settings_of(scope.rc)
        facts = describe_databases(scope.pool, p.target_server)
        live = facts.get(p.live)
        just_replaced = _data(scope, "swap").get("previous") or (
            live.marker.previous if live and live.marker else None
        )
        from fabflows.procedures.reload_plan import previous_to_drop

        dropped = []
        for name in previous_to_drop(
            facts.names, p.live, settings.keep_previous, just_replaced or ""
        ):
            if name in facts.names:
                drop_database(scope.pool, p.target_server, name, dry_run=False)
                dropped.append(name)
        kept = [n for n in facts.names if previous_of(n, p.live) and n not in dropped]
        mark_database(scope.pool, p.target_server, p.live, None, dry_run=False)
        scope.details["Dropped"] = ", ".join(dropped) or "none"
        scope.details["Kept"] = ", ".join(kept) or "none"
        scope.details["kept"] = kept
        return {"summary": f"dropped {', '.join(dropped) or 'nothing'}", "kept": kept}

    # ---------------------------------------------------------------- the list

    def steps(self) -> list[Step]:
        named = {
            "recover": Step(
                "recover", self.recover, no_undo="a repair puts a dead run's leftovers back"
            ),
            "create-side": Step("create-side", self.create_side, self.drop_side),
            "copy": Step("copy", self.copy, self.stop_copy),
            "verify-copy": Step("verify-copy", self.verify_copy, self.drop_side),
            "mask": Step("mask", self.mask, self.drop_side),
            "analyze": Step("analyze", self.analyze, self.drop_side),
            "upgrade-mode-on": Step(
                "upgrade-mode-on", self.upgrade_mode_on, self.upgrade_mode_undo, site_down=True
            ),
            "stop-app": Step("stop-app", self.stop_app, self.start_app, site_down=True),
            "pgbouncer-pause": Step(
                "pgbouncer-pause", self.pgbouncer_pause, self.pgbouncer_resume, site_down=True
            ),
            "swap": Step("swap", self.swap, self.undo_swap, site_down=True),
            "pgbouncer-resume": Step(
                "pgbouncer-resume",
                self.pgbouncer_resume,
                no_undo="it is pgbouncer-pause's undo",
                site_down=True,
            ),
            "migrate": Step(
                "migrate",
                self.migrate,
                no_undo="migrations change data; until they are confirmed the swap's undo puts "
                "the previous database back",
                site_down=self.plan.swap_path != "pause",
                auto_undo=False,
            ),
            "start-app": Step(
                "start-app", self.start_app, no_undo="it is stop-app's undo", site_down=True
            ),
            "upgrade-mode-off": Step(
                "upgrade-mode-off", self.upgrade_mode_off, no_undo="it ends the maintenance"
            ),
            "verify": Step("verify", self.verify, no_undo="reads only"),
            "cleanup": Step(
                "cleanup",
                self.cleanup,
                no_undo="a dropped database cannot come back (runs only after the reload succeeded)",
                auto_undo=False,
            ),
        }
        missing = [c.step for c in self.plan.changes if c.step not in named]
        if missing:
            raise BadInput(f"reload plan has unknown step(s): {', '.join(missing)}")
        return [named[c.step] for c in self.plan.changes]
