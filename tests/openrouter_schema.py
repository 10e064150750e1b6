"""OpenRouter's provider model listing as a JSON schema (``tests/schemas/openrouter_models.json``:
the definitions of OpenRouter's own OpenAPI schema for its current provider document; its
``$comment`` names the page and the commit), and a check of a listing against it.

OpenRouter's document allows no fields of its own but its own; a worker's card also carries
OpenAI's (``object``, ``owned_by``: the OpenAI SDK's model object) and vLLM's (``root``,
``parent``, ``max_model_len``, ``permission``). Those are taken out of a copy of each card before
the check; every other field must be OpenRouter's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "openrouter_models.json").read_text())
NOT_OPENROUTERS = frozenset({"object", "owned_by", "root", "parent", "max_model_len", "permission"})


def valid_for_openrouter(listing: dict[str, Any]) -> dict[str, Any]:
    """``listing`` itself, once it is valid (jsonschema's ValidationError says where not)."""
    checked = dict(listing)
    if isinstance(listing.get("data"), list):
        checked["data"] = [_document(card) for card in listing["data"]]
    jsonschema.validate(checked, SCHEMA)
    return listing


def _document(card: Any) -> Any:
    if not isinstance(card, dict):
        return card
    return {k: v for k, v in card.items() if k not in NOT_OPENROUTERS}
