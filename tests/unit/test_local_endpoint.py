"""The local endpoint with two fake-engine workers: runpod's real production loop and the real
handler in separate processes, the fake engine instead of vLLM. Clients are the unmodified openai
SDK, runpod's own client, and raw HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import runpod
from openai.types.chat import ChatCompletionMessageParam

from local_endpoint.harness import ABORTED, LocalEndpoint, local_endpoint
from tests.fake_endpoint import fake_endpoint
from tests.fakes import TEXT

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
PAUSE_S = 0.25  # per streamed event: a fake stream lasts about 2.5 s, long enough to cancel


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEndpoint]:
    with fake_endpoint(
        tmp_path_factory.mktemp("fake-endpoint"), PAUSE_S, "--workers", "2"
    ) as started:
        yield started


def test_openai_sdk_one_shot_stream_and_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["fake-model"]

    answer = client.chat.completions.create(model="fake-model", messages=QUESTION)
    assert answer.choices[0].message.content == TEXT
    assert answer.usage is not None and answer.usage.completion_tokens == 7

    chunks = list(
        client.chat.completions.create(
            model="fake-model",
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert len({c.id for c in chunks}) == 1
    assert [c.usage.completion_tokens for c in chunks if c.usage] == [7]

    completion = list(client.completions.create(model="fake-model", prompt="Hi", stream=True))
    assert "".join(c.choices[0].text for c in completion) == TEXT


async def test_async_openai_sdk(endpoint: LocalEndpoint) -> None:
    client = endpoint.async_openai()
    answer = await client.chat.completions.create(model="fake-model", messages=QUESTION)
    assert answer.choices[0].message.content == TEXT
    stream = await client.chat.completions.create(
        model="fake-model",
        messages=QUESTION,
        stream=True,
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == TEXT
    await client.close()


def test_an_idle_connection_outlives_the_sdks_keep_alive(endpoint: LocalEndpoint) -> None:
    """httpx (the OpenAI SDK's transport) reuses a connection idle for up to 5 s: the endpoint
    must not close it first, or the request sent on it as it closes fails ("Connection error")."""
    host, port = endpoint.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Authorization": f"Bearer {endpoint.key}"}
    try:
        answers = []
        for pause in (0.0, 6.0):
            time.sleep(pause)
            connection.request("GET", "/v2/local/health", headers=headers)
            response = connection.getresponse()
            answers.append((response.status, json.loads(response.read())["workers"]["ready"]))
            if not pause:
                first_socket = connection.sock
        assert answers == [(200, 2), (200, 2)]
        assert connection.sock is first_socket  # the same connection, still open after 6 s
    finally:
        connection.close()


def test_openai_errors_raise_the_sdks_exception_classes(
    client: openai.OpenAI, endpoint: LocalEndpoint
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as not_found:
            client.chat.completions.create(model="nope", messages=QUESTION, stream=stream)
        assert not_found.value.status_code == 404
        assert not_found.value.body == {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    with pytest.raises(openai.NotFoundError) as route:
        client.post("/embeddings-of-nothing", cast_to=object, body={})
    assert "/v1/chat/completions" in str(route.value.message)

    stranger = openai.OpenAI(base_url=endpoint.openai_base, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    assert endpoint.call("GET", "/health", key="")[0] == 401

    status, body = endpoint.call("POST", "/run", body=None)
    assert (status, body["error"]["type"]) == (400, "BadRequestError")


def test_runpod_client_run_status_stream_run_sync(rp: runpod.Endpoint) -> None:
    one_shot = {"messages": QUESTION}
    output = rp.run_sync(one_shot, timeout=30)
    assert output[0]["choices"][0]["message"]["content"] == TEXT

    job = rp.run(one_shot)
    assert job.output(timeout=30)[0]["choices"][0]["message"]["content"] == TEXT
    assert job.status() == "COMPLETED"

    streamed = rp.run({"messages": QUESTION, "stream": True})
    chunks = list(streamed.stream())
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == TEXT
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    assert streamed.status() == "COMPLETED"

    health = rp.health()
    assert health["workers"]["ready"] == 2
    assert health["jobs"]["completed"] >= 3


def test_stream_route_is_incremental(endpoint: LocalEndpoint) -> None:
    _, job = endpoint.call("POST", "/run", {"input": {"prompt": "Hi", "stream": True}})
    seen: list[Any] = []
    for _ in range(200):
        status, body = endpoint.call("GET", f"/stream/{job['id']}")
        assert status == 200
        seen += [chunk["output"] for chunk in body["stream"]]
        if body["status"] == "COMPLETED" and not body["stream"]:
            break
    _, final = endpoint.call("GET", f"/status/{job['id']}")
    assert seen == final["output"]  # every chunk exactly once, in order
    assert final["workerId"].startswith("local-worker-")
    assert final["delayTime"] >= 0 and final["executionTime"] > 0


def test_cancel_stops_the_job_in_the_worker(endpoint: LocalEndpoint, rp: runpod.Endpoint) -> None:
    long_stream = {"messages": QUESTION, "stream": True}
    jobs = [rp.run(long_stream) for _ in range(2)]
    endpoint.wait_for(
        lambda: sum(w["jobs_in_progress"] for w in endpoint.workers()) == 2, "both jobs to run"
    )
    running = [i for i, w in enumerate(endpoint.workers()) if w["jobs_in_progress"]]
    endpoint.wait_for(
        lambda: (
            sum(endpoint.worker_metric("worker_engine_running_requests", i) for i in running) == 2
        ),
        "both requests to be generating",
    )

    assert jobs[0].cancel() == {"id": jobs[0].job_id, "status": "CANCELLED"}
    # its worker says it aborted the engine request (the stream did not end by itself)
    endpoint.wait_for(
        lambda: endpoint.log_count(f"job {jobs[0].job_id} {ABORTED}") == 1,
        "the cancelled request to leave the engine",
    )
    assert jobs[1].output(timeout=120)[-1]["usage"]["completion_tokens"] == 7
    assert jobs[0].status() == "CANCELLED"


def test_sixteen_concurrent_streams_stay_whole(endpoint: LocalEndpoint) -> None:
    async def one(client: openai.AsyncOpenAI) -> list[Any]:
        stream = await client.chat.completions.create(
            model="fake-model",
            messages=QUESTION,
            stream=True,
        )
        return [chunk async for chunk in stream]

    async def all_of_them() -> list[list[Any]]:
        client = endpoint.async_openai()
        try:
            return await asyncio.gather(*(one(client) for _ in range(16)))
        finally:
            await client.close()

    streams = asyncio.run(all_of_them())
    ids = set()
    for chunks in streams:
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXT
        assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
        ids |= {c.id for c in chunks}
    assert len(ids) == 16  # one id per stream, no chunk of one inside another


def test_metrics(endpoint: LocalEndpoint) -> None:
    endpoint.call("POST", "/runsync", {"input": {"prompt": "Hi", "stream": True}})
    text = endpoint.text("/metrics")
    for name in (
        'runpod_local_jobs_finished_total{status="COMPLETED"}',
        "runpod_local_job_queue_wait_seconds_count",
        "runpod_local_job_time_to_first_byte_seconds_count",
        "runpod_local_job_stream_posts_bucket",
        'runpod_local_workers{state="ready"} 2.0',
    ):
        assert name in text, name


def test_a_worker_that_dies_fails_its_jobs_and_is_replaced(
    endpoint: LocalEndpoint, rp: runpod.Endpoint
) -> None:
    job = rp.run({"messages": QUESTION, "stream": True})
    endpoint.wait_for(lambda: job.status() == "IN_PROGRESS", "the job to start")
    victim = next(w for w in endpoint.workers() if w["jobs_in_progress"])
    its_children = psutil.Process(victim["pid"]).children(recursive=True)
    assert its_children  # runpod's ping process at least
    os.kill(victim["pid"], signal.SIGKILL)

    assert job.output(timeout=120) is None
    _, status = endpoint.call("GET", f"/status/{job.job_id}")
    assert status["status"] == "FAILED"
    assert json.loads(status["error"])["error"]["code"] == 503

    endpoint.wait_for(
        lambda: all(w["ready"] for w in endpoint.workers()), "the worker to come back", 120
    )
    assert not [p for p in its_children if p.is_running() and p.status() != "zombie"]
    replaced = next(w for w in endpoint.workers() if w["slot"] == victim["slot"])
    assert replaced["starts"] == 2 and replaced["pid"] != victim["pid"]
    assert replaced["id"] == f"{victim['slot']}-r2"
    assert (
        rp.run_sync({"messages": QUESTION}, timeout=120)[0]["choices"][0]["message"]["content"]
        == TEXT
    )


def test_a_worker_that_cannot_start_stops_the_endpoint(tmp_path: Path) -> None:
    with (
        pytest.raises(AssertionError, match="endpoint exited with 1"),
        local_endpoint(
            tmp_path, {"MAX_CONCURRENCY": "many"}, "--worker-module", "tests.fake_worker"
        ),
    ):
        pass
    assert "exited with status 1 at start" in (tmp_path / "local-endpoint.log").read_text()


def test_unknown_routes_and_endpoints_get_openai_errors(endpoint: LocalEndpoint) -> None:
    assert endpoint.call("GET", "//v2/other/health") == (
        404,
        {
            "error": {
                "message": "No route /v2/other/health.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
        },
    )
    status, body = endpoint.call("GET", "/status/local-nothing")
    assert (status, body["error"]["type"]) == (404, "NotFoundError")


def test_a_busy_port_is_a_clear_error(endpoint: LocalEndpoint) -> None:
    port = endpoint.url.rsplit(":", 1)[1]
    run = subprocess.run(
        [sys.executable, "-m", "local_endpoint", "--port", port, "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.startswith(f"local endpoint not started: 127.0.0.1:{port}: ")
