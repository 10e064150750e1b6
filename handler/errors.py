"""The worker's exceptions and the one function that turns any exception into an OpenAI error.

The tree::

    WorkerError                 status, type, param; message safe to show a client
    ├── InvalidRequest          400 BadRequestError: the job or its request does not validate
    ├── NotFound                404 NotFoundError: unknown route or model
    ├── EngineError             an error answer from vLLM's server, passed on as it gave it
    └── EngineDead              503 ServiceUnavailableError: the engine process is gone

Out: :func:`error_body` gives ``{"error": {"message", "type", "param", "code"}}`` with ``code`` the
HTTP status, as vLLM's own server does. Anything that is not a WorkerError becomes a 500 whose
message names no file, path, address or Python repr (the details go to the log only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError


class WorkerError(Exception):
    status: int = 500
    type: str = "InternalServerError"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type


class InvalidRequest(WorkerError):
    status = 400
    type = "BadRequestError"


class NotFound(WorkerError):
    status = 404
    type = "NotFoundError"


class EngineError(WorkerError):
    """An error answer from vLLM's server, with its HTTP status; ``body`` is the answer as vLLM
    gave it (OpenAI's error object, or Anthropic's for the Messages API), passed on unchanged
    but for a sanitized message and ``code``, which is always the HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int | None = None,
        type: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, param=param, status=status, type=type)
        self.body = body

    @classmethod
    def from_answer(cls, status: int, body: Any) -> EngineError:
        """An error answer of vLLM's app: its status and JSON body (of any shape)."""
        info = body.get("error") if isinstance(body, dict) else None
        if not isinstance(info, dict):
            return cls(f"The engine answered with status {status}.", status=status)
        param = info.get("param")
        return cls(
            str(info.get("message") or f"The engine answered with status {status}."),
            param=param if isinstance(param, str) else None,
            status=status,
            type=str(info.get("type") or "InternalServerError"),
            body=body,
        )


class EngineDead(WorkerError):
    status = 503
    type = "ServiceUnavailableError"

    def __init__(
        self,
        message: str = "The inference engine has stopped; this worker is "
        "shutting down and the job should be retried on another worker.",
    ) -> None:
        super().__init__(message)


class ShuttingDown(WorkerError):
    status = 503
    type = "ServiceUnavailableError"

    def __init__(self, grace_s: float) -> None:
        super().__init__(
            f"The worker was stopped and the job did not finish within {grace_s:g} s; "
            "send it again."
        )


def from_validation_error(exc: ValidationError, prefix: str = "") -> InvalidRequest:
    """A pydantic error as one readable InvalidRequest, naming the first offending field."""
    return invalid_request(exc.errors(include_url=False, include_input=False), prefix)


def invalid_request(
    errors: Iterable[Mapping[str, Any]], prefix: str = "", param: str | None = None
) -> InvalidRequest:
    """Pydantic's error entries (``loc``, ``msg``) as one readable InvalidRequest; ``param`` is
    the first offending field unless given. The input values are never repeated."""
    parts = []
    params = []
    for error in errors:
        where = prefix + ".".join(str(p) for p in error["loc"])
        params.append(where.rstrip(".") or None)
        parts.append(f"{where.rstrip('.')}: {error['msg']}" if where else str(error["msg"]))
    return InvalidRequest(
        "; ".join(parts) or "invalid request", param=param or (params[0] if params else None)
    )


_UNSAFE = [
    (re.compile(r" at 0x[0-9a-fA-F]+"), ""),
    (re.compile(r'File "[^"]+", line \d+'), "<frame>"),
    # file-system paths (a known root, or a file name with an extension), not URL routes
    (
        re.compile(
            r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv|etc|proc|app|workspace|runpod-volume)"
            r"(?:/[\w.\-]+)+"
        ),
        "<path>",
    ),
    (re.compile(r"(?:/[\w.\-]+)+/[\w\-]+\.\w+"), "<path>"),
    (re.compile(r"<(?:class|function|module|object|coroutine|async_generator) [^>]*>"), "<object>"),
]


def sanitize(message: str) -> str:
    """Strip paths, memory addresses, frames and object reprs; keep the first line only."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    for pattern, repl in _UNSAFE:
        first = pattern.sub(repl, first)
    return first[:2000]


def error_body(exc: BaseException) -> dict[str, Any]:
    """Any exception as OpenAI's error object; unknown exceptions become a bland 500."""
    if isinstance(exc, ValidationError):
        exc = from_validation_error(exc)
    if isinstance(exc, EngineError) and exc.body is not None:
        info = {**exc.body["error"], "message": sanitize(exc.message), "code": exc.status}
        return {**exc.body, "error": info}
    if isinstance(exc, WorkerError):
        message, etype, param, status = exc.message, exc.type, exc.param, exc.status
    else:
        message = f"Internal error ({type(exc).__name__}); the worker keeps serving."
        etype, param, status = "InternalServerError", None, 500
    return {"error": {"message": sanitize(message), "type": etype, "param": param, "code": status}}


def job_error(exc: BaseException) -> dict[str, str]:
    """What the handler yields to fail a RunPod job: the SDK stores ``str()`` of the ``error``
    value as the job's error, so it is the OpenAI error object already encoded as JSON."""
    return {"error": json.dumps(error_body(exc), ensure_ascii=False)}
