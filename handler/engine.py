"""The vLLM engine behind the worker: the only module that imports vllm (lazily, in ``start``).

In: :class:`~handler.settings.Settings`, turned into ``vllm serve`` arguments and parsed by vLLM's
own parser, so every ``vllm serve`` flag works as an environment variable (``TENSOR_PARALLEL_SIZE``
for ``--tensor-parallel-size``). vLLM's ``AsyncLLM`` and its OpenAI serving layer (chat,
completions, models, with their chat templates, tool and reasoning parsers) are built once.

They live on an event loop of their own, in a thread: vLLM binds its objects to the loop that
built them, while runpod runs jobs on a loop it makes later (and uvicorn, under
``--rp_serve_api``, on another). :meth:`VllmEngine.serve` may be awaited from any loop; a streamed
answer is carried across as SSE strings, and closing or cancelling it aborts the vLLM request.

Out: a response dict, or an async iterator of SSE events. Errors: vLLM's error answers become
:class:`~handler.errors.EngineError` with vLLM's status and type; a malformed argument raises
:class:`~handler.settings.SettingsError` naming the variable; a dead engine raises EngineDead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import json
import logging
import shlex
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil
from pydantic import BaseModel, TypeAdapter, ValidationError

from handler.errors import EngineDead, InvalidRequest, NotFound, from_validation_error
from handler.protocol import EngineCall, EngineReply, ModelInfo, Route
from handler.settings import Settings, SettingsError, env_names, lora_specs
from handler.streaming import END, Failure, engine_error, pump

log = logging.getLogger("handler.engine")
T = TypeVar("T")

# Flags the worker sets from its own settings; the variable to use instead of each.
_OWNED_FLAGS = {
    "--model": "MODEL_NAME",
    "--revision": "MODEL_REVISION",
    "--tokenizer": "TOKENIZER_NAME",
    "--served-model-name": "OPENAI_SERVED_MODEL_NAME_OVERRIDE",
    "--max-model-len": "MAX_MODEL_LEN",
    "--dtype": "DTYPE",
    "--kv-cache-memory-bytes": "KV_CACHE_GB",
    "--lora-modules": "LORA_MODULES",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_HEALTH_POLL_S = 0.5


_CONNECTOR_OWNER = "LMCACHE_ENABLED=false, to configure a KV connector yourself"


def owned_args(
    settings: Settings, connector: Mapping[str, Any] | None = None, spare_lora_slot: bool = False
) -> list[str]:
    """The ``vllm serve`` arguments that come from the worker's own settings (and the LMCache
    connector, when the worker runs an LMCache server).

    ``spare_lora_slot``: one LoRA slot more than adapters. vLLM 0.32's CPU LoRA kernels index the
    adapter weights with -1 for a request without an adapter, which is the last slot: in a batch
    that mixes both, base-model requests ran through the last adapter. An empty last slot makes
    that a no-op."""
    argv = [
        "--model",
        settings.model,
        "--served-model-name",
        settings.model_id,
        "--dtype",
        settings.dtype,
    ]
    optional = {
        "--revision": settings.model_revision,
        "--tokenizer": settings.tokenizer,
        "--max-model-len": settings.max_model_len,
        "--kv-cache-memory-bytes": (
            int(settings.kv_cache_gb * 2**30) if settings.kv_cache_gb else None
        ),
    }
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    if settings.lora_modules:
        specs = lora_specs(settings.lora_modules)
        # every adapter can share a batch (MAX_LORAS, passed later, still wins)
        slots = len(specs) + (1 if spare_lora_slot else 0)
        argv += ["--enable-lora", "--max-loras", str(slots), "--lora-modules", *specs]
    # usage.prompt_tokens_details.cached_tokens: prompt tokens from vLLM's prefix cache or LMCache
    argv.append("--enable-prompt-tokens-details")
    if connector is not None:
        argv += ["--kv-transfer-config", json.dumps(connector)]
    return argv


def passthrough_args(
    parser: argparse.ArgumentParser, env: Mapping[str, str], connector: bool = False
) -> list[str]:
    """``vllm serve`` arguments for the variables named like one of its flags."""
    actions = {opt: action for action in parser._actions for opt in action.option_strings}
    owned = dict(_OWNED_FLAGS)
    if connector:
        owned["--kv-transfer-config"] = _CONNECTOR_OWNER
    argv: list[str] = []
    for name in sorted(env):
        flag = "--" + name.lower().replace("_", "-")
        action = actions.get(flag)
        if action is None:
            continue
        if flag in owned:
            raise SettingsError(f"{name}: set {owned[flag]} instead")
        argv += _flag_args(name, flag, action, env[name])
    return argv


def _flag_args(name: str, flag: str, action: argparse.Action, value: str) -> list[str]:
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        lowered = value.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise SettingsError(f"{name}={value!r}: expected true or false")
        if lowered in _TRUE:
            return [flag]
        return ["--no-" + flag[2:]] if isinstance(action, argparse.BooleanOptionalAction) else []
    if action.nargs in ("+", "*"):
        return [flag, *shlex.split(value)]
    return [flag, value]


def build_args(
    settings: Settings, connector: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """Parse the settings with vLLM's own ``vllm serve`` parser; errors name the variable."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    base = owned_args(settings, connector, spare_lora_slot=current_platform.is_cpu())
    _parse(parser, base, "the model settings (" + ", ".join(sorted(env_names())) + ")")
    extra: list[str] = []
    for name in sorted(settings.engine_passthrough):
        one = passthrough_args(
            parser, {name: settings.engine_passthrough[name]}, connector is not None
        )
        if one:
            _parse(parser, base + one, f"{name}={settings.engine_passthrough[name]!r}")
            extra += one
    args = _parse(parser, base + extra, "the engine settings")
    validate_parsed_serve_args(args)
    return args


