"""OpenRouter's provider listing vocabulary: the values its model documents may hold.

Sources: OpenRouter's provider integration guide, current format (schema version 2.4,
https://openrouter.ai/docs/guides/providers/integration: valid input and output modality types,
quantizations, pricing entries as USD strings, capability descriptors) and its OpenAPI schema
(``tests/schemas/openrouter_models.json`` names the commit); the parameter names and ranges are
those of OpenRouter's API parameters page (https://openrouter.ai/docs/api-reference/parameters).
The sampling parameter and feature names are the ones the listing settings take (the guide's
legacy format listed them); each becomes descriptors of a text output's ``supported_parameters``.
Only constants and one pure check live here; :mod:`handler.settings` checks the listing settings
against them at start and :mod:`handler.model_card` builds the listing from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SCHEMA_VERSION = "2.4"
INPUT_MODALITIES = ("text", "image", "video", "audio", "file")
OUTPUT_MODALITIES = (
    "text",
    "image",
    "video",
    "speech",
    "transcription",
    "embeddings",
    "rerank",
    "audio",
)
QUANTIZATIONS = (
    "int4",
    "int8",
    "fp4",
    "mxfp4",
    "nvfp4",
    "fp6",
    "fp8",
    "mxfp8",
    "fp16",
    "bf16",
    "fp32",
)
SAMPLING_PARAMETERS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "top_a",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "seed",
    "max_tokens",
    "logit_bias",
)
FEATURES = ("tools", "json_mode", "structured_outputs", "logprobs", "web_search", "reasoning")

_BOOLEAN: dict[str, Any] = {"type": "boolean"}  # the guide's "supported" marker
# Each sampling parameter's descriptor, with the range the parameters page gives it. max_tokens's
# upper bound is the model's output length, filled in per model. logit_bias maps token ids, which
# no descriptor can list, to biases: accepted, its domain not described.
PARAMETERS: dict[str, dict[str, Any]] = {
    "temperature": {"type": "range", "min": 0, "max": 2},
    "top_p": {"type": "range", "min": 0, "max": 1},
    "top_k": {"type": "integer", "min": 0},
    "min_p": {"type": "range", "min": 0, "max": 1},
    "top_a": {"type": "range", "min": 0, "max": 1},
    "frequency_penalty": {"type": "range", "min": -2, "max": 2},
    "presence_penalty": {"type": "range", "min": -2, "max": 2},
    "repetition_penalty": {"type": "range", "min": 0, "max": 2},
    "stop": {"type": "array"},
    "seed": {"type": "integer"},
    "max_tokens": {"type": "integer", "min": 1, "unit": "token"},
    "logit_bias": {"type": "unknown"},
}
# Each feature as the request parameters that ask for it (json_mode is response_format's
# json_object; web_search is web_search_options), with their descriptors.
FEATURE_PARAMETERS: dict[str, dict[str, dict[str, Any]]] = {
    "tools": {"tools": _BOOLEAN, "tool_choice": _BOOLEAN},
    "json_mode": {"response_format": _BOOLEAN},
    "structured_outputs": {"structured_outputs": _BOOLEAN},
    "logprobs": {"logprobs": _BOOLEAN, "top_logprobs": {"type": "integer", "min": 0, "max": 20}},
    "web_search": {"web_search_options": _BOOLEAN},
    "reasoning": {"reasoning": _BOOLEAN},
}


def invalid(values: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """The values that are not among ``allowed``, in their order."""
    known = set(allowed)
    return [value for value in values if value not in known]
