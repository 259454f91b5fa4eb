"""The ``fabflows`` command: run any runbook from a terminal, the way ``fab`` users are used to.

    fabflows flows
    fabflows run describe-environment --environment staging
    fabflows run update-sysadmin-users --help        # the flow's own options
    fabflows run update-sysadmin-users --environment staging --users-dir deployment/users --apply
    fabflows config check fabulaws-config.yaml
    fabflows runs --environment staging              # recent runs; `fabflows show RUN` shows one
    fabflows sandbox up | down | status
    fabflows demo
    fabflows server start | stop | status            # a per-user Prefect server (+ warm runner)
    fabflows warm start | stop | status

Runs are dry unless ``--apply``. Exit status: 0 done, 1 the flow failed, 2 bad input (nothing was
started), 3 the flow refused (outside its window, approval rejected, another run holds the lock).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from pydantic import BaseModel, TypeAdapter, ValidationError

from config.loader import CONFIG_ENV_VAR, lookup_order
from fabflows.errors import BadInput, Refused
from fabflows.registry import FLOWS

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 1, 2, 3
COMMON = ("environment", "deployment", "config", "dry_run")


class UsageError(Exception):
    """Bad command line: reported before anything is started."""


def load_flow(name: str) -> Any:
    if name not in FLOWS:
        raise UsageError(f"unknown flow {name!r}; known: {', '.join(sorted(FLOWS))}")
    module, _, attr = FLOWS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def flow_summary(fl: Any) -> str:
    """The docstring's first sentence, whole (its first paragraph up to the first full stop)."""
    doc = inspect.getdoc(fl.fn) or ""
    paragraph = " ".join(doc.split("\n\n", 1)[0].split())
    sentence = re.match(r"(.+?(?<!e\.g)(?<!i\.e)[.!?])(?=\s|$)", paragraph)
    return sentence.group(1) if sentence else paragraph


def docstring_args(fl: Any) -> dict[str, str]:
    """The docstring's Google-style ``Args:`` section: parameter name -> its text (one line)."""
    lines = (inspect.getdoc(fl.fn) or "").splitlines()
    try:
        first = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    base, current = None, None
    for line in lines[first:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        base = indent if base is None else base
        if indent < base:  # the next section ("Returns:")
            break
        item = re.match(r"(\w+)(?: \([^)]*\))?:\s*(.*)$", line.strip())
        if indent == base and item:
            current = item.group(1)
            out[current] = item.group(2)
        elif current:
            out[current] += " " + line.strip()
    return out


def flow_options(fl: Any) -> dict[str, inspect.Parameter]:
    """The flow's own parameters (beyond environment/deployment/config/dry_run)."""
    sig = inspect.signature(fl.fn)
    return {n: p for n, p in sig.parameters.items() if n not in COMMON}


def _takes_list(hint: Any) -> bool:
    """``list[...]`` or ``list[...] | None``: a comma-separated value is a list."""
    if get_origin(hint) is list:
        return True
    return any(get_origin(arg) is list for arg in get_args(hint))


def parse_flow_options(fl: Any, argv: list[str]) -> dict[str, Any]:
    """``--users-dir DIR --remove`` -> {"users_dir": "DIR", "remove": True}, typed by the signature."""
    options = flow_options(fl)
    hints = get_type_hints(fl.fn)
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}")
        key, eq, inline = arg[2:].partition("=")
        negate = key.startswith("no-") and key[3:].replace("-", "_") in options
        name = (key[3:] if negate else key).replace("-", "_")
        if name not in options:
            known = ", ".join("--" + n.replace("_", "-") for n in options) or "none"
            raise UsageError(f"{fl.name} has no option --{key} (its options: {known})")
        hint = hints.get(name, str)
        if hint is bool:
            out[name] = not negate if not eq else inline.lower() in ("1", "true", "yes")
            i += 1
            continue
        if eq:
            raw = inline
            i += 1
        else:
            if i + 1 >= len(argv):
                raise UsageError(f"--{key} needs a value")
            raw = argv[i + 1]
            i += 2
        try:
            value: Any = json.loads(raw) if raw[:1] in "[{" else raw
            if isinstance(value, str) and _takes_list(hint):  # --roles web,worker
                value = [v.strip() for v in value.split(",") if v.strip()]
            out[name] = TypeAdapter(hint).validate_python(value, strict=False)
        except (ValidationError, json.JSONDecodeError):
            try:
                out[name] = TypeAdapter(hint).validate_json(raw)
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"]
                raise UsageError(f"--{key} {raw!r}: {msg}") from None
    return out


