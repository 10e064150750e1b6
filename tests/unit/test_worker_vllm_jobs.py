"""Jobs written for RunPod's official worker (runpod-workers/worker-vllm: v2.x in-process, and
HEAD's generic form) on the fake engine: accepted with worker-vllm's meaning, and answered in its
v2 shape with NATIVE_OUTPUT_FORMAT=worker-vllm-v2 or a job's ``use_openai_format: false``."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from handler.errors import InvalidRequest
from handler.jobs import make_handler
from handler.protocol import Shape, to_engine_call
from handler.settings import Settings
from handler.v2_shape import V2Stream, v2_response
from tests.fakes import TEXT, TOKENS, FakeEngine, chat_response, sse
from tests.jobs import parse_single

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def v2_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"native_output_format": "worker-vllm-v2"})


async def run(engine: FakeEngine, settings: Settings, job_input: Any) -> list[Any]:
    handler = make_handler(engine, settings)
    return [out async for out in handler({"id": "job-1", "input": job_input})]


def call_of(settings: Settings, job_input: dict[str, Any]) -> tuple[dict[str, Any], str, Shape]:
    call, shape = to_engine_call(parse_single(job_input), settings, "j")
    return dict(call.body or {}), call.route, shape


def test_generic_form_with_method_as_worker_vllms_readme_sends_it(settings: Settings) -> None:
    readme_job = {  # worker-vllm README, "call any vLLM route directly"
        "route": "/v1/chat/completions",
        "method": "POST",
        "body": {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hello"}],
            "stream": True,
        },
    }
    call, shape = to_engine_call(parse_single(readme_job), settings, "j")
    assert (call.route, call.method, dict(call.body or {}), shape) == (
        "/v1/chat/completions",
        "POST",
        readme_job["body"],
        Shape.NATIVE,
    )
    models, _ = to_engine_call(
        parse_single({"route": "/v1/models", "method": "get"}), settings, "j"
    )
    assert (models.route, models.method) == ("/v1/models", "GET")


@pytest.mark.parametrize(
    ("route", "method"), [("/v1/models", "POST"), ("/v1/completions", "GET"), ("/tokenize", "PUT")]
)
def test_a_method_the_route_does_not_take_is_a_405(
    settings: Settings, route: str, method: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        to_engine_call(parse_single({"route": route, "method": method, "body": {}}), settings, "j")
    assert (caught.value.status, caught.value.param) == (405, "input.method")
    assert route in caught.value.message


def test_apply_chat_template_sends_the_prompt_as_one_user_message(settings: Settings) -> None:
    body, route, _ = call_of(
        settings, {"prompt": "Why is the sky blue?", "apply_chat_template": True}
    )
    assert route == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
    assert "prompt" not in body
    plain, plain_route, _ = call_of(settings, {"prompt": "Why", "apply_chat_template": False})
    assert (plain_route, plain["prompt"]) == ("/v1/completions", "Why")


def test_messages_win_over_prompt_as_in_worker_vllm(settings: Settings) -> None:
    body, route, _ = call_of(settings, {"messages": HI, "prompt": "ignored"})
    assert (route, body["messages"], "prompt" in body) == ("/v1/chat/completions", HI, False)


def test_model_inside_sampling_params_selects_the_model(settings: Settings) -> None:
    body, _, _ = call_of(settings, {"prompt": "x", "sampling_params": {"model": "smol-lora"}})
    assert body["model"] == "smol-lora"
    same, _, _ = call_of(settings, {"prompt": "x", "model": "a", "sampling_params": {"model": "a"}})
    assert same["model"] == "a"
    with pytest.raises(InvalidRequest) as caught:
        call_of(settings, {"prompt": "x", "model": "a", "sampling_params": {"model": "b"}})
    assert caught.value.param == "input.sampling_params.model"


async def test_an_unknown_model_in_sampling_params_reaches_the_engine(
    engine: FakeEngine, settings: Settings
) -> None:
    [out] = await run(engine, settings, {"prompt": "x", "sampling_params": {"model": "gpt-9"}})
    assert engine.calls[0].body is not None and engine.calls[0].body["model"] == "gpt-9"
    assert '"code": 404' in out["error"]


async def test_batch_hints_are_accepted_and_logged_once(
    engine: FakeEngine, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    job = {
        "prompt": "x",
        "stream": True,
        "max_batch_size": 10,
        "min_batch_size": "1",
        "batch_size_growth_factor": 3,
    }
    handler = make_handler(engine, settings)
    with caplog.at_level(logging.INFO, logger="handler.jobs"):
        for i in range(3):
            outputs = [o async for o in handler({"id": f"j{i}", "input": job})]
            assert "".join(c["choices"][0]["text"] for c in outputs if c["choices"]) == TEXT
    notes = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    assert len(notes) == 1
    for key in ("max_batch_size", "min_batch_size", "batch_size_growth_factor"):
        assert key in notes[0]


def test_use_openai_format_overrides_the_setting(settings: Settings, v2_settings: Settings) -> None:
    assert call_of(settings, {"prompt": "x"})[2] is Shape.NATIVE
    assert call_of(v2_settings, {"prompt": "x"})[2] is Shape.V2
    assert call_of(v2_settings, {"prompt": "x", "use_openai_format": True})[2] is Shape.NATIVE
    assert call_of(settings, {"prompt": "x", "use_openai_format": False})[2] is Shape.V2
    assert call_of(v2_settings, {"input": "x"})[2] is Shape.NATIVE  # embeddings: v2 had none


def test_v2_streams_ask_vllm_for_usage_in_every_chunk(v2_settings: Settings) -> None:
    body, _, _ = call_of(
        v2_settings,
        {"prompt": "x", "stream": True, "sampling_params": {"stream_options": {}}},
    )
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


async def test_v2_one_shot(engine: FakeEngine, v2_settings: Settings) -> None:
    outputs = await run(engine, v2_settings, {"prompt": "x", "sampling_params": {"n": 1}})
    assert outputs == [
        {"choices": [{"tokens": [TEXT]}], "usage": {"input": 12, "output": len(TOKENS)}}
    ]


@pytest.mark.parametrize("job", [{"prompt": "x"}, {"messages": HI}])
async def test_v2_stream_one_batch_per_token_without_merging(
    engine: FakeEngine, v2_settings: Settings, job: dict[str, Any]
) -> None:
    outputs = await run(engine, v2_settings, {**job, "stream": True})
    assert outputs == [
        {"choices": [{"tokens": [token]}], "usage": {"input": 12, "output": i + 1}}
        for i, token in enumerate(TOKENS)
    ]


async def test_v2_stream_coalesced_keeps_each_piece(v2_settings: Settings) -> None:
    settings = v2_settings.model_copy(update={"stream_flush_interval_ms": 10_000.0})
    engine = FakeEngine()
    outputs = await run(engine, settings, {"messages": HI, "stream": True})
    assert [t for o in outputs for t in o["choices"][0]["tokens"]] == TOKENS
    assert outputs[-1]["usage"] == {"input": 12, "output": len(TOKENS)}
    assert len(outputs) < len(TOKENS)


async def test_v2_batch_job_answers_each_request_in_v2_shape(
    engine: FakeEngine, v2_settings: Settings
) -> None:
    [out] = await run(
        engine,
        v2_settings,
        {"requests": [{"prompt": "x"}, {"prompt": "y", "use_openai_format": True}]},
    )
    v2, openai = out["results"]
    assert v2 == {"choices": [{"tokens": [TEXT]}], "usage": {"input": 12, "output": 7}}
    assert openai == chat_response(engine.calls[1])


async def test_v2_stream_error_mid_stream_fails_the_job(v2_settings: Settings) -> None:
    engine = FakeEngine(error_event_after=3)
    outputs = await run(engine, v2_settings, {"prompt": "x", "stream": True})
    assert [o["choices"][0]["tokens"] for o in outputs[:-1]] == [[t] for t in TOKENS[:3]]
    assert '"code": 500' in outputs[-1]["error"]


async def test_a_v2_job_with_every_v2_key(engine: FakeEngine, settings: Settings) -> None:
    job = {  # worker-vllm v2.x JobInput reads exactly these keys
        "prompt": "Why is the sky blue?",
        "messages": None,
        "stream": False,
        "max_batch_size": 50,
        "min_batch_size": 1,
        "batch_size_growth_factor": 3,
        "apply_chat_template": True,
        "use_openai_format": False,
        "sampling_params": {"temperature": 0.7, "max_tokens": 100},
    }
    outputs = await run(engine, settings, job)
    assert outputs == [{"choices": [{"tokens": [TEXT]}], "usage": {"input": 12, "output": 7}}]
    [call] = engine.calls
    assert call.route == "/v1/chat/completions" and call.body is not None
    assert call.body["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]


def test_v2_shape_keeps_each_choice_in_its_place() -> None:
    response = {
        "choices": [
            {"index": 1, "text": "b"},
            {"index": 0, "message": {"role": "assistant", "content": "a"}},
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    assert v2_response(response) == {
        "choices": [{"tokens": ["a"]}, {"tokens": ["b"]}],
        "usage": {"input": 3, "output": 4},
    }
    stream = V2Stream(2)

    def chunk(index: int, text: str, done: int) -> str:
        usage = {"prompt_tokens": 3, "completion_tokens": done}
        return sse({"id": "x", "choices": [{"index": index, "text": text}], "usage": usage})

    assert stream.frame([chunk(1, "b", 1), chunk(0, "a", 2), chunk(1, "c", 3)]) == [
        {"choices": [{"tokens": ["a"]}, {"tokens": ["b", "c"]}], "usage": {"input": 3, "output": 3}}
    ]
    assert stream.frame([chunk(0, "", 3)]) == []  # no text, nothing new: not sent
    final = sse({"id": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    assert stream.frame([final, "data: [DONE]\n\n"]) == [
        {"choices": [{"tokens": []}, {"tokens": []}], "usage": {"input": 3, "output": 4}}
    ]


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ({"logprobs": 3}, {"logprobs": True, "top_logprobs": 3}),
        ({"logprobs": 0}, {"logprobs": True, "top_logprobs": 0}),
        ({"logprobs": 2, "top_logprobs": 5}, {"logprobs": True, "top_logprobs": 5}),
        ({"logprobs": True, "top_logprobs": 1}, {"logprobs": True, "top_logprobs": 1}),
        ({"logprobs": False}, {"logprobs": False}),
    ],
)
def test_v2_logprobs_count_on_chat_becomes_top_logprobs(
    settings: Settings, given: dict[str, Any], sent: dict[str, Any]
) -> None:
    body, _, _ = call_of(settings, {"messages": HI, "sampling_params": given})
    assert {k: body[k] for k in ("logprobs", "top_logprobs") if k in body} == sent
    completion, _, _ = call_of(settings, {"prompt": "x", "sampling_params": given})
    assert completion["logprobs"] == given["logprobs"]  # completions take the count as it is
