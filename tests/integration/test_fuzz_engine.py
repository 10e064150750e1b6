"""Fuzzing on the real engine: the fake-engine fuzz cases (tests/fuzz_inputs.py) through the
handler on vLLM with SmolLM2 (tools, a LoRA adapter and structured outputs on).

``FUZZ_ENGINE_EXAMPLES`` cases (200 by default, as CI runs), the same on every run
(``FUZZ_RANDOM=1`` explores). Every case ends in answers or one OpenAI error, with no traceback,
file path or Python repr in an error and neither a traceback nor the worker's model or adapter
folder in an answer; afterwards no engine request is left running and the worker still answers
a normal request.

So that 200 cases fit in CI, generation is capped at :data:`CAP` tokens and nothing else of a
case is changed: an OpenAI body that names no length gets ``max_tokens`` :data:`CAP`, native
jobs default to it (``DEFAULT_MAX_TOKENS``), and a valid length above it is lowered to it
(negative, enormous and wrongly typed lengths stay as generated).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

from handler.engine.interface import Engine
from handler.jobs import make_handler
from handler.settings import load_settings
from local_endpoint.harness import MODEL_ID
from tests.fuzz_inputs import check_outputs, fuzz_settings, job_inputs
from tests.integration.conftest import LORA

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FUZZ_ENGINE_EXAMPLES", "200"))
CAP = 8
CONTEXT = 2048  # MAX_MODEL_LEN of configs/local.env: longer lengths are refused at once
LENGTHS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
NORMAL = {
    "prompt": "The capital of France is",
    "sampling_params": {"max_tokens": 2, "temperature": 0},
}


def capped(lengths: dict[str, Any], add: bool) -> dict[str, Any]:
    out = dict(lengths)
    for key in LENGTHS:
        value = out.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and CAP < value <= CONTEXT:
            out[key] = CAP
    if add and not any(key in out for key in LENGTHS):
        out["max_tokens"] = CAP
    return out


def bounded(job_input: Any) -> Any:
    """The job input with generation capped (see the module's docstring)."""
    if not isinstance(job_input, dict):
        return job_input
    out = dict(job_input)
    if isinstance(out.get("openai_input"), dict):
        out["openai_input"] = capped(out["openai_input"], add=True)
    if isinstance(out.get("sampling_params"), dict):
        out["sampling_params"] = capped(out["sampling_params"], add=False)
    if isinstance(out.get("requests"), list):
        out["requests"] = [bounded(item) for item in out["requests"]]
    return out


@pytest.fixture(scope="module")
def fuzz_handler(engine: Engine, full_env: dict[str, str], lora_adapter: Path) -> Any:
    fuzz_settings = load_settings(
        {**full_env, "STREAM_FLUSH_INTERVAL_MS": "0", "DTYPE": "float32", "DEFAULT_MAX_TOKENS": "8"}
    )
    leaks = re.compile(
        "|".join(["Traceback", re.escape(full_env["MODEL_NAME"]), re.escape(str(lora_adapter))])
    )
    return make_handler(engine, fuzz_settings), leaks


async def answers(handler: Any, job_input: Any) -> list[Any]:
    async def run() -> list[Any]:
        return [out async for out in handler({"id": "fuzz", "input": job_input})]

    return await asyncio.wait_for(run(), timeout=120)


def wait_idle(engine: Engine, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while engine.running_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running_requests() == 0, "an engine request outlived its job"


@pytest.mark.timeout(max(300, EXAMPLES * 5))
@fuzz_settings(EXAMPLES)
@given(job_input=job_inputs([MODEL_ID, LORA]))
def test_any_job_input_on_the_real_engine(
    job_input: Any, fuzz_handler: Any, engine: Engine
) -> None:
    handler, leaks = fuzz_handler
    check_outputs(asyncio.run(answers(handler, bounded(job_input))), answer_leaks=leaks)
    wait_idle(engine)
    [normal] = asyncio.run(answers(handler, NORMAL))
    assert normal["choices"][0]["text"].startswith(" Paris"), normal
    assert not engine.dead
