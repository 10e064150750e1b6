"""The local endpoint's job store and answer shapes, without HTTP or processes."""

from __future__ import annotations

import asyncio
import json

from handler.local.jobstore import Job, JobStore, Observer, Status
from handler.local.relay import (
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


async def test_old_final_jobs_are_forgotten() -> None:
    clock = Clock()
    store = JobStore(retention_s=60, clock=clock)
    old = store.submit("a")
    store.cancel(old)
    running = store.submit("b")
    await store.take("w0", 1, hold_s=1)
    clock.now += 61
    store.submit("c")
    assert store.get(old.id) is None
    assert store.get(running.id) is running


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


async def test_a_job_a_going_away_worker_could_not_start_waits_for_another() -> None:
    store = JobStore()
    job = store.submit({"prompt": "hi"})
    assert await store.take("w0", 1, hold_s=1) == [job]
    store.complete(job, unavailable_error())
    assert (job.status, job.worker_id, job.retries, store.retried) == (Status.IN_QUEUE, None, 1, 1)
    assert await store.take("w0", 1, hold_s=0.01) == []  # w0 is going away: nothing more for it
    assert await store.take("w1", 1, hold_s=1) == [job]
    store.complete(job, {"output": ["ok"]})
    assert (job.status, store.totals[Status.FAILED]) == (Status.COMPLETED, 0)


async def test_a_job_that_streamed_or_was_retried_enough_fails_with_the_503() -> None:
    store = JobStore()
    streamed, poison = store.submit("a"), store.submit("b")
    assert await store.take("w0", 1, hold_s=1) == [streamed]
    store.add_output(streamed, "chunk")
    store.complete(streamed, unavailable_error())
    assert streamed.status is Status.FAILED  # its client saw output already
    for worker in ("w1", "w2", "w3"):
        assert await store.take(worker, 1, hold_s=1) == [poison]
        store.complete(poison, unavailable_error())
    assert (poison.status, poison.retries) == (Status.FAILED, 2)
    assert json.loads(poison.error or "")["error"]["code"] == 503


async def test_fail_ends_a_queued_or_running_job_with_the_error() -> None:
    store = JobStore()
    running, queued = store.submit("a"), store.submit("b")
    assert await store.take("w0", 1, hold_s=1) == [running]
    store.fail(running, "no")
    store.fail(queued, "no")
    assert [queued.status, running.status] == [Status.FAILED, Status.FAILED]
    assert store.counts()[Status.IN_QUEUE] == 0 and await store.take("w0", 1, hold_s=0.01) == []
