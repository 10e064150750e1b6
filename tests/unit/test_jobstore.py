"""The local endpoint's job store and answer shapes, without HTTP or processes."""

from __future__ import annotations

import asyncio
import json

import pytest

from local_endpoint.jobstore import Job, JobStore, Limits, NotRetryable, Observer, Status
from local_endpoint.relay import (
    job_failure,
    one_shot_output,
    openai_job_input,
    sse_chunk,
    sse_failure,
    status_body,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_job_goes_from_queue_to_worker_to_completed() -> None:
    clock = Clock()
    events: list[tuple[str, str]] = []
    store = JobStore(
        Observer(
            taken=lambda j: events.append(("taken", j.status)),
            first_output=lambda j: events.append(("first", j.status)),
            finished=lambda j: events.append(("finished", j.status)),
        ),
        clock=clock,
    )
    job = store.submit({"prompt": "hi"})
    assert store.counts()[Status.IN_QUEUE] == 1
    clock.now = 100.5
    assert await store.take("w0", 4, hold_s=1) == [job]
    clock.now = 101.0
    store.add_output(job, "a")
    store.add_output(job, "b")
    clock.now = 102.0
    store.complete(job, {"output": ["a", "b"]})

    assert status_body(job) == {
        "id": job.id,
        "status": "COMPLETED",
        "delayTime": 500,
        "executionTime": 1500,
        "workerId": "w0",
        "output": ["a", "b"],
    }
    assert events == [
        ("taken", Status.IN_PROGRESS),
        ("first", Status.IN_PROGRESS),
        ("finished", Status.COMPLETED),
    ]
    assert (job.stream_posts, store.totals[Status.COMPLETED]) == (2, 1)


async def test_take_waits_for_work_and_hands_out_at_most_count() -> None:
    store = JobStore()
    waiting = asyncio.create_task(store.take("w0", 2, hold_s=5))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    jobs = [store.submit(i) for i in range(3)]
    assert await waiting == jobs[:2]
    assert await store.take("w1", 2, hold_s=5) == jobs[2:]
    assert await store.take("w1", 2, hold_s=0.01) == []


async def test_take_hands_nothing_to_a_worker_that_died_while_waiting() -> None:
    store = JobStore()
    alive = True
    waiting = asyncio.create_task(store.take("w0", 1, hold_s=5, alive=lambda: alive))
    await asyncio.sleep(0.01)
    alive = False
    job = store.submit("x")
    assert await waiting == []
    assert job.status is Status.IN_QUEUE and await store.take("w1", 1, hold_s=1) == [job]


async def test_stream_is_incremental() -> None:
    store = JobStore()
    job = store.submit("x")
    await store.take("w0", 1, hold_s=1)
    store.add_output(job, 1)
    assert store.read_stream(job) == [1]
    assert store.read_stream(job) == []
    store.add_output(job, 2)
    store.add_output(job, 3)
    assert store.read_stream(job) == [2, 3]


async def test_cancel_a_queued_job_never_runs_it() -> None:
    store = JobStore()
    job = store.submit("x")
    store.cancel(job)
    assert job.status is Status.CANCELLED
    assert await store.take("w0", 1, hold_s=0.01) == []


async def test_cancel_a_running_job_signals_its_worker_and_drops_late_output() -> None:
    store = JobStore()
    job = store.submit("x")
    await store.take("w0", 1, hold_s=1)
    polling = asyncio.create_task(store.stop_signals("w0", hold_s=5))
    other = asyncio.create_task(store.stop_signals("w1", hold_s=0.05))
    await asyncio.sleep(0.01)
    store.cancel(job)
    assert await polling == [job.id]
    assert await other == []
    store.add_output(job, "late")
    store.complete(job, {"output": ["late"]})
    assert (job.status, job.stream, job.output) == (Status.CANCELLED, [], None)


async def test_wait_returns_on_change() -> None:
    store = JobStore()
    job = store.submit("x")
    waiter = asyncio.create_task(store.wait(job, 5))
    await asyncio.sleep(0.01)
    await store.take("w0", 1, hold_s=1)
    await asyncio.wait_for(waiter, 1)


async def test_a_lost_worker_fails_its_running_jobs_only() -> None:
    store = JobStore()
    running = store.submit("a")
    await store.take("w0", 1, hold_s=1)
    queued = store.submit("b")
    assert store.fail_worker_jobs("w0", '{"error": {"code": 503}}') == 1
    assert (running.status, queued.status) == (Status.FAILED, Status.IN_QUEUE)


async def test_close_releases_every_poll_and_cancels_the_queue() -> None:
    store = JobStore()
    take = asyncio.create_task(store.take("w0", 1, hold_s=30))
    stops = asyncio.create_task(store.stop_signals("w0", hold_s=30))
    await asyncio.sleep(0.01)
    store.close()
    assert await asyncio.wait_for(take, 1) == []
    assert await asyncio.wait_for(stops, 1) == []
    job = store.submit("late")
    store.close()
    assert job.status is Status.CANCELLED


async def test_final_jobs_are_forgotten_after_their_result_retention() -> None:
    clock = Clock()
    store = JobStore(clock=clock)
    run = store.submit("a")  # /run: 30 minutes
    sync = store.submit("b", Limits(retention_s=60))  # /runsync: 1 minute
    running = store.submit("c")
    store.cancel(run)
    store.cancel(sync)
    await store.take("w0", 1, hold_s=1)
    clock.now += 61
    store.sweep()
    assert (store.get(run.id), store.get(sync.id), store.get(running.id)) == (run, None, running)
    clock.now += 1800
    store.sweep()
    # ``running`` passed its execution timeout: TIMED_OUT, kept for its retention in turn
    assert (store.get(run.id), store.get(running.id)) == (None, running)
    assert running.status is Status.TIMED_OUT


def test_failures_map_to_openai_errors_with_their_status() -> None:
    job = Job(id="j", input=None, created=0, status=Status.FAILED)
    job.error = json.dumps({"error": {"message": "no", "type": "NotFoundError", "code": 404}})
    assert job_failure(job) == (
        404,
        {"error": {"message": "no", "type": "NotFoundError", "code": 404}},
    )

    job.error = "handler: boom at /opt/x/y.py line 3 \ntraceback: ..."
    status, body = job_failure(job)
    assert status == 500
    assert body["error"]["message"] == "The worker failed the job: handler: boom at <path> line 3"

    job.status = Status.CANCELLED
    assert job_failure(job)[0] == 409
    assert sse_failure(job).endswith("data: [DONE]\n\n")
    assert json.loads(sse_failure(job).split("\n\n")[0][6:])["error"]["type"] == "CancelledError"


def test_openai_shapes() -> None:
    assert openai_job_input("/v1/models", None) == {"openai_route": "/v1/models"}
    assert openai_job_input("/v1/completions", {"prompt": "x"}) == {
        "openai_route": "/v1/completions",
        "openai_input": {"prompt": "x"},
    }
    assert one_shot_output([{"a": 1}]) == {"a": 1}
    assert one_shot_output([1, 2]) == [1, 2]
    assert sse_chunk("data: x\n\n") == "data: x\n\n"
    assert sse_chunk({"a": "é"}) == 'data: {"a": "é"}\n\n'


def unavailable_error() -> dict[str, str]:
    body = {"message": "engine gone", "type": "ServiceUnavailableError", "param": None}
    return {"error": json.dumps({"error": {**body, "code": 503}})}


async def test_a_job_failed_before_any_output_stays_failed_and_its_worker_gets_no_more() -> None:
    """As on RunPod: nothing is retried on its own, even a 503 before any output."""
    store = JobStore()
    job, other = store.submit({"prompt": "hi"}), store.submit("next")
    assert await store.take("w0", 1, hold_s=1) == [job]
    store.complete(job, unavailable_error())
    assert (job.status, json.loads(job.error or "")["error"]["code"]) == (Status.FAILED, 503)
    assert (store.retried, store.counts()[Status.IN_QUEUE]) == (0, 1)
    assert await store.take("w0", 1, hold_s=0.01) == []  # w0 is going away: nothing more for it
    assert await store.take("w1", 1, hold_s=1) == [other]


async def test_jobs_a_poll_could_not_deliver_go_back_to_the_front_in_order() -> None:
    store = JobStore()
    a, b, c = store.submit("a"), store.submit("b"), store.submit("c")
    taken = await store.take("w0", 2, hold_s=1)
    assert taken == [a, b]
    store.put_back(taken)
    assert (a.status, a.worker_id, a.started, store.counts()[Status.IN_QUEUE]) == (
        Status.IN_QUEUE,
        None,
        None,
        3,
    )
    assert await store.take("w1", 3, hold_s=1) == [a, b, c]


async def test_retry_runs_a_failed_or_timed_out_job_again_without_its_old_output() -> None:
    clock = Clock()
    store = JobStore(clock=clock)
    job = store.submit("a", Limits(execution_timeout_s=5))
    assert await store.take("w0", 1, hold_s=1) == [job]
    store.add_output(job, "partial")
    store.complete(job, unavailable_error())
    store.retry(job)
    assert (job.status, job.output, job.error, job.stream, job.worker_id) == (
        Status.IN_QUEUE,
        None,
        None,
        [],
        None,
    )
    assert status_body(job) == {"id": job.id, "status": "IN_QUEUE"}
    assert await store.take("w1", 1, hold_s=1) == [job]
    clock.now += 5
    store.sweep()
    assert job.status is Status.TIMED_OUT
    assert await store.stop_signals("w1", hold_s=1) == [job.id]  # stopped in its worker
    store.retry(job)
    assert await store.take("w1", 1, hold_s=1) == [job]
    clock.now += 5
    store.sweep()
    store.retry(job)  # before w1 collected the stop: the new run is not stopped by it
    assert await store.take("w1", 1, hold_s=1) == [job]
    assert await store.stop_signals("w1", hold_s=0.01) == []
    store.complete(job, {"output": ["ok"]})
    assert (job.status, job.output, job.retries, store.retried) == (Status.COMPLETED, ["ok"], 3, 3)
    for status in (Status.COMPLETED, Status.CANCELLED, Status.IN_QUEUE, Status.IN_PROGRESS):
        job.status = status
        with pytest.raises(NotRetryable, match=f"is {status.value}; only FAILED or TIMED_OUT"):
            store.retry(job)


async def test_time_limits_from_submission_and_from_start() -> None:
    clock = Clock()
    store = JobStore(clock=clock)
    queued = store.submit("q", Limits(ttl_s=10))
    slow = store.submit("s", Limits(execution_timeout_s=30))
    await store.take("w0", 1, hold_s=1)  # takes ``queued``
    await store.take("w1", 1, hold_s=1)  # takes ``slow``
    queued.status, queued.worker_id = Status.IN_QUEUE, None  # as if no worker had taken it
    store._pending.append(queued.id)
    clock.now += 10
    store.sweep()
    assert (queued.status, slow.status) == (Status.TIMED_OUT, Status.IN_PROGRESS)
    assert json.loads(queued.error or "")["error"] == {
        "message": "The job's TTL (10 s) passed before it ended.",
        "type": "TimeoutError",
        "param": None,
        "code": 504,
    }
    assert store.counts()[Status.IN_QUEUE] == 0
    clock.now += 20
    store.sweep()
    assert slow.status is Status.TIMED_OUT
    assert "past its execution timeout (30 s)" in (slow.error or "")
    assert job_failure(slow)[0] == 504
    assert store.totals[Status.TIMED_OUT] == 2


async def test_fail_ends_a_queued_or_running_job_with_the_error() -> None:
    store = JobStore()
    running, queued = store.submit("a"), store.submit("b")
    assert await store.take("w0", 1, hold_s=1) == [running]
    store.fail(running, "no")
    store.fail(queued, "no")
    assert [queued.status, running.status] == [Status.FAILED, Status.FAILED]
    assert store.counts()[Status.IN_QUEUE] == 0 and await store.take("w0", 1, hold_s=0.01) == []
