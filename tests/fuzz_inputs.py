"""Random and malformed job inputs for the fuzz tests (hypothesis strategies), and the checks
every answer must pass: the fake engine's (tests/unit/test_fuzz.py) and the real one's
(tests/integration/test_fuzz_engine.py)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from handler.protocol import ROUTES

# A Python file is named by a path, or quoted, or with a line number: not "input.py", which is the
# path of a job key named "py" (Hypothesis draws keys from the literals of the modules it has seen,
# so any new code can bring such a key).
LEAKS = re.compile(
    r"Traceback|File \"|\w\.py(?:[\"']|:\d|, line)|/[\w.\-]+\.py\b|"
    r"/(?:home|usr|opt|root|tmp|app|lib)/| at 0x[0-9a-f]+|"
    r"<(?:class|function|module|object|coroutine|async_generator) "
)
CHAT = [{"role": "user", "content": "Capital of France?"}]


def fuzz_settings(examples: int) -> Callable[[Any], Any]:
    """``examples`` cases, the same on every run (a failure reproduces, CI is not flaky) unless
    ``FUZZ_RANDOM=1`` asks for new ones."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
        derandomize=os.environ.get("FUZZ_RANDOM") != "1",
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


def job_inputs(models: list[str]) -> st.SearchStrategy[Any]:
    """Job inputs: the OpenAI shape (routes known and not, bodies well-formed and not), the
    native shape, native batches, and any JSON value; ``models`` are names to ask for."""
    openai_jobs = st.fixed_dictionaries(
        {"openai_route": st.one_of(routes, json_values)},
        optional={
            "openai_input": st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {"model": st.sampled_from([*models, "other"]), "messages": st.just(CHAT)},
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
    return st.one_of(openai_jobs, native_jobs, batches, json_values, deep)


def check_error(output: Any) -> None:
    assert isinstance(output, dict) and list(output) == ["error"], output
    body = json.loads(output["error"])
    error = body["error"]
    assert list(body) == ["error"] and set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], int) and 400 <= error["code"] < 600


def check_outputs(outputs: list[Any], answer_leaks: re.Pattern[str] = LEAKS) -> None:
    """A job's outputs: answers, or one OpenAI error that ends the job; ``LEAKS`` in no error,
    ``answer_leaks`` in no answer (a real model's text may name a .py file)."""
    assert outputs, "a job must answer"
    for i, output in enumerate(outputs):
        if isinstance(output, dict) and "error" in output:
            assert i == len(outputs) - 1, "an error ends the job"
            check_error(output)
        else:
            assert isinstance(output, (dict, str)), type(output)
        shown = output if isinstance(output, str) else json.dumps(output)
        leaks = LEAKS if isinstance(output, dict) and "error" in output else answer_leaks
        assert not leaks.search(shown), shown[:300]
