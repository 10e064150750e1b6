"""Jobs written for RunPod's official worker (runpod-workers/worker-vllm) and for older vLLM, on
the real engine.

Outside-in, through the local endpoint (``/runsync`` as RunPod's clients call it, the OpenAI SDK
on the OpenAI route): worker-vllm's own README job examples and its ``.runpod/tests.json`` inputs,
verbatim (copied from worker-vllm at commit 7a92503; placeholders filled with this model's name;
the generic proxy form's stream, which has no ``max_tokens``, is cancelled after its first chunks);
a v2-style job with every v2 key, answered in v2's shape (``use_openai_format: false``); the
removed ``guided_*`` fields, which constrain the output at temperature 1, several times over.

In-process (the handler on the session's engine): ``NATIVE_OUTPUT_FORMAT=worker-vllm-v2``, v2's
shape one-shot and streamed, and ``guided_*`` in native ``sampling_params``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import openai
import pytest

from handler.engine.vllm_engine import VllmEngine
from handler.settings import Settings
from local_endpoint.harness import MODEL_ID, LocalEndpoint
from tests.integration.conftest import LORA
from tests.integration.samples import CITY_SCHEMA, QUESTION
from tests.integration.test_engine import run

pytestmark = pytest.mark.integration

# worker-vllm's .runpod/tests.json, the "input" of each test
TESTS_JSON_INPUTS: list[dict[str, Any]] = [
    {"prompt": "Write a short poem about artificial intelligence."},
    {
        "openai_route": "/v1/chat/completions",
        "openai_input": {
            "messages": [
                {
                    "role": "system",
                    "content": "You are a helpful assistant that writes concise responses.",
                },
                {
                    "role": "user",
                    "content": "Explain what a neural network is in one sentence.",
                },
            ],
            "max_tokens": 200,
            "temperature": 0.1,
        },
    },
]
# worker-vllm's README: "Text Input Formats" (prompt, messages)
README_PROMPT_JOB: dict[str, Any] = {
    "input": {
        "prompt": "why sky is blue?",
        "sampling_params": {"temperature": 0.7, "max_tokens": 100},
    }
}
README_MESSAGES_JOB: dict[str, Any] = {
    "input": {
        "messages": [
            {
                "role": "system",
                "content": "You are a helpful AI assistant that provides clear and concise "
                "responses.",
            },
            {
                "role": "user",
                "content": "Can you explain the difference between supervised and unsupervised "
                "learning?",
            },
            {
                "role": "assistant",
                "content": "Sure! Supervised learning uses labeled data, meaning each input has a "
                "corresponding correct output. The model learns by mapping inputs to known "
                "outputs. In contrast, unsupervised learning works with unlabeled data, where the "
                "model identifies patterns, structures, or clusters without predefined answers.",
            },
        ],
        "sampling_params": {"temperature": 0.7, "max_tokens": 100},
    }
}
# worker-vllm's README: "call any vLLM route directly with the generic proxy form"
README_GENERIC_JOB: dict[str, Any] = {
    "input": {
        "route": "/v1/chat/completions",
        "method": "POST",
        "body": {
            "model": MODEL_ID,  # "<YOUR DEPLOYED MODEL>"
            "messages": [{"role": "user", "content": "hello"}],
            "stream": True,
        },
    }
}
# worker-vllm v2.x's JobInput reads exactly these keys
V2_KEYS_JOB: dict[str, Any] = {
    "prompt": "What is the capital of France? Answer in one sentence.",
    "apply_chat_template": True,
    "use_openai_format": False,
    "max_batch_size": 30,
    "min_batch_size": 1,
    "batch_size_growth_factor": 3,
    "sampling_params": {"temperature": 0, "max_tokens": 30, "seed": 7},
}
SAMPLES = 3  # samples per constraint, at temperature 1
REGEX = r"[0-9]{3}-[0-9]{4}"
GUIDED: dict[str, tuple[dict[str, Any], Callable[[str], bool]]] = {
    "guided_choice": ({"guided_choice": ["yes", "no"]}, {"yes", "no"}.__contains__),
    "guided_regex": ({"guided_regex": REGEX}, lambda text: bool(re.fullmatch(REGEX, text))),
    "guided_json": (
        {"guided_json": CITY_SCHEMA},
        lambda text: json.loads(text)["city"] in {"Paris", "London", "Tokyo"},
    ),
}


@pytest.fixture(scope="module")
def endpoint(openai_endpoint: LocalEndpoint) -> LocalEndpoint:
    return openai_endpoint


@pytest.fixture(scope="module")
def v2_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"native_output_format": "worker-vllm-v2"})


def runsync(endpoint: LocalEndpoint, job: dict[str, Any]) -> list[Any]:
    """/runsync as runpod's client uses it: a job not done when the wait ends is polled at
    /status until it is (on a slow machine the wait can end first, on RunPod too)."""
    status, body = endpoint.call("POST", "/runsync?wait=300000", job, timeout=310)
    assert status == 200, body
    if body["status"] in {"IN_QUEUE", "IN_PROGRESS"}:
        body = endpoint.wait_status(body["id"])
    assert body["status"] == "COMPLETED", body
    return list(body["output"])


def assert_v2(output: dict[str, Any]) -> str:
    """``output`` is one v2 batch with one choice; its text."""
    assert set(output) == {"choices", "usage"}, output
    [choice] = output["choices"]
    assert list(choice) == ["tokens"] and all(isinstance(t, str) for t in choice["tokens"])
    assert set(output["usage"]) == {"input", "output"} and output["usage"]["input"] > 0
    return "".join(choice["tokens"])


def test_tests_json_inputs_verbatim(endpoint: LocalEndpoint) -> None:
    [completion] = runsync(endpoint, {"input": TESTS_JSON_INPUTS[0]})
    # a raw prompt to an instruct model: sampled, it may well end at once, as worker-vllm's does
    assert completion["object"] == "text_completion", completion
    assert completion["choices"][0]["finish_reason"] in {"stop", "length"}
    assert completion["usage"]["prompt_tokens"] > 0
    [chat] = runsync(endpoint, {"input": TESTS_JSON_INPUTS[1]})
    assert chat["object"] == "chat.completion" and chat["model"] == MODEL_ID
    assert isinstance(chat["choices"][0]["message"]["content"], str)  # sampled: may be empty
    assert chat["usage"]["completion_tokens"] >= 1


def test_readme_job_examples_verbatim(endpoint: LocalEndpoint) -> None:
    # sampled answers (the examples' temperatures): their text may be empty (an end-of-text
    # token first), so what is checked is their shape and their token counts
    [prompt] = runsync(endpoint, README_PROMPT_JOB)
    assert isinstance(prompt["choices"][0]["text"], str)
    assert 1 <= prompt["usage"]["completion_tokens"] <= 100
    [messages] = runsync(endpoint, README_MESSAGES_JOB)
    assert isinstance(messages["choices"][0]["message"]["content"], str)
    assert messages["usage"]["completion_tokens"] >= 1
    # the generic proxy form streams sampled chat with no max_tokens: it may run to the model's
    # length (a minute or more here), so once its first chunks are in, the job is cancelled, as
    # a client that has seen enough does; if it ended first, it ended as a stream ends
    code, taken = endpoint.call("POST", "/run", README_GENERIC_JOB)
    assert code == 200, taken
    first = endpoint.first_output(taken["id"])
    assert first[0]["choices"][0]["delta"]["role"] == "assistant", first
    assert endpoint.call("POST", f"/cancel/{taken['id']}")[0] == 200
    final = endpoint.wait_status(taken["id"])
    assert all(c["object"] == "chat.completion.chunk" for c in first), first
    if final["status"] == "COMPLETED":
        chunks = list(final["output"])
        assert all(c["object"] == "chat.completion.chunk" for c in chunks), chunks
        finished = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        assert finished in {"stop", "length"}
    else:
        assert final["status"] == "CANCELLED", final


def test_readme_examples_in_v2_shape(endpoint: LocalEndpoint) -> None:
    for example in (README_PROMPT_JOB, README_MESSAGES_JOB):
        job = {"input": {**example["input"], "use_openai_format": False}}
        [output] = runsync(endpoint, job)
        # sampled (the examples' temperatures): an end-of-text token first is a valid answer
        # with empty text, so the shape and the token count are what is checked
        assert isinstance(assert_v2(output), str) and 0 < output["usage"]["output"] <= 100


@pytest.mark.parametrize("stream", [False, True])
def test_a_v2_job_with_every_v2_key(endpoint: LocalEndpoint, stream: bool) -> None:
    outputs = runsync(endpoint, {"input": {**V2_KEYS_JOB, "stream": stream}})
    texts = [assert_v2(o) for o in outputs]
    assert "".join(texts) == "The capital of France is Paris."
    counts = [o["usage"]["output"] for o in outputs]
    assert counts == sorted(counts) and counts[0] > 0
    assert len(outputs) == 1 or stream
    logged = endpoint.log.read_text(errors="replace")
    assert logged.count("batch_size_growth_factor: streams are batched by time") == 1


def _sampled(client: openai.OpenAI, kind: str, stream: bool, extra: dict[str, Any]) -> str:
    common: dict[str, Any] = {
        "model": MODEL_ID,
        "temperature": 1,
        "max_tokens": 30,
        "extra_body": extra,
    }
    if kind == "chat":
        if not stream:
            reply = client.chat.completions.create(messages=QUESTION, **common)
            return reply.choices[0].message.content or ""
        chunks = client.chat.completions.create(messages=QUESTION, stream=True, **common)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if not stream:
        text: str = client.completions.create(prompt="Answer: ", **common).choices[0].text
        return text
    pieces = client.completions.create(prompt="Answer: ", stream=True, **common)
    return "".join(c.choices[0].text for c in pieces if c.choices)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("field", list(GUIDED))
def test_guided_fields_constrain_the_openai_route(
    endpoint: LocalEndpoint, field: str, kind: str, stream: bool
) -> None:
    extra, accepts = GUIDED[field]
    client = endpoint.openai()
    texts = [_sampled(client, kind, stream, extra) for _ in range(SAMPLES)]
    assert all(accepts(text) for text in texts), texts


def test_a_guided_backend_is_a_400_naming_it(endpoint: LocalEndpoint) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        endpoint.openai().chat.completions.create(
            model=MODEL_ID,
            messages=QUESTION,
            extra_body={"guided_choice": ["yes"], "guided_decoding_backend": "outlines"},
        )
    assert "guided_decoding_backend" in str(caught.value)


async def test_the_v2_setting_one_shot_and_streamed(
    engine: VllmEngine, v2_settings: Settings
) -> None:
    job = {"messages": QUESTION, "sampling_params": {"temperature": 0, "max_tokens": 30}}
    [one] = await run(engine, v2_settings, job)
    assert assert_v2(one) == "The capital of France is Paris."
    streamed = await run(engine, v2_settings, {**job, "stream": True})
    assert "".join(assert_v2(o) for o in streamed) == assert_v2(one)
    assert len(streamed) > 1 and streamed[-1]["usage"] == one["usage"]
    openai_shaped = await run(engine, v2_settings, {**job, "use_openai_format": True})
    assert openai_shaped[0]["object"] == "chat.completion"


@pytest.mark.parametrize("stream", [False, True])
async def test_guided_fields_constrain_native_jobs(
    engine: VllmEngine, v2_settings: Settings, stream: bool
) -> None:
    for field, (extra, accepts) in GUIDED.items():
        for job in ({"prompt": "Answer: "}, {"messages": QUESTION}):
            sampling = {"temperature": 1, "max_tokens": 30, **extra}
            full = {**job, "sampling_params": sampling, "stream": stream}
            for _ in range(SAMPLES):
                outputs = await run(engine, v2_settings, full)
                text = "".join(assert_v2(o) for o in outputs)
                assert accepts(text), (field, job, text)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_v2_shape_with_n_choices(
    engine: VllmEngine, v2_settings: Settings, stream: bool
) -> None:
    sampling = {"n": 2, "temperature": 1, "max_tokens": 8, "seed": 5}
    job = {"prompt": "The capital of France is", "sampling_params": sampling, "stream": stream}
    outputs = await run(engine, v2_settings, job)
    assert all(len(o["choices"]) == 2 for o in outputs), outputs
    texts = ["".join(t for o in outputs for t in o["choices"][i]["tokens"]) for i in (0, 1)]
    assert all(texts), texts
    assert 2 <= outputs[-1]["usage"]["output"] <= 16  # over both choices, as v2 counted
    assert len(outputs) == 1 or stream


async def test_v2s_guided_decoding_object_constrains_native_jobs(
    engine: VllmEngine, v2_settings: Settings
) -> None:
    """worker-vllm v2 handed sampling_params to vLLM's SamplingParams, which took this object."""
    sampling = {"temperature": 1, "max_tokens": 10, "guided_decoding": {"choice": ["yes", "no"]}}
    for _ in range(SAMPLES):
        outputs = await run(
            engine, v2_settings, {"prompt": "Answer: ", "sampling_params": sampling}
        )
        assert assert_v2(outputs[0]) in {"yes", "no"}


