"""vLLM's removed guided_* fields become structured_outputs at the edge, in every job shape, or a
400 that names them: never a silent 200 with unconstrained output."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from handler.errors import InvalidRequest
from handler.guided import translate_guided
from handler.jobs import make_handler
from handler.protocol import to_engine_call
from handler.settings import Settings
from tests.fakes import FakeEngine
from tests.jobs import parse_single

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"guided_json": SCHEMA}, {"json": SCHEMA}),
    ({"guided_json": '{"type": "integer"}'}, {"json": '{"type": "integer"}'}),
    ({"guided_regex": "[0-9]{3}"}, {"regex": "[0-9]{3}"}),
    ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
    ({"guided_grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"'}),
    (
        {"guided_json": SCHEMA, "guided_whitespace_pattern": " ?"},
        {"json": SCHEMA, "whitespace_pattern": " ?"},
    ),
    ({"guided_regex": "a+", "guided_decoding_backend": "auto"}, {"regex": "a+"}),
    ({"guided_choice": ["a"], "structured_outputs": {"choice": ["a"]}}, {"choice": ["a"]}),
    (
        {"guided_json": SCHEMA, "structured_outputs": {"disable_any_whitespace": True}},
        {"json": SCHEMA, "disable_any_whitespace": True},
    ),
    # worker-vllm v2 passed sampling_params to vLLM's SamplingParams, whose guided_decoding
    # object took structured_outputs' keys and a backend
    ({"guided_decoding": {"choice": ["a", "b"], "backend": "auto"}}, {"choice": ["a", "b"]}),
    (
        {"guided_decoding": {"json": SCHEMA, "disable_fallback": False, "regex": None}},
        {"json": SCHEMA},
    ),
    (
        {"guided_decoding": {"json_object": True}, "guided_whitespace_pattern": " "},
        {"json_object": True, "whitespace_pattern": " "},
    ),
]
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/responses"]


@pytest.mark.parametrize(("given", "structured"), CASES)
@pytest.mark.parametrize("route", ROUTES)
def test_each_field_becomes_its_structured_outputs_key(
    route: str, given: dict[str, Any], structured: dict[str, Any]
) -> None:
    body = {"model": "m", "temperature": 1, **given}
    before = copy.deepcopy(body)
    assert translate_guided(route, body) == {
        "model": "m",
        "temperature": 1,
        "structured_outputs": structured,
    }
    assert body == before


def test_null_fields_are_unset() -> None:
    assert translate_guided("/v1/completions", {"guided_json": None, "n": 1}) == {"n": 1}


@pytest.mark.parametrize(
    ("route", "body", "param", "words"),
    [
        (
            "/v1/chat/completions",
            {"guided_decoding_backend": "outlines"},
            "x.guided_decoding_backend",
            "STRUCTURED_OUTPUTS_CONFIG",
        ),
        ("/v1/embeddings", {"guided_json": SCHEMA}, "x.guided_json", "/v1/embeddings"),
        ("/v1/messages", {"guided_choice": ["a"]}, "x.guided_choice", "/v1/messages"),
        (
            "/v1/completions",
            {"guided_regex": "a", "structured_outputs": {"regex": "b"}},
            "x.guided_regex",
            "disagree",
        ),
        (
            "/v1/completions",
            {"guided_regex": "a", "structured_outputs": "b"},
            "x.structured_outputs",
            "object",
        ),
        (
            "/v1/completions",
            {"guided_decoding": {"regex": "a", "backend": "outlines"}},
            "x.guided_decoding.backend",
            "STRUCTURED_OUTPUTS_CONFIG",
        ),
        (
            "/v1/completions",
            {"guided_decoding": {"regex": "a", "disable_fallback": True}},
            "x.guided_decoding.disable_fallback",
            "no equivalent",
        ),
        ("/v1/completions", {"guided_decoding": ["a"]}, "x.guided_decoding", "object"),
        (
            "/v1/completions",
            {"guided_decoding": {"regex": "a"}, "structured_outputs": {"regex": "b"}},
            "x.guided_decoding.regex",
            "guided_decoding.regex and structured_outputs.regex disagree",
        ),
        (
            "/v1/embeddings",
            {"guided_decoding": {"regex": "a"}},
            "x.guided_decoding",
            "/v1/embeddings",
        ),
    ],
)
def test_fields_without_an_equivalent_are_a_400_naming_them(
    route: str, body: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        translate_guided(route, body, "x.")
    assert caught.value.param == param and words in caught.value.message


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("job_input", "param_prefix"),
    [
        (
            {
                "openai_route": "/v1/chat/completions",
                "openai_input": {"model": "fake-model", "messages": [], "guided_choice": ["a"]},
            },
            "input.openai_input.",
        ),
        (
            {
                "route": "/v1/completions",
                "body": {"model": "fake-model", "prompt": "x", "guided_choice": ["a"]},
            },
            "input.body.",
        ),
        ({"prompt": "x", "sampling_params": {"guided_choice": ["a"]}}, "input.sampling_params."),
        ({"messages": [], "sampling_params": {"guided_choice": ["a"]}}, "input.sampling_params."),
    ],
)
def test_every_job_shape_translates(
    settings: Settings, job_input: dict[str, Any], param_prefix: str, stream: bool
) -> None:
    job_input = copy.deepcopy(job_input)
    inner = job_input.get("openai_input") or job_input.get("body") or job_input["sampling_params"]
    inner["stream"] = stream
    call, _ = to_engine_call(parse_single(job_input), settings, "j")
    assert call.body is not None
    assert call.body["structured_outputs"] == {"choice": ["a"]}
    assert "guided_choice" not in call.body
    inner["guided_decoding_backend"] = "lm-format-enforcer"
    with pytest.raises(InvalidRequest) as caught:
        to_engine_call(parse_single(job_input), settings, "j")
    assert caught.value.param == param_prefix + "guided_decoding_backend"


async def test_the_handler_answers_a_bad_guided_field_with_a_400(
    engine: FakeEngine, settings: Settings
) -> None:
    handler = make_handler(engine, settings)
    job = {"input": {"input": "x", "sampling_params": {"guided_json": SCHEMA}}}
    [out] = [o async for o in handler({"id": "j", **job})]
    assert '"code": 400' in out["error"] and "guided_json" in out["error"]
    assert engine.calls == []
