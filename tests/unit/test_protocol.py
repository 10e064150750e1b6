from __future__ import annotations

import pytest

from handler.errors import InvalidRequest, NotFound
from handler.protocol import (
    NativeJob,
    OpenAIRouteJob,
    Shape,
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
        "/v1/chat/completions, /v1/completions, /v1/models"
    )


def test_job_models_are_distinct_types() -> None:
    assert isinstance(parse_job({"openai_route": "/v1/models"}), OpenAIRouteJob)
    assert isinstance(parse_job({"prompt": "x"}), NativeJob)
