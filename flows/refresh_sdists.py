"""refresh-sdists: bring the app repository's vendored sdists in step with requirements/apps.txt."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from packaging.utils import canonicalize_name
from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from config import FabulawsConfig
from fabflows import audit, lock
from fabflows.errors import BadInput
from fabflows.report import artifact_key, markdown_table, publish_markdown, text_table
from fabflows.runbook import load_context
from tasks.local.sdists import (
    CommitResult,
    DownloadResult,
    GitState,
    RemoveResult,
    SdistsComparison,
    commit_on_branch,
    download_sdist,
    get_git_state,
    get_sdists_state,
    remove_sdists,
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


class RefreshSdistsReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: str
    dry_run: bool
    outcome: str
    plan: RefreshSdistsPlan
    downloaded: list[DownloadResult] = Field(default_factory=list)
    removed: list[RemoveResult] = Field(default_factory=list)
    failures: list[str] = Field(default_factory=list)
    commit: CommitResult | None = None
    after: SdistsComparison | None = None

    def render_text(self) -> str:
        out = [f"{self.plan.sdists_dir}: {self.outcome}", ""]
        out.append(text_table([c.model_dump() for c in self.plan.changes]))
        out += [f"problem: {p}" for p in self.plan.problems]
        out += [f"warning: {w}" for w in self.plan.warnings]
        out += [f"FAILED: {f}" for f in self.failures]
        if self.commit:
            out.append(self.commit.summary)
        return "\n".join(out)


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


@flow(name=FLOW_NAME, log_prints=False)
def refresh_sdists(
    environment: str,
    deployment: str | None = None,
    config: str | None = None,
    dry_run: bool = True,
    package: str | None = None,
    commit: bool = False,
) -> RefreshSdistsReport:
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

    **Rollback:** each package is refreshed on its own (download to a temporary directory, then the
    old version removed), so a failure leaves that package as it was; removed files are kept in the
    run's backup directory under `state_dir`. With `commit`, `git switch -` and deleting the branch
    undo the commit.

    Args:
        environment: Environment whose config to use (the sdists are shared by all).
        deployment: Deployment (default: the config's default_deployment).
        config: Path of the config file (default: $FABFLOWS_CONFIG or ./fabflows.yaml).
        dry_run: Only show the plan (default). Untick to apply.
        package: Refresh only this package (default: all of apps.txt).
        commit: Commit the changes on a new branch (not pushed).
    """
    logger = get_run_logger()
    ctx = load_context(environment, deployment, config)
    env = ctx.env
    audit.record_start(env)
    settings = ctx.config.fabflows.sdists
    repo, requirements, sdists = sdists_paths(ctx.config)
    sdists_rel = str(sdists.relative_to(repo)) if sdists.is_relative_to(repo) else str(sdists)

    comparison = get_sdists_state(str(requirements), str(sdists))
    git: GitState | None = get_git_state(str(repo), [sdists_rel]) if commit else None
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    branch = f"{settings.branch_prefix}-{stamp}" if commit else None
    plan = plan_refresh_sdists(comparison, package, branch, str(repo))
    problems = list(plan.problems)
    if git is not None and not git.is_repository:
        problems.append(f"{repo} is not a git work tree: cannot commit")
    if git is not None and git.dirty:
        problems.append(
            f"uncommitted changes under {sdists_rel} ({', '.join(git.dirty[:5])}): commit or stash "
            "them first, or run without commit"
        )
    plan = plan.model_copy(update={"problems": problems})
    plan_md = render_plan(plan)
    key = artifact_key(FLOW_NAME, env.deployment, env.environment)
    publish_markdown(key + "-plan", plan_md, f"sdists plan for {repo}")
    if plan.problems:
        raise BadInput("; ".join(plan.problems))

    def report(outcome: str, **kw) -> RefreshSdistsReport:
        audit.record_summary(env, outcome=outcome, plan_markdown=plan_md, flow_name=FLOW_NAME)
        return RefreshSdistsReport(
            environment=env.environment, dry_run=dry_run, outcome=outcome, plan=plan, **kw
        )

    if dry_run:
        return report(f"dry run: {len(plan.changes)} change(s)")
    if not plan.changes:
        return report("up to date: nothing to change", after=comparison)

    backup = Path(ctx.config.fabflows.state_dir).expanduser() / "sdists-removed" / stamp
    downloaded: list[DownloadResult] = []
    removed: list[RemoveResult] = []
    failures: list[str] = []
    with lock.environment_lock(f"sdists:{repo}", ctx.config):
        wanted = plan.downloads
        refreshed: set[str] = set()
        for start in range(0, len(wanted), settings.parallel_downloads):
            batch = wanted[start : start + settings.parallel_downloads]
            futures = [
                download_sdist.submit(
                    c.target.split("==")[0],
                    c.target.split("==", 1)[1],
                    str(sdists),
                    settings.index_url,
                    dry_run=False,
                    timeout=settings.download_timeout_seconds,
                )
                for c in batch
            ]
            for change, future in zip(batch, futures, strict=True):
                try:
                    downloaded.append(future.result())
                    refreshed.add(canonicalize_name(change.package))
                except Exception as exc:  # counted and reported; the run fails below
                    failures.append(str(exc))
                    logger.error("%s", exc)
        # a package's other versions go only once its pinned one is in place
        to_remove = [
            c.target
            for c in plan.removals
            if canonicalize_name(c.package) in refreshed
            or canonicalize_name(c.package) not in {canonicalize_name(d.package) for d in wanted}
        ]
        if to_remove:
            removed.append(remove_sdists(str(sdists), to_remove, str(backup), dry_run=False))
        after = get_sdists_state(str(requirements), str(sdists))
        keys = {canonicalize_name(c.package) for c in plan.changes}
        wrong = [p for p in after.packages if p.key in keys and p.state != "ok"]
        if wrong and not failures:
            failures += [f"{p.name} is still {p.state} after the refresh" for p in wrong]
        result = None
        if commit and not failures:
            message = (
                f"Refresh vendored sdists ({plan.package or 'all packages'}) with fabflows\n\n"
                + "\n".join(f"{c.action} {c.target}: {c.reason}" for c in plan.changes)
            )
            result = commit_on_branch(str(repo), [sdists_rel], branch, message, dry_run=False)
    outcome = (
        f"{len(failures)} failure(s)"
        if failures
        else f"refreshed: {len(downloaded)} downloaded, "
        f"{sum(len(r.removed) for r in removed)} removed"
    )
    final = report(
        outcome,
        downloaded=downloaded,
        removed=removed,
        failures=failures,
        commit=result,
        after=after,
    )
    if failures:
        raise RuntimeError(f"refresh-sdists: {outcome}: " + "; ".join(failures))
    return final
