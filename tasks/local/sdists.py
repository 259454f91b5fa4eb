"""Vendored sdists of an app repository: ``requirements/apps.txt`` vs ``requirements/sdists/``.

FabulAWS deploys with ``pip install --no-index --find-links=file://<code_root>/<requirements_sdists>``,
so every pinned requirement must have its source distribution in the repository. The maintenance
doc's refresh commands use ``pip install -d``, an option pip removed long ago; the equivalent today
is ``pip download --no-binary :all: --no-deps -d <dir> name==version``.

- :func:`read_requirements` (pure, reads one file tree) parses pinned requirements, following ``-r``
  includes; anything that cannot be vendored as an sdist (unpinned, ``-e``, URLs) is a problem.
- :func:`compare_sdists` (pure) classifies each package: ok, missing, stale (only other versions
  present), surplus (the wanted version plus others), extra (not required at all), and lists files
  that are not sdists.
- :func:`get_sdists_state` (read task) does both for a checkout.
- :func:`download_sdist` (write task) downloads one ``name==version`` into a temporary directory
  beside the sdists and moves the one sdist it got into place: a failed download changes nothing.
- :func:`remove_sdists` (write task) moves files into a backup directory (its compensation,
  :func:`restore_sdists`, moves them back).
- :func:`get_git_state` / :func:`commit_on_branch`: the optional commit on a new branch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidSdistFilename, canonicalize_name, parse_sdist_filename
from packaging.version import InvalidVersion, Version
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from fabflows.errors import BadInput
from tasks.plan import StepResult

_INCLUDE = re.compile(r"^(?:-r|--requirement)[\s=]*(\S+)$")

PackageState = Literal["ok", "missing", "stale", "surplus", "extra"]

SDIST_SUFFIXES = (".tar.gz", ".zip")
IGNORED_FILES = (".gitkeep", "README", "README.md", "README.txt")


class SdistError(RuntimeError):
    """pip could not download a package's sdist; the message names it and pip's last words."""


# --------------------------------------------------------------------------- models


class PinnedRequirement(BaseModel):
    """One ``name==version`` line of the requirements."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="As written (Django, django_storages).")
    key: str = Field(description="PEP 503 normalized name (django, django-storages).")
    version: str
    source: str = Field(description="file:line it comes from.")


class RequirementsFile(BaseModel):
    """The pinned requirements, and the lines that cannot be vendored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    requirements: list[PinnedRequirement]
    problems: list[str] = Field(default_factory=list)


class SdistFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    filename: str
    key: str
    version: str


class PackageStatus(BaseModel):
    """One package: what the requirements want and what the directory holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    name: str
    wanted: str | None = Field(description="Pinned version (None: not required).")
    files: list[str] = Field(description="Its sdists in the directory.")
    state: PackageState
    remove: list[str] = Field(description="Files that should go (other versions, or not required).")


class SdistsComparison(BaseModel):
    """apps.txt vs the sdists directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requirements_file: str
    sdists_dir: str
    packages: list[PackageStatus]
    unknown_files: list[str] = Field(description="Files that are not sdists (left alone).")
    problems: list[str] = Field(description="Requirement lines that cannot be vendored.")

    def by_state(self, state: PackageState) -> list[PackageStatus]:
        return [p for p in self.packages if p.state == state]

    @property
    def clean(self) -> bool:
        return all(p.state == "ok" for p in self.packages)


# --------------------------------------------------------------------------- pure parts


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0] if not raw.lstrip().startswith("#") else ""
        if not buf:
            start = number
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append((start, buf.strip()))
        buf = ""
    if buf.strip():
        out.append((start, buf.strip()))
    return out


def parse_requirements(
    text: str, source: str
) -> tuple[list[PinnedRequirement], list[str], list[str]]:
    """Pure: (pinned requirements, problems, included files) of one requirements file's text."""
    reqs: list[PinnedRequirement] = []
    problems: list[str] = []
    includes: list[str] = []
    for number, line in _logical_lines(text):
        where = f"{source}:{number}"
        include = _INCLUDE.match(line)
        if include:
            includes.append(include.group(1))
            continue
        if line.startswith(("-e", "--editable")):
            problems.append(
                f"{where}: editable requirement {line!r} cannot be vendored as an sdist"
            )
            continue
        if line.startswith("-"):
            continue  # --index-url, --find-links, -c ...: pip options, not packages
        spec = line.split(" --", 1)[0].strip()  # drop per-requirement options (--hash=...)
        try:
            req = Requirement(spec)
        except InvalidRequirement as exc:
            problems.append(f"{where}: {line!r} is not a requirement ({exc})")
            continue
        if req.url:
            problems.append(
                f"{where}: {req.name} comes from a URL; it cannot be vendored by version"
            )
            continue
        pins = [s for s in req.specifier if s.operator in ("==", "===") and "*" not in s.version]
        if len(pins) != 1 or len(req.specifier) != 1:
            problems.append(
                f"{where}: {req.name}{req.specifier} is not pinned to one version (name==version)"
            )
            continue
        reqs.append(
            PinnedRequirement(
                name=req.name,
                key=canonicalize_name(req.name),
                version=pins[0].version,
                source=where,
            )
        )
    return reqs, problems, includes


