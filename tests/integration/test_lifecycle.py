"""Shutdown and death of a real worker under runpod's production loop (the local endpoint, one
worker, LMCache on, ``SHUTDOWN_GRACE_S`` 8 s; the endpoint starts a worker again after each).

* SIGTERM with two jobs generating: the worker takes no further job, the short job finishes
  whole, the one longer than the grace period ends with a 503 error once it has passed, and the
  worker exits 0 and leaves no process (engine core, LMCache server) behind.
* The engine core process killed with three jobs running (one death for all: each worker start
  costs ~35 s): each ends FAILED with a 503 error as its client sees it (a ``/runsync`` answer,
  an OpenAI stream's error event, a ``/run`` job's status) and the worker exits non-zero, with
  nothing left; the ``/run`` job stays FAILED (RunPod retries nothing by itself) until the
  client's ``/retry``, which the replacement worker completes.

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


def test_sigterm_finishes_what_fits_the_grace_period_fails_the_rest_and_takes_no_other(
    endpoint: LocalEndpoint,
) -> None:
    """One SIGTERM with two jobs generating: the short one finishes whole, the one longer than
    the grace period ends with a 503 once it has passed; a job sent after the worker stopped
    taking jobs waits in the queue for the next start; the worker exits 0 with nothing left."""
    worker, long = start_generating(endpoint, 1500)
    short = submit(endpoint, story(50))  # started last, so it is still generating at the signal
    endpoint.first_output(short)
    stops = endpoint.log.read_text(errors="replace").count(STOPPING)
    signalled = time.monotonic()
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

    done = endpoint.wait_status(short)
    assert done["status"] == "COMPLETED", done
    assert done["output"][-1]["usage"]["completion_tokens"] == 50
    cut = endpoint.wait_status(long)
    assert time.monotonic() - signalled >= GRACE_S  # not before the grace period
    unavailable(cut)
    assert json.loads(cut["error"])["error"]["message"] == (
        "The worker was stopped and the job did not finish within 8 s; send it again."
    )
    assert exit_of(endpoint, worker["starts"]) == {"code": 0, "left_behind": 0}

    # the stopping worker left the late job queued; the next start runs it
    later = endpoint.wait_status(late)
    assert later["status"] == "COMPLETED", later
    assert later["workerId"] != worker["id"]


def openai_story_request(endpoint: LocalEndpoint) -> tuple[str, dict[str, Any], dict[str, str]]:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {endpoint.key}"}
    return f"{endpoint.openai_base}/chat/completions", body, headers


def test_engine_core_death_fails_every_job_as_its_client_sees_it_until_retried(
    endpoint: LocalEndpoint,
) -> None:
    """One engine death with three jobs running, one for each way a client waits: a /runsync
    client gets the 503 failure as its answer; an OpenAI stream gets the chunks so far, then the
    503 error event (so clients that retry on 503 do); a /run job ends FAILED with the 503 and
    stays so (RunPod retries nothing by itself) until the client's /retry, which the
    replacement worker completes. The worker exits 1 and leaves nothing behind."""
    worker = ready_worker(endpoint)
    before = endpoint.call("GET", "/health")[1]["jobs"]
    assert before["inProgress"] == 0
    url, body, headers = openai_story_request(endpoint)
    events: list[str] = []
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        httpx.stream("POST", url, json=body, headers=headers, timeout=240) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        events += [line for line in itertools.islice(lines, 6) if line]
        answer = pool.submit(
            endpoint.call, "POST", "/runsync", {"input": story(1500, stream=False)}, None, 300
        )
        endpoint.wait_for(
            lambda: endpoint.call("GET", "/health")[1]["jobs"]["inProgress"] == 2,
            "the worker to take the /runsync job beside the stream",
        )
        job_id = submit(endpoint, story(300))
        endpoint.first_output(job_id)
        engine_core(worker).kill()
        events += [line for line in lines if line]
        code, answered = answer.result()

    assert code == 200, answered
    unavailable(answered)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert (error["code"], error["type"]) == (503, "ServiceUnavailableError"), error
    assert all('"error"' not in event for event in events[:-2])
    failed = endpoint.wait_status(job_id)
    unavailable(failed)
    assert exit_of(endpoint, worker["starts"]) == {"code": 1, "left_behind": 0}
    after = endpoint.call("GET", "/health")[1]["jobs"]
    assert (after["failed"], after["completed"]) == (before["failed"] + 3, before["completed"])

    replacement = ready_worker(endpoint)
    assert endpoint.status(job_id) == failed  # nothing retried it meanwhile
    assert endpoint.call("POST", f"/retry/{job_id}") == (200, {"id": job_id, "status": "IN_QUEUE"})
    done = endpoint.wait_status(job_id)
    assert done["status"] == "COMPLETED", done
    assert done["workerId"] == replacement["id"]
    assert done["output"][-1]["usage"]["completion_tokens"] == 300