async def test_model_in_sampling_params_selects_the_lora_adapter(
    engine: VllmEngine, settings: Settings
) -> None:
    sampling = {"model": LORA, "temperature": 0, "max_tokens": 5}
    [out] = await run(
        engine, settings, {"prompt": "The capital of France is", "sampling_params": sampling}
    )
    assert out["model"] == LORA, out
    [base] = await run(engine, settings, {"prompt": "x", "sampling_params": {"max_tokens": 1}})
    assert base["model"] == MODEL_ID


def test_a_method_the_route_does_not_take_fails_the_job_with_a_405(endpoint: LocalEndpoint) -> None:
    job = {"input": {**README_GENERIC_JOB["input"], "method": "GET"}}
    status, body = endpoint.call("POST", "/runsync", job, timeout=120)
    assert status == 200 and body["status"] == "FAILED", body
    error = json.loads(body["error"])["error"]
    assert (error["code"], error["param"]) == (405, "input.method")


async def test_v2_logprobs_count_on_a_chat_job(engine: VllmEngine, settings: Settings) -> None:
    sampling = {"logprobs": 2, "temperature": 0, "max_tokens": 3}
    [out] = await run(engine, settings, {"messages": QUESTION, "sampling_params": sampling})
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(t["top_logprobs"]) == 2 for t in content), content
