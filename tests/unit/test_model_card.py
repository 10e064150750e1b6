"""The /v1/models listing with OpenRouter's provider fields."""

from __future__ import annotations

from typing import Any

import pytest

from handler.model_card import SAMPLING_PARAMETERS, default_hub_id, describe_models
from handler.protocol import ModelInfo
from handler.settings import load_settings

INFO = ModelInfo(context_length=8192, dtype="bfloat16")
LISTING: dict[str, Any] = {
    "object": "list",
    "data": [
        {"id": "qwen", "object": "model", "created": 1, "owned_by": "vllm", "parent": None},
        {"id": "sql", "object": "model", "created": 1, "owned_by": "vllm", "parent": "qwen"},
    ],
}


def test_defaults_come_from_the_engine() -> None:
    settings = load_settings(
        {"MODEL_NAME": "Qwen/Qwen3-8B", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "qwen"}
    )
    listing = describe_models(LISTING, settings, INFO)
    extra = {
        "name": "qwen",
        "context_length": 8192,
        "max_output_length": 8192,
        "quantization": "bf16",
        "input_modalities": ["text"],
        "output_modalities": ["text"],
        "pricing": {"prompt": "0", "completion": "0"},
        "supported_sampling_parameters": list(SAMPLING_PARAMETERS),
        "supported_features": ["json_mode", "structured_outputs", "logprobs"],
        "hugging_face_id": "Qwen/Qwen3-8B",
    }
    assert listing == {
        "object": "list",
        "data": [{**card, **extra} for card in LISTING["data"]],
    }
    assert LISTING["data"][0] == {  # the caller's listing is left alone
        "id": "qwen",
        "object": "model",
        "created": 1,
        "owned_by": "vllm",
        "parent": None,
    }


def test_settings_win() -> None:
    settings = load_settings(
        {
            "MODEL_NAME": "/models/q",
            "MODEL_DISPLAY_NAME": "Qwen3 8B (fast)",
            "HUGGING_FACE_ID": "Qwen/Qwen3-8B",
            "MAX_OUTPUT_LENGTH": "4096",
            "MODEL_QUANTIZATION": "fp8",
            "INPUT_MODALITIES": "text, image",
            "OUTPUT_MODALITIES": "text",
            "PRICING_PROMPT": "0.00000015",
            "PRICING_COMPLETION": "0.0000006",
            "SUPPORTED_SAMPLING_PARAMETERS": "temperature,top_p,stop",
            "SUPPORTED_FEATURES": "tools,json_mode",
        }
    )
    card = describe_models(LISTING, settings, INFO)["data"][0]
    assert {k: card[k] for k in list(card)[5:]} == {
        "name": "Qwen3 8B (fast)",
        "context_length": 8192,
        "max_output_length": 4096,
        "quantization": "fp8",
        "input_modalities": ["text", "image"],
        "output_modalities": ["text"],
        "pricing": {"prompt": "0.00000015", "completion": "0.0000006"},
        "supported_sampling_parameters": ["temperature", "top_p", "stop"],
        "supported_features": ["tools", "json_mode"],
        "hugging_face_id": "Qwen/Qwen3-8B",
    }


@pytest.mark.parametrize(
    ("info", "quantization", "features", "inputs"),
    [
        (
            ModelInfo(8192, "float16", quantization="awq", tools=True, reasoning=True),
            "int4",
            ["tools", "json_mode", "structured_outputs", "logprobs", "reasoning"],
            ["text"],
        ),
        (
            ModelInfo(8192, "bfloat16", quantization="fp8", multimodal=True),
            "fp8",
            None,
            ["text", "image"],
        ),
        (ModelInfo(512, "float32", generates=False, embeds=True), "fp32", [], ["text"]),
        (ModelInfo(512, "float32", quantization="exotic"), "unknown", None, ["text"]),
    ],
)
def test_engine_facts(
    info: ModelInfo, quantization: str, features: list[str] | None, inputs: list[str]
) -> None:
    card = describe_models(LISTING, load_settings({}), info)["data"][0]
    assert card["quantization"] == quantization
    assert card["supported_features"] == (
        features if features is not None else ["json_mode", "structured_outputs", "logprobs"]
    )
    assert card["input_modalities"] == inputs


@pytest.mark.parametrize(
    ("model", "hub_id"),
    [("org/name", "org/name"), ("/models/x", ""), ("./org/x", ""), ("name", ""), ("a/b/c", "")],
)
def test_hub_id_from_model_name(model: str, hub_id: str) -> None:
    assert default_hub_id(model) == hub_id


@pytest.mark.parametrize(
    ("hub_id", "roots"),
    [
        ("Qwen/Qwen3-8B", ["Qwen/Qwen3-8B", "sql"]),  # baked or cached: the Hub id
        ("", ["qwen", "sql"]),  # a local folder: the served names
    ],
)
def test_local_paths_in_root_are_replaced(hub_id: str, roots: list[str]) -> None:
    settings = load_settings(
        {"MODEL_NAME": "/models/q", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "qwen"}
        | ({"HUGGING_FACE_ID": hub_id} if hub_id else {})
    )
    listing = {
        "object": "list",
        "data": [
            {**LISTING["data"][0], "root": "/models/q"},
            {**LISTING["data"][1], "root": "./adapters/sql"},
        ],
    }
    cards = describe_models(listing, settings, INFO)["data"]
    assert [card["root"] for card in cards] == roots


def test_a_hub_root_is_kept() -> None:
    settings = load_settings({"MODEL_NAME": "Qwen/Qwen3-8B"})
    listing = {"object": "list", "data": [{**LISTING["data"][0], "root": "Qwen/Qwen3-8B"}]}
    [card] = describe_models(listing, settings, INFO)["data"]
    assert card["root"] == "Qwen/Qwen3-8B"
