"""The broker user's password, changed where RabbitMQ checks it: on the cache server(s).

FabulAWS's ``broker_password`` is the password of a RabbitMQ user (the deploy user, by default) and
goes into ``CELERY_BROKER_URL``; the original never changed it in RabbitMQ when it was rotated. Here
``rabbitmqctl change_password <user>`` and ``rabbitmqctl authenticate_user <user>`` read the password
from their stdin (RabbitMQ 3.8+), so it never appears on a command line, in ``ps`` or in a log.

These are fleet steps' building blocks (they take a :class:`Remote` for one cache server). Idempotent:
a user that already authenticates with the new password is left alone. The compensation is the
same change with the old password.
"""

from __future__ import annotations

from pydantic import SecretStr

from tasks.ssh.fleet import FleetHost, HostResult
from tasks.ssh.remote import Remote
from tasks.ssh.secrets import run_with_secret

AUTH_FAILED = 65
"""rabbitmqctl authenticate_user's exit code for refused credentials (EX_DATAERR)."""


def authenticates(remote: Remote, user: str, password: SecretStr) -> bool:
    """Does RabbitMQ accept ``password`` for ``user``? (reads, also in a dry run)"""
    code = run_with_secret(
        remote,
        ["rabbitmqctl", "-q", "authenticate_user", "--", user],
        password,
        sudo=True,
        change=False,
        ok_codes=(0, AUTH_FAILED),
    )
    return code == 0


def change_password(remote: Remote, user: str, password: SecretStr) -> None:
    """``rabbitmqctl change_password <user>`` with the password on stdin (recorded; skipped dry)."""
    run_with_secret(
        remote,
        ["rabbitmqctl", "-q", "change_password", "--", user],
        password,
        sudo=True,
        change=True,
    )


def broker_password_step(  # noqa: ANN201
    user: str, current: SecretStr, new: SecretStr, *, checked: bool = False
):
    """A fleet step making ``user`` accept ``new`` (checked with ``current`` first).

    ``checked=True`` skips the checks before the change (the caller ran :func:`broker_check_step`
    earlier, outside a window: each rabbitmqctl call costs a second or two).

    Raises (inside the step, so the host fails with the message): the broker refuses both
    passwords, or refuses the new one after the change.
    """

    def step(remote: Remote, host: FleetHost) -> HostResult:
        if not checked:
            state = broker_state(remote, user, current, new)
            if state == "new":
                return HostResult(
                    status="unchanged", message=f"{user} already has the new password"
                )
        change_password(remote, user, new)
        if remote.dry_run:
            return HostResult(status="changed", message=f"would change the password of {user}")
        if not authenticates(remote, user, new):
            raise RuntimeError(f"RabbitMQ refuses {user} with the new password after the change")
        return HostResult(status="changed", message=f"changed the password of {user}")

    return step


def broker_state(remote: Remote, user: str, current: SecretStr, new: SecretStr) -> str:
    """``new`` (already changed) or ``current``; raises RuntimeError when the broker refuses both."""
    if authenticates(remote, user, new):
        return "new"
    if authenticates(remote, user, current):
        return "current"
    raise RuntimeError(
        f"RabbitMQ refuses {user} with both the current and the new password: the servers' "
        "broker_password does not match the broker"
    )


def broker_check_step(user: str, current: SecretStr, new: SecretStr):  # noqa: ANN201
    """A read-only fleet step: which password the broker accepts now (``output``: new/current)."""

    def step(remote: Remote, host: FleetHost) -> HostResult:
        state = broker_state(remote, user, current, new)
        return HostResult(
            status="unchanged", message=f"{user}: accepts the {state} password", output=state
        )

    return step


# --------------------------------------------------------------------------- alternating users


def list_users(remote: Remote) -> dict[str, list[str]]:
    """user -> tags (reads, also in a dry run)."""
    out = remote.read(["rabbitmqctl", "-q", "list_users"], sudo=True).stdout
    users: dict[str, list[str]] = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or parts[0] in ("user", "Listing"):
            continue
        tags = parts[1].strip().strip("[]")
        users[parts[0]] = [t.strip() for t in tags.split(",") if t.strip()]
    return users


def user_permissions(remote: Remote, user: str) -> list[tuple[str, str, str, str]]:
    """(vhost, configure, write, read) of ``user`` (reads)."""
    out = remote.read(["rabbitmqctl", "-q", "list_user_permissions", "--", user], sudo=True).stdout
    perms = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[0] != "vhost":
            perms.append((parts[0], parts[1], parts[2], parts[3]))
    return perms


def ensure_user_like(remote: Remote, user: str, like: str, password: SecretStr) -> bool:
    """Make ``user`` exist with ``password`` (stdin) and the tags and vhost permissions of
    ``like``; True if it was created. Idempotent. The alternate user of a rotation."""
    users = list_users(remote)
    created = user not in users
    if created:
        run_with_secret(
            remote, ["rabbitmqctl", "-q", "add_user", "--", user], password, sudo=True, change=True
        )
    else:
        change_password(remote, user, password)
    tags = users.get(like, [])
    remote.write(["rabbitmqctl", "-q", "set_user_tags", user, *tags], sudo=True)
    for vhost, conf, write, read in user_permissions(remote, like):
        remote.write(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "--", user, conf, write, read],
            sudo=True,
        )
    if not remote.dry_run and not authenticates(remote, user, password):
        raise RuntimeError(f"RabbitMQ refuses {user} with its new password")
    return created
