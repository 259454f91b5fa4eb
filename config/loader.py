"""Load and validate a config file; every error names the file, the key path and what is wrong."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.models import CrossReferenceError, FabulawsConfig

DEFAULT_PATHS = ("fabflows.yaml", "fabulaws-config.yml", "fabulaws-config.yaml")
"""Looked up in the current directory when no --config is given (FabulAWS used the .yml name)."""

CONFIG_ENV_VAR = "FABFLOWS_CONFIG"


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key or '<top level>'}: {self.message}"


class ConfigError(ValueError):
    """A config file could not be used. ``problems`` lists each bad key."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _key_path(loc: tuple[Any, ...]) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            # pydantic adds the union member / function name for some errors; drop those
            text = str(item)
            if text.startswith(("function-", "union[", "list[", "dict[", "str", "int")) and parts:
                continue
            parts.append(("." if parts else "") + text)
    return "".join(parts)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(str(path), "", "file not found")]) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), "", f"cannot read: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigProblem(str(path), where, f"not valid YAML: {problem}")]) from None
    if data is None:
        raise ConfigError([ConfigProblem(str(path), "", "the file is empty")])
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigProblem(str(path), "", f"expected a mapping of keys, got {type(data).__name__}")]
        )
    return data


def lookup_order() -> str:
    """Where a config is looked for when none is named (for help texts and errors)."""
    return f"${CONFIG_ENV_VAR}, else ./{', ./'.join(DEFAULT_PATHS)} (the first that exists)"


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config path: the explicit one, $FABFLOWS_CONFIG, or a default name in the cwd."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(CONFIG_ENV_VAR):
        return Path(os.environ[CONFIG_ENV_VAR]).expanduser()
    for name in DEFAULT_PATHS:
        if Path(name).exists():
            return Path(name)
    raise ConfigError(
        [
            ConfigProblem(
                "(no file)",
                "",
                f"no config given: pass --config, set ${CONFIG_ENV_VAR}, or create one of "
                f"./{', ./'.join(DEFAULT_PATHS)} in this directory",
            )
        ]
    )


def load_config(path: str | os.PathLike[str] | None = None) -> FabulawsConfig:
    """Read and validate a config file.

    A file may be a FabulAWS ``fabulaws-config.yaml`` as is, or a fabflows file that names one with
    ``fabulaws_config: <path>`` (relative to itself) and adds a ``fabflows:`` section, so the original
    file can stay untouched while a team migrates.
    """
    file = find_config(path)
    data = _read_yaml(file)
    origin: dict[str, str] = {k: str(file) for k in data}
    base_ref = data.pop("fabulaws_config", None)
    if base_ref is not None:
        if not isinstance(base_ref, str):
            raise ConfigError([ConfigProblem(str(file), "fabulaws_config", "must be a file path")])
        base_path = (file.parent / base_ref).expanduser()
        base = _read_yaml(base_path)
        base.pop("fabulaws_config", None)
        origin = {k: str(base_path) for k in base} | {k: str(file) for k in data}
        data = base | data
    try:
        return FabulawsConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, CrossReferenceError):
                for key, message in ctx_err.problems:
                    problems.append(
                        ConfigProblem(origin.get(key.split(".")[0], str(file)), key, message)
                    )
                continue
            key = _key_path(tuple(err["loc"]))
            top = str(err["loc"][0]) if err["loc"] else ""
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                message = "unknown key (fabflows' own sections accept only documented keys)"
            elif err["type"] == "missing":
                message = "required key is missing"
            elif any(word in key for word in ("secret", "password", "passphrase", "token")):
                message = f"{message} (value not shown)"
            else:
                message = f"{message} (got {err.get('input')!r})"
            problems.append(ConfigProblem(origin.get(top, str(file)), key, message))
        raise ConfigError(problems) from None
