"""Request bodies of the local endpoint, in and out: RunPod's size limits, JSON that a worker can be
given, and the client's presence.

A declared ``Content-Length`` over the limit is refused (413) before anything is read, and reading
stops at the limit (chunked bodies too). A body the endpoint could not carry to a worker as JSON
(``NaN``/``Infinity``, lone UTF-16 surrogates, nesting deeper than :data:`MAX_JSON_DEPTH`) is
refused with a 400 at submission, so no job is accepted and then lost.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from handler.errors import InvalidRequest, WorkerError

MAX_RUN_BYTES = 10 * 1024 * 1024  # RunPod's limits on a request body
MAX_RUNSYNC_BYTES = 20 * 1024 * 1024
# Containers inside containers a request body may have: deep enough for any real JSON schema,
# shallow enough that the job (wrapped in a few more levels), the worker's JSON decoding and the
# handler's validation all stay far from Python's recursion limit (1000).
MAX_JSON_DEPTH = 128
UNCARRYABLE = "The job's input cannot be encoded as JSON for a worker; it was not run."


def too_large(limit: int) -> WorkerError:
    return WorkerError(
        f"Request body is larger than the limit of {limit} bytes.",
        status=413,
        type="RequestTooLargeError",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) by its declared length before reading, or once ``limit`` bytes
    have arrived without an end (chunked bodies declare none)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> None:
    raise InvalidRequest(f"Request body holds {name}, which JSON cannot carry; send a number.")


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_carryable(value: Any) -> None:
    """Refuse what cannot travel to a worker as JSON: nesting over :data:`MAX_JSON_DEPTH` and
    strings with a lone UTF-16 surrogate (no UTF-8 encoding exists for one). Iterative, so any
    depth is safe to check."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise InvalidRequest(
                    'Request body holds a lone UTF-16 surrogate (such as "\\ud800"), which '
                    "has no UTF-8 encoding."
                )
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"Request body nests deeper than {MAX_JSON_DEPTH} levels.")
        children = [*item, *item.values()] if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequest(f"Request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except ValueError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    check_carryable(value)
    return value


async def read_json(request: Request, limit: int) -> Any:
    return parse_json(await read_body(request, limit))


def encode_json(value: Any) -> bytes:
    """JSON as starlette's ``JSONResponse`` writes it; ValueError (or RecursionError) when the
    value has no JSON form."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


async def until_disconnected(request: Request) -> None:
    """Return when the client hangs up (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
