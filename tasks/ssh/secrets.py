"""Secret files on the servers: read and write them over SFTP, and re-render the files embedding them.

FabulAWS keeps one plaintext file per secret at ``<home>/<name>`` (mode 600, owned by the deploy user)
and renders copies into config files (the pgbouncer userlist, the New Relic files...). The original
wrote them with ``echo "<value>" > file``: the value was in Fabric's output and in ``ps`` on the
server, and a ``"``, ``$`` or backtick broke it. Here:

- **Reading:** file facts (exists, owner, group, mode) come from one ``stat`` per server; contents
  travel over SFTP (files the SSH user may read) or on the stdout of ``sudo cat`` (root's files).
  Contents never appear on a command line, in a log line or in a result that is persisted: tasks that
  return them set ``persist_result=False``, and facts carry only an HMAC of the content under a key
  that lives for one run (:class:`Fingerprint`), useless to anyone who sees it.
- **Writing happens in three steps, so that a change can be undone until it is committed:**

  1. *stage*: each new content is uploaded over SFTP into a private directory (mode 700) of the SSH
     user, then ``install``-ed as ``<path>.fabflows-next`` with the file's owner, group and mode;
  2. *swap*: ``<path>`` is copied to ``<path>.fabflows-prev`` (or ``<path>.fabflows-absent`` marks that
     there was none), then ``<path>.fabflows-next`` is renamed onto ``<path>`` (atomic);
  3. *commit* removes the backups; *restore* (the compensation of swap) puts them back.

  The backups are on the servers themselves: a run killed between swap and commit leaves them
  there, and :func:`describe_secret_files` reports them as leftovers.
- Commands only ever carry paths, owners and modes, quoted with :func:`shlex.join`.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
import secrets as pysecrets
import shlex
from collections.abc import Sequence
from pathlib import Path

import jinja2
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, SecretBytes, SecretStr

from blocks.secrets import check_secret_name
from config import EnvironmentConfig
from config.models import SecretFileSettings, normalize_role
from tasks.ssh.connection import ConnectionPool
from tasks.ssh.fleet import FleetHost, FleetResult, HostResult, RateControl, run_fleet
from tasks.ssh.remote import CommandError, Remote, exec_command, sh_argv, sudo_argv

NEXT_SUFFIX = ".fabflows-next"
PREV_SUFFIX = ".fabflows-prev"
ABSENT_SUFFIX = ".fabflows-absent"
BACKUP_SUFFIXES = (NEXT_SUFFIX, PREV_SUFFIX, ABSENT_SUFFIX)
STAGE_DIR_PREFIX = ".fabflows-stage-"
"""The private upload directories (in the SSH user's home) of :func:`stage_files`."""

ALL_ROLES = ["cache", "db-primary", "db-replica", "web", "worker"]

# --------------------------------------------------------------------------- default files

PGBOUNCER_USERLIST = """\
"{{ database_user | replace('"', '""') }}" "{{ database_password | replace('"', '""') }}"
"""

NEWRELIC_INI = """\
# Written by fabflows from the {{ deployment }}-{{ environment }}-secrets block.
[newrelic]
license_key = {{ newrelic_license_key }}
app_name = {{ project }} {{ environment }} ({{ process }})
monitor_mode = true
log_file = stderr
log_level = info
"""

NEWRELIC_INFRA = """\
# Written by fabflows from the {{ deployment }}-{{ environment }}-secrets block.
license_key: {{ newrelic_license_key }}
display_name: {{ host }}
custom_attributes:
  environment: {{ environment }}
  role: {{ role }}
"""

DEFAULT_FILES: tuple[SecretFileSettings, ...] = (
    SecretFileSettings(
        path="{home}/services/pgbouncer/userlist-{environment}.txt",
        template=PGBOUNCER_USERLIST,
        roles=["web", "worker"],
        restart=["{environment}-pgbouncer"],
    ),
    SecretFileSettings(
        path="{home}/services/newrelic-{environment}-web.ini",
        template=NEWRELIC_INI.replace("{{ process }}", "web"),
        roles=["web"],
        kind="newrelic",
    ),
    SecretFileSettings(
        path="{home}/services/newrelic-{environment}-celery.ini",
        template=NEWRELIC_INI.replace("{{ process }}", "celery"),
        roles=["worker"],
        kind="newrelic",
    ),
    SecretFileSettings(
        path="/etc/newrelic-infra.yml",
        template=NEWRELIC_INFRA,
        roles=list(ALL_ROLES),
        owner="root",
        mode="0600",
        restart=["newrelic-infra"],
        kind="newrelic",
    ),
)
"""What FabulAWS renders with secrets, as the sandbox's app lays it out:
pgbouncer's userlist (database_password), the New Relic agent files for web and celery, and the New
Relic infrastructure agent's config (newrelic_license_key). The app itself reads its secrets from the
secret files ``<home>/<name>``."""


class BadTemplate(ValueError):
    """A file template cannot be loaded or rendered (the message names the file, never a value)."""


class FileSpec(BaseModel):
    """One config file embedding secrets, with its placeholders resolved for an environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    template: str
    roles: list[str]
    owner: str
    mode: int
    restart: list[str]
    kind: str
    uses: list[str] = Field(description="Secret names the template refers to.")


def _fill(text: str, env: EnvironmentConfig) -> str:
    values = {
        "home": env.home.rstrip("/"),
        "environment": env.environment,
        "deployment": env.deployment,
        "project": env.project,
    }
    try:
        return text.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise BadTemplate(
            f"{text!r}: unknown placeholder {exc}; use {{home}}, {{environment}}, {{deployment}} "
            "or {{project}}"
        ) from None


def check_remote_path(path: str) -> str:
    """An absolute, normalized path without characters that break the scripts' framing."""
    if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
        raise BadTemplate(f"{path!r} is not an absolute, normalized file path")
    if any(c in path for c in "\n\r\t\x00"):
        raise BadTemplate(f"{path!r} contains a control character")
    if path.endswith(BACKUP_SUFFIXES):
        raise BadTemplate(f"{path!r} ends with a suffix fabflows uses for its backups")
    return path


def template_names(template: str) -> list[str]:
    """Undeclared names a Jinja2 template uses (pure)."""
    from jinja2 import meta

    try:
        ast = _jinja().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise BadTemplate(f"template syntax error line {exc.lineno}: {exc.message}") from None
    return sorted(meta.find_undeclared_variables(ast))


def _jinja() -> jinja2.Environment:
    return jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - config files, not HTML
        keep_trailing_newline=True,
    )


