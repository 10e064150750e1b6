"""Shutdown and death of a real worker under runpod's production loop (the local endpoint, one
worker, LMCache on, ``SHUTDOWN_GRACE_S`` 8 s; the endpoint starts a worker again after each).

* SIGTERM with a job generating: the worker takes no further job, the job finishes whole, the
  worker exits 0 and leaves no process (engine core, LMCache server) behind.
* SIGTERM with a job longer than the grace period: the job ends with a 503 error once the grace
  period has passed, and the worker exits 0 with nothing left.
* The engine core process killed: the job generating ends FAILED with a 503 error and the worker
  exits non-zero, with nothing left; the job stays FAILED (RunPod retries nothing by itself)
  until the client's ``/retry``, which the replacement worker completes. A ``/runsync`` client
  gets the failure as its answer. Through the OpenAI route, a stream ends with the 503 error
  event and the job counts as failed.

Every kill or signal comes after the state it interrupts was seen from outside: a job's first
output at ``/stream`` (or the OpenAI stream's first chunks), a job taken (``/health``), the
worker's log line saying it stopped taking jobs. Waits are safety nets that say what they saw.

"Left behind" is counted by the endpoint when a worker exits: processes of its group still
running (``last_exit`` in ``/local/workers``).
"""

from __future__ import annotations

import concurrent.futures
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

from local_endpoint.harness import LocalEndpoint, local_endpoint

pytestmark = pytest.mark.integration

GRACE_S = 8.0
STOPPING = "stopping: no more jobs are taken"


def story(tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "prompt": "Once upon a time",
        "stream": stream,
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
        timeout=240,
    )
    [worker] = endpoint.workers()
    return worker


def submit(endpoint: LocalEndpoint, job_input: dict[str, Any]) -> str:
    code, body = endpoint.call("POST", "/run", {"input": job_input})
    assert code == 200, body
    return str(body["id"])


def start_generating(endpoint: LocalEndpoint, tokens: int) -> tuple[dict[str, Any], str]:
    """The ready worker, and a streamed job of ``tokens`` whose first output the endpoint has."""
    worker = ready_worker(endpoint)
    job_id = submit(endpoint, story(tokens))
    endpoint.first_output(job_id)
    return worker, job_id


def engine_core(worker: dict[str, Any]) -> psutil.Process:
    family = psutil.Process(int(worker["pid"])).children(recursive=True)
    [core] = [p for p in family if "EngineCore" in p.name() + " ".join(p.cmdline())]
    return core


def exit_of(endpoint: LocalEndpoint, start: int) -> dict[str, int]:
    """How the worker's ``start``-th start ended (exit status, processes left), once it has."""

    def ended() -> bool:
        last = endpoint.workers()[0]["last_exit"]
        return last is not None and last["start"] >= start

    endpoint.wait_for(ended, f"start {start} of the worker to exit", timeout=120)
    last = dict(endpoint.workers()[0]["last_exit"])
    assert last.pop("start") == start
    return last


def unavailable(status: dict[str, Any]) -> None:
    assert status["status"] == "FAILED", status
    error = json.loads(status["error"])["error"]
    assert (error["code"], error["type"]) == (503, "ServiceUnavailableError"), error


def test_sigterm_finishes_the_running_job_takes_no_other_and_leaves_nothing(
    endpoint: LocalEndpoint,
) -> None:
    worker, job_id = start_generating(endpoint, 100)
    stops = endpoint.log.read_text(errors="replace").count(STOPPING)
    os.kill(int(worker["pid"]), signal.SIGTERM)
    endpoint.wait_for(
        lambda: (
            endpoint.log.read_text(errors="replace").count(STOPPING) == stops + 1
            and endpoint.workers()[0]["job_take_polls"] == 0
        ),
        "the worker to stop taking jobs (its log line, and its job-take poll closed)",
    )
    late = submit(
        endpoint, {"prompt": "The capital of France is", "sampling_params": {"max_tokens": 4}}
    )

    done = endpoint.wait_status(job_id)
    assert done["status"] == "COMPLETED", done
    assert done["output"][-1]["usage"]["completion_tokens"] == 100
    assert exit_of(endpoint, worker["starts"]) == {"code": 0, "left_behind": 0}

    # the stopping worker left the late job queued; the next start runs it
    later = endpoint.wait_status(late)
    assert later["status"] == "COMPLETED", later
    assert later["workerId"] != worker["id"]


def test_sigterm_fails_a_job_that_outlasts_the_grace_period(endpoint: LocalEndpoint) -> None:
    worker, job_id = start_generating(endpoint, 1500)
    signalled = time.monotonic()
    os.kill(int(worker["pid"]), signal.SIGTERM)

    done = endpoint.wait_status(job_id)
    assert time.monotonic() - signalled >= GRACE_S  # not before the grace period
    unavailable(done)
    assert json.loads(done["error"])["error"]["message"] == (
        "The worker was stopped and the job did not finish within 8 s; send it again."
    )
    assert exit_of(endpoint, worker["starts"]) == {"code": 0, "left_behind": 0}


def test_engine_core_death_fails_the_job_which_stays_failed_until_retried(
    endpoint: LocalEndpoint,
) -> None:
    worker, job_id = start_generating(endpoint, 300)
    engine_core(worker).kill()

    failed = endpoint.wait_status(job_id)
    unavailable(failed)
    assert exit_of(endpoint, worker["starts"]) == {"code": 1, "left_behind": 0}
    replacement = ready_worker(endpoint)
    assert endpoint.status(job_id) == failed  # nothing retried it meanwhile

    assert endpoint.call("POST", f"/retry/{job_id}") == (200, {"id": job_id, "status": "IN_QUEUE"})
    done = endpoint.wait_status(job_id)
    assert done["status"] == "COMPLETED", done
    assert done["workerId"] == replacement["id"]
    assert done["output"][-1]["usage"]["completion_tokens"] == 300


def test_engine_core_death_answers_a_runsync_client_with_the_failure(
    endpoint: LocalEndpoint,
) -> None:
    """Killed while the job is taken (before or after its first output: the outcome is the same
    since nothing is retried), the /runsync answer is the 503 failure."""
    worker = ready_worker(endpoint)
    before = endpoint.call("GET", "/health")[1]["jobs"]
    assert before["inProgress"] == 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            endpoint.call, "POST", "/runsync", {"input": story(300, stream=False)}, None, 300
        )
        endpoint.wait_for(
            lambda: endpoint.call("GET", "/health")[1]["jobs"]["inProgress"] == 1,
            "the worker to take the job",
        )
        engine_core(worker).kill()
        code, body = answer.result()
    assert code == 200, body
    unavailable(body)
    assert exit_of(endpoint, worker["starts"]) == {"code": 1, "left_behind": 0}
    after = endpoint.call("GET", "/health")[1]["jobs"]
    assert (after["failed"], after["completed"]) == (before["failed"] + 1, before["completed"])


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
        "POST", f"{endpoint.openai_base}/chat/completions", json=body, headers=headers, timeout=240
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        events += [line for line in itertools.islice(lines, 6) if line]
        engine_core(worker).kill()
        events += [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert (error["code"], error["type"]) == (503, "ServiceUnavailableError"), error
    assert all('"error"' not in event for event in events[:-2])
    assert exit_of(endpoint, worker["starts"]) == {"code": 1, "left_behind": 0}
    after = endpoint.call("GET", "/health")[1]["jobs"]
    assert (after["failed"], after["completed"]) == (before["failed"] + 1, before["completed"])
