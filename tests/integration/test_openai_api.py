"""The OpenAI surface, driven by the unmodified ``openai`` SDK through the local endpoint: every
route and request feature docs/api.md lists, one-shot and streamed where OpenAI allows.

One real worker (``python -m handler`` under runpod's production loop, LMCache on) with the hermes
tool parser and a random LoRA adapter. Answers come from SmolLM2-135M; where its words are not the
point, structured outputs pin them down so that the assertions can be exact.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionTokenLogprob

from handler import openrouter
from handler.model_card import SAMPLING_PARAMETERS
from handler.protocol import ROUTES
from local_endpoint.harness import MODEL_ID, LocalEndpoint
from tests.integration.conftest import LORA
from tests.integration.samples import (
    ANSWER,
    CITY_SCHEMA,
    EOS,
    HERMES_CALL,
    LOOSE_TOOLS,
    PERSON_SCHEMA,
    QUESTION,
    TOOLS,
    WEATHER,
)
from tests.openrouter_schema import valid_for_openrouter

pytestmark = pytest.mark.integration

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 30}


@pytest.fixture(scope="module")
def endpoint(openai_endpoint: LocalEndpoint) -> LocalEndpoint:
    return openai_endpoint


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(**{"model": MODEL_ID, "messages": QUESTION, **kwargs})


def streamed_chat(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    return list(chat(client, stream=True, **kwargs))


def joined_tool_calls(chunks: list[Any]) -> list[tuple[str, str]]:
    """(name, arguments) of each streamed tool call, its deltas joined by index."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                name_args = calls.setdefault(delta.index, ["", ""])
                name_args[0] += delta.function.name or ""
                name_args[1] += delta.function.arguments or ""
    return [(name, args) for name, args in (calls[i] for i in sorted(calls))]


# --- models, LoRA -----------------------------------------------------------------------------


def test_models_list_the_base_model_and_the_adapter_with_openrouter_fields(
    client: openai.OpenAI,
) -> None:
    listing = client.models.list()
    base, lora = listing.data
    valid_for_openrouter(listing.model_dump(exclude_unset=True))  # what the worker sent
    assert (base.id, base.object, base.owned_by) == (MODEL_ID, "model", "vllm")
    # the same `created` in every answer and on every card (vLLM stamps each answer anew)
    assert base.created == lora.created == client.models.list().data[0].created
    assert lora.model_extra and (lora.model_extra["name"], lora.model_extra["description"]) == (
        LORA,
        f"LoRA adapter {LORA} on {MODEL_ID}.",
    )
    assert lora.model_extra["hugging_face_id"] == ""
    assert (lora.id, lora.model_extra and lora.model_extra["parent"]) == (LORA, MODEL_ID)
    assert base.model_extra is not None
    # vLLM's root is the folder the weights came from: a worker's path is never shown
    assert (base.model_extra["root"], lora.model_extra["root"]) == (MODEL_ID, LORA)
    parameters = {name: dict(openrouter.PARAMETERS[name]) for name in SAMPLING_PARAMETERS}
    parameters["max_tokens"]["max"] = 2048
    for feature in ("tools", "json_mode", "structured_outputs", "logprobs"):
        parameters |= openrouter.FEATURE_PARAMETERS[feature]
    extra = {k: base.model_extra[k] for k in base.model_extra if k not in ("root", "permission")}
    assert extra == {
        "parent": None,
        "max_model_len": 2048,
        "schema_version": "2.4",
        "name": MODEL_ID,
        "quantization": "bf16",
        "input_modalities": [
            {
                "type": "text",
                "supported_inputs": {"max_context_length": {"value": 2048, "unit": "token"}},
                "pricing": [{"type": "prompt", "unit": "token", "cost_usd": "0"}],
            }
        ],
        "output_modalities": [
            {
                "type": "text",
                "max_length": {"value": 2048, "unit": "token"},
                "streaming": True,
                "supported_parameters": parameters,
                "pricing": [{"type": "completion", "unit": "token", "cost_usd": "0"}],
            }
        ],
        "hugging_face_id": "",
    }


def test_lora_adapter_is_chosen_by_model(client: openai.OpenAI) -> None:
    base = chat(client, **GREEDY).choices[0].message.content
    adapted = chat(client, model=LORA, **GREEDY)
    assert base == ANSWER
    assert adapted.model == LORA and adapted.choices[0].message.content != ANSWER
    streamed = streamed_chat(client, model=LORA, **GREEDY)
    assert {c.model for c in streamed} == {LORA}
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == adapted.choices[0].message.content


