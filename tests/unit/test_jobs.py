"""The handler on the fake engine: the whole list of yields, directly and through runpod's
own job code (rp_job.handle_job with only its two network calls replaced)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from runpod.serverless.modules import rp_job

from handler.jobs import make_handler
from handler.model_card import describe_models
from handler.protocol import ROUTES
from handler.settings import Settings
from tests.fakes import (
    ENGINE_CORE_ERROR,
    MODELS,
    TEXT,
    FakeEngine,
    chat_events,
    chat_response,
    completion_events,
)

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Capital of France?"}]}


async def run(
    engine: FakeEngine, settings: Settings, job_input: Any, on_dead: list[str] | None = None
) -> list[Any]:
    sink = on_dead if on_dead is not None else []
    handler = make_handler(engine, settings, lambda: sink.append("dead"))
    return [out async for out in handler({"id": "job-1", "input": job_input})]


def error_of(output: Any) -> dict[str, Any]:
    assert isinstance(output, dict) and list(output) == ["error"]
    body = json.loads(output["error"])
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


async def test_openai_route_streams_sse_text(engine: FakeEngine, settings: Settings) -> None:
    job = {"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, "stream": True}}
    outputs = await run(engine, settings, job)
    assert outputs == chat_events(engine.calls[0])  # interval 0: one yield per event


async def test_openai_route_one_shot(engine: FakeEngine, settings: Settings) -> None:
    outputs = await run(
        engine, settings, {"openai_route": "/v1/chat/completions", "openai_input": CHAT}
    )
    assert outputs == [chat_response(engine.calls[0])]


async def test_models_route_adds_the_openrouter_fields(
    engine: FakeEngine, settings: Settings
) -> None:
    outputs = await run(engine, settings, {"openai_route": "/v1/models"})
    assert outputs == [describe_models(MODELS, settings, engine.model_info)]
    [text] = outputs[0]["data"][0]["input_modalities"]
    assert text["supported_inputs"]["max_context_length"] == {"value": 2048, "unit": "token"}


async def test_native_batch_keeps_order_with_an_error_in_place(
    settings: Settings,
) -> None:
    engine = FakeEngine(pause=0.01)
    requests = [
        {"messages": CHAT["messages"]},
        {"messages": CHAT["messages"], "model": "gpt-9"},
        {"prompt": 7},
        {"prompt": "The capital"},
    ]
    outputs = await run(engine, settings, {"requests": requests})
    first, last = engine.calls[0], engine.calls[2]
    assert [c.request_id.rsplit("-", 1)[0] for c in engine.calls] == [
        "job-1-0",
        "job-1-1",
        "job-1-3",
    ]
    assert outputs == [
        {
            "results": [
                chat_response(first),
                {
                    "error": {
                        "message": "The model `gpt-9` does not exist.",
                        "type": "NotFoundError",
                        "param": "model",
                        "code": 404,
                    }
                },
                {
                    "error": {
                        "message": "input.requests.2.prompt.str: Input should be a valid string; "
                        "input.requests.2.prompt.list[str]: Input should be a valid list; "
                        "input.requests.2.prompt.list[int]: Input should be a valid list; "
                        "input.requests.2.prompt.list[list[int]]: Input should be a valid list",
                        "type": "BadRequestError",
                        "param": "input.requests.2.prompt.str",
                        "code": 400,
                    }
                },
                chat_response(last),
            ]
        }
    ]


async def test_native_batch_runs_concurrently(settings: Settings) -> None:
    engine = FakeEngine(pause=0.2)
    outputs = await run(
        engine, settings, {"requests": [{"messages": CHAT["messages"], "stream": False}] * 8}
    )
    assert len(outputs[0]["results"]) == 8
    assert engine.peak >= 8


async def test_native_stream_yields_chunk_dicts(engine: FakeEngine, settings: Settings) -> None:
    outputs = await run(engine, settings, {"prompt": "The capital", "stream": True})
    call = engine.calls[0]
    assert call.body is not None
    assert call.body["max_tokens"] == 100
    expected = [json.loads(e[len("data: ") :]) for e in completion_events(call)[:-1]]
    assert outputs == expected


async def test_native_stream_coalesced(engine: FakeEngine, settings: Settings) -> None:
    slow = settings.model_copy(update={"stream_flush_interval_ms": 60_000.0})
    outputs = await run(engine, slow, {"messages": CHAT["messages"], "stream": True})
    call = engine.calls[0]
    # the role-only chunk waits for the first token and goes out with it (and with whatever
    # else was ready then), merged into one chunk; the rest is held for the interval
    first = outputs[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"].startswith("The")
    assert [o["choices"][0]["delta"] if o["choices"] else o["usage"] for o in outputs] == [
        {"role": "assistant", "content": first["content"]},
        {"content": TEXT[len(first["content"]) :]},
        {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    ]
    assert all(o["id"] == f"chatcmpl-{call.request_id}" for o in outputs)


async def test_unknown_model_is_a_404(engine: FakeEngine, settings: Settings) -> None:
    outputs = await run(
        engine,
        settings,
        {"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, "model": "gpt-9"}},
    )
    assert len(outputs) == 1
    assert error_of(outputs[0]) == {
        "message": "The model `gpt-9` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


@pytest.mark.parametrize(
    ("job_input", "code"),
    [
        (None, 400),
        ("text", 400),
        ({"openai_route": "/v1/images/generations"}, 404),
        ({"messages": 7}, 400),
        ({"prompt": "x", "sampling_params": []}, 400),
    ],
)
async def test_bad_jobs_end_with_one_error(
    engine: FakeEngine, settings: Settings, job_input: Any, code: int
) -> None:
    outputs = await run(engine, settings, job_input)
    assert len(outputs) == 1 and error_of(outputs[0])["code"] == code
    assert engine.calls == []


async def test_failure_mid_stream_fails_the_job_without_leaking(settings: Settings) -> None:
    engine = FakeEngine(fail_after=3)
    outputs = await run(
        engine,
        settings,
        {"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, "stream": True}},
    )
    assert outputs[:3] == chat_events(engine.calls[0])[:3]
    assert error_of(outputs[3]) == {
        "message": "Internal error (RuntimeError); the worker keeps serving.",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
    assert len(outputs) == 4


async def test_an_error_event_fails_the_job_after_what_came_before(settings: Settings) -> None:
    engine = FakeEngine(error_event_after=3)
    job = {"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, "stream": True}}
    dead: list[str] = []
    outputs = await run(engine, settings, job, dead)
    assert outputs[:3] == chat_events(engine.calls[0])[:3]
    assert error_of(outputs[3]) == ENGINE_CORE_ERROR
    assert len(outputs) == 4 and dead == []


@pytest.mark.parametrize("native", [False, True])
async def test_engine_death_mid_stream_is_a_503(settings: Settings, native: bool) -> None:
    engine = FakeEngine(error_event_after=2, dies_mid_stream=True)
    job: dict[str, Any] = {"messages": CHAT["messages"], "stream": True}
    if not native:
        job = {"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, "stream": True}}
    dead: list[str] = []
    outputs = await run(engine, settings, job, dead)
    assert len(outputs) == 3 and dead == ["dead"]
    assert error_of(outputs[2]) == {
        "message": "The inference engine has stopped; this worker is shutting down and the job "
        "should be retried on another worker.",
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 503,
    }


async def test_a_model_card_by_id(engine: FakeEngine, settings: Settings) -> None:
    [card] = await run(engine, settings, {"openai_route": "/v1/models/fake-model"})
    assert card == describe_models(MODELS, settings, engine.model_info)["data"][0]
    [missing] = await run(engine, settings, {"route": "/v1/models/gpt-9"})
    assert error_of(missing) == {
        "message": "The model `gpt-9` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


async def test_the_native_generic_form_calls_the_route(
    engine: FakeEngine, settings: Settings
) -> None:
    [answer] = await run(engine, settings, {"route": "/v1/chat/completions", "body": CHAT})
    assert answer == chat_response(engine.calls[0])
    assert (engine.calls[0].route, dict(engine.calls[0].body or {})) == (
        "/v1/chat/completions",
        CHAT,
    )


@pytest.mark.parametrize(
    "job_input", [{"route": "/sleep"}, {"openai_route": "/collective_rpc", "openai_input": {}}]
)
async def test_administrative_routes_are_404s(
    engine: FakeEngine, settings: Settings, job_input: dict[str, Any]
) -> None:
    [output] = await run(engine, settings, job_input)
    error = error_of(output)
    assert (error["code"], error["type"]) == (404, "NotFoundError")
    assert "is not available to jobs" in error["message"] and engine.calls == []


async def test_dead_engine_fails_the_job_and_reports(settings: Settings) -> None:
    engine = FakeEngine()
    engine.is_dead = True
    dead: list[str] = []
    outputs = await run(engine, settings, {"prompt": "x"}, dead)
    assert error_of(outputs[0])["code"] == 503 and dead == ["dead"] and len(outputs) == 1


async def test_cancelling_a_job_closes_its_stream(settings: Settings) -> None:
    engine = FakeEngine(pause=0.05)
    handler = make_handler(engine, settings)
    seen: list[Any] = []

    async def consume() -> None:
        async for out in handler({"id": "job-9", "input": {"prompt": "x", "stream": True}}):
            seen.append(out)

    task = asyncio.create_task(consume())
    while len(seen) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.closed_early == [engine.calls[0].request_id]
    assert engine.running_requests() == 0


class RunPodNetwork:
    """Stands in for the two POSTs runpod's job code makes."""

    def __init__(self) -> None:
        self.streamed: list[Any] = []
        self.sent: list[tuple[dict[str, Any], bool]] = []

    async def stream_result(self, _session: Any, data: dict[str, Any], _job: Any) -> None:
        self.streamed.append(data)

    async def send_result(
        self, _session: Any, data: dict[str, Any], _job: Any, is_stream: bool = False
    ) -> None:
        self.sent.append((data, is_stream))


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> RunPodNetwork:
    net = RunPodNetwork()
    monkeypatch.setattr(rp_job, "stream_result", net.stream_result)
    monkeypatch.setattr(rp_job, "send_result", net.send_result)
    return net


async def test_runpod_aggregates_a_stream(
    engine: FakeEngine, settings: Settings, network: RunPodNetwork
) -> None:
    config = {"handler": make_handler(engine, settings), "return_aggregate_stream": True}
    job = {
        "id": "j",
        "input": {"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, "stream": True}},
    }
    await rp_job.handle_job(None, config, job)
    events = chat_events(engine.calls[0])
    assert network.streamed == [{"output": e} for e in events]
    assert network.sent == [({"output": events}, True)]


async def test_runpod_fails_the_job_with_the_json_error(
    engine: FakeEngine, settings: Settings, network: RunPodNetwork
) -> None:
    config = {"handler": make_handler(engine, settings), "return_aggregate_stream": True}
    await rp_job.handle_job(None, config, {"id": "j", "input": {"openai_route": "/v2/nothing"}})
    assert network.streamed == []
    [(result, is_stream)] = network.sent
    assert is_stream and list(result) == ["error"]
    assert json.loads(result["error"]) == {
        "error": {
            "message": "unknown route '/v2/nothing'; public routes: " + ", ".join(ROUTES),
            "type": "NotFoundError",
            "param": "openai_route",
            "code": 404,
        }
    }
