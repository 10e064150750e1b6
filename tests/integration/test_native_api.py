"""The OpenAI features through the native job shape, on the handler directly (in-process engine,
float32): tools, structured outputs, logprobs, n, stop, seed, LoRA, batch jobs, and a seeded
request that gives the same text alone or beside eight others."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from handler.engine.vllm_engine import VllmEngine
from handler.settings import Settings
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
from tests.integration.test_engine import run

pytestmark = pytest.mark.integration

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 30}


async def one(engine: VllmEngine, settings: Settings, job_input: Any) -> dict[str, Any]:
    [out] = await run(engine, settings, job_input)
    assert "error" not in out, out
    return dict(out)


async def test_tools_auto_and_named(engine: VllmEngine, settings: Settings) -> None:
    auto = await one(
        engine,
        settings,
        {
            "messages": WEATHER,
            "tools": LOOSE_TOOLS,
            "tool_choice": "auto",
            "sampling_params": {"max_tokens": 60, "structured_outputs": {"regex": HERMES_CALL}},
        },
    )
    [call] = ChatCompletion.model_validate(auto).choices[0].message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == (  # type: ignore[union-attr]
        "get_time",
        {"city": "Tokyo"},
    )
    named = {
        "messages": WEATHER,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "sampling_params": {"max_tokens": 60, "temperature": 0},
    }
    reply = ChatCompletion.model_validate(await one(engine, settings, named))
    [call] = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), CITY_SCHEMA)  # type: ignore[union-attr]
    chunks = [
        ChatCompletionChunk.model_validate(c)
        for c in await run(engine, settings, {**named, "stream": True})
    ]
    arguments = "".join(
        d.function.arguments or ""
        for c in chunks
        for choice in c.choices
        for d in choice.delta.tool_calls or []
        if d.function
    )
    assert json.loads(arguments) == json.loads(call.function.arguments)  # type: ignore[union-attr]


async def test_structured_outputs(engine: VllmEngine, settings: Settings) -> None:
    person = await one(
        engine,
        settings,
        {
            "messages": [{"role": "user", "content": "Describe a programmer as JSON."}],
            "sampling_params": {
                "max_tokens": 80,
                "temperature": 0,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": PERSON_SCHEMA},
                },
            },
        },
    )
    jsonschema.validate(json.loads(person["choices"][0]["message"]["content"]), PERSON_SCHEMA)
    constraints: dict[str, tuple[dict[str, Any], Callable[[str], object]]] = {
        "choice": ({"choice": ["yes", "no"]}, {"yes", "no"}.__contains__),
        "regex": ({"regex": r"[0-9]{3}-[0-9]{4}"}, re.compile(r"[0-9]{3}-[0-9]{4}").fullmatch),
        "grammar": (
            {"grammar": 'root ::= "Paris" | "Lyon"'},
            {"Paris", "Lyon"}.__contains__,
        ),
    }
    for name, (constraint, accepts) in constraints.items():
        out = await one(
            engine,
            settings,
            {
                "prompt": "Answer: ",
                "sampling_params": {"max_tokens": 20, "structured_outputs": constraint},
            },
        )
        assert accepts(Completion.model_validate(out).choices[0].text), name


async def test_logprobs_n_stop_and_seed(engine: VllmEngine, settings: Settings) -> None:
    reply = ChatCompletion.model_validate(
        await one(
            engine,
            settings,
            {
                "messages": QUESTION,
                "sampling_params": {**GREEDY, "logprobs": True, "top_logprobs": 2},
            },
        )
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert "".join(t.token for t in logprobs.content) == ANSWER + EOS
    assert {len(t.top_logprobs) for t in logprobs.content} == {2}

    two = await one(
        engine,
        settings,
        {"prompt": "Once upon", "sampling_params": {"n": 2, "max_tokens": 8, "seed": 3}},
    )
    assert [c["index"] for c in two["choices"]] == [0, 1]

    stopped = await one(
        engine, settings, {"messages": QUESTION, "sampling_params": {**GREEDY, "stop": ["Paris"]}}
    )
    assert stopped["choices"][0]["message"]["content"] == "The capital of France is "

    seeded = {
        "messages": QUESTION,
        "sampling_params": {"temperature": 1.0, "seed": 99, "max_tokens": 20},
    }
    first, second = [await one(engine, settings, seeded) for _ in range(2)]
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


async def test_lora_by_model(engine: VllmEngine, settings: Settings) -> None:
    base = await one(engine, settings, {"messages": QUESTION, "sampling_params": GREEDY})
    adapted = await one(
        engine, settings, {"messages": QUESTION, "sampling_params": GREEDY, "model": LORA}
    )
    assert base["choices"][0]["message"]["content"] == ANSWER
    assert adapted["model"] == LORA
    assert adapted["choices"][0]["message"]["content"] != ANSWER


async def test_batch_runs_together_and_answers_in_order(
    engine: VllmEngine, settings: Settings
) -> None:
    requests = [
        {"messages": QUESTION, "sampling_params": GREEDY},
        {"prompt": "The capital of France is", "sampling_params": GREEDY},
        {"messages": QUESTION, "sampling_params": {"temperature": "hot"}},
        {"messages": QUESTION, "sampling_params": GREEDY, "model": LORA},
        {"messages": QUESTION, "sampling_params": GREEDY, "model": "gpt-9"},
    ]
    [out] = await run(engine, settings, {"requests": requests})
    chat, completion, bad, lora, unknown = out["results"]
    assert ChatCompletion.model_validate(chat).choices[0].message.content == ANSWER
    assert Completion.model_validate(completion).choices[0].text.startswith(" Paris")
    assert (bad["error"]["code"], bad["error"]["param"]) == (400, "temperature")
    assert lora["model"] == LORA
    assert (unknown["error"]["code"], unknown["error"]["type"]) == (404, "NotFoundError")
    singles = [await one(engine, settings, r) for r in (requests[0], requests[3])]
    assert [chat["choices"], lora["choices"]] == [s["choices"] for s in singles]


async def test_seeded_request_is_the_same_alone_or_beside_eight_others(
    engine: VllmEngine, settings: Settings
) -> None:
    """Holds in float32 (this engine); in bfloat16 the CPU kernels round differently with the
    batch's shape and the texts part after a few tokens (docs/api.md, Reproducibility)."""
    sampled = {
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "sampling_params": {"temperature": 1.0, "seed": 1234, "max_tokens": 48},
    }
    others = [
        {
            "messages": [{"role": "user", "content": f"Tell story number {i} about dragons."}],
            "sampling_params": {"temperature": 1.0, "seed": i, "max_tokens": 48},
        }
        for i in range(8)
    ]
    alone = await one(engine, settings, sampled)
    together = await asyncio.gather(*(one(engine, settings, j) for j in [sampled, *others]))
    assert together[0]["choices"] == alone["choices"]
    assert alone["usage"]["completion_tokens"] > 20
