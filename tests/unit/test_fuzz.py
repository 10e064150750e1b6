"""Property-based fuzzing of the handler on the fake engine: random and malformed job inputs.

Every case must end in a valid answer (a response dict, SSE text, or chunk dicts) or in exactly
one OpenAI-shaped error, with no traceback, file path, memory address or Python repr in anything
the caller gets; afterwards the handler still answers a normal request. ``FUZZ_EXAMPLES`` sets
the number of cases (5,000 by default, as CI runs; set more for a deeper run). The cases are the
same on every run, so a failure is reproducible and CI is not flaky; ``FUZZ_RANDOM=1`` explores
new ones.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from hypothesis import given

from handler.jobs import make_handler
from handler.settings import load_settings
from tests.fakes import FakeEngine
from tests.fuzz_inputs import CHAT, check_outputs, fuzz_settings, job_inputs

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5000"))
SETTINGS = load_settings(
    {"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "fake-model", "STREAM_FLUSH_INTERVAL_MS": "0"}
)


async def answers(handler: Any, job_input: Any) -> list[Any]:
    return [out async for out in handler({"id": "fuzz", "input": job_input})]


@fuzz_settings(EXAMPLES)
@given(job_input=job_inputs(["fake-model"]))
def test_any_job_input_ends_in_an_answer_or_one_openai_error(job_input: Any) -> None:
    engine = FakeEngine()
    handler = make_handler(engine, SETTINGS)
    check_outputs(asyncio.run(answers(handler, job_input)))
    [normal] = asyncio.run(answers(handler, {"messages": CHAT}))
    assert normal["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert engine.active == 0