# --- tools ------------------------------------------------------------------------------------


def test_tool_choice_auto_parses_the_models_tool_call(client: openai.OpenAI) -> None:
    forced: dict[str, Any] = {
        "messages": WEATHER,
        "tools": LOOSE_TOOLS,
        "tool_choice": "auto",
        "max_tokens": 60,
        "extra_body": {"structured_outputs": {"regex": HERMES_CALL}},
    }
    answer = chat(client, **forced)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function",
        "get_time",
        {"city": "Tokyo"},
    )
    chunks = streamed_chat(client, **forced)
    [(name, arguments)] = joined_tool_calls(chunks)
    assert (name, json.loads(arguments)) == ("get_time", {"city": "Tokyo"})
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "function", "function": {"name": "get_weather"}}, "required"],
    ids=["named", "required"],
)
def test_forced_tool_choice_gives_arguments_valid_against_the_schema(
    client: openai.OpenAI, tool_choice: Any
) -> None:
    params: dict[str, Any] = {
        "messages": WEATHER,
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "max_tokens": 60,
        "temperature": 0,
    }
    [call] = chat(client, **params).choices[0].message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    if tool_choice != "required":
        assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, CITY_SCHEMA)
    [(name, streamed_arguments)] = joined_tool_calls(streamed_chat(client, **params))
    assert (name, json.loads(streamed_arguments)) == (call.function.name, arguments)


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    answer = chat(client, tools=TOOLS, tool_choice="none", **GREEDY).choices[0]
    assert answer.message.tool_calls in (None, [])
    assert answer.finish_reason == "stop" and answer.message.content


# --- structured outputs -----------------------------------------------------------------------


def test_response_format_json_schema_validates(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Describe a programmer as JSON."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        },
        "max_tokens": 80,
        "temperature": 0,
    }
    content = chat(client, **params).choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), PERSON_SCHEMA)
    streamed = "".join(
        c.choices[0].delta.content or "" for c in streamed_chat(client, **params) if c.choices
    )
    assert streamed == content


def test_response_format_json_object(client: openai.OpenAI) -> None:
    content = chat(
        client,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    ).choices[0]
    assert content.finish_reason == "stop"
    assert isinstance(json.loads(content.message.content or ""), dict)


