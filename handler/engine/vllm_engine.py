"""The vLLM engine behind the worker: vLLM's ``AsyncLLM`` and the FastAPI app ``vllm serve`` runs
over it, built once, in-process, from :func:`~handler.engine.args.build_args`.

The engine and the app live on an event loop of their own, in a thread (vLLM binds its objects to
the loop that built them), and the worker runs runpod's job loop on that same loop
(:attr:`VllmEngine.loop`), so a job calls the app as uvicorn would (:mod:`handler.engine.asgi`): no
thread hop and no GIL contention per event, as in ``vllm serve``. :meth:`VllmEngine.serve` may
also be awaited from any other loop (``make run``, tests): each event then crosses threads. A
streamed answer is carried as whole SSE events, and leaving it early tells the app the client
disconnected, which aborts the vLLM request.

Out: the JSON answer as a dict, or an async iterator of SSE events. Errors: an error answer
becomes :class:`~handler.errors.EngineError` with vLLM's status and body; a dead engine,
EngineDead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
from fastapi.exceptions import RequestValidationError

from handler.engine.args import build_args, on_cpu
from handler.engine.asgi import (
    LEAVE_S,
    Exchange,
    Lifespan,
    ResponseStart,
    next_item,
    validation_answer,
    whole_answer,
)
from handler.engine.interface import END, EngineCall, EngineReply, ModelInfo
from handler.engine.lora import Adapters
from handler.engine.processes import child_processes, reap
from handler.errors import EngineDead
from handler.settings import Settings

log = logging.getLogger("handler.engine")


_HEALTH_POLL_S = 0.5


class VllmEngine:
    """vLLM's AsyncLLM and the app `vllm serve` runs over it, on a dedicated event-loop thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        opened: _Opened,
        on_dead: Callable[[], None],
    ) -> None:
        self._loop, self._thread = loop, thread
        self._client, self._app, self._stack = opened.client, opened.app, opened.stack
        self._info = opened.info
        self._adapters = opened.adapters
        self._on_dead = on_dead
        self._dead = False
        self._closed = False
        self._processes: list[psutil.Process] = []
        # seconds each step of start() took, for the worker's cold-start log
        self.start_phases: dict[str, float] = {}

    @classmethod
    def start(
        cls,
        settings: Settings,
        on_dead: Callable[[], None] = lambda: None,
        connector: Mapping[str, Any] | None = None,
        after_args: Callable[[], None] = lambda: None,
    ) -> VllmEngine:
        """Build the engine and its serving layer; returns once it can take requests.
        ``connector``: vLLM's kv-transfer config (the LMCache server's), if any. ``after_args``
        runs once vllm is imported and the arguments are parsed, before the engine is built."""
        started = time.perf_counter()
        adapters = Adapters.from_settings(settings)  # LoRA adapters by name (LORA_DIR)
        runtime_lora = adapters is not None
        args = build_args(settings, connector, runtime_lora)  # the first call imports vllm
        args_s = time.perf_counter() - started
        after_args()
        if connector is not None and not _keeps_kv_cache(args):
            log.warning(
                "LMCache is off: %s is a pooling model, it keeps no KV cache", settings.model_id
            )
            args = build_args(settings, runtime_lora=runtime_lora)
        before = {p.pid for p in child_processes()}
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="vllm-engine-loop", daemon=True)
        thread.start()
        try:
            opened = asyncio.run_coroutine_threadsafe(_open(args, adapters), loop).result()
        except BaseException:
            if adapters is not None:
                adapters.close()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            raise
        engine = cls(loop, thread, opened, on_dead)
        engine.start_phases = {"vLLM import and engine arguments": args_s, **opened.phases}
        # the engine's own processes: not those already running (the LMCache server)
        engine._processes = [p for p in child_processes() if p.pid not in before]
        asyncio.run_coroutine_threadsafe(engine._watch_health(), loop)
        log.info(
            "engine ready in %.1f s (model %s)", time.perf_counter() - started, settings.model_id
        )
        return engine

    @property
    def dead(self) -> bool:
        return self._dead or bool(self._client.errored)

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    def running_requests(self) -> int:
        return int(self._client.get_num_unfinished_requests())

    def routes(self) -> list[tuple[str, str]]:
        """(method, path) of every route vLLM's app registered for this model."""
        return [
            (method, route.path)
            for route in self._app.routes
            for method in sorted(getattr(route, "methods", None) or {"*"})
        ]

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the engine and its app run on. A caller on this loop (the worker's job
        loop runs here) calls the app directly; one on any other loop hops between threads for
        every event, and its thread contends with the engine's for the GIL."""
        return self._loop

    async def serve(self, call: EngineCall) -> EngineReply:
        if self.dead:
            raise EngineDead()
        caller = asyncio.get_running_loop()
        if self._adapters is not None:  # an adapter the request names, loaded first
            await self._on_engine_loop(self._adapters.before(call.body), caller)
        queue: asyncio.Queue[object] = asyncio.Queue()
        exchange: Exchange
        running: asyncio.Future[None]
        if caller is self._loop:
            exchange = Exchange(self._app, call, queue.put_nowait)
            running = asyncio.ensure_future(exchange.run())
        else:

            def deliver(item: object) -> None:
                with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
                    caller.call_soon_threadsafe(queue.put_nowait, item)

            exchange = Exchange(self._app, call, deliver)
            running = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(exchange.run(), self._loop)
            )
        ended = False
        try:
            start = await next_item(queue)
            if not isinstance(start, ResponseStart):
                raise TypeError("vLLM's app answered without a response start")
            if start.events:
                ended = True  # the stream's reader takes over
                return self._events(queue, exchange, running)
            body = await next_item(queue)
            ended = True
        finally:
            if not ended:
                await self._leave(exchange, running)
        answer = whole_answer(start, body if isinstance(body, bytes) else b"", call.route)
        if self._adapters is not None and call.route == "/v1/models":
            return await self._adapters.listed(answer)  # and the folder's not used yet
        return answer

    async def _on_engine_loop(
        self, work: Coroutine[Any, Any, None], caller: asyncio.AbstractEventLoop
    ) -> None:
        if caller is self._loop:
            await work
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    async def _events(
        self, queue: asyncio.Queue[object], exchange: Exchange, running: asyncio.Future[None]
    ) -> AsyncIterator[str]:
        """The SSE events of a streamed answer; leaving early disconnects the request, which
        makes vLLM abort it."""
        ended = False
        try:
            while (item := await next_item(queue)) is not END:
                yield item  # type: ignore[misc]
            ended = True
        finally:
            if not ended:
                await self._leave(exchange, running)

    async def _leave(self, exchange: Exchange, running: asyncio.Future[None]) -> None:
        """The caller has gone: tell vLLM's app the client disconnected (it aborts the engine
        request), and cancel the call if it has not ended soon after."""
        if running.done():  # it ended on its own (a failure the caller is raising)
            return
        self._loop.call_soon_threadsafe(exchange.disconnect)
        try:
            await asyncio.wait_for(asyncio.shield(running), LEAVE_S)
        except TimeoutError:
            running.cancel()
        except Exception:  # the call's own failure: nobody is waiting for it any more
            log.debug("request %s ended with an error after its caller left", exchange.id)
        log.info("request %s: caller left; vLLM aborted it", exchange.id)

    def shutdown(self) -> None:
        """Stop the engine core processes and the loop thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stack.aclose(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        reap(self._processes)
        if self._adapters is not None:
            self._adapters.close()
        log.info("engine stopped")

    async def _watch_health(self) -> None:
        while not self._closed:
            await asyncio.sleep(_HEALTH_POLL_S)
            if self._client.errored and not self._closed:
                self._dead = True
                log.critical("the vLLM engine has died")
                self._on_dead()
                return


def _keeps_kv_cache(args: argparse.Namespace) -> bool:
    """Whether the model generates (and so has a KV cache a connector can carry)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return bool(AsyncEngineArgs.from_cli_args(args).create_model_config().runner_type == "generate")


