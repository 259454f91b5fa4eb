"""Sysadmin accounts on servers: validated input, host facts, a pure plan, and fleet steps.

The input is a users directory like FabulAWS's ``deployment/users/``: one public-key file per user
(file name = user name, one or more keys), plus an optional ``<user>.gecos`` with the full name.
:func:`load_users_dir` validates all of it before any host is touched and reports every problem at
once (:class:`fabflows.errors.BadInput`).

On a host, fabflows records the accounts it manages in ``/etc/fabflows/sysadmin-users`` (one name a
line). Only those are ever locked or removed; accounts fabflows did not create or adopt are never
touched. The marker is written *before* an account is created, so a run that dies half-way leaves
nothing fabflows would not recognise next time.

Per host, :func:`plan_host_users` turns :class:`HostFacts` (read by :data:`FACTS_SCRIPT`) and the
wanted :class:`SysadminUsersSpec` into an ordered list of :class:`Change` s, each with the exact
command it runs. The plan is pure and table-tested; the fleet steps read facts, plan, and run the
commands (or, in a dry run, only record them).
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl, run_fleet
from tasks.ssh.remote import Remote, sh_argv
from tasks.ssh.users_input import (  # noqa: F401 - the module's public names, as before
    IGNORED_FILES,
    KEY_TYPES,
    MAX_GECOS,
    NAME_RE,
    NAME_RULE,
    RESERVED_NAMES,
    PublicKey,
    SysadminUser,
    check_gecos,
    check_user_name,
    load_users_dir,
    parse_public_key,
    public_key_of,
)
from tasks.ssh.users_plan import (  # noqa: F401 - the module's public names, as before
    END_SESSIONS_SCRIPT,
    MARKER_PATH,
    NOLOGIN_SHELLS,
    SHELL,
    SYSTEM_DIRS,
    SYSTEM_UID_MAX,
    AccountFacts,
    Change,
    ChangeAction,
    FileFacts,
    HostFacts,
    HostUsersPlan,
    SysadminUsersSpec,
    build_spec,
    check_home,
    parse_facts,
    plan_host_users,
)

# --------------------------------------------------------------------------- host facts

FACTS_SCRIPT = r"""set -u
marker=$1; shift
printf 'now\t%s\n' "$(date +%s)"
if [ -f "$marker" ]; then
  printf 'marker\tpresent\n'
  while IFS= read -r n || [ -n "$n" ]; do
    printf 'managed\t%s\n' "$n"
    case "$n" in ''|-*) ;; *) set -- "$@" "$n";; esac
  done < "$marker"
fi
printf 'nologin\t%s\n' "$(command -v nologin || echo /usr/sbin/nologin)"
getent group | while IFS= read -r l; do printf 'group\t%s\n' "$l"; done
pw=$(getent passwd "$@")
printf '%s\n' "$pw" | while IFS= read -r l; do [ -n "$l" ] && printf 'passwd\t%s\n' "$l"; done
getent shadow "$@" | while IFS=: read -r n p _ _ _ _ _ ex _; do
  case "$p" in '') k=empty;; '!') k=locked-empty;; '!'*) k=locked;; '*') k=star;; '$'*) k=hash;; *) k=other;; esac
  printf 'shadow\t%s\t%s\t%s\n' "$n" "$k" "$ex"
done
printf '%s\n' "$pw" | while IFS=: read -r n _ _ _ _ h _; do
  [ -n "$n" ] && printf '%s\n' "$h/.ssh" "$h/.ssh/authorized_keys" "$h/.ssh/authorized_keys2"
done | sort -u | xargs -r -d '\n' sh -c 'find -P "$@" -maxdepth 0 -printf "stat\t%p\t%u:%g:%m:%y\n" 2>/dev/null; true' sh
printf '%s\n' "$pw" | while IFS=: read -r n _ _ _ _ h _; do
  [ -n "$n" ] && [ ! -L "$h/.ssh" ] && printf '%s\n' "$h/.ssh/authorized_keys"
done | sort -u | xargs -r -d '\n' sh -c 'find -P "$@" -maxdepth 0 -type f -exec grep -aH "" -- {} + 2>/dev/null; true' sh |
  while IFS= read -r l; do printf 'keyline\t%s\n' "$l"; done
