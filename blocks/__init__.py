"""Prefect blocks: identity and secrets only (SecretStr), one factory method each."""
