"""Vendored sdists: parsing and comparison table-tested; pip download against a local PEP 503 index
served by the test (never the public index); removal and its compensation; the commit on a branch."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from fabflows.errors import BadInput
from fabflows.testing.package_index import PackageIndex
from tasks.local.sdists import (
    RequirementsFile,
    SdistError,
    commit_on_branch,
    compare_sdists,
    download_sdist,
    get_git_state,
    parse_requirements,
    parse_sdist,
    pip_download_argv,
    read_requirements,
    remove_sdists,
    restore_sdists,
)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PackageIndex]:
    idx = PackageIndex(
        tmp_path_factory.mktemp("index"),
        [("alpha", "1.0"), ("alpha", "1.1"), ("Beta_Pkg", "2.0")],
    ).start()
    yield idx
    idx.stop()


@pytest.fixture(autouse=True)
def _no_user_pip_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)


REQUIREMENTS = """\
# web stack
Django==4.2.7
django-storages[boto3]==1.14.2 ; python_version >= "3.8"
psycopg2==2.9.9 \\
    --hash=sha256:abc
celery===5.3.6  # arbitrary equality is a pin too
-r more.txt
--index-url https://example.com/simple
requests>=2.31
-e git+https://example.com/repo.git#egg=thing
pkg @ https://example.com/pkg-1.0.tar.gz
this is not a requirement
"""


def test_parse_requirements() -> None:
    reqs, problems, includes = parse_requirements(REQUIREMENTS, "apps.txt")
    assert [(r.key, r.version) for r in reqs] == [
        ("django", "4.2.7"),
        ("django-storages", "1.14.2"),
        ("psycopg2", "2.9.9"),
        ("celery", "5.3.6"),
    ]
    assert reqs[2].source == "apps.txt:4"
    assert includes == ["more.txt"]
    assert len(problems) == 4
    assert "requests>=2.31 is not pinned" in problems[0]
    assert "editable" in problems[1]
    assert "URL" in problems[2]
    assert "not a requirement" in problems[3]


@pytest.mark.parametrize(
    ("filename", "parsed"),
    [
        ("Django-4.2.7.tar.gz", ("django", "4.2.7")),
        ("django_storages-1.14.2.tar.gz", ("django-storages", "1.14.2")),
        ("psycopg2-2.9.9.zip", ("psycopg2", "2.9.9")),
        ("thing-1.0-py3-none-any.whl", None),
        ("notes.txt", None),
        ("broken.tar.gz", None),
    ],
)
def test_parse_sdist(filename: str, parsed) -> None:
    got = parse_sdist(filename)
    assert ((got.key, got.version) if got else None) == parsed


def _reqs(text: str) -> RequirementsFile:
    reqs, problems, _ = parse_requirements(text, "apps.txt")
    return RequirementsFile(path="apps.txt", requirements=reqs, problems=problems)


def test_compare_classifies_every_package_and_file() -> None:
    cmp = compare_sdists(
        _reqs("alpha==1.1\nbeta-pkg==2.0\ngamma==3.0\ndelta==1.0\n"),
        [
            "alpha-1.0.tar.gz",  # stale
            "beta_pkg-2.0.tar.gz",  # ok
            "delta-0.9.tar.gz",  # surplus: the pinned version next to an older one
            "delta-1.0.tar.gz",
            "omega-1.0.tar.gz",  # extra
            "README.md",
            "notes.txt",
        ],
        "sdists",
    )
    states = {p.key: (p.state, p.remove) for p in cmp.packages}
    assert states == {
        "alpha": ("stale", ["alpha-1.0.tar.gz"]),
        "beta-pkg": ("ok", []),
        "delta": ("surplus", ["delta-0.9.tar.gz"]),
        "gamma": ("missing", []),
        "omega": ("extra", ["omega-1.0.tar.gz"]),
    }
    assert cmp.unknown_files == ["notes.txt"]
    assert not cmp.clean


def test_compare_flags_conflicting_pins_and_equal_versions() -> None:
    cmp = compare_sdists(_reqs("alpha==1.0\nAlpha==1.1\n"), ["alpha-1.0.0.tar.gz"], "sdists")
    assert cmp.packages[0].state == "ok"  # 1.0 == 1.0.0
    assert "conflicts with alpha==1.0" in cmp.problems[0]


def test_read_requirements_follows_includes_and_names_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "apps.txt").write_text("-r base.txt\nalpha==1.1\n")
    (tmp_path / "base.txt").write_text("beta-pkg==2.0\n-r apps.txt\n")
    got = read_requirements(tmp_path / "apps.txt")
    assert sorted(r.key for r in got.requirements) == ["alpha", "beta-pkg"]
    with pytest.raises(BadInput, match="missing.txt does not exist"):
        read_requirements(tmp_path / "missing.txt")


def test_pip_argv_is_todays_form() -> None:
    argv = pip_download_argv("alpha==1.1", "/d", "http://i/simple/", python="py")
    assert argv[:4] == ["py", "-m", "pip", "download"]
    assert argv[argv.index("--no-binary") + 1] == ":all:" and "--no-deps" in argv
    assert argv[-1] == "alpha==1.1" and "install" not in argv


def test_download_rhythm_and_failure_leaves_nothing(index: PackageIndex, tmp_path: Path) -> None:
    sdists = tmp_path / "sdists"
    sdists.mkdir()
    with disable_run_logger():
        dry = download_sdist.fn("alpha", "1.1", str(sdists), index.url, dry_run=True)
        assert dry.changed and dry.summary == "Would download alpha==1.1"
        assert list(sdists.iterdir()) == []
        real = download_sdist.fn("alpha", "1.1", str(sdists), index.url, dry_run=False)
        assert real.changed and real.filename == "alpha-1.1.tar.gz"
        assert (
            download_sdist.fn("alpha", "1.1", str(sdists), index.url, dry_run=True).changed is False
        )
        again = download_sdist.fn("Alpha", "1.1.0", str(sdists), index.url, dry_run=False)
        assert not again.changed
        with pytest.raises(SdistError, match="alpha==9.9: pip download failed"):
            download_sdist.fn("alpha", "9.9", str(sdists), index.url, dry_run=False)
    assert sorted(p.name for p in sdists.iterdir()) == ["alpha-1.1.tar.gz"]


def test_remove_and_restore(tmp_path: Path) -> None:
    sdists = tmp_path / "sdists"
    sdists.mkdir()
    for name in ("a-1.0.tar.gz", "b-1.0.tar.gz"):
        (sdists / name).write_text(name)
    backup = tmp_path / "backup"
    with disable_run_logger():
        assert remove_sdists.fn(str(sdists), ["a-1.0.tar.gz"], str(backup), dry_run=True).changed
        assert (sdists / "a-1.0.tar.gz").exists()
        done = remove_sdists.fn(
            str(sdists), ["a-1.0.tar.gz", "x.tar.gz"], str(backup), dry_run=False
        )
        assert done.removed == ["a-1.0.tar.gz"] and (backup / "a-1.0.tar.gz").exists()
        assert not remove_sdists.fn(
            str(sdists), ["a-1.0.tar.gz"], str(backup), dry_run=False
        ).changed
        restore_sdists.fn(str(sdists), done, dry_run=False)
    assert sorted(p.name for p in sdists.iterdir()) == ["a-1.0.tar.gz", "b-1.0.tar.gz"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_commit_on_branch_commits_only_the_sdists(tmp_path: Path) -> None:
    repo = tmp_path / "app"
    (repo / "requirements" / "sdists").mkdir(parents=True)
    (repo / "requirements" / "sdists" / "a-1.0.tar.gz").write_text("a")
    (repo / "other.txt").write_text("x")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    (repo / "requirements" / "sdists" / "a-1.0.tar.gz").unlink()
    (repo / "requirements" / "sdists" / "a-1.1.tar.gz").write_text("a")
    (repo / "other.txt").write_text("changed, not ours")
    with disable_run_logger():
        state = get_git_state.fn(str(repo), ["requirements/sdists"])
        assert state.is_repository and state.branch == "main" and len(state.dirty) == 2
        result = commit_on_branch.fn(
            str(repo), ["requirements/sdists"], "fabflows/refresh", "Refresh", dry_run=False
        )
    assert result.changed and _git(repo, "branch", "--show-current") == "fabflows/refresh"
    changed = _git(repo, "show", "--no-renames", "--name-status", "--format=", "HEAD").splitlines()
    assert sorted(changed) == [
        "A\trequirements/sdists/a-1.1.tar.gz",
        "D\trequirements/sdists/a-1.0.tar.gz",
    ]
    assert "other.txt" in _git(repo, "status", "--porcelain")  # left for its owner
