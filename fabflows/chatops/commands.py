"""Slash-command parsing and permission checks (pure: no Slack, no Prefect).

    /fabflows <flow> [<deployment>] <environment> [apply] [key=value ...]
    /fabflows describe myproject staging
    /fabflows reload-db myproject staging apply
    /fabflows status
    /fabflows help

``<flow>`` is a registered flow name or an alias (``describe``, ``reload-db`` and the config's
``fabflows.chatops.aliases``). Runs are dry runs unless ``apply`` is given. ``key=value`` values are
read as JSON when they parse (``true``, ``3``, ``["a"]``), else as text.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from config import FabulawsConfig
from config.models import ChatopsSettings

BUILTIN_ALIASES = {
    "describe": "describe-environment",
    "reload-db": "reload-production-db",
    "stop": "stop-environment",
    "start": "start-environment",
    "upgrade": "upgrade-packages",
}

USAGE = (
    "Usage: `/fabflows <flow> [deployment] <environment> [apply] [key=value ...]`, "
    "`/fabflows status`, `/fabflows help`. Runs are dry runs unless you add `apply`."
)


class CommandError(ValueError):
    """The command cannot be run; the message is shown to the Slack user."""


class Command(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Literal["run", "status", "help"]
    flow: str | None = None
    deployment: str | None = None
    environment: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


def aliases(settings: ChatopsSettings) -> dict[str, str]:
    return {**BUILTIN_ALIASES, **settings.aliases}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_command(text: str, config: FabulawsConfig, flows: dict[str, str]) -> Command:
    """Parse the text after ``/fabflows``.

    Raises:
        CommandError: unknown flow, deployment or environment, or a malformed argument.
    """
    words = text.split()
    if not words or words[0] in ("help", "-h", "--help"):
        return Command(action="help")
    if words[0] == "status":
        return Command(action="status")
    word, rest = words[0], words[1:]
    table = aliases(config.fabflows.chatops)
    flow = word if word in flows else table.get(word)
    if flow is None or flow not in flows:
        known = sorted(set(flows) | {a for a, f in table.items() if f in flows})
        raise CommandError(f"unknown flow {word!r}; known: {', '.join(known)}")
    positional = [w for w in rest if "=" not in w and w != "apply"]
    parameters: dict[str, Any] = {}
    for item in rest:
        if item == "apply":
            parameters["dry_run"] = False
        elif "=" in item:
            key, _, value = item.partition("=")
            if not key.isidentifier():
                raise CommandError(f"{key!r} is not a parameter name")
            if key in ("environment", "deployment", "config"):
                raise CommandError(f"{key} is given by position, not as {key}=")
            parameters[key] = _value(value)
    if len(positional) == 1:
        deployment = config.default_deployment or config.deployments[0]
        environment = positional[0]
    elif len(positional) == 2:
        deployment, environment = positional
    else:
        raise CommandError(f"say which environment (and optionally deployment). {USAGE}")
    if deployment not in config.deployments:
        raise CommandError(
            f"unknown deployment {deployment!r}; known: {', '.join(config.deployments)}"
        )
    if environment not in config.environments:
        raise CommandError(
            f"unknown environment {environment!r}; known: {', '.join(config.environments)}"
        )
    return Command(
        action="run",
        flow=flow,
        deployment=deployment,
        environment=environment,
        parameters=parameters,
    )


def user_name(settings: ChatopsSettings, user_id: str) -> str:
    """The configured name of a Slack user.

    Raises:
        CommandError: the user is not in ``fabflows.chatops.users``.
    """
    name = settings.users.get(user_id)
    if name is None:
        raise CommandError(
            f"Slack user {user_id} is not known to fabflows (fabflows.chatops.users); nothing was done"
        )
    return name


def may_run(settings: ChatopsSettings, user_id: str, environment: str, flow: str) -> None:
    """Raises CommandError unless ``user_id`` may start ``flow`` in ``environment``."""
    name = user_name(settings, user_id)
    perm = settings.permissions.get(environment)
    if perm is None or user_id not in perm.run:
        raise CommandError(f"{name} may not start runs in {environment}")
    if "*" not in perm.flows and flow not in perm.flows:
        raise CommandError(f"{name} may not start {flow} in {environment}")


def may_approve(
    settings: ChatopsSettings,
    user_id: str,
    environment: str,
    started_by: str | None,
    protected: bool,
) -> str:
    """The approver's name, or CommandError (unknown, not an approver here, or four-eyes)."""
    name = user_name(settings, user_id)
    perm = settings.permissions.get(environment)
    if perm is None or user_id not in perm.approve:
        raise CommandError(f"{name} may not approve runs in {environment}")
    if settings.four_eyes and protected and started_by == f"slack:{user_id}":
        raise CommandError(f"{name} started this run and may not approve it too (four eyes)")
    return name