@dataclass(frozen=True)
class _Opened:
    client: Any  # vLLM's AsyncLLM
    app: Any  # the FastAPI app `vllm serve` runs, its state filled in
    stack: contextlib.AsyncExitStack
    info: ModelInfo
    phases: dict[str, float] = field(default_factory=dict)  # engine build, app build: seconds
    adapters: Adapters | None = None  # LoRA adapters loaded by name at run time


async def _open(args: argparse.Namespace, adapters: Adapters | None = None) -> _Opened:
    """Runs on the engine loop: AsyncLLM, then vLLM's own app over it, as `vllm serve` builds
    them (without its HTTP server)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app

    from handler.engine import media_connector

    media_connector.install()  # images refused or not fetched: the client's error, on every route
    stack = contextlib.AsyncExitStack()
    started = time.perf_counter()
    try:
        client = await stack.enter_async_context(build_async_engine_client(args))
        tasks = await client.get_supported_tasks()
        built = time.perf_counter()
        app = build_app(args, tasks, client.model_config)
        app.add_exception_handler(RequestValidationError, validation_answer)
        app.middleware_stack = app.build_middleware_stack()  # built once already: take it in
        if adapters is not None:  # before the app's serving models copy vLLM's resolvers
            adapters.register()
        await init_app_state(client, app.state, args, tasks)
        if adapters is not None:
            models = app.state.openai_serving_models
            adapters.bind(models, client.model_config.model, client.vllm_config.lora_config)
        lifespan = Lifespan(app)
        await lifespan.start()
        stack.push_async_callback(lifespan.stop)  # before the engine client closes
    except BaseException:
        await stack.aclose()
        raise
    phases = {"engine build": built - started, "app build": time.perf_counter() - built}
    info = _model_info(client.model_config, args, tasks)
    return _Opened(client, app, stack, info, phases, adapters)


def _model_info(config: Any, args: argparse.Namespace, tasks: Any) -> ModelInfo:
    return ModelInfo(
        context_length=int(config.max_model_len),
        dtype=str(config.dtype).removeprefix("torch."),
        quantization=str(config.quantization) if config.quantization else None,
        multimodal=bool(config.is_multimodal_model),
        tools=bool(args.enable_auto_tool_choice),
        reasoning=bool(args.structured_outputs_config.reasoning_parser),
        generates="generate" in tasks,
        embeds="embed" in tasks,
        scores="classify" in tasks,  # vLLM 0.32 scores and reranks with a classifier
        loaded_at=int(time.time()),
        on_cpu=on_cpu(),
    )
