"""S3 CORS rules (fix-static-cors), validated as S3 validates them."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from config.models.base import Strict

CORS_METHODS: tuple[str, ...] = ("GET", "PUT", "POST", "DELETE", "HEAD")
"""HTTP methods an S3 CORS rule may allow."""

_CORS_ORIGIN = re.compile(r"^(\*|[a-z][a-z0-9+.-]*://[^/\s?#]+)$")


class CorsRule(Strict):
    """One S3 CORS rule (PutBucketCors' CORSRule), validated as S3 validates it."""

    id: str | None = Field(default=None, max_length=255, description="Rule ID (informational).")
    allowed_origins: list[str] = Field(
        min_length=1,
        description="Origins allowed (scheme://host[:port], or *); each may hold one * wildcard.",
    )
    allowed_methods: list[Literal["GET", "PUT", "POST", "DELETE", "HEAD"]] = Field(
        min_length=1, description="Methods allowed (GET, PUT, POST, DELETE, HEAD)."
    )
    allowed_headers: list[str] = Field(
        default_factory=list,
        description="Headers a preflight may ask for (Access-Control-Request-Headers); one * each.",
    )
    expose_headers: list[str] = Field(
        default_factory=list, description="Response headers scripts may read."
    )
    max_age_seconds: int | None = Field(
        default=None, ge=0, description="How long browsers may cache the preflight answer."
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin.count("*") > 1:
                raise ValueError(f"origin {origin!r} has more than one * wildcard (S3 allows one)")
            if not _CORS_ORIGIN.match(origin):
                raise ValueError(
                    f"origin {origin!r} is not * or scheme://host[:port] (no path, no spaces)"
                )
        return v

    @field_validator("allowed_headers")
    @classmethod
    def _headers(cls, v: list[str]) -> list[str]:
        for header in v:
            if header.count("*") > 1 or not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", header):
                raise ValueError(f"allowed header {header!r} is not a header name (one * allowed)")
        return v

    @field_validator("expose_headers")
    @classmethod
    def _expose(cls, v: list[str]) -> list[str]:
        for header in v:
            if not re.match(r"^[A-Za-z0-9!#$%&'+.^_`|~-]+$", header):
                raise ValueError(f"expose header {header!r} is not a header name (no wildcards)")
        return v


DEFAULT_STATIC_CORS_RULES: tuple[CorsRule, ...] = (
    CorsRule(
        allowed_origins=["*"],
        allowed_methods=["GET"],
        allowed_headers=["Authorization"],
        max_age_seconds=3000,
    ),
)
"""The rule the maintenance doc has operators click into the console."""