"""
"""Read as root, with a fixed number of processes whatever the number of users: the marker, the
groups, and for every listed or managed user the passwd entry, the password *state* (a
classification, never the hash) and expiry, and ~/.ssh, authorized_keys and authorized_keys2 (owner,
mode, type; the keys themselves). Symlinks are reported, never followed."""


def read_host_facts(remote: Remote, spec: SysadminUsersSpec) -> HostFacts:
    """One command, as root, reads everything the plan needs."""
    names = sorted({u.name for u in spec.users} | {spec.deploy_user, spec.connect_user})
    out = remote.read(sh_argv(FACTS_SCRIPT, MARKER_PATH, *names), sudo=True)
    return parse_facts(out.stdout)


# --------------------------------------------------------------------------- fleet steps


def facts_step(spec: SysadminUsersSpec) -> Callable[[Remote, FleetHost], HostResult]:
    """Read one host's accounts: ``unchanged`` (a read), ``output`` is its :class:`HostFacts`."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        facts = read_host_facts(remote, spec)
        return HostResult(
            status="unchanged",
            message=f"{len(facts.accounts)} account(s) read, {len(facts.managed)} managed",
            output=facts,
        )

    return step


LoginCheck = Callable[[FleetHost], None]


def apply_step(
    spec: SysadminUsersSpec,
    approved: dict[str, list[str]] | None,
    login_check: LoginCheck | None,
) -> Callable[[Remote, FleetHost], HostResult]:
    """Re-read, re-plan, refuse drift from the approved plan, run the changes, check login.

    ``approved`` maps host address -> the change summaries the operator saw (None: no check). If
    the connect user's authorized_keys were rewritten, ``login_check`` opens a fresh connection;
    if that fails, the previous authorized_keys are put back over the still-open connection.
    """

    def step(remote: Remote, host: FleetHost) -> HostResult:
        facts = read_host_facts(remote, spec)
        plan = plan_host_users(facts, spec)
        if plan.errors:
            return HostResult(status="failed", message="; ".join(plan.errors))
        if approved is not None and plan.summaries() != approved.get(host.address, []):
            return HostResult(
                status="failed",
                message="host changed since the plan was shown; nothing done here. Now it needs: "
                + ("; ".join(plan.summaries()) or "nothing"),
            )
        if not plan.changes:
            return HostResult(status="unchanged", message="already as listed")
        remote.write_batch(
            [(c.argv, c.stdin.encode() if c.stdin is not None else None) for c in plan.changes],
            sudo=True,
        )
        rewrote_own = any(
            c.action == "write-keys" and c.user == spec.connect_user for c in plan.changes
        )
        if rewrote_own and login_check is not None and not remote.dry_run:
            try:
                login_check(host)
            except Exception as exc:
                acct = facts.accounts[spec.connect_user]
                previous = acct.keys_content
                path = f"{acct.home.rstrip('/')}/.ssh/authorized_keys"
                if previous is not None:
                    remote.write_file(
                        path,
                        previous.encode(),
                        owner=spec.connect_user,
                        group=acct.primary_group,
                        mode=0o600,
                    )
                return HostResult(
                    status="failed",
                    message=f"{spec.connect_user} could not log in after the keys changed ({exc}); "
                    "previous authorized_keys restored",
                )
        return HostResult(status="changed", message="; ".join(plan.summaries()))

    return step


@task(name="list-sysadmin-accounts", cache_policy=NO_CACHE)
def list_sysadmin_accounts(
    hosts: list[FleetHost], spec: SysadminUsersSpec, pool: ConnectionPool, rate: RateControl
) -> FleetResult:
    """Read every host's accounts (read only; each result's ``output`` is its HostFacts)."""
    return run_fleet(
        hosts, facts_step(spec), pool=pool, rate=rate, dry_run=True, name="list-sysadmin-accounts"
    )


@task(name="update-sysadmin-accounts", cache_policy=NO_CACHE, retries=0)
def update_sysadmin_accounts(
    hosts: list[FleetHost],
    spec: SysadminUsersSpec,
    pool: ConnectionPool,
    rate: RateControl,
    approved: dict[str, list[str]] | None,
    *,
    dry_run: bool,
) -> FleetResult:
    """Bring every host's sysadmin accounts to ``spec``; in a dry run only record the commands.

    Idempotent: each host is re-read and re-planned, so a second run changes nothing. A host whose
    plan differs from ``approved`` is not touched (it changed since the operator saw the plan).
    Compensation: if fabflows' own login breaks after its keys were rewritten, the previous keys are
    restored at once; created accounts are not removed again (a later run with the user dropped
    locks them).
    """
    opts = pool.opts

    def login_check(host: FleetHost) -> None:
        from tasks.ssh.connection import connect

        connect(host.address, opts).close()

    return run_fleet(
        hosts,
        apply_step(spec, approved, login_check),
        pool=pool,
        rate=rate,
        dry_run=dry_run,
        name="update-sysadmin-accounts",
    )