def resolve_files(
    settings: Sequence[SecretFileSettings] | None,
    env: EnvironmentConfig,
    config_dir: Path | None = None,
    deploy_user: str | None = None,
) -> list[FileSpec]:
    """The environment's secret-bearing config files (``settings`` or :data:`DEFAULT_FILES`).

    Raises:
        BadTemplate: a template file is missing, a template does not parse, a path is unusable or
            two entries name the same path.
    """
    out: list[FileSpec] = []
    seen: set[str] = set()
    for item in DEFAULT_FILES if settings is None else settings:
        path = check_remote_path(_fill(item.path, env))
        if path in seen:
            raise BadTemplate(f"{path} is listed twice in fabflows.secrets.files")
        seen.add(path)
        if item.template is not None:
            text = item.template
        else:
            source = Path(item.template_file or "")
            if not source.is_absolute():
                source = (config_dir or Path.cwd()) / source
            try:
                text = source.read_text()
            except OSError as exc:
                raise BadTemplate(f"{path}: template file {source}: {exc.strerror}") from None
        try:
            uses = template_names(text)
        except BadTemplate as exc:
            raise BadTemplate(f"{path}: {exc}") from None
        out.append(
            FileSpec(
                path=path,
                template=text,
                roles=[normalize_role(r) for r in item.roles],
                owner=item.owner or deploy_user or env.deploy_user,
                mode=int(item.mode, 8),
                restart=[_fill(r, env) for r in item.restart],
                kind=item.kind,
                uses=uses,
            )
        )
    return out


