from __future__ import annotations

import pytest

from handler.errors import InvalidRequest, NotFound
from handler.protocol import (
    NativeBatch,
    NativeJob,
    OpenAIRouteJob,
    Shape,
    batch_items,
    normalize_route,
    parse_job,
    to_engine_call,
)
from handler.settings import Settings


def test_openai_route_job(settings: Settings) -> None:
    job = parse_job(
        {
            "openai_route": "/v1/chat/completions",
            "openai_input": {"model": "m", "messages": [], "stream": True},
        }
    )
    call, shape = to_engine_call(job, settings, "job-1")
    assert shape is Shape.OPENAI
    assert call.route == "/v1/chat/completions" and call.stream
    assert call.request_id.startswith("job-1-")
    assert dict(call.body) == {
        "model": "m",
        "messages": [],
        "stream": True,
        "request_id": call.request_id,
    }


@pytest.mark.parametrize("openai_input", [None, {}])
def test_models_route_without_input(
    settings: Settings, openai_input: dict[str, str] | None
) -> None:
    call, shape = to_engine_call(
        parse_job({"openai_route": "/v1/models", "openai_input": openai_input}), settings, "j"
    )
    assert (call.route, dict(call.body), shape) == ("/v1/models", {}, Shape.OPENAI)


def test_native_chat_gets_defaults(settings: Settings) -> None:
    job = parse_job(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "sampling_params": {"temperature": 0},
        }
    )
    call, shape = to_engine_call(job, settings, "j")
    assert shape is Shape.NATIVE
    assert dict(call.body) == {
        "temperature": 0,
        "max_tokens": 100,
        "stream_options": {"include_usage": True},
        "model": "fake-model",
        "stream": True,
        "request_id": call.request_id,
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_native_prompt_keeps_given_max_tokens(settings: Settings) -> None:
    job = parse_job(
        {"prompt": "Once", "sampling_params": {"max_completion_tokens": 5}, "model": "other"}
    )
    call, _ = to_engine_call(job, settings, "j")
    assert call.route == "/v1/completions"
    assert dict(call.body) == {
        "max_completion_tokens": 5,
        "model": "other",
        "stream": False,
        "request_id": call.request_id,
        "prompt": "Once",
    }


def test_the_callers_dict_is_not_changed(settings: Settings) -> None:
    given = {"messages": [{"role": "user", "content": "hi"}], "sampling_params": {"n": 1}}
    to_engine_call(parse_job(given), settings, "j")
    assert given == {"messages": [{"role": "user", "content": "hi"}], "sampling_params": {"n": 1}}


@pytest.mark.parametrize(
    ("job_input", "param"),
    [
        ("hello", "input"),
        ([1, 2], "input"),
        ({}, "input"),
        ({"messages": [], "prompt": "x"}, "input"),
        ({"messages": "hi"}, "input.messages"),
        ({"prompt": "x", "stream": "maybe"}, "input.stream"),
        ({"prompt": "x", "sampling_param": {}}, "input.sampling_param"),
        ({"openai_route": 3}, "input.openai_route"),
        ({"prompt": "x", "input": "y"}, "input"),
        ({"prompt": "x", "tools": []}, "input"),
        ({"input": "x", "stream": True}, "input"),
        ({"requests": []}, "input.requests"),
        ({"requests": "x"}, "input.requests"),
        ({"openai_route": "/v1/completions", "openai_input": [1]}, "input.openai_input"),
    ],
)
def test_malformed_jobs_are_400(job_input: object, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_job(job_input)
    assert caught.value.status == 400
    assert (caught.value.param or "").startswith(param)


@pytest.mark.parametrize(
    ("raw", "route"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("v1/completions/", "/v1/completions"),
        ("/models", "/v1/models"),
        (" /v1/models ", "/v1/models"),
    ],
)
def test_route_spellings(raw: str, route: str) -> None:
    assert normalize_route(raw) == route


def test_unknown_route_lists_the_supported_ones() -> None:
    with pytest.raises(NotFound) as caught:
        normalize_route("/v1/images/generations")
    assert caught.value.message == (
        "unknown openai_route '/v1/images/generations'; supported routes: "
        "/v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings, /v1/tokenize, "
        "/v1/detokenize, /v1/responses"
    )


def test_job_models_are_distinct_types() -> None:
    assert isinstance(parse_job({"openai_route": "/v1/models"}), OpenAIRouteJob)
    assert isinstance(parse_job({"prompt": "x"}), NativeJob)


def test_native_tools_and_structured_outputs(settings: Settings) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    job = parse_job(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": tools,
            "tool_choice": "auto",
            "sampling_params": {"structured_outputs": {"choice": ["a", "b"]}, "logprobs": True},
        }
    )
    call, _ = to_engine_call(job, settings, "j")
    assert dict(call.body) == {
        "structured_outputs": {"choice": ["a", "b"]},
        "logprobs": True,
        "model": "fake-model",
        "request_id": call.request_id,
        "max_tokens": 100,
        "stream": False,
        "tools": tools,
        "tool_choice": "auto",
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_native_embeddings(settings: Settings) -> None:
    job = parse_job({"input": ["a", "b"], "sampling_params": {"encoding_format": "base64"}})
    call, shape = to_engine_call(job, settings, "j")
    assert (call.route, shape) == ("/v1/embeddings", Shape.NATIVE)
    assert dict(call.body) == {
        "encoding_format": "base64",
        "model": "fake-model",
        "request_id": call.request_id,
        "input": ["a", "b"],
    }


@pytest.mark.parametrize(
    ("route", "tracked"),
    [("/v1/tokenize", False), ("/v1/detokenize", False), ("/v1/responses", True)],
)
def test_request_id_only_where_an_engine_request_runs(
    settings: Settings, route: str, tracked: bool
) -> None:
    call, _ = to_engine_call(
        parse_job({"openai_route": route, "openai_input": {"model": "m"}}), settings, "j"
    )
    assert ("request_id" in call.body) is tracked
    if route == "/v1/responses":
        assert call.body["request_id"] == "resp_" + call.request_id


def test_batch_items_are_parsed_one_by_one(settings: Settings) -> None:
    batch = parse_job(
        {"requests": [{"prompt": "a"}, {"prompt": 3}, {"prompt": "b", "stream": True}]}
    )
    assert isinstance(batch, NativeBatch)
    good, bad_type, streamed = batch_items(batch, settings)
    assert good == NativeJob(prompt="a")
    assert isinstance(bad_type, InvalidRequest) and bad_type.param == "input.requests.1.prompt.str"
    assert isinstance(streamed, InvalidRequest)
    assert (streamed.message, streamed.param) == (
        "requests in a batch are not streamed",
        "input.requests.2",
    )


def test_batch_size_is_bounded(settings: Settings) -> None:
    small = settings.model_copy(update={"max_batch_requests": 2})
    with pytest.raises(InvalidRequest) as caught:
        batch_items(NativeBatch(requests=[{"prompt": "x"}] * 3), small)
    assert caught.value.message == (
        "a batch may carry at most 2 requests (MAX_BATCH_REQUESTS), got 3"
    )