def _parse(parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except SystemExit:
        raise SettingsError(f"invalid {what}: {parser_error(stderr.getvalue())}") from None


def parser_error(text: str) -> str:
    """argparse's error line and what follows it (a pydantic message spans several lines), in one
    line, without the usage text before it or pydantic's link after it."""
    lines = [line.strip() for line in text.strip().splitlines()]
    start = next((i for i, line in enumerate(lines) if ": error: " in line), len(lines) - 1)
    kept = [line for line in lines[start:] if line and not line.startswith("For further info")]
    if not kept:
        return "rejected by vLLM"
    kept[0] = kept[0].split(": error: ", 1)[-1]
    return " ".join(kept)


class VllmEngine:
    """vLLM's AsyncLLM and OpenAI serving layer on a dedicated event-loop thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        opened: _Opened,
        on_dead: Callable[[], None],
    ) -> None:
        self._loop, self._thread = loop, thread
        self._client, self._state, self._stack = opened.client, opened.state, opened.stack
        self._info = opened.info
        self._on_dead = on_dead
        self._dead = False
        self._closed = False
        self._processes: list[psutil.Process] = []

    @classmethod
    def start(
        cls,
        settings: Settings,
        on_dead: Callable[[], None] = lambda: None,
        connector: Mapping[str, Any] | None = None,
    ) -> VllmEngine:
        """Build the engine and its serving layer; returns once it can take requests.
        ``connector``: vLLM's kv-transfer config (the LMCache server's), if any."""
        started = time.perf_counter()
        args = build_args(settings, connector)
        if connector is not None and not _keeps_kv_cache(args):
            log.warning(
                "LMCache is off: %s is a pooling model, it keeps no KV cache", settings.model_id
            )
            args = build_args(settings)
        before = {p.pid for p in _child_processes()}
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="vllm-engine-loop", daemon=True)
        thread.start()
        try:
            opened = asyncio.run_coroutine_threadsafe(_open(args), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            raise
        engine = cls(loop, thread, opened, on_dead)
        # the engine's own processes: not those already running (the LMCache server)
        engine._processes = [p for p in _child_processes() if p.pid not in before]
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

    async def serve(self, call: EngineCall) -> EngineReply:
        if self.dead:
            raise EngineDead()
        reply = await self._on_engine_loop(self._create(call))
        if isinstance(reply, dict):
            return reply
        return self._relay(reply, call)

    def shutdown(self) -> None:
        """Stop the engine core processes and the loop thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stack.aclose(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        _reap(self._processes)
        log.info("engine stopped")

    async def _on_engine_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _create(self, call: EngineCall) -> dict[str, Any] | AsyncIterator[str]:
        """Runs on the engine loop: validate with vLLM's request model, then call its server."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        if call.route == "/v1/models":
            listing = await self._state.openai_serving_models.show_available_models()
            return dict(listing.model_dump(mode="json"))
        endpoint = _endpoint(self._state, call.route)
        try:
            request = endpoint.validator.validate_python(dict(call.body))
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        except (TypeError, ValueError) as exc:  # raised by some of vLLM's "before" validators
            raise InvalidRequest(f"malformed request: {exc}") from None
        try:
            result = await endpoint.create(request, None)
        except Exception as exc:  # vLLM raises what its HTTP layer would turn into an error
            result = create_error_response(exc)
        if isinstance(result, ErrorResponse):
            raise engine_error(result.error.model_dump())
        return _plain(result, by_alias=endpoint.by_alias)

    async def _relay(self, events: AsyncIterator[str], call: EngineCall) -> AsyncIterator[str]:
        """Carry a stream from the engine loop to the caller's loop; abort it if left early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def deliver(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

        pumping = asyncio.run_coroutine_threadsafe(pump(events, deliver), self._loop)
        ended = False
        try:
            while (item := await queue.get()) is not END:
                if isinstance(item, Failure):
                    ended = True
                    raise item.exc
                yield item  # type: ignore[misc]
            ended = True
        finally:
            if not ended:
                await self._abort(pumping, call)

    async def _abort(self, pumping: Future[None], call: EngineCall) -> None:
        pumping.cancel()
        ids = [f"{prefix}{call.request_id}" for prefix in ("chatcmpl-", "cmpl-", "resp_")]
        done = asyncio.run_coroutine_threadsafe(self._client.abort(ids), self._loop)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(done)), timeout=5)
        log.info("aborted engine request %s", call.request_id)

    async def _watch_health(self) -> None:
        while not self._closed:
            await asyncio.sleep(_HEALTH_POLL_S)
            if self._client.errored and not self._closed:
                self._dead = True
                log.critical("the vLLM engine has died")
                self._on_dead()
                return


