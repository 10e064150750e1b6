"""OpenRouter's provider model listing as a JSON schema (``tests/schemas/openrouter_models.json``,
written from OpenRouter's provider docs; its ``$comment`` names the page), and a check of a
listing against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "openrouter_models.json").read_text())


def valid_for_openrouter(listing: dict[str, Any]) -> dict[str, Any]:
    """``listing`` itself, once it is valid (jsonschema's ValidationError says where not)."""
    jsonschema.validate(listing, SCHEMA)
    return listing
