"""rotate-credentials: new database and broker passwords with no request failing (alternating logins)."""

from __future__ import annotations

from prefect import flow

from fabflows.procedures.credential_rotation import (
    Credential,
    RotateCredentials,
    RotateCredentialsPlan,
    plan_rotate_credentials,
)
from fabflows.runtime.engine import RunbookReport, execute

FLOW_NAME = "rotate-credentials"

__all__ = ["RotateCredentialsPlan", "plan_rotate_credentials", "rotate_credentials"]

RUNBOOK = RotateCredentials()


@flow(name=FLOW_NAME, log_prints=False)
def rotate_credentials(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    credentials: list[Credential] | None = None,
    window_override_reason: str | None = None,
) -> RunbookReport:
    """Rotate the app's PostgreSQL and RabbitMQ passwords and the replicas' replication password
    with two logins each, so no request fails and replication never stops.

    push-server-secrets changes a database or broker password in place, inside a short upgrade
    window (seconds of error page): the old password stops working the moment the new one is set,
    and every server must move at once. This runbook uses **alternating logins** instead (the
    scheme managed secret rotation uses for databases): each credential has two logins, the app
    uses one, the new password goes on the other, the servers move to it one by one, and only then
    is the old password killed.

    - Database: `<database_user>` (owns the database and its objects: the group) and
      `<database_user>_alt` (created on the first rotation: a login member of the group that acts
      as it, `ALTER ROLE … SET role`, so it has the same privileges and what it creates belongs
      to the group). Passwords are set as `postgres` over SSH, as SCRAM verifiers on psql's stdin.
    - Broker: `<broker_user>` and `<broker_user>_alt` (same tags and vhost permissions), passwords
      on `rabbitmqctl`'s stdin.
    - Replication (when the environment has a db-replica): `replicator` and `replicator_alt`
      (`REPLICATION LOGIN`, allowed by the primary's `pg_hba.conf` from every replica). Each
      replica moves in its own step: its `.pgpass` gets the new login's line beside the old one,
      its `primary_conninfo` names the new login, PostgreSQL reloads (the WAL receiver reconnects
      at once), and the step waits until the primary serves it as the new login. The db servers'
      `<home>/replication_user` and `<home>/replication_password` name the login in use
      (add-replica, reset-replicas and promote-replica read them); the block holds the same pair.
    - The app's login is named on every server by `<home>/database_user` (`broker_user`) beside
      `<home>/database_password` (`broker_password`); the secrets block holds the same pair.

    **When to run:** to change the database or broker password (a schedule, a leaked secret,
    someone leaving). It needs the secrets block `<deployment>-<environment>-secrets` with the
    current passwords (pull-server-secrets makes it). The new passwords are generated here: nobody
    types or sees them.

    **Preconditions:** every server's files match the block (pull-server-secrets shows it); no
    unfinished rotation (a `*_password_pending` value in the block: run `fabflows recover`).

    **Blast radius:** the database login and broker user the app does not use (new password), the
    secret files and the files rendered from them (pgbouncer's userlist) on every server,
    pgbouncer and gunicorn reloaded gracefully (SIGHUP), the worker programs restarted, the block,
    and at the end the old login's password (a throwaway nobody keeps). No downtime: measured with
    a probe through the load balancer every 100 ms, 0 failed requests (bench/credential_rotation.py).

    **Dry run shows:** which login gets the new password where, the statement with the password
    masked, which servers switch in which step and which files they get (names and paths), the
    block's change and which login is retired. Never a value.

    **Steps** (journaled): `prepare` (the new passwords kept in the block as pending, set on the
    unused logins, checked by logging in), one `switch-replica-<address>` per replica,
    `switch-other-servers`, one `switch-web-<address>` per
    web server (out of the load balancers while it switches, like the rolling secret rollouts;
    back in once it answers its health check), `promote` (the block's pair becomes the new
    login and password), `retire` (the old login's password replaced by a throwaway), `commit`.

    **Rollback:** until `promote` starts, a failed step undoes the steps done, newest first: the
    kept old files go back and the app reloads on the old login (whose password still works), and
    the pending password is dropped (the unused login gets a throwaway). A run killed outright is
    undone the same way by `fabflows recover` (recover-environment) from its journal (names,
    addresses and paths only, never a value). Once `promote` has started every server already uses
    the new login, so recover finishes forward instead (promote, retire, commit). Either way no
    server is left on a login whose password it does not have.

    Args:
        environment: Environment (e.g. staging).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Set false to apply it.
        credentials: Which to rotate: database, broker, replication (default: all; replication
            only when a db-replica runs).
        window_override_reason: Apply outside the maintenance window, for this recorded reason.
    """
    return execute(RUNBOOK, locals())
