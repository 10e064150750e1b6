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
from tests.jobs import parse_single


def test_openai_route_job(settings: Settings) -> None:
    job = parse_single(
        {
            "openai_route": "/v1/chat/completions",
            "openai_input": {"model": "m", "messages": [], "stream": True},
        }
    )
    call, shape = to_engine_call(job, settings, "job-1")
    assert shape is Shape.OPENAI
    assert call.route == "/v1/chat/completions" and call.stream
    assert call.request_id.startswith("job-1-")
    assert dict(call.body or {}) == {
        "model": "m",
        "messages": [],
        "stream": True,
    }
    assert call.method == "POST"


@pytest.mark.parametrize("openai_input", [None, {}])
def test_models_route_without_input(
    settings: Settings, openai_input: dict[str, str] | None
) -> None:
    call, shape = to_engine_call(
        parse_single({"openai_route": "/v1/models", "openai_input": openai_input}), settings, "j"
    )
    assert (call.route, call.method, call.body, shape) == (
        "/v1/models",
        "GET",
        None,
        Shape.OPENAI,
    )


def test_native_generic_form_reaches_any_public_route(settings: Settings) -> None:
    body = {"model": "m", "query": "q", "documents": ["a"]}
    call, shape = to_engine_call(parse_single({"route": "/v1/rerank", "body": body}), settings, "j")
    assert (call.route, call.method, dict(call.body or {}), shape) == (
        "/v1/rerank",
        "POST",
        body,
        Shape.NATIVE,
    )
    retrieve, _ = to_engine_call(parse_single({"route": "/v1/models/org/name"}), settings, "j")
    assert (retrieve.route, retrieve.method, retrieve.body) == ("/v1/models/org/name", "GET", None)


def test_native_chat_gets_defaults(settings: Settings) -> None:
    job = parse_single(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "sampling_params": {"temperature": 0},
        }
    )
    call, shape = to_engine_call(job, settings, "j")
    assert shape is Shape.NATIVE
    assert dict(call.body or {}) == {
        "temperature": 0,
        "max_tokens": 100,
        "stream_options": {"include_usage": True},
        "model": "fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_native_prompt_keeps_given_max_tokens(settings: Settings) -> None:
    job = parse_single(
        {"prompt": "Once", "sampling_params": {"max_completion_tokens": 5}, "model": "other"}
    )
    call, _ = to_engine_call(job, settings, "j")
    assert call.route == "/v1/completions"
    assert dict(call.body or {}) == {
        "max_completion_tokens": 5,
        "model": "other",
        "stream": False,
        "prompt": "Once",
    }


def test_the_callers_dict_is_not_changed(settings: Settings) -> None:
    given = {"messages": [{"role": "user", "content": "hi"}], "sampling_params": {"n": 1}}
    to_engine_call(parse_single(given), settings, "j")
    assert given == {"messages": [{"role": "user", "content": "hi"}], "sampling_params": {"n": 1}}


@pytest.mark.parametrize(
    ("job_input", "param"),
    [
        ("hello", "input"),
        ([1, 2], "input"),
        ({}, "input"),
        ({"messages": [], "input": "x"}, "input"),
        ({"prompt": [1, 2], "apply_chat_template": True}, "input"),
        ({"input": "x", "apply_chat_template": True}, "input"),
        ({"prompt": "x", "max_batch_size": "many"}, "input.max_batch_size"),
        ({"prompt": "x", "use_openai_format": "perhaps"}, "input.use_openai_format"),
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
        ("/v1/tokenize", "/tokenize"),
        ("tokenize", "/tokenize"),
        ("/rerank", "/rerank"),
        ("/v2/rerank", "/v2/rerank"),
        ("/messages", "/v1/messages"),
        ("/v1/responses/resp_1/cancel", "/v1/responses/resp_1/cancel"),
    ],
)
def test_route_spellings(raw: str, route: str) -> None:
    assert normalize_route(raw)[0] == route


def test_unknown_route_lists_the_public_ones() -> None:
    with pytest.raises(NotFound) as caught:
        normalize_route("/v1/images/generations")
    assert caught.value.message.startswith(
        "unknown route '/v1/images/generations'; public routes: /v1/models, "
        "/v1/models/{model_id}, /v1/chat/completions, "
    )
    assert caught.value.param == "openai_route"


@pytest.mark.parametrize(
    "raw", ["/sleep", "/collective_rpc", "/v1/load_lora_adapter", "/reset_prefix_cache", "metrics"]
)
def test_administrative_routes_are_refused(raw: str) -> None:
    with pytest.raises(NotFound) as caught:
        normalize_route(raw)
    assert caught.value.message.startswith(f"route {raw!r} is not available to jobs (")


def test_job_models_are_distinct_types() -> None:
    assert isinstance(parse_job({"openai_route": "/v1/models"}), OpenAIRouteJob)
    assert isinstance(parse_job({"prompt": "x"}), NativeJob)


def test_native_tools_and_structured_outputs(settings: Settings) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    job = parse_single(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": tools,
            "tool_choice": "auto",
            "sampling_params": {"structured_outputs": {"choice": ["a", "b"]}, "logprobs": True},
        }
    )
    call, _ = to_engine_call(job, settings, "j")
    assert dict(call.body or {}) == {
        "structured_outputs": {"choice": ["a", "b"]},
        "logprobs": True,
        "model": "fake-model",
        "max_tokens": 100,
        "stream": False,
        "tools": tools,
        "tool_choice": "auto",
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_native_embeddings(settings: Settings) -> None:
    job = parse_single({"input": ["a", "b"], "sampling_params": {"encoding_format": "base64"}})
    call, shape = to_engine_call(job, settings, "j")
    assert (call.route, shape) == ("/v1/embeddings", Shape.NATIVE)
    assert dict(call.body or {}) == {
        "encoding_format": "base64",
        "model": "fake-model",
        "input": ["a", "b"],
    }


@pytest.mark.parametrize(
    ("route", "tracked"),
    [("/v1/tokenize", False), ("/v1/chat/completions", False), ("/v1/responses", True)],
)
def test_request_id_in_the_body_only_for_the_responses_api(
    settings: Settings, route: str, tracked: bool
) -> None:
    call, _ = to_engine_call(
        parse_single({"openai_route": route, "openai_input": {"model": "m"}}), settings, "j"
    )
    assert ("request_id" in (call.body or {})) is tracked
    if route == "/v1/responses":
        assert call.body is not None
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
