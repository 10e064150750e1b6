"""Property-based fuzzing of the handler on the fake engine: random and malformed job inputs.

Every case must end in a valid answer (a response dict, SSE text, or chunk dicts) or in exactly
one OpenAI-shaped error, with no traceback, file path, memory address or Python repr in anything
the caller gets; afterwards the handler still answers a normal request. ``FUZZ_EXAMPLES`` sets
the number of cases (10,000 by default, as CI runs). The cases are the same on every run, so a
failure is reproducible and CI is not flaky; ``FUZZ_RANDOM=1`` explores new ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.jobs import make_handler
from handler.protocol import ROUTES
from handler.settings import load_settings
from tests.fakes import FakeEngine

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10000"))
LEAKS = re.compile(
    r"Traceback|File \"|\.py\b|/(?:home|usr|opt|root|tmp|app|lib)/| at 0x[0-9a-f]+|"
    r"<(?:class|function|module|object|coroutine|async_generator) "
)
CHAT = [{"role": "user", "content": "Capital of France?"}]
SETTINGS = load_settings(
    {"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "fake-model", "STREAM_FLUSH_INTERVAL_MS": "0"}
)

text = st.one_of(
    st.text(max_size=50),
    st.sampled_from(["", " ", "\ud800", "\x00", "\u202e", "é" * 3, "/etc/passwd", "<class 'x'>"]),
    st.integers(min_value=10_000, max_value=1_000_000).map(lambda n: "a" * n),
)
numbers = st.one_of(
    st.integers(),
    st.sampled_from([-1, 0, 2**63, -(2**63), 10**100]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": [value]}
    return value


deep = st.integers(min_value=50, max_value=400).map(nested)
routes = st.one_of(
    st.sampled_from([*ROUTES, "/v1/images/generations", "", "//", "v1/chat/completions/"]),
    text,
)
openai_jobs = st.fixed_dictionaries(
    {"openai_route": st.one_of(routes, json_values)},
    optional={
        "openai_input": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"model": st.sampled_from(["fake-model", "other"]), "messages": st.just(CHAT)},
                optional={"stream": json_values, "max_tokens": numbers, "n": numbers},
            ),
        ),
        "extra": json_values,
    },
)
native_jobs = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.one_of(st.just(CHAT), json_values, deep),
        "prompt": st.one_of(text, json_values),
        "input": json_values,
        "sampling_params": st.one_of(json_values, st.dictionaries(text, numbers, max_size=3)),
        "stream": json_values,
        "model": json_values,
        "tools": json_values,
        "tool_choice": json_values,
        "unknown_key": json_values,
    },
)
batches = st.fixed_dictionaries(
    {"requests": st.one_of(st.lists(native_jobs, max_size=4), json_values)}
)
job_inputs = st.one_of(openai_jobs, native_jobs, batches, json_values, deep)


def check_error(output: Any) -> None:
    assert isinstance(output, dict) and list(output) == ["error"], output
    body = json.loads(output["error"])
    error = body["error"]
    assert list(body) == ["error"] and set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], int) and 400 <= error["code"] < 600


def check_outputs(outputs: list[Any]) -> None:
    assert outputs, "a job must answer"
    for i, output in enumerate(outputs):
        if isinstance(output, dict) and "error" in output:
            assert i == len(outputs) - 1, "an error ends the job"
            check_error(output)
        else:
            assert isinstance(output, (dict, str)), type(output)
        shown = output if isinstance(output, str) else json.dumps(output)
        assert not LEAKS.search(shown), shown[:300]


async def answers(handler: Any, job_input: Any) -> list[Any]:
    return [out async for out in handler({"id": "fuzz", "input": job_input})]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
)
@given(job_input=job_inputs)
def test_any_job_input_ends_in_an_answer_or_one_openai_error(job_input: Any) -> None:
    engine = FakeEngine()
    handler = make_handler(engine, SETTINGS)
    check_outputs(asyncio.run(answers(handler, job_input)))
    [normal] = asyncio.run(answers(handler, {"messages": CHAT}))
    assert normal["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert engine.active == 0
