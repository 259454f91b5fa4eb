"""refresh-sdists: bring the app repository's vendored sdists in step with requirements/apps.txt."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from packaging.utils import canonicalize_name
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from config import EnvironmentConfig, FabulawsConfig
from fabflows.errors import BadInput
from fabflows.report import markdown_table
from fabflows.runbook import RunContext
from fabflows.runtime.engine import Runbook, RunbookReport, Scope, Step, execute
from fabflows.runtime.plan import Change, RunbookPlan
from tasks.local.sdists import (
    GitState,
    RemoveResult,
    SdistsComparison,
    commit_on_branch,
    download_sdist,
    get_git_state,
    get_sdists_state,
    remove_sdists,
    restore_sdists,
)

FLOW_NAME = "refresh-sdists"


class SdistChange(BaseModel):
    """One file to add or remove, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: str = Field(description="download or remove")
    package: str
    target: str = Field(description="name==version to download, or the file to remove.")
    reason: str


class RefreshSdistsPlan(BaseModel):
    """What refresh-sdists would change in the sdists directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repository: str
    requirements_file: str
    sdists_dir: str
    package: str | None = Field(description="The one package refreshed (None: all).")
    changes: list[SdistChange]
    up_to_date: list[str] = Field(description="Packages already right.")
    unknown_files: list[str]
    problems: list[str] = Field(description="Refused before any change.")
    warnings: list[str] = Field(default_factory=list)
    commit_branch: str | None = None

    @property
    def downloads(self) -> list[SdistChange]:
        return [c for c in self.changes if c.action == "download"]

    @property
    def removals(self) -> list[SdistChange]:
        return [c for c in self.changes if c.action == "remove"]


def plan_refresh_sdists(
    comparison: SdistsComparison,
    package: str | None = None,
    commit_branch: str | None = None,
    repository: str = "",
) -> RefreshSdistsPlan:
    """Pure: the downloads and removals that make the directory match the requirements.

    All packages: download missing and stale ones; remove other versions and packages no longer
    required. One package: only its own files. Requirement lines that cannot be vendored refuse an
    all-packages refresh (fix apps.txt first) and are warnings for a one-package refresh.
    """
    changes: list[SdistChange] = []
    problems: list[str] = []
    warnings: list[str] = []
    packages = comparison.packages
    if package is not None:
        key = canonicalize_name(package)
        packages = [p for p in comparison.packages if p.key == key and p.wanted is not None]
        if not packages:
            problems.append(f"{package} is not pinned in {comparison.requirements_file}")
        warnings += comparison.problems
    else:
        problems += comparison.problems
    for p in packages:
        if p.state in ("missing", "stale"):
            why = "missing" if p.state == "missing" else f"stale ({', '.join(p.files)})"
            changes.append(
                SdistChange(
                    action="download", package=p.name, target=f"{p.name}=={p.wanted}", reason=why
                )
            )
        for f in p.remove:
            why = "not in the requirements" if p.wanted is None else f"not the pinned {p.wanted}"
            changes.append(SdistChange(action="remove", package=p.name, target=f, reason=why))
    return RefreshSdistsPlan(
        repository=repository,
        requirements_file=comparison.requirements_file,
        sdists_dir=comparison.sdists_dir,
        package=package,
        changes=changes,
        up_to_date=[p.name for p in packages if p.state == "ok"],
        unknown_files=comparison.unknown_files,
        problems=problems,
        warnings=warnings,
        commit_branch=commit_branch if changes else None,
    )


def render_plan(plan: RefreshSdistsPlan) -> str:
    scope = f"package `{plan.package}`" if plan.package else "all packages"
    out = [f"# refresh-sdists: `{plan.sdists_dir}` ({scope})", ""]
    out.append(
        f"**{len(plan.downloads)} download(s), {len(plan.removals)} removal(s); "
        f"{len(plan.up_to_date)} package(s) up to date.**"
    )
    out += ["", markdown_table([c.model_dump() for c in plan.changes]), ""]
    if plan.unknown_files:
        out.append(f"Not sdists (left alone): {', '.join(plan.unknown_files)}")
    if plan.commit_branch:
        out.append(f"Then commit on a new branch `{plan.commit_branch}` (not pushed).")
    if plan.problems:
        out += ["", "**Refused:**", *[f"- {p}" for p in plan.problems]]
    if plan.warnings:
        out += ["", "**Warnings:**", *[f"- {w}" for w in plan.warnings]]
    out += [
        "",
        "Downloads use `pip download --no-binary :all: --no-deps` into a temporary directory; a "
        "failed download changes nothing. Removed files are kept in the run's backup directory.",
    ]
    return "\n".join(out)


def sdists_paths(config: FabulawsConfig) -> tuple[Path, Path, Path]:
    """(repository, requirements file, sdists directory) from config.

    Raises:
        BadInput: ``fabflows.sdists.app_repo`` is not set or not a directory.
    """
    settings = config.fabflows.sdists
    if not settings.app_repo:
        raise BadInput(
            "fabflows.sdists.app_repo is not set: the app repository checkout to refresh"
        )
    repo = Path(settings.app_repo).expanduser()
    if not repo.is_dir():
        raise BadInput(f"fabflows.sdists.app_repo {repo} is not a directory")
    sdists = settings.sdists_dir or (config.requirements_sdists or "requirements/sdists")
    return repo, repo / settings.requirements_file, repo / sdists.strip("/")


class SdistsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    package: str | None = None
    commit: bool = False


class SdistsFacts(BaseModel):
    repository: str
    requirements: str
    sdists: str
    sdists_rel: str
    comparison: SdistsComparison
    git: GitState | None = None
    branch: str | None = None
    backup: str
    index_url: str | None = None
    parallel_downloads: int = 4
    download_timeout: float = 300


class SdistsRunPlan(RunbookPlan):
    """The engine's plan: the sdists plan, and where the run keeps what it removes."""

    DIGEST_EXCLUDE: ClassVar[set[str]] = {"branch", "backup"}

    sdists: RefreshSdistsPlan
    requirements: str
    sdists_rel: str
    branch: str | None = None
    backup: str
    index_url: str | None = None
    parallel_downloads: int = 4
    download_timeout: float = 300