def parse_sdist(filename: str) -> SdistFile | None:
    """``Django-4.2.7.tar.gz`` -> (django, 4.2.7); None for anything that is not an sdist name."""
    if not filename.endswith(SDIST_SUFFIXES):
        return None
    try:
        name, version = parse_sdist_filename(filename)
    except (InvalidSdistFilename, InvalidVersion):
        return None
    return SdistFile(filename=filename, key=canonicalize_name(name), version=str(version))


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def compare_sdists(
    requirements: RequirementsFile, filenames: list[str], sdists_dir: str
) -> SdistsComparison:
    """Pure: classify every required package and every file of the directory."""
    files: dict[str, list[SdistFile]] = {}
    unknown = []
    for name in sorted(filenames):
        if name in IGNORED_FILES or name.startswith("."):
            continue
        parsed = parse_sdist(name)
        if parsed is None:
            unknown.append(name)
        else:
            files.setdefault(parsed.key, []).append(parsed)
    problems = list(requirements.problems)
    wanted: dict[str, PinnedRequirement] = {}
    for req in requirements.requirements:
        if req.key in wanted and not _same_version(wanted[req.key].version, req.version):
            problems.append(
                f"{req.source}: {req.name}=={req.version} conflicts with "
                f"{wanted[req.key].name}=={wanted[req.key].version} ({wanted[req.key].source})"
            )
            continue
        wanted.setdefault(req.key, req)
    packages = []
    for key in sorted(set(wanted) | set(files)):
        have = files.get(key, [])
        names = [f.filename for f in have]
        req = wanted.get(key)
        if req is None:
            packages.append(
                PackageStatus(
                    key=key, name=key, wanted=None, files=names, state="extra", remove=names
                )
            )
            continue
        right = [f for f in have if _same_version(f.version, req.version)]
        others = [f.filename for f in have if f not in right]
        if not have:
            state: PackageState = "missing"
        elif not right:
            state = "stale"
        elif others or len(right) > 1:
            state = "surplus"
            others += [f.filename for f in right[1:]]
        else:
            state = "ok"
        packages.append(
            PackageStatus(
                key=key, name=req.name, wanted=req.version, files=names, state=state, remove=others
            )
        )
    return SdistsComparison(
        requirements_file=requirements.path,
        sdists_dir=sdists_dir,
        packages=packages,
        unknown_files=unknown,
        problems=problems,
    )


def pip_download_argv(
    requirement: str, dest: str, index_url: str | None, python: str | None = None
) -> list[str]:
    """Today's form of the doc's ``pip install -d``: one sdist, no wheels, no dependencies."""
    argv = [
        python or sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        "--no-input",
        "--disable-pip-version-check",
        "--dest",
        dest,
    ]
    if index_url:
        argv += ["--index-url", index_url]
    return [*argv, requirement]


# --------------------------------------------------------------------------- read tasks


def read_requirements(path: Path) -> RequirementsFile:
    """Parse ``path`` and the files it includes with ``-r`` (each once).

    Raises:
        BadInput: the file (or an included one) does not exist.
    """
    reqs: list[PinnedRequirement] = []
    problems: list[str] = []
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop(0).resolve()
        if current in seen:
            continue
        seen.add(current)
        try:
            text = current.read_text()
        except FileNotFoundError:
            raise BadInput(f"requirements file {current} does not exist") from None
        r, p, includes = parse_requirements(text, str(current))
        reqs += r
        problems += p
        todo += [current.parent / inc for inc in includes]
    return RequirementsFile(path=str(path), requirements=reqs, problems=problems)


