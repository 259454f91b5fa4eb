"""Config files for tests: the FabulAWS sample as is, plus a fabflows overlay pointing at peers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SAMPLE = Path(__file__).resolve().parents[2] / "sandbox" / "fabulaws-config.yaml"


def write_config(directory: Path, fabflows: dict[str, Any] | None = None, **top: Any) -> Path:
    """Write ``fabflows.yaml`` in ``directory``: the untouched sample + overrides + a fabflows section."""
    data: dict[str, Any] = {"fabulaws_config": str(SAMPLE), **top}
    if fabflows is not None:
        data["fabflows"] = fabflows
    path = directory / "fabflows.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def moto_section(endpoint: str, **environments: Any) -> dict[str, Any]:
    """A fabflows section for a moto endpoint (fake keys: moto accepts any)."""
    return {
        "aws": {
            "endpoint_url": endpoint,
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "max_attempts": 4,
        },
        "environments": environments,
    }