def plan_run(facts: SdistsFacts, params: SdistsParams, env: EnvironmentConfig) -> SdistsRunPlan:
    """Pure: the sdists plan plus the git checks, as the engine's plan."""
    plan = plan_refresh_sdists(facts.comparison, params.package, facts.branch, facts.repository)
    problems = list(plan.problems)
    git = facts.git
    if git is not None and not git.is_repository:
        problems.append(f"{facts.repository} is not a git work tree: cannot commit")
    if git is not None and git.dirty:
        problems.append(
            f"uncommitted changes under {facts.sdists_rel} ({', '.join(git.dirty[:5])}): commit or "
            "stash them first, or run without commit"
        )
    plan = plan.model_copy(update={"problems": problems, "commit_branch": None})
    steps = {"download": "download-sdists", "remove": "remove-old-sdists"}
    changes = [
        Change(target=c.target, action=c.action, detail=c.reason, step=steps[c.action])
        for c in plan.changes
    ]
    branch = facts.branch if plan.changes else None
    if branch:
        changes.append(
            Change(
                target="a new local branch",
                action="commit the sdists",
                detail="named when applied; not pushed",
                step="commit",
            )
        )
    return SdistsRunPlan(
        title=f"refresh-sdists: {plan.sdists_dir} ({plan.package or 'all packages'})",
        environment=env.label,
        changes=changes,
        noops=[f"{p} up to date" for p in plan.up_to_date],
        problems=problems,
        notes=plan.warnings
        + (
            [f"not sdists (left alone): {', '.join(plan.unknown_files)}"]
            if plan.unknown_files
            else []
        ),
        sdists=plan,
        requirements=facts.requirements,
        sdists_rel=facts.sdists_rel,
        branch=branch,
        backup=facts.backup,
        index_url=facts.index_url,
        parallel_downloads=facts.parallel_downloads,
        download_timeout=facts.download_timeout,
    )


def _download(plan: SdistsRunPlan):  # noqa: ANN202
    wanted = plan.sdists.downloads

    def apply(scope: Scope) -> dict[str, Any]:
        directory = plan.sdists.sdists_dir
        got: list[str] = []
        failures: list[str] = []
        for start in range(0, len(wanted), plan.parallel_downloads):
            batch = wanted[start : start + plan.parallel_downloads]
            futures = [
                download_sdist.submit(
                    c.target.split("==")[0],
                    c.target.split("==", 1)[1],
                    directory,
                    plan.index_url,
                    dry_run=False,
                    timeout=plan.download_timeout,
                )
                for c in batch
            ]
            for future in futures:
                try:
                    result = future.result()
                    if result.filename:
                        got.append(result.filename)
                        scope.record(downloaded=got)  # what undo removes, before going on
                except Exception as exc:  # counted; the step fails after the batch
                    failures.append(str(exc))
        if failures:
            raise RuntimeError(f"{len(failures)} download(s) failed: " + "; ".join(failures))
        return {"downloaded": got, "summary": f"downloaded {', '.join(got) or 'nothing'}"}

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        for name in data.get("downloaded", []):
            (Path(plan.sdists.sdists_dir) / name).unlink(missing_ok=True)

    return apply, undo


def _remove(plan: SdistsRunPlan):  # noqa: ANN202
    targets = [c.target for c in plan.sdists.removals]

    def apply(scope: Scope) -> dict[str, Any]:
        scope.record(backup_dir=plan.backup, removed=targets)
        result = remove_sdists(plan.sdists.sdists_dir, targets, plan.backup, dry_run=False)
        return {
            "backup_dir": result.backup_dir,
            "removed": result.removed,
            "summary": result.summary,
        }

    def undo(scope: Scope, data: dict[str, Any]) -> None:
        removed = RemoveResult(
            changed=True,
            dry_run=False,
            summary="",
            removed=data.get("removed", []),
            backup_dir=data.get("backup_dir", plan.backup),
        )
        restore_sdists(plan.sdists.sdists_dir, removed, dry_run=False)

    return apply, undo