def prefect_api_url() -> str | None:
    """The Prefect API to use: $PREFECT_API_URL, else a running `fabflows server`, else None
    (Prefect's embedded mode: a temporary server for this process, ~10 s)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    try:
        from fabflows.server import running_url  # type: ignore[attr-defined]
    except ImportError:
        return None
    return running_url()


def _quiet_console(verbose: bool) -> None:
    """Run logs go to the Prefect API in full; the terminal shows warnings only unless --verbose."""
    import logging

    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging

    if not PROCESS_LOGGING_CONFIG:  # importing prefect sets it up (~0.1 s): not twice
        setup_logging()
    if not verbose:
        for handler in logging.getLogger().handlers:
            if handler.name == "console":
                handler.setLevel(logging.WARNING)
                handler.addFilter(drop_bad_input_traceback)


def drop_bad_input_traceback(record: Any) -> bool:
    """False for Prefect's "Encountered exception" record of a run that ended on bad input or a
    refusal (a plan with problems, a busy environment): the terminal shows that as one line at the
    end; the run's logs in the UI keep the traceback. Any other record, and every record with
    --verbose, is shown."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, BadInput | Refused)


def render_result(result: Any) -> str:
    render = getattr(result, "render_text", None)
    if callable(render):
        return render()
    if isinstance(result, BaseModel):
        import yaml

        return yaml.safe_dump(json.loads(result.model_dump_json()), sort_keys=False)
    return str(result)


def sandbox_config() -> Path | None:
    """The running sandbox's config (``sandbox/state/fabflows.yaml``), or None.

    Read from the sandbox daemon's status file without importing the sandbox (it is not shipped
    by ``pip install``, and its imports are heavy).
    """
    state = os.environ.get("FABFLOWS_SANDBOX_DIR")
    if not state:
        spec = importlib.util.find_spec("sandbox")
        if spec is None or not spec.submodule_search_locations:
            return None
        state = str(Path(list(spec.submodule_search_locations)[0]) / "state")
    try:
        data = json.loads((Path(state) / "daemon.json").read_text())
        if not Path(f"/proc/{int(data['pid'])}").exists():  # the daemon (root's) is gone
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    config = Path(str(data.get("config", "")))
    return config if data.get("status") == "ready" and config.is_file() else None


CONFIG_HELP = f"config file (default: {lookup_order()}; else the running sandbox's config)"


def config_path(explicit: str | None) -> Path:
    """The config to use: ``--config``, $FABFLOWS_CONFIG, a default file here, else the running
    sandbox's (said in one stderr line). Raises ConfigError naming the same lookup."""
    from config.loader import ConfigError, find_config

    try:
        return find_config(explicit)
    except ConfigError as exc:
        found = sandbox_config()
        if found is None:
            problem = exc.problems[0]
            raise ConfigError(
                [replace(problem, message=problem.message + "; or start the sandbox (make demo)")]
            ) from None
    print(f"fabflows: no config given; using the sandbox's {found}", file=sys.stderr)
    return found


DEMO_COMMANDS = (
    "fabflows config check",
    "fabflows run describe-environment --environment staging",
    "fabflows run update-sysadmin-users -e staging --users-dir deployment/users",
    "fabflows runs",
)
"""What ``fabflows demo`` tells a new user to try next: the README's "Using it" commands."""


