"""The local endpoint's HTTP app, for one endpoint id: RunPod's public API and OpenAI route
(:mod:`local_endpoint.client_routes`, behind the client key when one is set), the webhooks runpod's
SDK calls (:mod:`local_endpoint.worker_routes`, behind the worker key the endpoint gave its workers
as ``RUNPOD_AI_API_KEY``), both checked by :mod:`local_endpoint.auth`; plus ``/metrics``
(Prometheus) and ``/local/workers`` (the worker processes and their metrics URLs), which need the
client key when one is set. Request bodies: :mod:`local_endpoint.bodies`.

Errors are OpenAI's error object, with the HTTP status in ``code``.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from handler.errors import InvalidRequest, NotFound, WorkerError, error_body
from local_endpoint.auth import client_check, worker_check
from local_endpoint.client_routes import client_router
from local_endpoint.jobstore import JobStore
from local_endpoint.metrics import Metrics
from local_endpoint.options import Options
from local_endpoint.worker_routes import worker_router
from local_endpoint.workers import WorkerPool


def error_response(exc: WorkerError) -> JSONResponse:
    # a body refused for its size is not read further: the connection cannot be reused
    headers = {"Connection": "close"} if exc.status == 413 else None
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


def create_app(options: Options, store: JobStore, pool: WorkerPool, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="Local RunPod endpoint", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    clients = [Depends(client_check(options.api_key))]
    app.include_router(client_router(options, store, pool, clients))
    app.include_router(
        worker_router(options, store, pool, [Depends(worker_check(pool.worker_key))])
    )

    @app.get("/metrics", dependencies=clients)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/local/workers", dependencies=clients)
    async def workers() -> list[dict[str, object]]:
        return pool.describe()

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error in the API's one shape: OpenAI's error object, the HTTP status in ``code``."""

    @app.exception_handler(WorkerError)
    async def _worker_error(_request: Request, exc: WorkerError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(InvalidRequest("; ".join(parts)))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound(f"No route {request.url.path}."))
        return error_response(
            WorkerError(str(exc.detail), status=exc.status_code, type="InvalidRequestError")
        )
