"""The handler on the real vLLM engine: both job shapes, streamed and one-shot, bad input,
cancellation. Outputs are checked with the OpenAI SDK's own types and stream parser."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import pytest
from openai import OpenAI, Stream
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from runpod.serverless.modules import rp_job

from handler.engine.vllm_engine import VllmEngine
from handler.jobs import make_handler
from handler.settings import Settings
from local_endpoint.harness import MODEL_ID
from tests.integration.conftest import LORA

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
ANSWER = "The capital of France is Paris."
PROMPT = "The three primary colors are"
GREEDY = {"temperature": 0, "max_tokens": 24}


async def run(engine: VllmEngine, settings: Settings, job_input: Any) -> list[Any]:
    handler = make_handler(engine, settings)
    return [out async for out in handler({"id": "it", "input": job_input})]


def openai_job(route: str, **body: Any) -> dict[str, Any]:
    return {"openai_route": route, "openai_input": {"model": MODEL_ID, **body}}


def parse_sse(text: str, cast_to: type[Any]) -> list[Any]:
    """The SSE text as the openai SDK's stream parser reads it from an HTTP response."""
    client = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    response = httpx2.Response(
        200,
        content=text.encode(),
        headers={"content-type": "text/event-stream"},
        request=httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions"),
    )
    return list(Stream(cast_to=cast_to, response=response, client=client))


def error_of(outputs: list[Any]) -> dict[str, Any]:
    assert len(outputs) == 1 and list(outputs[0]) == ["error"]
    body = json.loads(outputs[0]["error"])
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


@pytest.fixture(autouse=True)
def nothing_left_running(engine: VllmEngine) -> Any:
    yield
    assert engine.running_requests() == 0


async def test_openai_chat_one_shot(engine: VllmEngine, settings: Settings) -> None:
    [out] = await run(
        engine, settings, openai_job("/v1/chat/completions", messages=QUESTION, **GREEDY)
    )
    reply = ChatCompletion.model_validate(out)
    assert (reply.model, reply.choices[0].message.content) == (MODEL_ID, ANSWER)
    assert reply.choices[0].finish_reason == "stop" and reply.usage is not None


async def test_openai_chat_stream_parses_as_openai_chunks(
    engine: VllmEngine, settings: Settings
) -> None:
    outputs = await run(
        engine,
        settings,
        openai_job(
            "/v1/chat/completions",
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        ),
    )
    assert all(isinstance(o, str) for o in outputs) and outputs[-1].endswith("data: [DONE]\n\n")
    chunks = parse_sse("".join(outputs), ChatCompletionChunk)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.usage is not None for c in chunks].count(True) == 1 and chunks[-1].usage


async def test_openai_completion_stream_equals_one_shot(
    engine: VllmEngine, settings: Settings
) -> None:
    [one] = await run(engine, settings, openai_job("/v1/completions", prompt=PROMPT, **GREEDY))
    one_shot = Completion.model_validate(one)
    outputs = await run(
        engine, settings, openai_job("/v1/completions", prompt=PROMPT, stream=True, **GREEDY)
    )
    chunks = parse_sse("".join(outputs), Completion)
    assert "".join(c.choices[0].text for c in chunks) == one_shot.choices[0].text
    assert one_shot.usage is not None and one_shot.usage.completion_tokens == 24


async def test_native_chat_stream_equals_one_shot(engine: VllmEngine, settings: Settings) -> None:
    [one] = await run(engine, settings, {"messages": QUESTION, "sampling_params": GREEDY})
    assert ChatCompletion.model_validate(one).choices[0].message.content == ANSWER
    outputs = await run(
        engine, settings, {"messages": QUESTION, "sampling_params": GREEDY, "stream": True}
    )
    chunks = [ChatCompletionChunk.model_validate(o) for o in outputs]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == one["usage"]["completion_tokens"]


async def test_native_prompt_default_max_tokens(engine: VllmEngine, settings: Settings) -> None:
    # DEFAULT_MAX_TOKENS applies where a native job gives none (its 512 would take a minute here)
    settings = settings.model_copy(update={"default_max_tokens": 40})
    [one] = await run(engine, settings, {"prompt": PROMPT, "sampling_params": {"temperature": 0}})
    reply = Completion.model_validate(one)
    assert reply.usage is not None and reply.choices[0].text
    # not vLLM's 16: greedy, this prompt runs on to DEFAULT_MAX_TOKENS
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (40, "length")
    outputs = await run(
        engine, settings, {"prompt": PROMPT, "sampling_params": {"temperature": 0}, "stream": True}
    )
    # the SDK reads completion chunks with its stream parser (its Completion type has no
    # finish_reason null), so the native chunks go through that parser too
    chunks = parse_sse("".join(f"data: {json.dumps(o)}\n\n" for o in outputs), Completion)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].usage is not None