@dataclass(frozen=True)
class _Endpoint:
    validator: TypeAdapter[Any]  # vLLM's request model (some are unions: a TypeAdapter each)
    create: Callable[..., Any]  # vLLM's serving method: (request, raw_request) -> response
    by_alias: bool = False  # the Responses API's models dump by alias, as vLLM's server does


# route -> (vLLM serving object on the app state, its method, what the route is for)
_SERVING: dict[str, tuple[str, str, str]] = {
    "/v1/chat/completions": ("openai_serving_chat", "create_chat_completion", "chat completions"),
    "/v1/completions": ("openai_serving_completion", "create_completion", "text completions"),
    "/v1/embeddings": ("serving_embedding", "__call__", "embeddings"),
    "/v1/tokenize": ("serving_tokenization", "create_tokenize", "tokenizing"),
    "/v1/detokenize": ("serving_tokenization", "create_detokenize", "detokenizing"),
    "/v1/responses": ("openai_serving_responses", "create_responses", "the Responses API"),
}


@functools.cache
def _request_model(route: Route) -> TypeAdapter[Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest

    models: dict[str, Any] = {
        "/v1/chat/completions": ChatCompletionRequest,
        "/v1/completions": CompletionRequest,
        "/v1/embeddings": EmbeddingRequest,
        "/v1/tokenize": TokenizeRequest,
        "/v1/detokenize": DetokenizeRequest,
        "/v1/responses": ResponsesRequest,
    }
    return TypeAdapter(models[route])


def _endpoint(state: Any, route: Route) -> _Endpoint:
    """vLLM's request model and serving method for a route; NotFound if this model has none."""
    attribute, method, what = _SERVING[route]
    serving = getattr(state, attribute, None)
    if serving is None:
        raise NotFound(f"the served model does not support {what} ({route})")
    return _Endpoint(
        _request_model(route), getattr(serving, method), by_alias=route == "/v1/responses"
    )


def _plain(result: Any, by_alias: bool = False) -> dict[str, Any] | AsyncIterator[str]:
    """vLLM's answer as a JSON-safe dict, or a stream of SSE text."""
    from starlette.responses import JSONResponse, Response

    if isinstance(result, BaseModel):
        return dict(result.model_dump(mode="json", by_alias=by_alias))
    if isinstance(result, JSONResponse):
        return dict(json.loads(bytes(result.body)))
    if isinstance(result, Response):  # a binary body (embeddings' "bytes" encodings)
        raise InvalidRequest(
            "binary answers cannot travel in a JSON job; use encoding_format 'float' or 'base64'",
            param="encoding_format",
        )
    return _sse(result)


async def _sse(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """SSE text as vLLM's server sends it: chat and completion streams are text already; the
    Responses API streams event objects, framed with their ``event:`` type."""
    async for event in events:
        if isinstance(event, str):
            yield event
        else:
            data = event.model_dump_json(indent=None, by_alias=True)
            yield f"event: {getattr(event, 'type', 'message')}\ndata: {data}\n\n"


def _keeps_kv_cache(args: argparse.Namespace) -> bool:
    """Whether the model generates (and so has a KV cache a connector can carry)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return bool(AsyncEngineArgs.from_cli_args(args).create_model_config().runner_type == "generate")


def _child_processes() -> list[psutil.Process]:
    """The engine's process tree (EngineCore and its workers), recorded once it is up."""
    return list(psutil.Process().children(recursive=True))


def _alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie that has exited and only waits to be collected."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _is_resource_tracker(proc: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _reap(processes: list[psutil.Process], grace_s: float = 5.0) -> None:
    """Stop whatever vLLM's own shutdown left behind (e.g. the workers of a killed EngineCore).

    Python's resource tracker is left alone: it ignores SIGTERM, and exits by itself when this
    process does, after removing the shared memory the engine's processes left in /dev/shm
    (killing it leaks those segments)."""
    left = [p for p in processes if _alive(p) and not _is_resource_tracker(p)]
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(left, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if left:
        log.warning("stopped %d engine process(es) left after shutdown", len(left))


@dataclass(frozen=True)
class _Opened:
    client: Any  # vLLM's AsyncLLM
    state: Any  # the app state `vllm serve` builds: its OpenAI serving objects
    stack: contextlib.AsyncExitStack
    info: ModelInfo


async def _open(args: argparse.Namespace) -> _Opened:
    """Runs on the engine loop: AsyncLLM, then vLLM's OpenAI serving objects, as `vllm serve`."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

    stack = contextlib.AsyncExitStack()
    try:
        client = await stack.enter_async_context(build_async_engine_client(args))
        state = State()
        tasks = await client.get_supported_tasks()
        await init_app_state(client, state, args, tasks)
    except BaseException:
        await stack.aclose()
        raise
    return _Opened(client, state, stack, _model_info(client.model_config, args, tasks))


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
    )
