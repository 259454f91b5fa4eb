"""refresh-sdists: the plan table-tested; the flow on a real git checkout with a local index."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabflows.errors import BadInput
from fabflows.testing.configs import write_config
from fabflows.testing.package_index import PackageIndex, build_sdist
from flows.refresh_sdists import plan_refresh_sdists, refresh_sdists
from tasks.local.sdists import RequirementsFile, compare_sdists, parse_requirements


def _comparison(text: str, files: list[str]):
    reqs, problems, _ = parse_requirements(text, "apps.txt")
    return compare_sdists(
        RequirementsFile(path="apps.txt", requirements=reqs, problems=problems), files, "sdists"
    )


CMP = _comparison(
    "alpha==1.1\nbeta-pkg==2.0\ngamma==3.0\n",
    ["alpha-1.0.tar.gz", "beta_pkg-2.0.tar.gz", "omega-1.0.tar.gz"],
)


def _actions(plan) -> list[tuple[str, str]]:
    return [(c.action, c.target) for c in plan.changes]


def test_plan_all_packages() -> None:
    plan = plan_refresh_sdists(CMP)
    assert _actions(plan) == [
        ("download", "alpha==1.1"),
        ("remove", "alpha-1.0.tar.gz"),
        ("download", "gamma==3.0"),
        ("remove", "omega-1.0.tar.gz"),
    ]
    assert plan.up_to_date == ["beta-pkg"] and not plan.problems


def test_plan_one_package_touches_only_it() -> None:
    plan = plan_refresh_sdists(CMP, package="Alpha")
    assert _actions(plan) == [("download", "alpha==1.1"), ("remove", "alpha-1.0.tar.gz")]


def test_plan_refuses_unknown_package_and_unvendorable_lines() -> None:
    assert "omega is not pinned" in plan_refresh_sdists(CMP, package="omega").problems[0]
    bad = _comparison("alpha==1.1\nrequests>=2\n", ["alpha-1.1.tar.gz"])
    assert "not pinned to one version" in plan_refresh_sdists(bad).problems[0]
    one = plan_refresh_sdists(bad, package="alpha")
    assert not one.problems and one.warnings and not one.changes


def test_plan_up_to_date() -> None:
    plan = plan_refresh_sdists(_comparison("alpha==1.1\n", ["alpha-1.1.tar.gz"]), None, "b")
    assert not plan.changes and plan.commit_branch is None


# --------------------------------------------------------------------------- the flow, for real


@pytest.fixture
def index(tmp_path: Path) -> Iterator[PackageIndex]:
    idx = PackageIndex(
        tmp_path / "index", [("alpha", "1.0"), ("alpha", "1.1"), ("beta-pkg", "2.0")]
    ).start()
    yield idx
    idx.stop()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    repo = tmp_path / "app"
    sdists = repo / "requirements" / "sdists"
    sdists.mkdir(parents=True)
    (repo / "requirements" / "apps.txt").write_text("alpha==1.1\nbeta-pkg==2.0\n")
    build_sdist(sdists, "alpha", "1.0")  # stale
    build_sdist(sdists, "omega", "0.1")  # no longer required
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return repo


def _files(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / "requirements" / "sdists").iterdir())


@pytest.mark.flow
def test_refresh_all_then_nothing_left(prefect_server, index, repo, tmp_path: Path) -> None:
    config = str(
        write_config(
            tmp_path,
            fabflows={
                "state_dir": str(tmp_path / "state"),
                "sdists": {"app_repo": str(repo), "index_url": index.url},
            },
        )
    )
    dry = refresh_sdists("staging", config=config)
    assert dry.outcome == "dry run: would apply 2 step(s)"
    text = dry.plan_text
    order = ["alpha==1.1", "alpha-1.0.tar.gz", "beta-pkg==2.0", "omega-0.1.tar.gz"]
    assert [text.index(t) for t in order] == sorted(text.index(t) for t in order)
    assert "download-sdists" in text and "remove-old-sdists" in text
    assert _files(repo) == ["alpha-1.0.tar.gz", "omega-0.1.tar.gz"]

    done = refresh_sdists("staging", config=config, dry_run=False, commit=True)
    assert _files(repo) == ["alpha-1.1.tar.gz", "beta_pkg-2.0.tar.gz"]
    assert [s.state for s in done.steps] == ["done", "done", "done"] and not done.problems
    branch = _git(repo, "branch", "--show-current")
    assert branch.startswith("fabflows/refresh-sdists-")
    assert _git(repo, "branch", "--show-current") == branch
    assert _git(repo, "status", "--porcelain") == ""
    removed = sorted(p.name for p in (tmp_path / "state" / "sdists-removed").glob("*/*"))
    assert removed == ["alpha-1.0.tar.gz", "omega-0.1.tar.gz"]

    again = refresh_sdists("staging", config=config, dry_run=False)
    assert again.outcome == "nothing to change" and not again.changed


@pytest.mark.flow
def test_bad_inputs_are_refused_before_any_change(prefect_server, index, repo, tmp_path) -> None:
    base = {"state_dir": str(tmp_path / "state"), "index_url": None}
    missing = write_config(
        tmp_path,
        fabflows={
            "state_dir": base["state_dir"],
            "sdists": {"app_repo": str(repo), "requirements_file": "requirements/app.txt"},
        },
    )
    with pytest.raises(BadInput, match="app.txt does not exist"):
        refresh_sdists("staging", config=str(missing), dry_run=False)
    unset = write_config(tmp_path, fabflows={"state_dir": base["state_dir"]})
    with pytest.raises(BadInput, match="app_repo is not set"):
        refresh_sdists("staging", config=str(unset), dry_run=False)
    (repo / "requirements" / "sdists" / "local-edit.tar.gz").write_text("x")
    dirty = write_config(
        tmp_path,
        fabflows={
            "state_dir": base["state_dir"],
            "sdists": {"app_repo": str(repo), "index_url": index.url},
        },
    )
    with pytest.raises(BadInput, match="uncommitted changes"):
        refresh_sdists("staging", config=str(dirty), dry_run=False, commit=True)
    assert _files(repo) == ["alpha-1.0.tar.gz", "local-edit.tar.gz", "omega-0.1.tar.gz"]


@pytest.mark.flow
def test_a_failed_download_leaves_the_directory_as_found(
    prefect_server, index, repo, tmp_path
) -> None:
    (repo / "requirements" / "apps.txt").write_text("alpha==1.1\nbeta-pkg==2.0\ngamma==9.9\n")
    config = write_config(
        tmp_path,
        fabflows={
            "state_dir": str(tmp_path / "state"),
            "sdists": {"app_repo": str(repo), "index_url": index.url},
        },
    )
    state = refresh_sdists("staging", config=str(config), dry_run=False, return_state=True)
    assert state.is_failed() and "gamma" in state.message
    assert _files(repo) == ["alpha-1.0.tar.gz", "omega-0.1.tar.gz"]  # downloads undone


KILL_AT = ["download-sdists", "download-sdists:after", "remove-old-sdists:after", "commit"]


@pytest.mark.flow
@pytest.mark.parametrize(
    "boundary",
    # make test keeps the kill point with old sdists removed and nothing committed; make
    # crash-matrix runs them all
    [
        b if b == "remove-old-sdists:after" else pytest.param(b, marks=pytest.mark.crash_matrix)
        for b in KILL_AT
    ],
)
def test_sigkill_at_every_boundary_then_recover(
    prefect_server, index, repo, tmp_path: Path, boundary: str
) -> None:
    import os
    import signal
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from fabflows.testing import faults
    from flows.recover_environment import recover_environment

    config = str(
        write_config(
            tmp_path,
            fabflows={
                "state_dir": str(tmp_path / "state"),
                "sdists": {"app_repo": str(repo), "index_url": index.url},
            },
        )
    )
    marker = tmp_path / "paused"
    env = dict(
        os.environ,
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        FABFLOWS_TEST_PAUSE_AT=f"refresh-sdists/{boundary}",
        FABFLOWS_TEST_PAUSE_MARKER=str(marker),
    )
    argv = [sys.executable, "-c", faults.CLI_CODE, "run", "refresh-sdists", "-e", "staging"]
    proc = subprocess.Popen(
        [*argv, "-c", config, "--commit", "--apply"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read().decode()[-3000:])
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    report = recover_environment(environment="staging", config=config, dry_run=False)
    assert not report.problems, report.render_text()
    assert _files(repo) == ["alpha-1.0.tar.gz", "omega-0.1.tar.gz"]  # as found
    assert _git(repo, "branch", "--show-current") == "main"
