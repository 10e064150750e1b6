"""Shutdown and death of a real worker under runpod's production loop (the local endpoint, one
worker, LMCache on, ``SHUTDOWN_GRACE_S`` 8 s; the endpoint starts a worker again after each).

* SIGTERM with a job generating: the worker takes no further job, the job finishes whole, the
  worker exits 0 and leaves no process (engine core, LMCache server) behind.
* SIGTERM with a job longer than the grace period: the job ends with a 503 error soon after the
  grace period, and the worker exits 0 with nothing left.
* The engine core process killed: the job generating ends with a 503 error and the worker exits
  non-zero within seconds, with nothing left; through the OpenAI route, a stream ends with the
  503 error event and the job counts as failed.

"Left behind" is counted by the endpoint when a worker exits: processes of its group still
running (``last_exit`` in ``/local/workers``).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
import runpod

from tests.local_endpoint import LocalEndpoint, local_endpoint

pytestmark = pytest.mark.integration

GRACE_S = 8.0


def story(tokens: int) -> dict[str, Any]:
    return {
        "prompt": "Once upon a time",
        "stream": True,
        "sampling_params": {"max_tokens": tokens, "ignore_eos": True, "temperature": 0},
    }


@pytest.fixture(scope="module")
def endpoint(
    tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str]
) -> Iterator[LocalEndpoint]:
    env = {**worker_env, "SHUTDOWN_GRACE_S": str(GRACE_S)}
    with local_endpoint(tmp_path_factory.mktemp("lifecycle"), env) as started:
        yield started


def ready_worker(endpoint: LocalEndpoint) -> dict[str, Any]:
    endpoint.wait_for(
        lambda: all(w["alive"] and w["ready"] for w in endpoint.workers()),
        "a ready worker",
        timeout=300,
    )
    [worker] = endpoint.workers()
    return worker


def start_generating(
    endpoint: LocalEndpoint, tokens: int
) -> tuple[runpod.Endpoint, dict[str, Any], runpod.endpoint.Job]:
    """runpod's client, the ready worker, and a streamed job of ``tokens`` it is generating."""
    rp = endpoint.runpod()
    worker = ready_worker(endpoint)
    job = rp.run(story(tokens))
    endpoint.wait_for(
        lambda: endpoint.worker_metric("worker_engine_running_requests", default=0) == 1,
        f"job {job.job_id} to be generating",
        timeout=60,
    )
    return rp, worker, job


def exit_of(endpoint: LocalEndpoint, start: int, timeout: float) -> dict[str, int]:
    """How the worker's ``start``-th start ended (exit status, processes left), once it has."""

    def ended() -> bool:
        last = endpoint.workers()[0]["last_exit"]
        return last is not None and last["start"] >= start

    endpoint.wait_for(ended, f"start {start} of the worker to exit", timeout=timeout)
    last = dict(endpoint.workers()[0]["last_exit"])
    assert last.pop("start") == start
    return last


def final_status(endpoint: LocalEndpoint, job_id: str, timeout: float) -> dict[str, Any]:
    def status() -> dict[str, Any]:
        return dict(endpoint.call("GET", f"/status/{job_id}")[1])

    endpoint.wait_for(
        lambda: status()["status"] in {"COMPLETED", "FAILED", "CANCELLED"},
        f"job {job_id} to end",
        timeout=timeout,
    )
    return status()


def test_sigterm_finishes_the_running_job_takes_no_other_and_leaves_nothing(
    endpoint: LocalEndpoint,
) -> None:
    rp, worker, job = start_generating(endpoint, 100)
    os.kill(int(worker["pid"]), signal.SIGTERM)
    time.sleep(0.5)  # the signal is handled: from now on the worker takes nothing
    late = rp.run({"prompt": "The capital of France is", "sampling_params": {"max_tokens": 4}})

    done = final_status(endpoint, job.job_id, timeout=60)
    assert done["status"] == "COMPLETED", done
    assert done["output"][-1]["usage"]["completion_tokens"] == 100
    assert exit_of(endpoint, worker["starts"], timeout=60) == {"code": 0, "left_behind": 0}

    # the stopping worker left the late job queued; the next start runs it
    later = final_status(endpoint, late.job_id, timeout=300)
    assert later["status"] == "COMPLETED", later
    assert later["workerId"] != worker["id"]


def test_sigterm_fails_a_job_that_outlasts_the_grace_period(endpoint: LocalEndpoint) -> None:
    _, worker, job = start_generating(endpoint, 1500)
    signalled = time.monotonic()
    os.kill(int(worker["pid"]), signal.SIGTERM)

    done = final_status(endpoint, job.job_id, timeout=GRACE_S + 30)
    took = time.monotonic() - signalled
    assert done["status"] == "FAILED", done
    error = json.loads(done["error"])["error"]
    assert (error["code"], error["type"]) == (503, "ServiceUnavailableError")
    assert error["message"] == (
        "The worker was stopped and the job did not finish within 8 s; send it again."
    )
    assert GRACE_S <= took < GRACE_S + 10
    assert exit_of(endpoint, worker["starts"], timeout=60) == {"code": 0, "left_behind": 0}


def test_engine_core_death_fails_the_job_and_the_worker_exits_non_zero(
    endpoint: LocalEndpoint,
) -> None:
    _, worker, job = start_generating(endpoint, 1500)
    family = psutil.Process(int(worker["pid"])).children(recursive=True)
    [core] = [p for p in family if "EngineCore" in p.name() + " ".join(p.cmdline())]
    killed = time.monotonic()
    core.kill()

    done = final_status(endpoint, job.job_id, timeout=30)
    assert done["status"] == "FAILED", done
    error = json.loads(done["error"])["error"]
    assert (error["code"], error["type"]) == (503, "ServiceUnavailableError")
    assert exit_of(endpoint, worker["starts"], timeout=30) == {"code": 1, "left_behind": 0}
    assert time.monotonic() - killed < 15


def test_engine_core_death_during_an_openai_stream_fails_the_job_with_a_503(
    endpoint: LocalEndpoint,
) -> None:
    """What an OpenAI client sees when the engine dies mid-stream: the chunks so far, then the
    503 error event (so clients that retry on 503 do), and the job counts as failed."""
    worker = ready_worker(endpoint)
    before = endpoint.call("GET", "/health")[1]["jobs"]
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[str] = []
    headers = {"Authorization": f"Bearer {endpoint.key}"}
    with httpx.stream(
        "POST", f"{endpoint.openai_base}/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        events += [line for line in itertools.islice(lines, 6) if line]
        family = psutil.Process(int(worker["pid"])).children(recursive=True)
        [core] = [p for p in family if "EngineCore" in p.name() + " ".join(p.cmdline())]
        core.kill()
        events += [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert (error["code"], error["type"]) == (503, "ServiceUnavailableError"), error
    assert all('"error"' not in event for event in events[:-2])
    assert exit_of(endpoint, worker["starts"], timeout=30) == {"code": 1, "left_behind": 0}
    after = endpoint.call("GET", "/health")[1]["jobs"]
    assert (after["failed"], after["completed"]) == (before["failed"] + 1, before["completed"])
