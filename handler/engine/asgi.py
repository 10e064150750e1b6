"""One request through vLLM's app as an ASGI call, on the engine's loop: no server, no socket.

A job's route, method and body become the request, so vLLM's routers, request validation,
exception handlers and SSE encoding answer exactly as ``vllm serve`` would. What the app sends
comes back as a :class:`ResponseStart`, then the whole JSON body or each SSE event (cut at event
boundaries), then :data:`~handler.engine.interface.END`. An error answer becomes
:class:`~handler.errors.EngineError` with vLLM's status and body (:func:`whole_answer`). The
app's ASGI lifespan runs as uvicorn runs it (:class:`Lifespan`), and a request body that does not
validate is answered in the worker's one error shape (:func:`validation_answer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from handler.engine.interface import END, EngineCall, Failure
from handler.errors import (
    EngineError,
    InvalidRequest,
    NotFound,
    error_body,
    invalid_request,
)

log = logging.getLogger("handler.engine")


# How long a request whose caller left may take to end once vLLM's app knows; then it is cancelled
LEAVE_S = 5.0


@dataclass(frozen=True)
class ResponseStart:
    status: int
    events: bool  # a text/event-stream body (delivered event by event), else one whole body
    json: bool  # an application/json body


def whole_answer(start: ResponseStart, body: bytes, route: str) -> dict[str, Any]:
    """A whole answer of vLLM's app as a JSON object; an error status raises EngineError."""
    try:
        answer = json.loads(body) if start.json and body.strip() else None
    except ValueError:
        answer = None
    if start.status == 404 and not (isinstance(answer, dict) and "error" in answer):
        # the app's router has no such route: one the served model's tasks do not register
        raise NotFound(f"the served model does not support {route}")
    if start.status >= 400:
        raise EngineError.from_answer(start.status, answer)
    if isinstance(answer, dict):
        return answer
    if start.json:
        raise EngineError("The engine answered with JSON that is not an object.", status=500)
    raise InvalidRequest(  # embeddings' "bytes" encoding, the one binary answer of the API
        "binary answers cannot travel in a JSON job; use encoding_format 'float' or 'base64'",
        param="encoding_format",
    )


async def next_item(queue: asyncio.Queue[object]) -> object:
    item = await queue.get()
    if isinstance(item, Failure):
        raise item.exc
    return item


class Exchange:
    """One request through vLLM's app as an ASGI call, on the engine loop.

    What the app sends is handed to ``deliver``: a :class:`ResponseStart`, then either the whole
    JSON body (bytes) or each SSE event (str, cut at event boundaries, so no event and no UTF-8
    character is split), then END; or a :class:`Failure`. ``disconnect`` makes the app's next
    ``receive`` report that the client left, which is how vLLM learns to abort a request."""

    def __init__(self, app: Any, call: EngineCall, deliver: Callable[[object], None]) -> None:
        self.id = call.request_id
        self._app, self._call, self._deliver = app, call, deliver
        self._left = asyncio.Event()
        self._body = b"" if call.body is None else json.dumps(call.body).encode()
        self._body_sent = False
        self._events: bool | None = None  # unknown until the response starts
        self._pending = bytearray()
        self._done = False

    def disconnect(self) -> None:
        self._left.set()

    async def run(self) -> None:
        try:
            await self._app(self._scope(), self._receive, self._send)
        except Exception as exc:
            # Starlette re-raises an unhandled error after it has sent its 500 answer
            if not self._done:
                self._deliver(Failure(exc))
                self._done = True
            else:
                log.debug("request %s: %s after the answer", self.id, type(exc).__name__)
        if not self._done:  # the app returned without finishing (the client left)
            self._deliver(END)

    def _scope(self) -> dict[str, Any]:
        headers = [(b"x-request-id", self._call.request_id.encode())]
        if self._call.body is not None:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(self._body)).encode()),
            ]
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self._call.method,
            "scheme": "http",
            "path": self._call.route,
            "raw_path": self._call.route.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
            "state": {},
        }

    async def _receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Mapping[str, Any]) -> None:
        if self._done:
            return
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers") or [])
            kind = headers.get(b"content-type", b"")
            self._events = kind.startswith(b"text/event-stream")
            self._deliver(
                ResponseStart(
                    int(message["status"]), self._events, kind.startswith(b"application/json")
                )
            )
            return
        if message["type"] != "http.response.body":
            return
        self._pending += message.get("body", b"")
        more = bool(message.get("more_body", False))
        if self._events:
            for event in cut_events(self._pending, final=not more):
                self._deliver(event)
        elif not more:
            self._deliver(bytes(self._pending))
        if not more:
            self._done = True
            self._deliver(END)


def cut_events(pending: bytearray, final: bool) -> list[str]:
    """The whole SSE events at the front of ``pending`` (removed from it); at the end of the
    body, whatever is left too."""
    end = pending.rfind(b"\n\n")
    if final:
        end = len(pending) - 2
    if end < 0:
        return []
    head = bytes(pending[: end + 2])
    del pending[: end + 2]
    return [event + "\n\n" for event in head.decode().split("\n\n") if event.strip()]


class Lifespan:
    """The app's ASGI lifespan, run as uvicorn runs it for ``vllm serve``. vLLM's starts the
    periodic engine stats log and freezes the garbage collector's view of the startup heap
    (``gc.freeze``): without that, each full collection walks every object of the loaded engine,
    and the loop that serves every job stalls for it."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        self._task = asyncio.ensure_future(self._app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        answer = await self._answer()
        if answer.get("type") == "lifespan.startup.complete":
            return
        try:  # Starlette re-raises what failed after its failure message
            await self._task
        except Exception as exc:
            raise RuntimeError(f"vLLM's app did not start: {exc!r}") from exc
        raise RuntimeError(f"vLLM's app did not start: {answer.get('type')}")

    async def stop(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._answer(), LEAVE_S)

    async def _answer(self) -> Mapping[str, Any]:
        assert self._task is not None
        reading = asyncio.ensure_future(self._from_app.get())
        await asyncio.wait({reading, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if reading.done():
            return reading.result()
        reading.cancel()
        self._task.result()  # raises what ended the lifespan
        return {"type": "lifespan ended"}


async def validation_answer(_request: Request, exc: Exception) -> Response:
    """A request body that does not validate, answered in the worker's one error shape: the
    field as the client named it (without FastAPI's ``body.``) and pydantic's reason, never the
    input values. (vLLM's own handler answers with each error's Python repr, the input in it.)"""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    reasons = [{**e, "loc": tuple(e.get("loc") or ())[1:]} for e in errors]
    # a vLLM validator's own error names its parameter
    named = [
        e["ctx"]["error"] for e in errors if isinstance(e.get("ctx", {}).get("error"), Exception)
    ]
    param = next(
        (p for p in (getattr(x, "parameter", None) for x in named) if isinstance(p, str)), None
    )
    body = error_body(invalid_request(reasons, param=param))
    return JSONResponse(body, status_code=400)
