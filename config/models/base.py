"""Names and base models every part of the config shares: roles, the strict and the
tolerant base, slugs."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

ROLES: tuple[str, ...] = ("cache", "db-primary", "db-replica", "web", "worker")
"""The roles fabflows knows, in the order a describe lists them."""

LEGACY_ROLE_NAMES: dict[str, str] = {"db-master": "db-primary", "db-slave": "db-replica"}
"""Role names FabulAWS used before 2019 (58e7b7a), mapped onto today's."""


_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


def normalize_role(role: str) -> str:
    """Map a legacy role name (``db-master``) onto today's (``db-primary``); others unchanged."""
    return LEGACY_ROLE_NAMES.get(role, role)


def _rename_roles(mapping: Any) -> Any:
    if isinstance(mapping, dict):
        return {normalize_role(k) if isinstance(k, str) else k: v for k, v in mapping.items()}
    return mapping


class Strict(BaseModel):
    """Base for fabflows' own sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Legacy(BaseModel):
    """Base for sections of the FabulAWS file: unknown keys are kept (and reported), not rejected."""

    model_config = ConfigDict(extra="allow", frozen=True)


_SLUG = re.compile(r"[^a-z0-9-]+")


def slug(text: str) -> str:
    """Lower-case, dash-separated form used in Prefect names and artifact keys."""
    return _SLUG.sub("-", text.lower()).strip("-")