async def test_models(engine: VllmEngine, settings: Settings) -> None:
    [out] = await run(engine, settings, {"openai_route": "/v1/models"})
    assert [Model.model_validate(m).id for m in out["data"]] == [MODEL_ID, LORA]
    # the in-process engine runs in float32
    assert {m["quantization"] for m in out["data"]} == {"fp32"}
    import torch

    # where the model runs sets the stream POST budget when STREAM_POSTS_PER_S is unset
    assert engine.model_info.on_cpu is (not torch.cuda.is_available())


LONG = "hello " * 3000


@pytest.mark.parametrize(
    ("job_input", "code", "param"),
    [
        pytest.param(
            {"openai_route": "/v1/images/generations", "openai_input": {}},
            404,
            "openai_route",
            id="unknown-route",
        ),
        pytest.param(openai_job("/v1/chat/completions", messages=5), 400, None, id="wrong-type"),
        pytest.param(
            openai_job("/v1/chat/completions", messages=[{"role": 1}]),
            400,
            "messages",
            id="wrong-message-type",
        ),
        pytest.param(
            {"messages": QUESTION, "sampling_params": {"temperature": "hot"}},
            400,
            "temperature",
            id="malformed-value",
        ),
        pytest.param({"prompt": "x", "sampling_params": {"n": -1}}, 400, None, id="negative-n"),
        pytest.param(
            openai_job("/v1/chat/completions", messages=QUESTION, model="gpt-4o"),
            404,
            None,
            id="unknown-model",
        ),
        pytest.param({"prompt": LONG}, 400, None, id="prompt-over-context"),
        pytest.param(
            {"messages": QUESTION, "sampling_params": {"max_tokens": 100_000}},
            400,
            None,
            id="max-tokens-over-context",
        ),
        pytest.param({"prompt": 12}, 400, "input.prompt", id="prompt-not-text"),
    ],
)
async def test_bad_input_is_one_openai_error(
    engine: VllmEngine, settings: Settings, job_input: Any, code: int, param: str | None
) -> None:
    error = error_of(await run(engine, settings, job_input))
    assert error["code"] == code
    if param is not None:
        assert (error["param"] or "").startswith(param)
    for bad in ("Traceback", "/root/", "/usr/", " at 0x", "<class"):
        assert bad not in error["message"]
    [out] = await run(engine, settings, {"messages": QUESTION, "sampling_params": GREEDY})
    assert out["choices"][0]["message"]["content"] == ANSWER  # still serving


async def test_cancelled_stream_leaves_no_running_request(
    engine: VllmEngine, settings: Settings
) -> None:
    handler = make_handler(engine, settings)
    seen: list[Any] = []

    async def consume() -> None:
        job = {
            "prompt": "Count from one to one thousand:",
            "stream": True,
            "sampling_params": {"max_tokens": 1500, "ignore_eos": True},
        }
        async for out in handler({"id": "to-cancel", "input": job}):
            seen.append(out)

    task = asyncio.create_task(consume())
    while len(seen) < 3:
        await asyncio.sleep(0.01)
    assert engine.running_requests() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.running_requests() == 0


async def test_through_runpods_job_loop(
    engine: VllmEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    streamed: list[Any] = []
    sent: list[Any] = []

    async def stream_result(_s: Any, data: Any, _job: Any) -> None:
        streamed.append(data)

    async def send_result(_s: Any, data: Any, _job: Any, is_stream: bool = False) -> None:
        sent.append((data, is_stream))

    monkeypatch.setattr(rp_job, "stream_result", stream_result)
    monkeypatch.setattr(rp_job, "send_result", send_result)
    config = {"handler": make_handler(engine, settings), "return_aggregate_stream": True}
    job = {
        "id": "rp",
        "input": openai_job("/v1/chat/completions", messages=QUESTION, stream=True, **GREEDY),
    }
    await rp_job.handle_job(None, config, job)
    outputs = [s["output"] for s in streamed]
    assert sent == [({"output": outputs}, True)]
    chunks = parse_sse("".join(outputs), ChatCompletionChunk)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
