"""The secrets block: Prefect's standard block checks, names and values, and a real save/load."""

from __future__ import annotations

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import SecretStr, ValidationError

from blocks.secrets import STANDARD_NAMES, ServerSecrets, check_secret_name, secrets_block_name


class TestServerSecretsStandard(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[ServerSecrets]:
        return ServerSecrets

    def test_has_a_valid_image(self, block: type[ServerSecrets]) -> None:
        # Prefect's version downloads the logo; this block has none (no network needed)
        assert block._logo_url is None


def test_secret_fields_are_declared_secret() -> None:
    secret_fields = ServerSecrets.model_json_schema()["secret_fields"]
    assert set(STANDARD_NAMES) <= set(secret_fields)
    assert "extra.*" in secret_fields


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "not usable"),
        ("../etc/passwd", "not usable"),
        ("a/b", "not usable"),
        ("Upper", "not usable"),
        ("1abc", "not usable"),
        ("dot.name", "not usable"),
        ("x" * 65, "not usable"),
    ],
)
def test_bad_names_are_refused(name: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_secret_name(name)
    with pytest.raises(ValueError, match=problem):
        ServerSecrets().set(name, "value")


@pytest.mark.parametrize(
    ("value", "problem"),
    [("", "empty"), ("two\nlines", "line break"), ("nul\x00", "NUL"), ("x" * 5000, "longer")],
)
def test_bad_values_are_refused_without_showing_them(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        ServerSecrets().set("smtp_password", value)
    assert "smtp_password" in str(info.value)
    if value:
        assert value not in str(info.value)
    with pytest.raises(ValidationError) as info2:
        ServerSecrets(extra={"mailgun_key": SecretStr(value)})
    if value:
        assert value not in str(info2.value)


def test_get_set_names_and_masking() -> None:
    s = ServerSecrets(database_password=SecretStr("pw'\"$x"))
    s.set("broker_password", "b$`r")
    s.set("mailgun_key", "mg-1")
    assert s.get("database_password").get_secret_value() == "pw'\"$x"
    assert s.get("mailgun_key").get_secret_value() == "mg-1"
    assert s.get("smtp_password") is None
    assert s.names_set() == ["database_password", "broker_password", "mailgun_key"]
    with pytest.raises(ValueError, match="field of its own"):
        ServerSecrets(extra={"database_password": SecretStr("x")})
    shown = repr(s) + str(s) + s.model_dump_json()
    for secret in ("pw'\"$x", "b$`r", "mg-1"):
        assert secret not in shown


def test_block_name() -> None:
    assert secrets_block_name("myproject", "staging") == "myproject-staging-secrets"
    assert secrets_block_name("My_Proj", "prod") == "my-proj-prod-secrets"
    assert secrets_block_name("myproject", "staging", "custom") == "custom"


@pytest.mark.flow
def test_save_and_load_keep_values_and_the_api_hides_them(prefect_server) -> None:
    import asyncio

    from prefect.client.orchestration import get_client

    s = ServerSecrets(database_password=SecretStr("round'trip$"))
    s.set("mailgun_key", "mg-round")
    s.save("myproject-test-secrets", overwrite=True)
    loaded = ServerSecrets.load("myproject-test-secrets")
    assert loaded.get("database_password").get_secret_value() == "round'trip$"
    assert loaded.get("mailgun_key").get_secret_value() == "mg-round"

    async def shown() -> str:
        async with get_client() as client:
            doc = await client.read_block_document_by_name(
                "myproject-test-secrets", "fabflows-server-secrets", include_secrets=False
            )
            return repr(doc.data)

    text = asyncio.run(shown())
    assert "round'trip$" not in text and "mg-round" not in text
