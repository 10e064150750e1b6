"""How the engine calls vLLM's app over ASGI, on a small Starlette app in its place (no vllm):
the request it makes, whole JSON answers, SSE events cut whole from any body chunking, error
answers of both shapes, and a caller that leaves (the app sees a disconnect); each called from
the engine's own loop and from another."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from handler.engine.asgi import Lifespan, validation_answer
from handler.engine.interface import EngineCall
from handler.engine.vllm_engine import VllmEngine, _Opened
from handler.errors import EngineError, InvalidRequest, NotFound, error_body
from tests.fakes import INFO

# body chunks that cut an event in two, and a two-byte UTF-8 character ("é") in two
CHUNKS = [b'data: {"t": "\xc3', b'\xa9"}\n\ndata: {"t": 2}\n\nda', b"ta: [DONE]\n\n"]


class Seen:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.disconnected = asyncio.Event()
        self.stream_closed = threading.Event()


def make_app(seen: Seen) -> Starlette:
    async def echo(request: Request) -> Response:
        seen.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "request_id": request.headers.get("x-request-id"),
                "body": await request.body(),
            }
        )
        return JSONResponse({"ok": True})

    async def chunked(_request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for chunk in CHUNKS:
                yield chunk

        return StreamingResponse(body(), media_type="text/event-stream")

    async def endless(_request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"data: {}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                seen.stream_closed.set()

        return StreamingResponse(body(), media_type="text/event-stream")

    async def waits(request: Request) -> Response:
        # as vLLM's one-shot routes do (with_cancellation): stop when the client leaves
        while (await request.receive())["type"] != "http.disconnect":
            pass
        seen.stream_closed.set()
        return JSONResponse({})

    async def anthropic_error(_request: Request) -> Response:
        body = {"type": "error", "error": {"type": "BadRequestError", "message": "no"}}
        return JSONResponse(body, status_code=400)

    async def openai_error(_request: Request) -> Response:
        error = {"message": "bad at /opt/x/y.py", "type": "BadRequestError", "param": "n"}
        return JSONResponse({"error": {**error, "code": 400}}, status_code=400)

    async def binary(_request: Request) -> Response:
        return Response(b"\x00\x01", media_type="application/octet-stream")

    async def boom(_request: Request) -> Response:
        raise RuntimeError("boom")

    return Starlette(
        routes=[
            Route("/echo", echo, methods=["GET", "POST"]),
            Route("/chunked", chunked, methods=["POST"]),
            Route("/endless", endless, methods=["POST"]),
            Route("/waits", waits, methods=["POST"]),
            Route("/anthropic-error", anthropic_error, methods=["POST"]),
            Route("/openai-error", openai_error, methods=["POST"]),
            Route("/binary", binary, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
        ]
    )


class FakeClient:
    errored = False

    def get_num_unfinished_requests(self) -> int:
        return 0


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture(params=["from the engine's loop", "from another loop"])
async def engine(request: pytest.FixtureRequest, seen: Seen) -> AsyncIterator[VllmEngine]:
    """The app in vLLM's place, called from the loop the engine runs on (as the worker's job
    loop does) or from another (``make run``): an engine loop thread of its own."""
    opened = _Opened(FakeClient(), make_app(seen), contextlib.AsyncExitStack(), INFO)
    if request.param == "from the engine's loop":
        loop = asyncio.get_running_loop()
        yield VllmEngine(loop, threading.current_thread(), opened, on_dead=lambda: None)
        return  # its shutdown would stop this loop, which is the test session's
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    engine = VllmEngine(loop, thread, opened, on_dead=lambda: None)
    yield engine
    engine.shutdown()


async def test_a_post_carries_body_and_request_id(engine: VllmEngine, seen: Seen) -> None:
    answer = await engine.serve(EngineCall(route="/echo", body={"a": "é"}, request_id="job-7"))
    assert answer == {"ok": True}
    assert seen.requests == [
        {
            "method": "POST",
            "path": "/echo",
            "request_id": "job-7",
            "body": json.dumps({"a": "é"}).encode(),
        }
    ]


async def test_a_get_has_no_body(engine: VllmEngine, seen: Seen) -> None:
    await engine.serve(EngineCall(route="/echo", method="GET", request_id="r"))
    assert seen.requests == [{"method": "GET", "path": "/echo", "request_id": "r", "body": b""}]


async def test_events_are_cut_whole_from_any_chunking(engine: VllmEngine) -> None:
    reply = await engine.serve(EngineCall(route="/chunked", body={}))
    assert not isinstance(reply, dict)
    assert [event async for event in reply] == [
        'data: {"t": "é"}\n\n',
        'data: {"t": 2}\n\n',
        "data: [DONE]\n\n",
    ]


async def test_leaving_a_stream_disconnects_the_request(engine: VllmEngine, seen: Seen) -> None:
    reply = await engine.serve(EngineCall(route="/endless", body={}))
    assert not isinstance(reply, dict)
    async for _event in reply:
        break
    await reply.aclose()  # type: ignore[attr-defined]
    assert seen.stream_closed.wait(5)


async def test_a_cancelled_one_shot_call_disconnects_the_request(
    engine: VllmEngine, seen: Seen
) -> None:
    task = asyncio.create_task(engine.serve(EngineCall(route="/waits", body={})))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen.stream_closed.wait(5)


async def test_an_anthropic_error_passes_on_with_its_status(engine: VllmEngine) -> None:
    with pytest.raises(EngineError) as caught:
        await engine.serve(EngineCall(route="/anthropic-error", body={}))
    assert caught.value.status == 400
    assert error_body(caught.value) == {
        "type": "error",
        "error": {"type": "BadRequestError", "message": "no", "code": 400},
    }


async def test_an_openai_error_passes_on_sanitized(engine: VllmEngine) -> None:
    with pytest.raises(EngineError) as caught:
        await engine.serve(EngineCall(route="/openai-error", body={}))
    assert error_body(caught.value) == {
        "error": {"message": "bad at <path>", "type": "BadRequestError", "param": "n", "code": 400}
    }


async def test_a_binary_answer_is_a_400(engine: VllmEngine) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await engine.serve(EngineCall(route="/binary", body={}))
    assert caught.value.param == "encoding_format"


async def test_an_unhandled_app_error_is_a_500_and_the_app_keeps_serving(
    engine: VllmEngine,
) -> None:
    with pytest.raises(EngineError) as caught:
        await engine.serve(EngineCall(route="/boom", body={}))
    assert caught.value.status == 500
    assert await engine.serve(EngineCall(route="/echo", body={})) == {"ok": True}


async def test_a_route_the_app_lacks_is_a_404_that_says_so(engine: VllmEngine) -> None:
    with pytest.raises(NotFound) as caught:
        await engine.serve(EngineCall(route="/nowhere", body={}))
    assert caught.value.message == "the served model does not support /nowhere"


class TypedBody(BaseModel):
    temperature: float
    messages: list[dict[str, str]]


def typed_app() -> FastAPI:
    """A FastAPI app with a typed body and the handler the engine puts on vLLM's app for
    request validation errors."""
    app = FastAPI()
    app.add_exception_handler(RequestValidationError, validation_answer)

    @app.post("/typed")
    async def typed(body: TypedBody) -> dict[str, str]:
        return {}

    return app


async def test_a_body_that_does_not_validate_is_one_readable_400() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    opened = _Opened(FakeClient(), typed_app(), contextlib.AsyncExitStack(), INFO)
    engine = VllmEngine(loop, thread, opened, on_dead=lambda: None)
    try:
        with pytest.raises(EngineError) as caught:
            await engine.serve(EngineCall(route="/typed", body={"temperature": "never-echoed"}))
    finally:
        engine.shutdown()
    assert error_body(caught.value) == {
        "error": {
            "message": "temperature: Input should be a valid number, unable to parse string as "
            "a number; messages: Field required",
            "type": "BadRequestError",
            "param": "temperature",
            "code": 400,
        }
    }


async def test_the_apps_lifespan_runs_as_a_server_runs_it() -> None:
    seen: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        seen.append("startup")
        yield
        seen.append("shutdown")

    lifespan_of = Lifespan(Starlette(lifespan=lifespan))
    await lifespan_of.start()
    assert seen == ["startup"]
    await lifespan_of.stop()
    assert seen == ["startup", "shutdown"]


async def test_a_lifespan_that_fails_to_start_stops_the_engine_start() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        raise ValueError("no stats logger")
        yield

    with pytest.raises(RuntimeError, match=r"did not start: ValueError\('no stats logger'\)"):
        await Lifespan(Starlette(lifespan=lifespan)).start()
