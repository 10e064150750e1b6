"""The local endpoint with a real worker: ``python -m handler`` under runpod's production loop,
vLLM on SmolLM2, driven by unmodified clients (openai sync and async, runpod.Endpoint, vLLM's
benchmark client)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
import runpod

from local_endpoint.harness import ABORTED, KEY, MODEL_ID, ROOT, LocalEndpoint
from tests.integration.conftest import LORA

pytestmark = pytest.mark.integration

QUESTION: Any = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
]
ANSWER = "The capital of France is Paris."
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 30}


@pytest.fixture(scope="module")
def endpoint(openai_endpoint: LocalEndpoint) -> LocalEndpoint:
    return openai_endpoint


def test_openai_sdk_chat_and_completions(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_ID, LORA]

    answer = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, **GREEDY)
    assert answer.choices[0].message.content == ANSWER
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and answer.usage is not None
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(usage[0], k) for k in counts] == [getattr(answer.usage, k) for k in counts]
    # reported on every answer (hits need a prompt longer than one 128-token CPU block)
    assert usage[0].prompt_tokens_details is not None
    assert usage[0].prompt_tokens_details.cached_tokens == 0

    prompt = "The capital of France is"
    completion = client.completions.create(model=MODEL_ID, prompt=prompt, **GREEDY)
    streamed = client.completions.create(model=MODEL_ID, prompt=prompt, stream=True, **GREEDY)
    text = "".join(c.choices[0].text for c in streamed)
    assert text == completion.choices[0].text and text.startswith(" Paris.")


async def test_async_openai_sdk(endpoint: LocalEndpoint) -> None:
    client = endpoint.async_openai()
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL_ID, LORA]
        answer = await client.chat.completions.create(model=MODEL_ID, messages=QUESTION, **GREEDY)
        assert answer.choices[0].message.content == ANSWER
        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=QUESTION, stream=True, **GREEDY
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == ANSWER
    finally:
        await client.close()


def test_errors_raise_the_sdks_exceptions_and_the_worker_keeps_serving(
    client: openai.OpenAI,
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="gpt-5", messages=QUESTION, stream=stream)
        assert missing.value.status_code == 404
        assert missing.value.body["type"] == "NotFoundError"  # type: ignore[index]

        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(
                model=MODEL_ID, messages=QUESTION, max_tokens=100_000, stream=stream
            )
        assert too_long.value.body == {
            "message": "max_tokens=100000 cannot be greater than max_model_len=2048. Please "
            "request fewer output tokens. (parameter=max_tokens, value=100000)",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        }
    with pytest.raises(openai.BadRequestError) as malformed:
        client.chat.completions.create(model=MODEL_ID, messages="hello")  # type: ignore[arg-type]
    assert malformed.value.body["param"] == "messages"  # type: ignore[index]

    answer = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, **GREEDY)
    assert answer.choices[0].message.content == ANSWER


def test_runpod_client(rp: runpod.Endpoint, client: openai.OpenAI) -> None:
    job_input = {"messages": QUESTION, "sampling_params": GREEDY}
    output = rp.run_sync(job_input, timeout=120)
    assert [o["choices"][0]["message"]["content"] for o in output] == [ANSWER]

    job = rp.run(job_input)
    assert job.status() in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert job.output(timeout=120)[0]["choices"][0]["message"]["content"] == ANSWER
    assert job.status() == "COMPLETED"

    streamed = rp.run({**job_input, "stream": True})
    chunks = list(streamed.stream())
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ANSWER
    assert chunks[-1]["usage"]["completion_tokens"] == output[0]["usage"]["completion_tokens"]
    assert rp.health()["workers"] == {
        "idle": 1,
        "initializing": 0,
        "ready": 1,
        "running": 0,
        "throttled": 0,
        "unhealthy": 0,
    }


def test_cancel_stops_generation_in_the_worker(
    rp: runpod.Endpoint, endpoint: LocalEndpoint
) -> None:
    long_job = {
        "prompt": "Once upon a time",
        "stream": True,
        "sampling_params": {"max_tokens": 1500, "ignore_eos": True},
    }
    job = rp.run(long_job)
    endpoint.wait_for(
        lambda: endpoint.worker_metric("worker_engine_running_requests") == 1,
        "the request to be generating",
        timeout=120,
    )
    assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
    # the worker says it aborted the engine request (1500 tokens did not finish by themselves)
    endpoint.wait_for(
        lambda: endpoint.log_count(f"job {job.job_id} {ABORTED}") == 1,
        "the worker to stop the cancelled job",
    )
    assert endpoint.worker_metric("worker_engine_running_requests") == 0
    _, status = endpoint.call("GET", f"/status/{job.job_id}")
    assert status["status"] == "CANCELLED"
    assert endpoint.workers()[0]["jobs_in_progress"] == 0


def test_sixteen_concurrent_streams_arrive_whole_and_in_order(endpoint: LocalEndpoint) -> None:
    """Each stream is forced (by a regex) to spell out its own code: any chunk lost, reordered
    or taken from another stream changes the text."""

    def code(i: int) -> str:
        return " ".join(f"s{i:02d}{letter}" for letter in "abcdefgh")

    async def one(client: openai.AsyncOpenAI, i: int) -> list[Any]:
        stream = await client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": f"Repeat the code {code(i)}"}],
            max_tokens=60,
            stream=True,
            extra_body={"structured_outputs": {"regex": code(i)}},
        )
        return [chunk async for chunk in stream]

    async def run_all() -> list[list[Any]]:
        client = endpoint.async_openai()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(16)))
        finally:
            await client.close()

    streams = asyncio.run(run_all())
    for i, chunks in enumerate(streams):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == code(i)
        assert len({c.id for c in chunks}) == 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({chunks[0].id for chunks in streams}) == 16


def test_vllm_benchmark_client_finishes_without_failures(
    endpoint: LocalEndpoint, worker_env: dict[str, str], tmp_path: Path
) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "vllm_bench_serve.py"),
            "--backend",
            "openai-chat",
            "--base-url",
            f"{endpoint.base}/openai",
            "--endpoint",
            "/v1/chat/completions",
            "--model",
            MODEL_ID,
            "--tokenizer",
            worker_env["MODEL_NAME"],
            "--dataset-name",
            "random",
            "--random-input-len",
            "64",
            "--random-output-len",
            "16",
            "--num-prompts",
            "16",
            "--max-concurrency",
            "4",
            "--save-result",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            "result.json",
            "--disable-tqdm",
        ],
        env={**os.environ, **worker_env, "OPENAI_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["completed"], result["failed"]) == (16, 0)
    assert result["total_output_tokens"] == 16 * 16


def test_a_streams_first_post_carries_its_first_token(endpoint: LocalEndpoint) -> None:
    """Each stream POST is a round trip to RunPod: the role-only chunk vLLM opens a chat stream
    with goes in the same POST as the first token, not in one of its own ahead of it."""
    job = {
        "openai_route": "/v1/chat/completions",
        "openai_input": {"model": MODEL_ID, "messages": QUESTION, "stream": True, **GREEDY},
    }
    status, body = endpoint.call("POST", "/runsync", {"input": job}, timeout=240)
    assert status == 200 and body["status"] == "COMPLETED", body
    posts = body["output"]  # what the job yielded: one value per stream POST
    first = [
        json.loads(line.removeprefix("data: "))
        for line in posts[0].splitlines()
        if line.startswith("data: {")
    ]
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in first)
    text = "".join(
        json.loads(line.removeprefix("data: "))["choices"][0]["delta"].get("content") or ""
        for post in posts
        for line in post.splitlines()
        if line.startswith("data: {")
    )
    assert text == ANSWER