@task(cache_policy=NO_CACHE, name="get-sdists-state", retries=0)
def get_sdists_state(requirements_path: str, sdists_dir: str) -> SdistsComparison:
    """Compare the requirements with the sdists directory (read-only).

    Raises:
        BadInput: the requirements file or the sdists directory does not exist.
    """
    directory = Path(sdists_dir)
    if not directory.is_dir():
        raise BadInput(f"sdists directory {directory} does not exist")
    reqs = read_requirements(Path(requirements_path))
    names = [p.name for p in directory.iterdir() if p.is_file()]
    return compare_sdists(reqs, names, str(directory))


# --------------------------------------------------------------------------- write tasks


class DownloadResult(StepResult):
    key: str
    requirement: str
    filename: str | None = Field(description="The sdist now in the directory (None: dry run).")
    seconds: float = 0.0


@task(
    cache_policy=NO_CACHE,
    name="download-sdist",
    task_run_name="download-sdist-{name}-{version}",
    retries=0,
    tags=["non-idempotent"],
)
def download_sdist(
    name: str,
    version: str,
    sdists_dir: str,
    index_url: str | None = None,
    *,
    dry_run: bool,
    timeout: float = 600,
    python: str | None = None,
) -> DownloadResult:
    """Download the sdist of ``name==version`` into ``sdists_dir`` (no-op if it is there already).

    pip downloads into a temporary directory beside the sdists; only a single sdist of exactly
    that name and version is moved into place, so a failure leaves the directory as it was.

    Raises:
        SdistError: pip failed, timed out, or got something other than that one sdist.
    """
    import time

    key = canonicalize_name(name)
    requirement = f"{name}=={version}"
    directory = Path(sdists_dir)
    present = [
        f.name
        for f in directory.iterdir()
        if (p := parse_sdist(f.name)) and p.key == key and _same_version(p.version, version)
    ]
    logger = get_run_logger()
    if present:
        return DownloadResult(
            changed=False,
            dry_run=dry_run,
            key=key,
            requirement=requirement,
            filename=present[0],
            summary=f"{present[0]} already present",
        )
    if dry_run:
        return DownloadResult(
            changed=True,
            dry_run=True,
            key=key,
            requirement=requirement,
            filename=None,
            summary=f"Would download {requirement}",
        )
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".fabflows-download-", dir=directory))
    try:
        argv = pip_download_argv(requirement, str(tmp), index_url, python)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise SdistError(
                f"{requirement}: pip download timed out after {timeout:.0f} s"
            ) from None
        if proc.returncode != 0:
            last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-3:]
            raise SdistError(f"{requirement}: pip download failed: " + " | ".join(last))
        got = [p for p in tmp.iterdir() if p.is_file()]
        parsed = [parse_sdist(p.name) for p in got]
        if (
            len(got) != 1
            or parsed[0] is None
            or parsed[0].key != key
            or not _same_version(parsed[0].version, version)
        ):
            raise SdistError(
                f"{requirement}: expected its one sdist, pip saved {[p.name for p in got]}"
            )
        target = directory / got[0].name
        os.replace(got[0], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = f"Downloaded {target.name}"
    logger.info("%s", summary)
    return DownloadResult(
        changed=True,
        dry_run=False,
        key=key,
        requirement=requirement,
        filename=target.name,
        summary=summary,
        seconds=round(time.monotonic() - started, 2),
    )


class RemoveResult(StepResult):
    removed: list[str] = Field(description="Files moved out of the sdists directory.")
    backup_dir: str = Field(description="Where they are now (restore_sdists moves them back).")


@task(cache_policy=NO_CACHE, name="remove-sdists", retries=0)
def remove_sdists(
    sdists_dir: str, filenames: list[str], backup_dir: str, *, dry_run: bool
) -> RemoveResult:
    """Move ``filenames`` out of the sdists directory into ``backup_dir`` (missing ones: no-op)."""
    directory = Path(sdists_dir)
    present = [f for f in filenames if (directory / f).is_file()]
    if not present:
        return RemoveResult(
            changed=False,
            dry_run=dry_run,
            summary="nothing to remove",
            removed=[],
            backup_dir=backup_dir,
        )
    if dry_run:
        return RemoveResult(
            changed=True,
            dry_run=True,
            summary=f"Would remove {', '.join(present)}",
            removed=present,
            backup_dir=backup_dir,
        )
    Path(backup_dir).mkdir(parents=True, exist_ok=True)
    for f in present:
        shutil.move(directory / f, Path(backup_dir) / f)
    summary = f"Removed {', '.join(present)} (kept in {backup_dir})"
    get_run_logger().info("%s", summary)
    return RemoveResult(
        changed=True, dry_run=False, summary=summary, removed=present, backup_dir=backup_dir
    )


@task(cache_policy=NO_CACHE, name="restore-sdists", retries=0)
def restore_sdists(sdists_dir: str, removed: RemoveResult, *, dry_run: bool) -> StepResult:
    """The compensation of :func:`remove_sdists`: move the recorded files back."""
    back = [f for f in removed.removed if (Path(removed.backup_dir) / f).is_file()]
    if not back:
        return StepResult(changed=False, dry_run=dry_run, summary="nothing to restore")
    if dry_run:
        return StepResult(changed=True, dry_run=True, summary=f"Would restore {', '.join(back)}")
    for f in back:
        shutil.move(Path(removed.backup_dir) / f, Path(sdists_dir) / f)
    return StepResult(changed=True, dry_run=False, summary=f"Restored {', '.join(back)}")


# --------------------------------------------------------------------------- git


class GitState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    is_repository: bool
    branch: str | None = None
    head: str | None = None
    dirty: list[str] = Field(
        default_factory=list, description="Uncommitted paths under the paths asked about."
    )


def _git(repo: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["git", "-C", repo, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip()}")
    return proc


@task(cache_policy=NO_CACHE, name="get-git-state", retries=0)
def get_git_state(repo: str, paths: list[str]) -> GitState:
    """Is ``repo`` a git work tree, on which branch, and what is uncommitted under ``paths``."""
    if _git(repo, "rev-parse", "--is-inside-work-tree", check=False).returncode != 0:
        return GitState(is_repository=False)
    branch = _git(repo, "branch", "--show-current").stdout.strip() or None
    head = _git(repo, "rev-parse", "--verify", "-q", "HEAD", check=False).stdout.strip() or None
    status = _git(repo, "status", "--porcelain", "--untracked-files=all", "--", *paths).stdout
    return GitState(
        is_repository=True,
        branch=branch,
        head=head,
        dirty=[line[3:] for line in status.splitlines() if line.strip()],
    )


class CommitResult(StepResult):
    branch: str
    commit: str | None = None


@task(
    cache_policy=NO_CACHE,
    name="commit-on-branch",
    task_run_name="commit-on-branch-{branch}",
    retries=0,
    tags=["non-idempotent"],
)
def commit_on_branch(
    repo: str, paths: list[str], branch: str, message: str, *, dry_run: bool
) -> CommitResult:
    """Create ``branch`` at HEAD, switch to it and commit the changes under ``paths`` (nothing else).

    Not pushed. No compensation is needed beyond git's own (``git switch -`` and delete the branch).
    """
    if dry_run:
        return CommitResult(
            changed=True,
            dry_run=True,
            branch=branch,
            summary=f"Would commit {', '.join(paths)} on a new branch {branch}",
        )
    _git(repo, "switch", "-c", branch)
    _git(repo, "add", "-A", "--", *paths)
    if _git(repo, "diff", "--cached", "--quiet", "--", *paths, check=False).returncode == 0:
        return CommitResult(
            changed=False,
            dry_run=False,
            branch=branch,
            summary=f"nothing to commit; branch {branch} created at HEAD",
        )
    ident = []
    if not _git(repo, "config", "user.email", check=False).stdout.strip():
        ident = ["-c", "user.name=fabflows", "-c", "user.email=fabflows@localhost"]
    _git(repo, *ident, "commit", "-q", "-m", message, "--", *paths)
    commit = _git(repo, "rev-parse", "HEAD").stdout.strip()
    summary = f"Committed on {branch} ({commit[:10]})"
    get_run_logger().info("%s", summary)
    return CommitResult(changed=True, dry_run=False, branch=branch, commit=commit, summary=summary)
