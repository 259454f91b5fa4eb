"""start-environment's own parts (the round trip is in test_stop_environment.py): the LUKS
passphrase comes from a Prefect Secret block, only when fs_encrypt is on, and stays a SecretStr."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.blocks.system import Secret
from pydantic import SecretStr

from fabflows.procedures.server_service import load_passphrase
from fabflows.runbook import load_context
from fabflows.testing.configs import moto_section, write_config


@pytest.mark.flow
def test_passphrase_from_its_block_only_with_fs_encrypt(
    prefect_server, aws, tmp_path: Path
) -> None:
    Secret(value="correct horse battery staple").save("staging-luks", overwrite=True)
    section = moto_section(aws.endpoint, staging={"luks_passphrase_block": "staging-luks"})
    encrypted = write_config(tmp_path, fabflows=section, instance_settings={"fs_encrypt": True})
    value = load_passphrase(load_context("staging", config=str(encrypted)))
    assert isinstance(value, SecretStr)
    assert value.get_secret_value() == "correct horse battery staple"
    assert "correct horse" not in repr(value)
    (tmp_path / "plain").mkdir()
    plain = write_config(tmp_path / "plain", fabflows=section)
    assert load_passphrase(load_context("staging", config=str(plain))) is None