@pytest.mark.parametrize(
    ("constraint", "accepts"),
    [
        ({"choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),
        # bounded: with [a-z]+ a sampled completion can spell letters until max_tokens
        (
            {"regex": r"[A-Z][a-z]{1,9}, [0-9]{4}"},
            re.compile(r"[A-Z][a-z]{1,9}, [0-9]{4}").fullmatch,
        ),
        (
            {"grammar": 'root ::= ("Paris" | "Lyon") " is in France"'},
            lambda text: (
                text
                in (
                    "Paris is in France",
                    "Lyon is in France",
                )
            ),
        ),
        (
            {"json": CITY_SCHEMA},
            lambda text: jsonschema.validate(json.loads(text), CITY_SCHEMA) is None,
        ),
    ],
    ids=["choice", "regex", "grammar", "json"],
)
def test_vllm_structured_outputs(client: openai.OpenAI, constraint: Any, accepts: Any) -> None:
    text = chat(client, max_tokens=40, extra_body={"structured_outputs": constraint})
    assert accepts(text.choices[0].message.content)
    completion = client.completions.create(
        model=MODEL_ID,
        prompt="Answer: ",
        max_tokens=40,
        extra_body={"structured_outputs": constraint},
    )
    assert accepts(completion.choices[0].text)


# --- sampling, logprobs, n, stop, seed, usage -------------------------------------------------


def test_chat_logprobs_one_shot_and_streamed(client: openai.OpenAI) -> None:
    answer = chat(client, logprobs=True, top_logprobs=3, **GREEDY).choices[0]
    assert answer.logprobs is not None and answer.logprobs.content is not None
    tokens = answer.logprobs.content
    assert all(isinstance(t, ChatCompletionTokenLogprob) for t in tokens)
    # vLLM's logprobs include the end-of-turn token that ended the answer
    assert answer.message.content == ANSWER and answer.finish_reason == "stop"
    assert "".join(t.token for t in tokens) == ANSWER + EOS
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in tokens)
    # greedy: each chosen token is the most likely one
    assert all(t.top_logprobs[0].token == t.token for t in tokens)
    streamed = [
        t
        for c in streamed_chat(client, logprobs=True, top_logprobs=3, **GREEDY)
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    assert [t.token for t in streamed] == [t.token for t in tokens]


def test_completion_logprobs(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {"model": MODEL_ID, "prompt": "The capital of France is", **GREEDY}
    choice = client.completions.create(logprobs=2, **params).choices[0]
    assert choice.logprobs is not None
    assert "".join(choice.logprobs.tokens or []) == choice.text + (
        EOS if choice.finish_reason == "stop" else ""
    )
    assert [len(top) for top in choice.logprobs.top_logprobs or []] == [2] * len(
        choice.logprobs.tokens or []
    )
    streamed = client.completions.create(logprobs=2, stream=True, **params)
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens or [])]
    assert tokens == choice.logprobs.tokens


def test_n_two_gives_two_choices(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {"n": 2, "temperature": 1.0, "seed": 7, "max_tokens": 12}
    answer = chat(client, **params)
    assert [c.index for c in answer.choices] == [0, 1]
    chunks = streamed_chat(client, **params)
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {c.index: c.message.content for c in answer.choices}
    # n is capped at OpenAI's 128 (vLLM's own cap is 16384: one such request holds a worker)
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, n=129, max_tokens=1)
    assert caught.value.body["message"].startswith("n must be at most 128, got 129")  # type: ignore[index]


def test_stop_seed_and_max_completion_tokens(client: openai.OpenAI) -> None:
    stopped = chat(client, stop=[" Paris"], **GREEDY).choices[0]
    assert (stopped.message.content, stopped.finish_reason) == ("The capital of France is", "stop")
    seeded = [
        chat(client, temperature=1.0, seed=1234, max_tokens=20).choices[0].message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    short = chat(client, max_completion_tokens=3, temperature=0)
    assert short.usage is not None and short.usage.completion_tokens == 3
    assert short.choices[0].finish_reason == "length"


def test_streamed_usage_arrives_once(client: openai.OpenAI) -> None:
    for chunks in (
        streamed_chat(client, stream_options={"include_usage": True}, **GREEDY),
        list(
            client.completions.create(
                model=MODEL_ID,
                prompt="The capital of France is",
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
        ),
    ):
        usage = [c.usage for c in chunks if c.usage]
        assert len(usage) == 1 and chunks[-1].usage == usage[0]
        assert usage[0].total_tokens == usage[0].prompt_tokens + usage[0].completion_tokens
    assert all(c.usage is None for c in streamed_chat(client, **GREEDY))


# --- tokenize, detokenize, responses, unknown routes ------------------------------------------


def test_tokenize_and_detokenize(client: openai.OpenAI) -> None:
    tokens: Any = client.post(
        "/tokenize", cast_to=object, body={"model": MODEL_ID, "prompt": "Hello Paris"}
    )
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
    text: Any = client.post(
        "/detokenize", cast_to=object, body={"model": MODEL_ID, "tokens": tokens["tokens"]}
    )
    assert text == {"prompt": "Hello Paris"}
    templated: Any = client.post(
        "/tokenize", cast_to=object, body={"model": MODEL_ID, "messages": QUESTION}
    )
    assert templated["count"] > tokens["count"]


def test_responses_api_one_shot_and_streamed(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {
        "model": MODEL_ID,
        "input": QUESTION[0]["content"],
        "max_output_tokens": 30,
        "temperature": 0,
    }
    response = client.responses.create(**params)
    assert (response.status, response.output_text) == ("completed", ANSWER)
    events = list(client.responses.create(stream=True, **params))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == ANSWER
    assert events[-1].response.output_text == ANSWER


def test_unknown_route_is_a_404_listing_the_routes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt="a cat", model=MODEL_ID)
    assert caught.value.status_code == 404
    assert caught.value.body == {
        "message": "unknown route '/v1/images/generations'; public routes: " + ", ".join(ROUTES),
        "type": "NotFoundError",
        "param": "openai_route",
        "code": 404,
    }


def test_embeddings_on_a_generative_model_is_a_clear_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model=MODEL_ID, input="hello", encoding_format="float")
    assert caught.value.body == {
        "message": "the served model does not support /v1/embeddings",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
