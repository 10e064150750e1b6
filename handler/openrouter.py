"""OpenRouter's provider listing vocabulary: the values its model documents may hold.

Source: OpenRouter's provider integration docs (the "List Models Endpoint" section: valid input
and output modalities, quantizations, sampling parameters and features; pricing fields as USD
strings). Only constants and one pure check live here; :mod:`handler.settings` checks the listing
settings against them at start and :mod:`handler.model_card` builds the listing from them.
"""

from __future__ import annotations

from collections.abc import Iterable

INPUT_MODALITIES = ("text", "image", "file", "audio", "video")
OUTPUT_MODALITIES = (
    "text",
    "image",
    "embeddings",
    "audio",
    "video",
    "rerank",
    "speech",
    "transcription",
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


def invalid(values: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """The values that are not among ``allowed``, in their order."""
    known = set(allowed)
    return [value for value in values if value not in known]
