"""The /v1/models listing with OpenRouter's provider fields (its current document, 2.4)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from openai.types import Model

from handler import openrouter
from handler.engine.interface import ModelInfo
from handler.model_card import default_hub_id, describe_models
from handler.settings import SettingsError, load_settings
from tests.openrouter_schema import valid_for_openrouter

INFO = ModelInfo(context_length=8192, dtype="bfloat16", loaded_at=1_764_000_000)
# What a text output of a generating model accepts by default: every sampling parameter vLLM
# takes (OpenRouter's but top_a), and JSON mode, structured outputs and logprobs.
DEFAULT_PARAMETERS: dict[str, Any] = {
    "temperature": {"type": "range", "min": 0, "max": 2},
    "top_p": {"type": "range", "min": 0, "max": 1},
    "top_k": {"type": "integer", "min": 0},
    "min_p": {"type": "range", "min": 0, "max": 1},
    "frequency_penalty": {"type": "range", "min": -2, "max": 2},
    "presence_penalty": {"type": "range", "min": -2, "max": 2},
    "repetition_penalty": {"type": "range", "min": 0, "max": 2},
    "stop": {"type": "array"},
    "seed": {"type": "integer"},
    "max_tokens": {"type": "integer", "min": 1, "unit": "token", "max": 8192},
    "logit_bias": {"type": "unknown"},
    "response_format": {"type": "boolean"},
    "structured_outputs": {"type": "boolean"},
    "logprobs": {"type": "boolean"},
    "top_logprobs": {"type": "integer", "min": 0, "max": 20},
}


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
    listing = valid_for_openrouter(describe_models(LISTING, settings, INFO))
    extra = {
        "schema_version": "2.4",
        "created": 1_764_000_000,  # when the engine loaded the model, not vLLM's answer time
        "name": "qwen",
        "quantization": "bf16",
        "input_modalities": [
            {
                "type": "text",
                "supported_inputs": {"max_context_length": {"value": 8192, "unit": "token"}},
                "pricing": [{"type": "prompt", "unit": "token", "cost_usd": "0"}],
            }
        ],
        "output_modalities": [
            {
                "type": "text",
                "max_length": {"value": 8192, "unit": "token"},
                "streaming": True,
                "supported_parameters": DEFAULT_PARAMETERS,
                "pricing": [{"type": "completion", "unit": "token", "cost_usd": "0"}],
            }
        ],
        "hugging_face_id": "Qwen/Qwen3-8B",
    }
    adapter = {
        **extra,
        "name": "sql",
        "description": "LoRA adapter sql on qwen.",
        "hugging_face_id": "",
    }
    assert listing == {
        "object": "list",
        "data": [{**LISTING["data"][0], **extra}, {**LISTING["data"][1], **adapter}],
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
            "PRICING_INPUT_CACHE_READ": "0.00000003",
            "MODEL_CREATED": "1700000000",
            "SUPPORTED_SAMPLING_PARAMETERS": "temperature,top_p,stop",
            "SUPPORTED_FEATURES": "tools,json_mode",
        }
    )
    card = valid_for_openrouter(describe_models(LISTING, settings, INFO))["data"][0]
    assert {k: card[k] for k in list(card)[2:]} == {
        "created": 1_700_000_000,
        "owned_by": "vllm",
        "parent": None,
        "schema_version": "2.4",
        "name": "Qwen3 8B (fast)",
        "quantization": "fp8",
        "input_modalities": [
            {
                "type": "text",
                "supported_inputs": {"max_context_length": {"value": 8192, "unit": "token"}},
                "pricing": [
                    {"type": "prompt", "unit": "token", "cost_usd": "0.00000015"},
                    {"type": "cached_prompt", "unit": "token", "cost_usd": "0.00000003"},
                ],
            },
            {"type": "image"},
        ],
        "output_modalities": [
            {
                "type": "text",
                "max_length": {"value": 4096, "unit": "token"},
                "streaming": True,
                "supported_parameters": {
                    "temperature": {"type": "range", "min": 0, "max": 2},
                    "top_p": {"type": "range", "min": 0, "max": 1},
                    "stop": {"type": "array"},
                    "tools": {"type": "boolean"},
                    "tool_choice": {"type": "boolean"},
                    "response_format": {"type": "boolean"},
                },
                "pricing": [{"type": "completion", "unit": "token", "cost_usd": "0.0000006"}],
            }
        ],
        "hugging_face_id": "Qwen/Qwen3-8B",
    }


def test_the_cards_are_openai_model_objects() -> None:
    # what the OpenAI SDK's models.list() reads from each card
    listing = describe_models(LISTING, load_settings({"MODEL_NAME": "Qwen/Qwen3-8B"}), INFO)
    models = [Model.model_validate(card) for card in valid_for_openrouter(listing)["data"]]
    assert [(m.id, m.object, m.created, m.owned_by) for m in models] == [
        ("qwen", "model", 1_764_000_000, "vllm"),
        ("sql", "model", 1_764_000_000, "vllm"),
    ]


@pytest.mark.parametrize(
    "change",
    [
        {"context_length": 8192},  # the legacy flat document's fields are not the current one's
        {"pricing": {"prompt": "0", "completion": "0"}},
        {"schema_version": "2.3"},
        {"quantization": "unknown"},
        {"input_modalities": ["text"]},
    ],
)
def test_the_schema_refuses_what_the_current_document_does_not_hold(change: dict[str, Any]) -> None:
    [card] = describe_models({"data": [LISTING["data"][0]]}, load_settings({}), INFO)["data"]
    with pytest.raises(jsonschema.ValidationError):
        valid_for_openrouter({"data": [card | change]})


@pytest.mark.parametrize(
    ("setting", "listed"), [("1e-7", "0.0000001"), ("-0", "0"), ("0.50", "0.50"), ("3", "3")]
)
def test_prices_are_plain_decimal_strings(setting: str, listed: str) -> None:
    settings = load_settings({"PRICING_PROMPT": setting, "PRICING_INPUT_CACHE_READ": setting})
    card = valid_for_openrouter(describe_models(LISTING, settings, INFO))["data"][0]
    assert [p["cost_usd"] for p in card["input_modalities"][0]["pricing"]] == [listed, listed]


def test_every_sampling_parameter_and_feature_is_described() -> None:
    settings = load_settings(
        {
            "SUPPORTED_SAMPLING_PARAMETERS": ",".join(openrouter.SAMPLING_PARAMETERS),
            "SUPPORTED_FEATURES": ",".join(openrouter.FEATURES),
            "OUTPUT_MODALITIES": ",".join(openrouter.OUTPUT_MODALITIES),
            "INPUT_MODALITIES": ",".join(openrouter.INPUT_MODALITIES),
        }
    )
    card = valid_for_openrouter(describe_models(LISTING, settings, INFO))["data"][0]
    text, *others = card["output_modalities"]
    assert list(text["supported_parameters"]) == [
        *openrouter.SAMPLING_PARAMETERS,
        *(name for names in openrouter.FEATURE_PARAMETERS.values() for name in names),
    ]
    assert others == [
        {"type": kind, "supported_parameters": {}} for kind in openrouter.OUTPUT_MODALITIES[1:]
    ]
    assert [m["type"] for m in card["input_modalities"]] == list(openrouter.INPUT_MODALITIES)


@pytest.mark.parametrize(
    ("info", "quantization", "features", "modalities"),
    [
        (
            ModelInfo(8192, "float16", quantization="awq", tools=True, reasoning=True),
            "int4",
            ["tools", "json_mode", "structured_outputs", "logprobs", "reasoning"],
            (["text"], ["text"]),
        ),
        (
            ModelInfo(8192, "bfloat16", quantization="fp8", multimodal=True),
            "fp8",
            None,
            (["text", "image"], ["text"]),
        ),
        # what vLLM reports on a GPU for AWQ/GPTQ checkpoints, MXFP4 and NVFP4 ones
        (ModelInfo(8192, "float16", quantization="awq_marlin"), "int4", None, (["text"], ["text"])),
        (
            ModelInfo(8192, "bfloat16", quantization="gptq_marlin"),
            "int4",
            None,
            (["text"], ["text"]),
        ),
        (ModelInfo(8192, "bfloat16", quantization="mxfp4"), "mxfp4", None, (["text"], ["text"])),
        (
            ModelInfo(8192, "bfloat16", quantization="modelopt_fp4"),
            "nvfp4",
            None,
            (["text"], ["text"]),
        ),
        # a format that depends on the checkpoint: left out, not a made-up value
        (
            ModelInfo(8192, "bfloat16", quantization="compressed-tensors"),
            None,
            None,
            (["text"], ["text"]),
        ),
        (ModelInfo(512, "float32", quantization="exotic"), None, None, (["text"], ["text"])),
        (
            ModelInfo(512, "float32", generates=False, embeds=True),
            "fp32",
            [],
            (["text"], ["embeddings"]),
        ),
        (
            ModelInfo(512, "float32", generates=False, scores=True),
            "fp32",
            [],
            (["text"], ["rerank"]),
        ),
    ],
)
def test_engine_facts(
    info: ModelInfo,
    quantization: str | None,
    features: list[str] | None,
    modalities: tuple[list[str], list[str]],
) -> None:
    card = valid_for_openrouter(describe_models(LISTING, load_settings({}), info))["data"][0]
    assert card.get("quantization") == quantization
    assert ("quantization" in card) == (quantization is not None)
    kinds = (
        [m["type"] for m in card["input_modalities"]],
        [m["type"] for m in card["output_modalities"]],
    )
    assert kinds == modalities
    [output] = card["output_modalities"]
    if features is None:  # the defaults
        assert output["supported_parameters"] == DEFAULT_PARAMETERS | {
            "max_tokens": {"type": "integer", "min": 1, "unit": "token", "max": info.context_length}
        }
    elif output["type"] == "text":
        asked = [k for f in features for k in openrouter.FEATURE_PARAMETERS[f]]
        assert [k for k in output["supported_parameters"] if k not in DEFAULT_PARAMETERS] == [
            k for k in asked if k not in DEFAULT_PARAMETERS
        ]
    else:  # an embedding or a reranking model: no generation parameters, no price of its own
        assert output == {"type": output["type"], "supported_parameters": {}}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MODEL_QUANTIZATION", "unknown", "unknown: not OpenRouter's; expected one of int4, "),
        ("MODEL_QUANTIZATION", "fp8,int4", "expected one quantization"),
        ("OUTPUT_MODALITIES", "text,embedding", "embedding: not OpenRouter's; expected some of"),
        ("INPUT_MODALITIES", "pdf", "pdf: not OpenRouter's"),
        (
            "SUPPORTED_SAMPLING_PARAMETERS",
            "temperature,logprobs,top_logprobs",
            "logprobs, top_logprobs: not OpenRouter's",
        ),
        ("SUPPORTED_FEATURES", "tools,vision", "vision: not OpenRouter's"),
        ("SUPPORTED_FEATURES", " , ", "nothing: not OpenRouter's"),
        ("PRICING_INPUT_CACHE_READ", "-1", "non-negative"),
    ],
)
def test_listing_settings_hold_only_openrouters_values(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({name: value})
    assert name in str(caught.value) and message in str(caught.value)


def test_created_is_the_same_in_every_answer() -> None:
    settings = load_settings({})
    first = describe_models({"data": [{"id": "m", "created": 5}]}, settings, INFO)
    later = describe_models({"data": [{"id": "m", "created": 9}]}, settings, INFO)
    assert first["data"][0]["created"] == later["data"][0]["created"] == 1_764_000_000


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
