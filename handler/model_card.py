"""The /v1/models listing: vLLM's model cards plus what OpenRouter's provider listing asks for.

In: vLLM's listing (``{"object": "list", "data": [model card, ...]}``, LoRA adapters included with
their ``parent``), the settings, and the engine's :class:`~handler.protocol.ModelInfo`.
Out: the same listing, every card keeping OpenAI's fields (``id``, ``object``, ``created``,
``owned_by``) and vLLM's, with ``name``, ``context_length``, ``max_output_length``,
``quantization``, ``input_modalities``, ``output_modalities``, ``pricing`` (USD per token, as
strings), ``supported_sampling_parameters``, ``supported_features`` and ``hugging_face_id`` added.
Each comes from its setting when set, else from the engine. vLLM's ``root`` (where the weights
were loaded from) is a local path on a worker: it becomes the Hugging Face id, or the card's own
id, so no answer shows the worker's files. Pure; raises nothing.
"""

from __future__ import annotations

from typing import Any

from handler.protocol import ModelInfo
from handler.settings import Settings, csv_list

# OpenRouter's sampling parameters that vLLM's OpenAI layer takes (top_a is not one of them).
SAMPLING_PARAMETERS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "seed",
    "max_tokens",
    "logit_bias",
    "logprobs",
    "top_logprobs",
)
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}
_METHODS = {"fp8": "fp8", "awq": "int4", "gptq": "int4", "bitsandbytes": "int4", "mxfp4": "fp4"}


def quantization_label(info: ModelInfo) -> str:
    """OpenRouter's quantization name for the engine's quantization method or weight dtype."""
    if info.quantization:
        return _METHODS.get(info.quantization.lower(), "unknown")
    return _DTYPES.get(info.dtype, "unknown")


def features(info: ModelInfo) -> list[str]:
    """OpenRouter's feature names for what the engine can do."""
    if not info.generates:
        return []
    found = ["tools"] if info.tools else []
    found += ["json_mode", "structured_outputs", "logprobs"]
    return found + (["reasoning"] if info.reasoning else [])


def default_hub_id(model: str) -> str:
    """MODEL_NAME when it reads as a Hub repository id (``org/name``), else empty."""
    parts = model.split("/")
    is_repo = len(parts) == 2 and all(parts) and not model.startswith((".", "~"))
    return model if is_repo else ""


def card_fields(settings: Settings, info: ModelInfo) -> dict[str, Any]:
    """The OpenRouter fields, the same for the base model and its adapters."""
    return {
        "name": settings.model_display_name or settings.model_id.rstrip("/").split("/")[-1],
        "context_length": info.context_length,
        "max_output_length": settings.max_output_length or info.context_length,
        "quantization": settings.model_quantization or quantization_label(info),
        "input_modalities": _listed(
            settings.input_modalities, ["text", "image"] if info.multimodal else ["text"]
        ),
        "output_modalities": csv_list(settings.output_modalities),
        "pricing": {"prompt": settings.pricing_prompt, "completion": settings.pricing_completion},
        "supported_sampling_parameters": _listed(
            settings.supported_sampling_parameters, list(SAMPLING_PARAMETERS)
        ),
        "supported_features": _listed(settings.supported_features, features(info)),
        "hugging_face_id": settings.hugging_face_id or default_hub_id(settings.model),
    }


def _listed(setting: str | None, default: list[str]) -> list[str]:
    return csv_list(setting) if setting else default


def describe_models(listing: dict[str, Any], settings: Settings, info: ModelInfo) -> dict[str, Any]:
    """The listing with the OpenRouter fields added to every card (vLLM's cards have none of
    them, so nothing of vLLM's is replaced)."""
    extra = card_fields(settings, info)
    cards = [
        {**card, **extra, **_public_root(card, extra["hugging_face_id"])}
        for card in listing.get("data") or []
    ]
    return {**listing, "data": cards}


def _public_root(card: dict[str, Any], hub_id: str) -> dict[str, Any]:
    """``root`` without a local path: the Hub id for the base model, else the card's id."""
    root = card.get("root")
    if not isinstance(root, str) or not root.startswith(("/", ".", "~")):
        return {}
    return {"root": hub_id if hub_id and not card.get("parent") else card.get("id")}
