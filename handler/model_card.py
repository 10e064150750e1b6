"""The /v1/models listing: vLLM's model cards plus OpenRouter's provider model document.

In: vLLM's listing (``{"object": "list", "data": [model card, ...]}``, LoRA adapters included with
their ``parent``), the settings, and the engine's :class:`~handler.engine.interface.ModelInfo`.
Out: the same listing, every card keeping OpenAI's fields (``id``, ``object``, ``owned_by``) and
vLLM's, with ``created`` made stable (vLLM stamps each answer with its own time), plus the fields
of OpenRouter's current provider document (schema 2.4, :mod:`handler.openrouter`):
``schema_version``, ``name``, ``quantization`` (left out when unknown), ``hugging_face_id``, and
typed ``input_modalities`` and ``output_modalities``. The text input carries the context length
and the prompt prices (USD per token, as strings); a text output carries the output length,
streaming, the completion price and ``supported_parameters``: a descriptor for each sampling
parameter and feature. Embedding and rerank outputs declare no parameters and no price of their
own (their tokens are prompt tokens). Each value comes from its setting when set, else from the
engine, and is one OpenRouter's guide lists. An adapter's card says it is one (``description``)
and carries no Hugging Face id of its own. vLLM's ``root`` (where the weights were loaded from) is
a local path on a worker: it becomes the Hugging Face id, or the card's own id, so no answer shows
the worker's files. Pure; raises nothing.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from handler import openrouter
from handler.engine.interface import ModelInfo
from handler.settings import Settings, csv_list

# OpenRouter's sampling parameters that vLLM's OpenAI layer takes: all but top_a (logprobs is a
# feature there, not a sampling parameter).
SAMPLING_PARAMETERS = tuple(p for p in openrouter.SAMPLING_PARAMETERS if p != "top_a")
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}
# vLLM's quantization methods (its --quantization names, and the kernels it picks for them on a
# GPU) by the number format of their weights. Methods whose format depends on the checkpoint
# (compressed-tensors, gguf, bitsandbytes, modelopt, ...) are not here: their cards leave
# quantization out unless MODEL_QUANTIZATION says.
_METHODS = {
    "fp8": "fp8",
    "fbgemm_fp8": "fp8",
    "ptpc_fp8": "fp8",
    "fp8_marlin": "fp8",
    "awq": "int4",
    "awq_marlin": "int4",
    "gptq": "int4",
    "gptq_marlin": "int4",
    "gptq_marlin_24": "int4",
    "marlin": "int4",
    "experts_int8": "int8",
    "mxfp4": "mxfp4",
    "modelopt_fp4": "nvfp4",
    "nvfp4": "nvfp4",
}


def quantization_label(info: ModelInfo) -> str | None:
    """OpenRouter's quantization for the engine's quantization method or weight dtype; None
    when neither tells it."""
    if info.quantization:
        return _METHODS.get(info.quantization.lower())
    return _DTYPES.get(info.dtype)


def output_modalities(info: ModelInfo) -> list[str]:
    """What the model gives back, in OpenRouter's words."""
    if info.generates:
        return ["text"]
    if info.embeds:
        return ["embeddings"]
    return ["rerank"] if info.scores else ["text"]


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
    """The OpenRouter fields of the base model's card."""
    quantization = settings.model_quantization or quantization_label(info)
    inputs = _listed(settings.input_modalities, ["text", "image"] if info.multimodal else ["text"])
    outputs = _listed(settings.output_modalities, output_modalities(info))
    return {
        "schema_version": openrouter.SCHEMA_VERSION,
        "created": info.loaded_at if settings.model_created is None else settings.model_created,
        "name": settings.model_display_name or settings.model_id.rstrip("/").split("/")[-1],
        **({"quantization": quantization} if quantization else {}),
        "input_modalities": [input_modality(kind, settings, info) for kind in inputs],
        "output_modalities": [output_modality(kind, settings, info) for kind in outputs],
        "hugging_face_id": settings.hugging_face_id or default_hub_id(settings.model),
    }


def input_modality(kind: str, settings: Settings, info: ModelInfo) -> dict[str, Any]:
    """One input modality: the text one holds the context length and the prompt prices."""
    if kind != "text":
        return {"type": kind}
    pricing = [_price("prompt", settings.pricing_prompt)]
    if settings.pricing_input_cache_read is not None:
        pricing.append(_price("cached_prompt", settings.pricing_input_cache_read))
    limits = {"max_context_length": _tokens(info.context_length)}
    return {"type": "text", "supported_inputs": limits, "pricing": pricing}


def output_modality(kind: str, settings: Settings, info: ModelInfo) -> dict[str, Any]:
    """One output modality: the text one holds the output length, the completion price and the
    parameters a request may set; any other declares none (the guide requires the map)."""
    if kind != "text":
        return {"type": kind, "supported_parameters": {}}
    length = settings.max_output_length or info.context_length
    return {
        "type": "text",
        "max_length": _tokens(length),
        "streaming": True,
        "supported_parameters": supported_parameters(settings, info, length),
        "pricing": [_price("completion", settings.pricing_completion)],
    }


def supported_parameters(settings: Settings, info: ModelInfo, length: int) -> dict[str, Any]:
    """The descriptor of each sampling parameter and of each feature's request parameters."""
    names = _listed(settings.supported_sampling_parameters, list(SAMPLING_PARAMETERS))
    found = {name: dict(openrouter.PARAMETERS[name]) for name in names}
    if "max_tokens" in found:
        found["max_tokens"]["max"] = length
    for feature in _listed(settings.supported_features, features(info)):
        found |= {k: dict(v) for k, v in openrouter.FEATURE_PARAMETERS[feature].items()}
    return found


def _tokens(count: int) -> dict[str, Any]:
    return {"value": count, "unit": "token"}


def _price(kind: str, usd: str) -> dict[str, str]:
    """A per-token price; its USD amount written without an exponent or a sign, as the guide's
    decimal strings are (the settings take any non-negative decimal, ``1e-7`` or ``-0`` too)."""
    return {"type": kind, "unit": "token", "cost_usd": format(Decimal(usd).copy_abs(), "f")}


def adapter_fields(card: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """An adapter's card: the base model's fields, under its own name, said to be an adapter
    of the base, with no Hugging Face id (the base's is not the adapter's)."""
    return {
        **base,
        "name": str(card.get("id")),
        "description": f"LoRA adapter {card.get('id')} on {card.get('parent')}.",
        "hugging_face_id": "",
    }


def _listed(setting: str | None, default: list[str]) -> list[str]:
    return csv_list(setting) if setting else default


def describe_models(listing: dict[str, Any], settings: Settings, info: ModelInfo) -> dict[str, Any]:
    """The listing with the OpenRouter fields added to every card (vLLM's cards have none of
    them but ``created``, which vLLM stamps with the time of each answer)."""
    base = card_fields(settings, info)
    cards = []
    for card in listing.get("data") or []:
        extra = adapter_fields(card, base) if card.get("parent") else base
        cards.append({**card, **extra, **_public_root(card, base["hugging_face_id"])})
    return {**listing, "data": cards}


def _public_root(card: dict[str, Any], hub_id: str) -> dict[str, Any]:
    """``root`` without a local path: the Hub id for the base model, else the card's id."""
    root = card.get("root")
    if not isinstance(root, str) or not root.startswith(("/", ".", "~")):
        return {}
    return {"root": hub_id if hub_id and not card.get("parent") else card.get("id")}
