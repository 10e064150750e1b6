"""``python -m local_endpoint``: the local endpoint and its workers, until SIGINT or SIGTERM.

Order: bind the port (so workers know the URL), start the HTTP server and the workers, announce
readiness once every worker has polled for a job, then wait for a signal or a worker that cannot
start. Shutdown: SIGTERM to the workers (they finish in-flight jobs), their long-polls released,
whatever is left killed after the grace period, then the HTTP server stops. Exit status 0 after a
requested stop, 1 when a worker could not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn
import uvloop

from handler.settings import LOCAL_ONLY, apply_process_environment, environment
from local_endpoint.app import create_app
from local_endpoint.jobstore import JobStore
from local_endpoint.metrics import Metrics
from local_endpoint.options import Options, parse_options
from local_endpoint.workers import WorkerPool

log = logging.getLogger("local_endpoint")


# How long an idle client connection stays open: longer than clients keep theirs (httpx, so
# the OpenAI and Anthropic SDKs, 5 s; aiohttp 15 s). With uvicorn's 5 s, a client reusing a
# connection just as the endpoint closed it got "Connection error" (httpx ReadError).
KEEP_ALIVE_S = 65


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the endpoint stops its workers before the server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(options: Options) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    sock.set_inheritable(False)
    return sock


async def serve(options: Options) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    try:
        sock = bind(options)
    except OSError as exc:
        print(
            f"local endpoint not started: {options.host}:{options.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    metrics = Metrics()
    store = JobStore(metrics.observer())
    pool = WorkerPool(
        options.workers,
        environment(),
        url,
        options.endpoint_id,
        store,
        command=(sys.executable, "-m", options.worker_module),
        restart=options.restart,
    )
    metrics.watch(store.counts, pool.states)
    app = create_app(options, store, pool, metrics)
    server = QuietServer(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    )
    http = asyncio.create_task(server.serve(sockets=[sock]))
    timer = asyncio.create_task(store.keep_time())
    await pool.start()
    print(f"local endpoint: {url}/v2/{options.endpoint_id} ({options.workers} worker(s))")
    print(f"  OpenAI base URL: {url}/v2/{options.endpoint_id}/openai/v1", flush=True)

    ready = asyncio.create_task(announce_ready(pool, options, url))
    stopped = asyncio.create_task(stop.wait())
    waiting: list[asyncio.Future[Any]] = [stopped, http, pool.fatal]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if pool.fatal.done():
        print(f"local endpoint: {pool.fatal.result()}; stopping", file=sys.stderr, flush=True)
        code = 1
    ready.cancel()
    stopped.cancel()
    timer.cancel()
    print("local endpoint: stopping workers", flush=True)
    await pool.stop(options.grace_s)
    server.should_exit = True
    await http
    print("local endpoint: stopped", flush=True)
    return code


async def announce_ready(pool: WorkerPool, options: Options, url: str) -> None:
    await pool.wait_ready()
    print(f"local endpoint: ready, {options.workers} worker(s) polling", flush=True)
    if options.ready_file is not None:
        options.ready_file.write_text(
            json.dumps({"url": url, "endpoint": f"{url}/v2/{options.endpoint_id}"})
        )


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    apply_process_environment(LOCAL_ONLY)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise SystemExit(uvloop.run(serve(options)))


if __name__ == "__main__":
    main()