def template_context(
    env: EnvironmentConfig, host: str, role: str, values: dict[str, str]
) -> dict[str, str]:
    """What templates see: the secrets (plain, in memory only) and the environment's names."""
    return {
        **values,
        "deployment": env.deployment,
        "environment": env.environment,
        "project": env.project,
        "home": env.home.rstrip("/"),
        "database_name": env.database_name,
        # the login the app uses now (rotate-credentials alternates two), else the config's
        "database_user": values.get("database_user", env.database_user),
        "deploy_user": env.deploy_user,
        "host": host,
        "role": role,
    }


def render_file(spec: FileSpec, context: dict[str, str]) -> SecretBytes:
    """Render ``spec`` (pure). The result embeds secrets, so it comes back as SecretBytes.

    Raises:
        BadTemplate: the template uses a name that is not a secret or an environment name.
    """
    try:
        text = _jinja().from_string(spec.template).render(**context)
    except jinja2.UndefinedError as exc:
        raise BadTemplate(f"{spec.path}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise BadTemplate(f"{spec.path}: {type(exc).__name__}") from None
    return SecretBytes(text.encode())


def secret_path(home: str, name: str) -> str:
    """``<home>/<name>``: where a secret's file is on every server."""
    return check_remote_path(posixpath.join(home.rstrip("/") or "/", check_secret_name(name)))


# --------------------------------------------------------------------------- fingerprints


class Fingerprint:
    """Keyed digests of file contents for one run: equal contents, equal prints.

    The key is random and never leaves the process, so a print says nothing about the content to
    anyone who reads it (unlike a plain hash of a short password).
    """

    def __init__(self, key: bytes | None = None):
        self._key = key or pysecrets.token_bytes(32)

    def __call__(self, content: bytes | SecretBytes | SecretStr | str) -> str:
        if isinstance(content, SecretBytes):
            content = content.get_secret_value()
        elif isinstance(content, SecretStr):
            content = content.get_secret_value()
        if isinstance(content, str):
            content = content.encode()
        return hmac.new(self._key, content, hashlib.sha256).hexdigest()[:32]

    def __repr__(self) -> str:
        return "Fingerprint(<per-run key>)"

    def __reduce__(self):  # noqa: ANN204 - never pickle the key into a persisted result
        raise TypeError("Fingerprint is not picklable")


def secret_file_content(value: SecretStr) -> SecretBytes:
    """A secret file holds exactly the value (no trailing newline, which readers strip anyway)."""
    return SecretBytes(value.get_secret_value().encode())


def secret_from_file(content: bytes) -> SecretStr:
    """The value in a secret file: UTF-8, one trailing line break (``echo`` wrote one) dropped."""
    text = content.decode("utf-8", "replace")
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return SecretStr(text)


# --------------------------------------------------------------------------- reading


class FileFact(BaseModel):
    """What one file on one server is (never its content)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    exists: bool
    owner: str | None = None
    group: str | None = None
    mode: int | None = None
    fingerprint: str | None = Field(
        default=None, description="Keyed digest of the content under the run's key."
    )

    def describe_mode(self) -> str:
        return f"{self.mode:04o}" if self.mode is not None else "-"


_STAT_SCRIPT = r"""for p do
  if [ -e "$p" ]; then printf 'E %s\n' "$(stat -c '%U %G %a' -- "$p")"; else printf 'N\n'; fi
done
"""
"""One line per path: ``E owner group mode`` or ``N`` (missing)."""


def stat_files(remote: Remote, paths: Sequence[str]) -> dict[str, tuple[str, str, int] | None]:
    """Owner, group and mode of each path (None: missing), in one ``sudo stat`` round trip."""
    if not paths:
        return {}
    result = remote.read(sh_argv(_STAT_SCRIPT, *paths), sudo=True)
    lines = result.stdout.splitlines()
    if len(lines) != len(paths):
        raise CommandError(remote.host, result.command, 0, "stat printed an unexpected answer")
    out: dict[str, tuple[str, str, int] | None] = {}
    for path, line in zip(paths, lines, strict=True):
        parts = line.split(" ")
        if parts[0] == "E" and len(parts) == 4:
            out[path] = (parts[1], parts[2], int(parts[3], 8))
        else:
            out[path] = None
    return out


def ssh_user(remote: Remote) -> str:
    return remote.conn.user


def _readable_by(user: str, owner: str, mode: int) -> bool:
    return (owner == user and mode & 0o400) or bool(mode & 0o004)


def read_file(remote: Remote, path: str, fact: tuple[str, str, int]) -> bytes:
    """A file's content: over SFTP when the SSH user may read it, else on ``sudo cat``'s stdout."""
    owner, _, mode = fact
    if _readable_by(ssh_user(remote), owner, mode):
        sftp = remote.conn.sftp()
        with sftp.open(path, "rb") as handle:
            return handle.read()
    result = remote.read(["cat", "--", path], sudo=True)
    return result.stdout.encode("utf-8", "surrogateescape")


def read_files(remote: Remote, paths: Sequence[str]) -> dict[str, tuple[FileFact, bytes | None]]:
    """Facts and contents of ``paths`` (content None: missing). Contents stay in memory."""
    facts = stat_files(remote, paths)
    out: dict[str, tuple[FileFact, bytes | None]] = {}
    for path in paths:
        fact = facts[path]
        if fact is None:
            out[path] = (FileFact(path=path, exists=False), None)
            continue
        content = read_file(remote, path, fact)
        out[path] = (
            FileFact(path=path, exists=True, owner=fact[0], group=fact[1], mode=fact[2]),
            content,
        )
    return out


def describe_files(
    remote: Remote, paths: Sequence[str], fingerprint: Fingerprint
) -> tuple[list[FileFact], list[str]]:
    """Facts with keyed fingerprints for ``paths``, and leftover backups of earlier runs."""
    with_backups = [p + s for p in paths for s in BACKUP_SUFFIXES]
    stats = stat_files(remote, list(paths) + with_backups)
    facts: list[FileFact] = []
    for path in paths:
        fact = stats[path]
        if fact is None:
            facts.append(FileFact(path=path, exists=False))
            continue
        content = read_file(remote, path, fact)
        facts.append(
            FileFact(
                path=path,
                exists=True,
                owner=fact[0],
                group=fact[1],
                mode=fact[2],
                fingerprint=fingerprint(content),
            )
        )
    leftovers = [p for p in with_backups if stats[p] is not None]
    return facts, leftovers


# --------------------------------------------------------------------------- writing


class StagedFile(BaseModel):
    """A file to put on a server: where, whose, which mode, and the content (never shown)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    owner: str
    mode: int
    content: SecretBytes


_INSTALL_SCRIPT = r"""set -eu
dir=$1; shift
trap 'rm -rf -- "$dir"' EXIT
while [ $# -ge 4 ]; do
  src=$1; dst=$2; owner=$3; mode=$4; shift 4
  group=$(id -gn -- "$owner")
  install -o "$owner" -g "$group" -m "$mode" -- "$dir/$src" "$dst.fabflows-next"
done
"""
"""Install each staged upload as ``<dst>.fabflows-next`` with owner, owner's group and mode; the
private upload directory is removed whatever happens."""

_SWAP_SCRIPT = r"""set -eu
for p do
  [ -e "$p.fabflows-next" ] || { echo "$p.fabflows-next is missing (not staged)" >&2; exit 3; }
done
for p do
  if [ -e "$p" ]; then
    cp -p -- "$p" "$p.fabflows-prev"; rm -f -- "$p.fabflows-absent"
  else
    : > "$p.fabflows-absent"; rm -f -- "$p.fabflows-prev"
  fi
  mv -f -- "$p.fabflows-next" "$p"
done
"""

_RESTORE_SCRIPT = r"""set -u
rc=0
for p do
  if [ -e "$p.fabflows-prev" ]; then mv -f -- "$p.fabflows-prev" "$p" || rc=1
  elif [ -e "$p.fabflows-absent" ]; then rm -f -- "$p" "$p.fabflows-absent" || rc=1
  fi
  rm -f -- "$p.fabflows-next"
done
exit $rc
"""

_COMMIT_SCRIPT = r"""for p do rm -f -- "$p.fabflows-prev" "$p.fabflows-absent" "$p.fabflows-next"; done
"""

_HAS_BACKUP_SCRIPT = r"""for p do
  if [ -e "$p.fabflows-prev" ] || [ -e "$p.fabflows-absent" ]; then printf 'B\n'; else printf 'N\n'; fi
done
"""


def stage_files(remote: Remote, files: Sequence[StagedFile]) -> None:
    """Put each file's content next to its target as ``<path>.fabflows-next`` (nothing live changes).

    The content goes over SFTP into a new private directory of the SSH user (mode 700, each file
    600), then one ``sudo sh`` installs them with the right owner, group and mode and removes the
    directory. In a dry run only the install command is recorded.
    """
    if not files:
        return
    for f in files:
        check_remote_path(f.path)
    token = pysecrets.token_hex(8)
    staging = f"{STAGE_DIR_PREFIX}{token}"
    args: list[str] = []
    for i, f in enumerate(files):
        args += [str(i), f.path, f.owner, f"{f.mode:04o}"]
    if remote.dry_run:
        remote.write(sh_argv(_INSTALL_SCRIPT, f"~/{staging}", *args), sudo=True)
        return
    sftp = remote.conn.sftp()
    home = sftp.normalize(".")
    directory = posixpath.join(home, staging)
    sftp.mkdir(directory, mode=0o700)
    try:
        sftp.chmod(directory, 0o700)
        for i, f in enumerate(files):
            target = posixpath.join(directory, str(i))
            with sftp.open(target, "wb") as handle:
                handle.chmod(0o600)
                handle.write(f.content.get_secret_value())
    except BaseException:
        remote.read(["rm", "-rf", "--", directory])
        raise
    remote.write(sh_argv(_INSTALL_SCRIPT, directory, *args), sudo=True)


def swap_in(remote: Remote, paths: Sequence[str]) -> None:
    """Back up each live file and rename its staged version onto it (the change goes live)."""
    if paths:
        remote.write(sh_argv(_SWAP_SCRIPT, *paths), sudo=True)


def restore(remote: Remote, paths: Sequence[str]) -> None:
    """The compensation of :func:`swap_in` (and of :func:`stage_files`): back to the backups."""
    if paths:
        remote.write(sh_argv(_RESTORE_SCRIPT, *paths), sudo=True)


def commit(remote: Remote, paths: Sequence[str]) -> None:
    """Drop the backups once the change is known good (no compensation after this)."""
    if paths:
        remote.write(sh_argv(_COMMIT_SCRIPT, *paths), sudo=True)


def backed_up(remote: Remote, paths: Sequence[str]) -> list[str]:
    """Paths that have a backup of an earlier version (swapped, not committed)."""
    if not paths:
        return []
    lines = remote.read(sh_argv(_HAS_BACKUP_SCRIPT, *paths), sudo=True).stdout.splitlines()
    return [p for p, flag in zip(paths, lines, strict=False) if flag == "B"]


# --------------------------------------------------------------------------- secrets on stdin


def shown_with_secret(argv: Sequence[str], sudo: bool) -> str:
    """How a command fed a secret on stdin is shown: the command line, and no digest of the secret."""
    full = sudo_argv(argv) if sudo else list(argv)
    return shlex.join(full) + " < stdin(secret, not shown)"


def run_with_secret(
    remote: Remote,
    argv: Sequence[str],
    secret: SecretStr | SecretBytes,
    *,
    sudo: bool,
    change: bool,
    ok_codes: Sequence[int] = (0,),
    timeout: float | None = None,
) -> int | None:
    """Run ``argv`` with ``secret`` (plus a newline) on its stdin; return the exit code.

    Unlike :meth:`Remote.write`, neither the recorded command nor an error shows a digest of the
    stdin. ``change=True`` records the command and, in a dry run, returns None before running it.

    Raises:
        CommandError: an exit code not in ``ok_codes``, or a timeout (message: command and exit
            code, the last stderr line, never the secret).
    """
    shown = shown_with_secret(argv, sudo)
    if change:
        remote.commands.append(shown)
        if remote.dry_run:
            return None
    value = secret.get_secret_value()
    data = (value if isinstance(value, bytes) else value.encode()) + b"\n"
    full = sudo_argv(argv) if sudo else list(argv)
    code, _, err = exec_command(
        remote.conn,
        shlex.join(full),
        stdin=data,
        timeout=timeout or remote.command_timeout,
        channel_timeout=remote.channel_timeout,
    )
    stderr = err.decode("utf-8", "replace")
    if value and (value if isinstance(value, str) else value.decode("utf-8", "replace")) in stderr:
        stderr = "(error output withheld: it echoed the secret)"
    if code is None:
        raise CommandError(remote.host, shown, None, stderr, timed_out=True)
    if code not in ok_codes:
        raise CommandError(remote.host, shown, code, stderr)
    return code


# --------------------------------------------------------------------------- tasks (fleet-wide)


class HostFiles(BaseModel):
    """One server's secret-bearing files: facts with keyed prints, and backups left behind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    address: str
    role: str
    files: list[FileFact]
    leftovers: list[str] = Field(
        default_factory=list, description="Backups (.fabflows-*) an earlier run left."
    )

    def fact(self, path: str) -> FileFact | None:
        return next((f for f in self.files if f.path == path), None)

    def fingerprint_of(self, path: str) -> str | None:
        """The keyed print of ``path``'s content (None: missing, or not read)."""
        fact = self.fact(path)
        return fact.fingerprint if fact is not None else None


@task(name="describe-secret-files", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def describe_secret_files(
    pool: ConnectionPool,
    hosts: list[FleetHost],
    paths_by_address: dict[str, list[str]],
    fingerprint: Fingerprint,
    rate: RateControl | None = None,
) -> list[HostFiles]:
    """Read-only: every host's files (owner, group, mode, keyed print) and leftover backups.

    Raises:
        FleetError: a host could not be read (unreachable, sudo refused...).
    """

    def step(remote: Remote, host: FleetHost) -> HostResult:
        facts, leftovers = describe_files(
            remote, paths_by_address.get(host.address, []), fingerprint
        )
        return HostResult(
            status="unchanged",
            message=f"{len(facts)} files read"
            + (f", {len(leftovers)} leftovers" if leftovers else ""),
            output=HostFiles(
                host=host.label,
                address=host.address,
                role=host.role,
                files=facts,
                leftovers=leftovers,
            ),
        )

    result = run_fleet(
        hosts,
        step,
        pool=pool,
        rate=rate or RateControl(max_concurrency="100%", max_errors="100%"),
        dry_run=True,
        name="describe-secret-files",
    )
    result.raise_for_errors()
    return [r.output for r in result.results]


@task(
    name="read-secret-values",
    task_run_name="read-secret-values-{host.name}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=2,
)
def read_secret_values(
    pool: ConnectionPool, host: FleetHost, home: str, names: list[str]
) -> dict[str, SecretStr | None]:
    """The values in ``<home>/<name>`` on one server (None: no such file). Never persisted."""
    paths = {name: secret_path(home, name) for name in names}
    holder: dict[str, SecretStr | None] = {}

    def step(remote: Remote, h: FleetHost) -> HostResult:
        contents = read_files(remote, list(paths.values()))
        for name, path in paths.items():
            _, content = contents[path]
            holder[name] = None if content is None else secret_from_file(content)
        return HostResult(status="unchanged", message=f"read {len(paths)} secret files")

    result = run_fleet(
        [host],
        step,
        pool=pool,
        rate=RateControl(max_concurrency=1),
        dry_run=True,
        name="read-secret-values",
    )
    result.raise_for_errors()
    return holder


def _fleet(
    pool: ConnectionPool,
    hosts: Sequence[FleetHost],
    step,  # noqa: ANN001
    *,
    dry_run: bool,
    name: str,
    rate: RateControl | None = None,
    timeout: float = 120,
) -> FleetResult:
    return run_fleet(
        hosts,
        step,
        pool=pool,
        rate=rate or RateControl(max_concurrency="100%", max_errors=0),
        dry_run=dry_run,
        name=name,
        command_timeout=timeout,
    )


@task(name="stage-secret-files", cache_policy=NO_CACHE, persist_result=False, retries=0)
def stage_secret_files(
    pool: ConnectionPool,
    hosts: list[FleetHost],
    files_by_address: dict[str, list[StagedFile]],
    *,
    dry_run: bool,
) -> FleetResult:
    """Stage each host's new files as ``<path>.fabflows-next`` (nothing live changes).

    Compensation: :func:`restore_secret_files` (removes what was staged).
    """

    def step(remote: Remote, host: FleetHost) -> HostResult:
        files = files_by_address.get(host.address, [])
        if not files:
            return HostResult(status="unchanged", message="nothing to stage")
        stage_files(remote, files)
        return HostResult(
            status="changed",
            message=f"staged {len(files)} file(s): " + ", ".join(f.path for f in files),
        )

    return _fleet(pool, hosts, step, dry_run=dry_run, name="stage-secret-files")


def _paths_step(action, verb: str, paths_by_address: dict[str, list[str]]):  # noqa: ANN001, ANN202
    def step(remote: Remote, host: FleetHost) -> HostResult:
        paths = paths_by_address.get(host.address, [])
        if not paths:
            return HostResult(status="unchanged", message=f"nothing to {verb}")
        action(remote, paths)
        return HostResult(status="changed", message=f"{verb}: " + ", ".join(paths))

    return step


@task(name="swap-in-secret-files", cache_policy=NO_CACHE, retries=0)
def swap_in_secret_files(
    pool: ConnectionPool,
    hosts: list[FleetHost],
    paths_by_address: dict[str, list[str]],
    *,
    dry_run: bool,
) -> FleetResult:
    """Make the staged files live, keeping the old ones as backups (compensation: restore)."""
    step = _paths_step(swap_in, "swap in", paths_by_address)
    return _fleet(pool, hosts, step, dry_run=dry_run, name="swap-in-secret-files")


@task(name="restore-secret-files", cache_policy=NO_CACHE, retries=0)
def restore_secret_files(
    pool: ConnectionPool,
    hosts: list[FleetHost],
    paths_by_address: dict[str, list[str]],
    *,
    dry_run: bool,
) -> FleetResult:
    """Put the backups back (and drop anything staged): the compensation of stage and swap-in.

    Every host is attempted even when one fails.
    """
    step = _paths_step(restore, "restore", paths_by_address)
    return _fleet(
        pool,
        hosts,
        step,
        dry_run=dry_run,
        name="restore-secret-files",
        rate=RateControl(max_concurrency="100%", max_errors="100%"),
    )


@task(name="commit-secret-files", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def commit_secret_files(
    pool: ConnectionPool,
    hosts: list[FleetHost],
    paths_by_address: dict[str, list[str]],
    *,
    dry_run: bool,
) -> FleetResult:
    """Drop the backups: after this the change can no longer be undone by restore."""
    step = _paths_step(commit, "commit", paths_by_address)
    return _fleet(
        pool,
        hosts,
        step,
        dry_run=dry_run,
        name="commit-secret-files",
        rate=RateControl(max_concurrency="100%", max_errors="100%"),
    )
