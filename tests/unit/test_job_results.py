"""How a job's results reach RunPod (handler.job_loop.handle_job and post_result), against a real
HTTP server standing in for RunPod's webhooks: the bodies, URLs and headers runpod's SDK sends,
one aiohttp request per result, retries on 5xx, and a job that always ends with a final result."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from runpod.http_client import AsyncClientSession
from runpod.serverless.modules import rp_http

from handler import job_loop


@dataclass
class Hooks:
    """RunPod's result webhooks: every request as (path, query, headers, body)."""

    calls: list[tuple[str, dict[str, str], dict[str, str], Any]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # statuses to answer with first
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    hold: bool = False  # answer nothing (a POST still in flight)

    async def record(self, request: web.Request) -> web.Response:
        body = json.loads((await request.read()).decode())
        self.calls.append((request.path, dict(request.query), dict(request.headers), body))
        self.arrived.set()
        if self.hold:
            await asyncio.sleep(3600)
        status = self.answers.pop(0) if self.answers else 200
        return web.json_response({"ok": status < 400}, status=status)


@pytest.fixture
async def hooks(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hooks]:
    recorded = Hooks()
    app = web.Application()
    app.router.add_post("/{kind}/{job_id}", recorded.record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    monkeypatch.setattr(rp_http, "JOB_STREAM_URL", f"{base}/stream/$ID?gpu=local")
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", f"{base}/done/$ID?gpu=local")
    monkeypatch.setattr(job_loop, "_RETRY_WAIT_S", (0.0, 0.0))
    yield recorded
    await server.close()


def config(handler: Any, **more: Any) -> dict[str, Any]:
    return {"handler": handler, "return_aggregate_stream": True, **more}


async def test_each_value_is_one_stream_post_then_the_aggregated_result(hooks: Hooks) -> None:
    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        yield "data: één\n\n"
        yield {"choices": [{"text": "x"}]}

    async with AsyncClientSession() as session:
        await job_loop.handle_job(session, config(handler), {"id": "job-1", "input": {}})
        shared = dict(session.headers)

    assert [(path, query, body) for path, query, _, body in hooks.calls] == [
        ("/stream/job-1", {"gpu": "local", "isStream": "false"}, {"output": "data: één\n\n"}),
        (
            "/stream/job-1",
            {"gpu": "local", "isStream": "false"},
            {"output": {"choices": [{"text": "x"}]}},
        ),
        (
            "/done/job-1",
            {"gpu": "local", "isStream": "true"},
            {"output": ["data: één\n\n", {"choices": [{"text": "x"}]}]},
        ),
    ]
    for _, _, headers, _ in hooks.calls:  # runpod's result headers, the job's id per request
        assert headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert headers["charset"] == "utf-8"
        assert headers["X-Request-ID"] == "job-1"
    assert "X-Request-ID" not in shared  # not set on the session every job shares


async def test_an_error_value_ends_the_job_as_failed(hooks: Hooks) -> None:
    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        yield "first"
        yield {"error": '{"error": {"code": 400}}'}
        yield "never sent"

    async with AsyncClientSession() as session:
        await job_loop.handle_job(session, config(handler), {"id": "job-2", "input": {}})

    assert [(path, body) for path, _, _, body in hooks.calls] == [
        ("/stream/job-2", {"output": "first"}),
        ("/done/job-2", {"error": '{"error": {"code": 400}}'}),
    ]


async def test_a_value_json_cannot_carry_fails_the_job_with_an_error(hooks: Hooks) -> None:
    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        yield "ok"
        yield {"score": float("nan")}

    async with AsyncClientSession() as session:
        await job_loop.handle_job(session, config(handler), {"id": "job-3", "input": {}})

    assert [path for path, *_ in hooks.calls] == ["/stream/job-3", "/done/job-3"]
    error = json.loads(hooks.calls[-1][3]["error"])["error"]
    assert (error["type"], error["code"]) == ("InternalServerError", 500)


async def test_a_5xx_is_tried_again_and_a_4xx_is_not(hooks: Hooks) -> None:
    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        yield "a"
        yield "b"

    hooks.answers = [503, 502, 200, 404]  # "a": two 5xx then taken; "b": refused
    async with AsyncClientSession() as session:
        await job_loop.handle_job(session, config(handler), {"id": "job-4", "input": {}})

    assert [(path, body) for path, _, _, body in hooks.calls] == [
        ("/stream/job-4", {"output": "a"}),
        ("/stream/job-4", {"output": "a"}),
        ("/stream/job-4", {"output": "a"}),
        ("/stream/job-4", {"output": "b"}),
        ("/done/job-4", {"output": ["a", "b"]}),
    ]


async def test_a_webhook_that_cannot_be_reached_is_tried_three_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", f"http://127.0.0.1:{port}/done/$ID?gpu=local")
    monkeypatch.setattr(job_loop, "_RETRY_WAIT_S", (0.0, 0.0))
    attempts = 0
    real_post = AsyncClientSession().__class__.post

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        return real_post(self, *args, **kwargs)

    async with AsyncClientSession() as session:
        monkeypatch.setattr(type(session), "post", counting)
        delivered = await job_loop.post_result(session, {"id": "job-5"}, {"output": 1}, "done")

    assert (delivered, attempts) == (False, 3)


async def test_a_job_stopped_while_a_post_is_in_flight_closes_its_handler_at_once(
    hooks: Hooks,
) -> None:
    closed = asyncio.Event()

    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        try:
            yield "first"
            yield "never"
        finally:
            closed.set()  # where a real handler aborts its engine request

    hooks.hold = True
    async with AsyncClientSession() as session:
        task = asyncio.create_task(
            job_loop.handle_job(session, config(handler), {"id": "job-6", "input": {}})
        )
        await asyncio.wait_for(hooks.arrived.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert closed.is_set()  # not left for the garbage collector

    # stopped by RunPod: no final result is sent, as with runpod's own handle_job
    assert [(path, body) for path, _, _, body in hooks.calls] == [
        ("/stream/job-6", {"output": "first"})
    ]


async def test_a_webhook_that_never_answers_is_reported_not_raised(hooks: Hooks) -> None:
    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        yield "a"

    hooks.hold = True
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        await job_loop.handle_job(session, config(handler), {"id": "job-7", "input": {}})

    # each POST timed out once (not sent again: it may have arrived), and the job still ended
    assert [(path, body) for path, _, _, body in hooks.calls] == [
        ("/stream/job-7", {"output": "a"}),
        ("/done/job-7", {"output": ["a"]}),
    ]
