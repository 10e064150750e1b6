"""Who may call what: clients need the endpoint's key (when it was started with one), workers the
key the endpoint gave them as ``RUNPOD_AI_API_KEY``; each is a FastAPI dependency."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from handler.errors import WorkerError

Check = Callable[[Request], Awaitable[None]]


class Unauthorized(WorkerError):
    status = 401
    type = "AuthenticationError"


# async: FastAPI runs a plain ``def`` dependency in a thread pool, a thread hand-off for every
# request (each stream POST from a worker among them)
def client_check(api_key: str | None) -> Check:
    """Clients: the endpoint's key, or anyone when it has none."""

    async def authorize(request: Request) -> None:
        if api_key and not key_matches(request, api_key):
            raise Unauthorized("Missing or wrong API key.")

    return authorize


def worker_check(worker_key: str) -> Check:
    """Workers' webhooks: the worker key, always."""

    async def authorize_worker(request: Request) -> None:
        if not key_matches(request, worker_key):
            raise Unauthorized("Worker webhooks need the worker key (RUNPOD_AI_API_KEY).")

    return authorize_worker


def key_matches(request: Request, key: str) -> bool:
    """``Authorization: Bearer KEY`` (clients), the bare key (runpod's worker SDK sends
    ``RUNPOD_AI_API_KEY`` as it is), or ``x-api-key: KEY`` (Anthropic's SDKs)."""
    given = request.headers.get("authorization", "").strip().removeprefix("Bearer ").strip()
    given = given or request.headers.get("x-api-key", "").strip()
    return hmac.compare_digest(given.encode(), key.encode())