def _commit(plan: SdistsRunPlan) -> Step:
    def apply(scope: Scope) -> dict[str, Any]:
        message = (
            f"Refresh vendored sdists ({plan.sdists.package or 'all packages'}) with fabflows\n\n"
            + "\n".join(f"{c.action} {c.target}: {c.reason}" for c in plan.sdists.changes)
        )
        assert plan.branch is not None
        result = commit_on_branch(
            plan.sdists.repository, [plan.sdists_rel], plan.branch, message, dry_run=False
        )
        return result.model_dump(mode="json")

    return Step(
        "commit",
        apply,
        no_undo="a local branch, never pushed: `git switch -` and `git branch -D` undo it",
    )


class RefreshSdists(Runbook[SdistsParams, SdistsFacts, SdistsRunPlan]):
    name = FLOW_NAME
    Params = SdistsParams
    plan_type = SdistsRunPlan

    def validate(self, rc: RunContext, params: SdistsParams) -> None:
        sdists_paths(rc.config)

    def gather(self, scope: Scope, params: SdistsParams) -> SdistsFacts:
        config = scope.rc.config
        repo, requirements, sdists = sdists_paths(config)
        rel = str(sdists.relative_to(repo)) if sdists.is_relative_to(repo) else str(sdists)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        settings = config.fabflows.sdists
        return SdistsFacts(
            repository=str(repo),
            requirements=str(requirements),
            sdists=str(sdists),
            sdists_rel=rel,
            comparison=get_sdists_state(str(requirements), str(sdists)),
            git=get_git_state(str(repo), [rel]) if params.commit else None,
            branch=f"{settings.branch_prefix}-{stamp}" if params.commit else None,
            backup=str(Path(config.fabflows.state_dir).expanduser() / "sdists-removed" / stamp),
            index_url=settings.index_url,
            parallel_downloads=settings.parallel_downloads,
            download_timeout=settings.download_timeout_seconds,
        )

    def plan(
        self, facts: SdistsFacts, params: SdistsParams, env: EnvironmentConfig
    ) -> SdistsRunPlan:
        return plan_run(facts, params, env)

    def steps(self, plan: SdistsRunPlan, params: SdistsParams) -> list[Step]:
        out: list[Step] = []
        if plan.sdists.downloads:
            apply, undo = _download(plan)
            out.append(Step("download-sdists", apply, undo))
        if plan.sdists.removals:
            apply, undo = _remove(plan)
            out.append(Step("remove-old-sdists", apply, undo))
        if plan.branch:
            out.append(_commit(plan))
        return out

    def verify(self, scope: Scope, plan: SdistsRunPlan, params: SdistsParams) -> list[str]:
        after = get_sdists_state(plan.requirements, plan.sdists.sdists_dir)
        keys = {canonicalize_name(c.package) for c in plan.sdists.changes}
        return [
            f"{p.name} is still {p.state}"
            for p in after.packages
            if p.key in keys and p.state != "ok"
        ]


RUNBOOK = RefreshSdists()


@flow(name=FLOW_NAME, log_prints=False)
def refresh_sdists(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    package: str | None = None,
    commit: bool = False,
) -> RunbookReport:
    """Refresh the vendored sdists of the app repository (the maintenance doc's "dependency sdists").

    **When to run:** after changing `requirements/apps.txt`, or to check that the sdists deploys
    install from (`pip install --no-index --find-links`) match it. The doc's commands use
    `pip install -d`, which pip no longer has; this runs today's
    `pip download --no-binary :all: --no-deps -d <sdists> name==version`.

    **What it compares:** every pinned requirement (following `-r` includes) with the directory:
    missing, stale (only other versions present), surplus (older versions next to the pinned one),
    and extras (packages no longer required). Files that are not sdists are left alone.

    **Blast radius:** files in the sdists directory of the checkout at `fabflows.sdists.app_repo`
    on the machine running the flow (and, with `commit`, a new local branch: never pushed). No
    server is touched.

    **Dry run shows:** each download and removal with its reason.

    **Refused before any change:** a missing apps.txt or sdists directory, a package that is not
    pinned, requirement lines that cannot be vendored (for an all-packages refresh), uncommitted
    changes in the sdists directory when `commit` is asked for.

    **Rollback:** each download goes to a temporary directory first; if any package fails, the
    sdists the run already downloaded are removed again and nothing else is changed (the directory
    is as found). Removed files are kept in the run's backup directory under `state_dir`; a failure
    after the removals moves them back. Both are journaled, so `fabflows recover` puts the
    directory back after a killed run too. With `commit`, `git switch -` and deleting the branch
    undo the commit.

    Args:
        environment: Environment whose config to use (the sdists are shared by all).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
        package: Refresh only this package (default: all of apps.txt).
        commit: Commit the changes on a new branch (not pushed).
    """
    return execute(RUNBOOK, locals())
