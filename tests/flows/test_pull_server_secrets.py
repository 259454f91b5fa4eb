"""pull-server-secrets: the plan as a table, the flow on real test hosts with a real block."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks.secrets import ServerSecrets
from fabflows.errors import BadInput
from fabflows.testing.app_env import build_app_env, default_secrets
from fabflows.testing.moto_server import MotoServer
from flows.pull_server_secrets import plan_pull_server_secrets, pull_server_secrets

BLOCK = "myproject-staging-secrets"


def _staging():
    import yaml

    from config import resolve_environment
    from config.models import FabulawsConfig
    from fabflows.testing.configs import SAMPLE

    data = yaml.safe_load(SAMPLE.read_text())
    return resolve_environment(FabulawsConfig.model_validate(data), "staging")


@pytest.mark.parametrize(
    ("source", "others", "block", "expected"),
    [
        ({"a": "p1"}, {}, None, [("a", "add", [])]),
        ({"a": "p1"}, {}, {"a": "p1"}, [("a", "unchanged", [])]),
        ({"a": "p1"}, {}, {"a": "p0"}, [("a", "update", [])]),
        ({"a": None}, {}, {"a": "p0"}, [("a", "missing on server", [])]),
        (
            {"a": "p1"},
            {"w2": {"a": "p2"}, "w3": {"a": "p1"}},
            {"a": "p1"},
            [("a", "unchanged", ["w2"])],
        ),
        ({"a": "p1"}, {"w2": {"a": None}}, {}, [("a", "add", ["w2"])]),
    ],
)
def test_plan(source, others, block, expected) -> None:
    prints = {"w1": source, **others}
    plan = plan_pull_server_secrets(_staging(), BLOCK, list(source), "w1", prints, block)
    assert [(c.name, c.action, c.differs_on) for c in plan.secrets] == expected
    assert plan.block_exists is (block is not None)
    assert "p1" not in plan.render_markdown()


@pytest.fixture(scope="module")
def env(test_network, tmp_path_factory):
    moto = MotoServer().start()
    built = build_app_env(
        moto.endpoint, test_network, tmp_path_factory.mktemp("pull"), app=False, prefix="pl"
    )
    try:
        yield built
    finally:
        built.destroy()
        moto.stop()


def _run(env, **kw):
    return pull_server_secrets(
        environment="staging", config=str(env.config_path), return_state=True, **kw
    )


@pytest.mark.hosts
@pytest.mark.flow
def test_dry_run_apply_again_and_disagreement(prefect_server, env) -> None:
    try:
        ServerSecrets.delete(BLOCK)  # left by earlier tests in the same Prefect server
    except Exception:  # noqa: BLE001 - not there
        pass
    state = _run(env)
    assert state.is_completed(), state.message
    dry = state.result()
    assert "pull 7 secret(s)" in dry.plan_text and "(new block)" in dry.plan_text
    with pytest.raises(ValueError):
        ServerSecrets.load(BLOCK)

    state = _run(env, dry_run=False)
    assert state.is_completed(), state.message
    block = ServerSecrets.load(BLOCK)
    for name, value in default_secrets().items():
        assert block.get(name).get_secret_value() == value

    state = _run(env, dry_run=False)
    assert state.result().outcome == "nothing to change"

    # a worker is the source; a web server with another smtp_password is reported, by name
    web = env.by_role("web")[0]
    web.exec(["sh", "-c", "printf other > /home/deploy/smtp_password"])
    block.set("secret_key", "stale-in-block")
    block.save(BLOCK, overwrite=True)
    state = _run(env, dry_run=False)
    result = state.result()
    assert result.details["Names changed in the block"] == "secret_key"
    assert f"servers disagree: smtp_password on {web.name}" in result.plan_text or (
        "servers disagree: smtp_password on " in result.plan_text
    )
    assert ServerSecrets.load(BLOCK).get("secret_key").get_secret_value() != "stale-in-block"
    previous = ServerSecrets.load(BLOCK + "-previous")
    assert previous.get("secret_key").get_secret_value() == "stale-in-block"


@pytest.mark.hosts
@pytest.mark.flow
def test_bad_password_names_fail_before_reading(prefect_server, env, tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load(env.config_path.read_text())
    data["password_names"] = ["database_password", "../etc/shadow"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    state = pull_server_secrets(environment="staging", config=str(bad), return_state=True)
    assert state.is_failed() and "password_names" in state.message
    with pytest.raises(BadInput):
        state.result()


@pytest.mark.hosts
@pytest.mark.flow
def test_sigkill_after_saving_the_block_then_recover(prefect_server, env, tmp_path: Path) -> None:
    """Kill point: the block is written, the run not closed; recover puts its previous version
    back. The journal names the block documents, never a value."""
    from fabflows.testing import faults
    from flows.recover_environment import recover_environment

    block = ServerSecrets()
    for name, value in default_secrets().items():
        block.set(name, value)
    block.set("secret_key", "before-the-kill")
    block.save(BLOCK, overwrite=True)
    faults.run_until_paused(
        "pull-server-secrets",
        "save-block:after",
        ["-e", "staging", "-c", str(env.config_path), "--apply"],
        tmp_path / "paused",
    )
    pulled = default_secrets()["secret_key"]
    assert ServerSecrets.load(BLOCK).get("secret_key").get_secret_value() == pulled
    report = recover_environment(environment="staging", config=str(env.config_path), dry_run=False)
    assert not report.problems, report.render_text()
    assert ServerSecrets.load(BLOCK).get("secret_key").get_secret_value() == "before-the-kill"
    journal_dir = env.config_path.parent / "state" / "journal"
    journal = "\n".join(p.read_text() for p in journal_dir.rglob("*") if p.is_file())
    assert "save-block" in journal
    assert pulled not in journal and "before-the-kill" not in journal