def next_commands(config: Path) -> str:
    """``fabflows demo``'s last words: the exact commands to type next, from this checkout."""
    lines = ["", "Next, from this checkout:", ""]
    if sys.prefix != sys.base_prefix:  # a venv (make demo's .venv): put `fabflows` on PATH
        activate = Path(sys.prefix) / "bin" / "activate"
        try:
            activate = activate.relative_to(Path.cwd())
        except ValueError:
            pass
        lines.append(f"    . {activate}")
    lines += [f"    {command}" for command in DEMO_COMMANDS]
    lines += [
        "",
        f"With no --config, no ${CONFIG_ENV_VAR} and no config file here, fabflows uses the "
        f"sandbox's\nconfig while the sandbox is up ({config}).",
        "`fabflows flows` lists every runbook; `fabflows sandbox down` removes the sandbox.",
    ]
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    from config import load_config, resolve_environment

    fl = load_flow(args.flow)
    params = parse_flow_options(fl, extra)
    sig = inspect.signature(fl.fn).parameters
    # validate the config and the environment before anything starts
    path = config_path(args.config)
    cfg = load_config(path)
    env = resolve_environment(cfg, args.environment, args.deployment)
    params |= {"environment": env.environment, "deployment": env.deployment}
    if "config" in sig:
        params["config"] = os.path.abspath(path)
    if "dry_run" in sig:
        params["dry_run"] = not args.apply
    elif args.apply:
        print(f"fabflows: {args.flow} changes nothing; --apply ignored", file=sys.stderr)
    os.environ.setdefault("FABFLOWS_PROGRESS_BAR", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from here
    os.environ.setdefault("FABFLOWS_STARTED_BY", f"cli:{os.environ.get('USER', 'unknown')}")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = prefect_api_url()
    updates: dict = {PREFECT_API_URL: url} if url else {}
    # the runbook's own checks (parameters, files, blocks, refusals) before a Prefect run exists,
    # against the running server (a block lookup without it would start a temporary server)
    from fabflows.runtime.engine import prevalidate

    try:
        with temporary_settings(updates):
            prevalidate(fl, params)
    except BadInput as exc:
        print(f"{args.flow}: bad input: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Refused as exc:
        print(f"{args.flow}: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if url is None:
        print(
            "fabflows: no Prefect server running; using a temporary one (~10 s). "
            "`fabflows server start` keeps one running.",
            file=sys.stderr,
        )
    _quiet_console(args.verbose)
    started = time.monotonic()
    if params.get("dry_run", True):
        # A run that changes nothing (read-only flow or dry run) skips Prefect's heartbeat thread,
        # whose shutdown costs ~0.9 s per call; a killed one has nothing to recover. Runs that apply
        # changes keep heartbeats, so the zombie automation marks them crashed if they die.
        updates["flows.heartbeat_frequency"] = None
    with temporary_settings(updates=updates):
        state = fl(**params, return_state=True)
    elapsed = time.monotonic() - started
    if state.is_cancelled():  # the engine's refusals: window, approval, lock, changed plan
        print(f"{args.flow}: refused: {state.message}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        result = state.result(raise_on_failure=True)
    except Exception as exc:  # the flow's own failure, reported by the engine
        if isinstance(exc, Refused):
            print(f"{args.flow}: refused: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        if isinstance(exc, BadInput):
            print(f"{args.flow}: bad input: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(
            f"{args.flow}: FAILED after {elapsed:.1f}s: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if args.json:
        if isinstance(result, BaseModel):
            print(result.model_dump_json(indent=2))
        else:
            print(json.dumps(result, default=str, indent=2))
    else:
        print(render_result(result))
        print(
            f"\n{args.flow}: done in {elapsed:.1f}s ({'dry run' if params.get('dry_run') else 'applied'})"
            if "dry_run" in params
            else f"\n{args.flow}: done in {elapsed:.1f}s",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_flows(args: argparse.Namespace) -> int:
    import textwrap

    width = max(len(n) for n in FLOWS)
    columns = max(60, shutil.get_terminal_size((100, 24)).columns)
    for name in sorted(FLOWS):
        try:
            summary = flow_summary(load_flow(name))
        except Exception as exc:  # a broken module must not hide the others
            summary = f"(cannot import: {exc})"
        lines = textwrap.wrap(summary, columns - width - 2, break_on_hyphens=False) or [""]
        print(f"{name.ljust(width)}  {lines[0]}")
        for line in lines[1:]:
            print(" " * (width + 2) + line)
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from config import load_config, resolve_environment

    path = config_path(args.file)
    cfg = load_config(path)
    print(f"{path}: OK")
    print(
        f"project: {cfg.project}; deployments: {', '.join(cfg.deployments)}; region: {cfg.region}"
    )
    print(f"roles: {', '.join(cfg.valid_roles)}")
    for env_name in cfg.environments:
        env = resolve_environment(cfg, env_name)
        flags = [
            f for f, on in (("production", env.is_production), ("protected", env.protected)) if on
        ]
        print(f"\n{env.label}{' (' + ', '.join(flags) + ')' if flags else ''}")
        types = ", ".join(f"{r}={t}" for r, t in env.instance_types.items()) or "none"
        print(f"  instance types: {types}")
        print(
            f"  autoscaling group: {env.auto_scaling_group or '-'}; load balancers: {', '.join(env.load_balancers) or '-'}"
        )
        print(f"  static bucket: {env.static_bucket}; database: {env.database_name}")
        if env.windows:
            for w in env.windows:
                print(f"  window: {','.join(w.days)} {w.start:%H:%M}-{w.end:%H:%M} {env.time_zone}")
        else:
            print("  windows: none (no window enforced)")
    for warning in cfg.warnings():
        print(f"warning: {warning}")
    return EXIT_OK


def _optional(module: str, attr: str) -> Callable[..., int] | None:
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The options every ``fabflows run`` takes, whatever the flow."""
    run.add_argument("flow", help="the runbook (`fabflows flows` lists them)")
    run.add_argument("--environment", "-e", required=True)
    run.add_argument("--deployment", "-d", help="default: the config's default_deployment")
    run.add_argument("--config", "-c", help=CONFIG_HELP)
    run.add_argument("--apply", action="store_true", help="make the changes (default: dry run)")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--verbose", "-v", action="store_true", help="show the run's logs")


def _type_name(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if get_origin(hint) is None else None
    return text or str(hint).replace("typing.", "")


def flow_help(name: str) -> str:
    """``fabflows run FLOW --help``: the generic options, then the flow's own (type, default, the
    docstring's Args text)."""
    fl = load_flow(name)
    parser = argparse.ArgumentParser(
        prog=f"fabflows run {name}",
        usage=f"fabflows run {name} --environment ENV [options] [{name} options]",
        description=flow_summary(fl),
        add_help=False,
    )
    add_run_arguments(parser)
    parser.add_argument("--help", "-h", action="help", help="show this help")
    own = parser.add_argument_group(f"{name} options")
    hints = get_type_hints(fl.fn)
    texts = docstring_args(fl)
    for option, param in flow_options(fl).items():
        hint = hints.get(option, str)
        flag = "--" + option.replace("_", "-")
        parts = [texts.get(option, "").replace("%", "%%")]
        if hint is bool:
            flag = f"{flag}, --no-{option.replace('_', '-')}"
            parts.append(f"(default: {'on' if param.default else 'off'})")
            own.add_argument(flag, action="store_true", help=" ".join(p for p in parts if p))
            continue
        required = param.default is inspect.Parameter.empty
        default = "required" if required else f"default: {param.default!r}"
        parts.append(f"({_type_name(hint)}; {default})".replace("%", "%%"))
        if _takes_list(hint):
            parts.append("(comma-separated, or JSON)")
        own.add_argument(flag, metavar="VALUE", help=" ".join(p for p in parts if p))
    return parser.format_help()


def shortcuts(argv: list[str]) -> list[str]:
    """``recover ...`` is ``run recover-environment ...``; ``resume RUN_ID ...`` is
    ``run resume-run --run-id RUN_ID ...`` (the environment found from the run's journal when no
    ``-e`` is given)."""
    if argv[:1] == ["recover"]:
        return ["run", "recover-environment", *argv[1:]]
    if argv[:1] == ["resume"] and len(argv) > 1 and not argv[1].startswith("-"):
        run_id, rest = argv[1], argv[2:]
        if not {"-e", "--environment"} & set(rest) and not any(
            a.startswith("--environment=") for a in rest
        ):
            env = environment_of_run(run_id, rest)
            if env is not None:
                rest = ["-e", env, *rest]
        return ["run", "resume-run", "--run-id", run_id, *rest]
    return argv


def environment_of_run(run_id: str, rest: list[str]) -> str | None:
    """The environment whose journal has ``run_id`` (None: not found; the run then asks for -e)."""
    from config import ConfigError, load_config, resolve_environment
    from fabflows.runtime.journal import Journal

    explicit = None
    for i, a in enumerate(rest):
        if a in ("-c", "--config") and i + 1 < len(rest):
            explicit = rest[i + 1]
        elif a.startswith("--config="):
            explicit = a.partition("=")[2]
    try:
        cfg = load_config(config_path(explicit))
    except (ConfigError, UsageError):
        return None
    for deployment in cfg.deployments:
        for name in cfg.environments:
            env = resolve_environment(cfg, name, deployment)
            if Journal.for_environment(env.label, cfg).entry(run_id) is not None:
                return name
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fabflows", description="FabulAWS maintenance runbooks as Prefect flows."
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("flows", help="list the runbooks")
    run = sub.add_parser(
        "run",
        help="run a runbook (dry unless --apply)",
        description="Run a runbook in this process. Flow options follow as --name value "
        "(`fabflows run FLOW --help` lists them).",
    )
    add_run_arguments(run)
    cfg = sub.add_parser("config", help="config tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a config and print what was understood")
    check.add_argument("file", nargs="?", help=CONFIG_HELP.replace("config file", "default"))
    sb = sub.add_parser("sandbox", help="the local sandbox (moto + isolated test hosts)")
    sb.add_argument("action", choices=["up", "down", "status"])
    sb.add_argument("--state-dir", default=None)
    sub.add_parser("demo", help="bring the sandbox up and describe myproject/staging")
    sub.add_parser(
        "recover",
        help="undo what dead runs left (= run recover-environment -e ENV [--apply])",
        add_help=False,
    )
    sub.add_parser(
        "resume",
        help="go on with a failed run from its failed step (resume RUN_ID [--apply])",
        add_help=False,
    )
    warm = sub.add_parser(
        "warm", help="the warm runner: `fabflows run` without Prefect's import time"
    )
    warm.add_argument("action", choices=["start", "stop", "status"], nargs="?", default="status")
    for module in (
        "fabflows.history",
        "fabflows.server",
        "deployments.cli",
        "fabflows.chatops.cli",
    ):
        adder = _optional(module, "add_parser")
        if adder:
            adder(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = shortcuts(argv)
    if argv[:1] == ["run"] and {"-h", "--help"} & set(argv):
        named = [a for a in argv[1:] if a in FLOWS]
        if named:
            print(flow_help(named[0]))
            return EXIT_OK
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "flows":
            return cmd_flows(args)
        if args.command == "run":
            return cmd_run(args, extra)
        if args.command == "config":
            return cmd_config_check(args)
        if args.command == "sandbox":
            from sandbox import cli as sandbox_cli

            return sandbox_cli.main(args.action, args.state_dir)
        if args.command == "warm":
            from fabflows import warm

            return warm.main([args.action])
        if args.command == "demo":
            from sandbox import cli as sandbox_cli

            return sandbox_cli.demo()
        handler = getattr(args, "handler", None)
        if handler:
            return handler(args)
        parser.error(f"unknown command {args.command}")
    except UsageError as exc:
        print(f"fabflows: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        print(f"fabflows: bad config:\n{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
