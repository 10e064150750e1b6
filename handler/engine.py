"""The vLLM engine behind the worker: the only module that imports vllm (lazily, in ``start``).

In: :class:`~handler.settings.Settings`, turned into ``vllm serve`` arguments and parsed by vLLM's
own parser, so every ``vllm serve`` flag works as an environment variable (``TENSOR_PARALLEL_SIZE``
for ``--tensor-parallel-size``); flags of its HTTP server alone are refused or ignored. vLLM's
``AsyncLLM`` and the FastAPI app ``vllm serve`` runs over it are built once, in-process.

Every request is an ASGI call of that app (no server, no socket): a job's route, method and body
become the request, so vLLM's routers, request validation, exception handlers and SSE encoding
answer exactly as ``vllm serve`` would. The engine and the app live on an event loop of their
own, in a thread (vLLM binds its objects to the loop that built them), and the worker runs
runpod's job loop on that same loop (:attr:`VllmEngine.loop`), so a job calls the app as uvicorn
would: no thread hop and no GIL contention per event, as in ``vllm serve``.
:meth:`VllmEngine.serve` may also be awaited from any other loop (``make run``, tests): each event
then crosses threads. A streamed answer is carried as whole SSE events, and leaving it early tells
the app the client disconnected, which aborts the vLLM request.

Out: the JSON answer as a dict, or an async iterator of SSE events. Errors: an error answer
becomes :class:`~handler.errors.EngineError` with vLLM's status and body; a malformed argument
raises :class:`~handler.settings.SettingsError` naming the variable; a dead engine, EngineDead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import shlex
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from handler import parsers
from handler.errors import (
    EngineDead,
    EngineError,
    InvalidRequest,
    NotFound,
    error_body,
    invalid_request,
)
from handler.protocol import EngineCall, EngineReply, ModelInfo
from handler.settings import (
    Settings,
    SettingsError,
    env_names,
    lora_specs,
    unknown_variables,
)
from handler.streaming import END, Failure

log = logging.getLogger("handler.engine")

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
    "--config": "VLLM_CONFIG_FILE",
}
# `vllm serve` flags that concern only its HTTP server. The worker runs vLLM's app in-process
# without that server, and RunPod authenticates callers: these would lock the worker out of its
# own app or change its routes, so they stop the worker ...
_SERVER_FLAGS_REFUSED = {
    "--api-key": "RunPod authenticates callers; vLLM's app would demand this key of the worker",
    "--root-path": "the worker calls vLLM's routes by their own paths",
    "--middleware": "the worker calls vLLM's app directly, not through an HTTP server",
}
# ... and these are ignored, with a warning (they configure a server that does not run).
_SERVER_FLAGS_IGNORED = frozenset(
    {
        "--host",
        "--port",
        "--uds",
        "--grpc-port",
        "--uvicorn-log-level",
        "--disable-uvicorn-access-log",
        "--disable-access-log-for-endpoints",
        "--allow-credentials",
        "--allowed-origins",
        "--allowed-methods",
        "--allowed-headers",
        "--ssl-keyfile",
        "--ssl-certfile",
        "--ssl-ca-certs",
        "--ssl-cert-reqs",
        "--ssl-ciphers",
        "--enable-ssl-refresh",
        "--disable-fastapi-docs",
        "--enable-offline-docs",
        "--h11-max-incomplete-event-size",
        "--h11-max-header-count",
        "--data-parallel-supervisor-port",
        "--dp-supervisor-probe-interval-s",
        "--dp-supervisor-probe-timeout-s",
        "--dp-supervisor-probe-failure-threshold",
    }
)
# Read by vLLM from the environment, with the effect of --api-key.
_KEY_VARIABLES = ("VLLM_API_KEY",)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_HEALTH_POLL_S = 0.5
# How long a request whose caller left may take to end once vLLM's app knows; then it is cancelled
_LEAVE_S = 5.0


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
        "--config": settings.vllm_config_file,
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
    # the render routes (/v1/chat/completions/render, ...); the disaggregated-serving routes it
    # also registers are never reachable from a job (handler.protocol.REFUSED_ROUTES)
    argv.append("--enable-scale-out")
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
    for name in _KEY_VARIABLES:
        if name in env:
            raise SettingsError(
                f"{name}: not for the worker ({_SERVER_FLAGS_REFUSED['--api-key']})"
            )
    for name in sorted(env):
        flag = "--" + name.lower().replace("_", "-")
        action = actions.get(flag)
        if action is None:
            continue
        if flag in owned:
            raise SettingsError(f"{name}: set {owned[flag]} instead")
        if flag in _SERVER_FLAGS_REFUSED:
            raise SettingsError(f"{name}: not for the worker ({_SERVER_FLAGS_REFUSED[flag]})")
        if flag in _SERVER_FLAGS_IGNORED:
            log.warning(
                "%s ignored: it configures vLLM's HTTP server, which the worker does not run", name
            )
            continue
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
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    options = [opt for action in parser._actions for opt in action.option_strings]
    unknown = unknown_variables(settings.engine_passthrough, options)
    if unknown:
        log.warning("not vLLM flags, so ignored: %s", "; ".join(unknown))
    base = owned_args(settings, connector, spare_lora_slot=_on_cpu())
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
    chosen = _parser_args(settings, args)
    if chosen:
        args = _parse(parser, base + extra + chosen, "TOOL_CALL_PARSER / REASONING_PARSER")
    validate_parsed_serve_args(args)
    return args


def _parser_args(settings: Settings, args: argparse.Namespace) -> list[str]:
    """The tool and reasoning parser flags: the settings', or those detected from the model's
    files (:mod:`handler.parsers`) among the parsers this vLLM registers; logged once."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    # plugins register their names on import, as `vllm serve` does before it checks them
    if args.tool_parser_plugin and len(args.tool_parser_plugin) > 3:
        ToolParserManager.import_tool_parser(args.tool_parser_plugin)
    if args.reasoning_parser_plugin and len(args.reasoning_parser_plugin) > 3:
        ReasoningParserManager.import_reasoning_parser(args.reasoning_parser_plugin)
    folder: str | None = args.tokenizer or args.model
    if folder and not Path(folder).is_dir():
        try:  # a model vLLM will download: its small files only, into the same hub cache
            from huggingface_hub import snapshot_download

            folder = snapshot_download(
                folder, revision=args.revision, allow_patterns=list(parsers.MODEL_FILES)
            )
        except Exception as exc:  # detection then finds nothing; vLLM reports a real problem
            log.warning("parsers: cannot read %s's files (%s)", folder, type(exc).__name__)
            folder = None
    chosen = parsers.choose(
        parsers.read_model_files(folder, args.chat_template),
        settings.tool_call_parser,
        settings.reasoning_parser,
        ToolParserManager.list_registered(),
        ReasoningParserManager.list_registered(),
    )
    log.info("parsers: %s", chosen.describe())
    return parsers.flags(chosen, settings.enable_auto_tool_choice)


def _parse(parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except SystemExit:
        raise SettingsError(f"invalid {what}: {parser_error(stderr.getvalue())}") from None
    except (OSError, ValueError) as exc:  # reading VLLM_CONFIG_FILE (vLLM's --config)
        raise SettingsError(f"invalid {what}: VLLM_CONFIG_FILE: {exc}") from None


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
        args = build_args(settings, connector)  # the first call imports vllm
        args_s = time.perf_counter() - started
        after_args()
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
        engine.start_phases = {"vLLM import and engine arguments": args_s, **opened.phases}
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
        queue: asyncio.Queue[object] = asyncio.Queue()
        exchange: _Exchange
        running: asyncio.Future[None]
        caller = asyncio.get_running_loop()
        if caller is self._loop:
            exchange = _Exchange(self._app, call, queue.put_nowait)
            running = asyncio.ensure_future(exchange.run())
        else:

            def deliver(item: object) -> None:
                with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
                    caller.call_soon_threadsafe(queue.put_nowait, item)

            exchange = _Exchange(self._app, call, deliver)
            running = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(exchange.run(), self._loop)
            )
        ended = False
        try:
            start = await _next(queue)
            if not isinstance(start, _Start):
                raise TypeError("vLLM's app answered without a response start")
            if start.events:
                ended = True  # the stream's reader takes over
                return self._events(queue, exchange, running)
            body = await _next(queue)
            ended = True
        finally:
            if not ended:
                await self._leave(exchange, running)
        return _answer(start, body if isinstance(body, bytes) else b"", call.route)

    async def _events(
        self, queue: asyncio.Queue[object], exchange: _Exchange, running: asyncio.Future[None]
    ) -> AsyncIterator[str]:
        """The SSE events of a streamed answer; leaving early disconnects the request, which
        makes vLLM abort it."""
        ended = False
        try:
            while (item := await _next(queue)) is not END:
                yield item  # type: ignore[misc]
            ended = True
        finally:
            if not ended:
                await self._leave(exchange, running)

    async def _leave(self, exchange: _Exchange, running: asyncio.Future[None]) -> None:
        """The caller has gone: tell vLLM's app the client disconnected (it aborts the engine
        request), and cancel the call if it has not ended soon after."""
        if running.done():  # it ended on its own (a failure the caller is raising)
            return
        self._loop.call_soon_threadsafe(exchange.disconnect)
        try:
            await asyncio.wait_for(asyncio.shield(running), _LEAVE_S)
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
        _reap(self._processes)
        log.info("engine stopped")

    async def _watch_health(self) -> None:
        while not self._closed:
            await asyncio.sleep(_HEALTH_POLL_S)
            if self._client.errored and not self._closed:
                self._dead = True
                log.critical("the vLLM engine has died")
                self._on_dead()
                return


@dataclass(frozen=True)
class _Start:
    status: int
    events: bool  # a text/event-stream body (delivered event by event), else one whole body
    json: bool  # an application/json body


def _answer(start: _Start, body: bytes, route: str) -> dict[str, Any]:
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


async def _next(queue: asyncio.Queue[object]) -> object:
    item = await queue.get()
    if isinstance(item, Failure):
        raise item.exc
    return item


class _Exchange:
    """One request through vLLM's app as an ASGI call, on the engine loop.

    What the app sends is handed to ``deliver``: a :class:`_Start`, then either the whole JSON
    body (bytes) or each SSE event (str, cut at event boundaries, so no event and no UTF-8
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
                _Start(int(message["status"]), self._events, kind.startswith(b"application/json"))
            )
            return
        if message["type"] != "http.response.body":
            return
        self._pending += message.get("body", b"")
        more = bool(message.get("more_body", False))
        if self._events:
            for event in _cut_events(self._pending, final=not more):
                self._deliver(event)
        elif not more:
            self._deliver(bytes(self._pending))
        if not more:
            self._done = True
            self._deliver(END)


def _cut_events(pending: bytearray, final: bool) -> list[str]:
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


_EXIT_WAIT_S = 2.0  # how long the engine's processes get to exit by themselves after shutdown


def _reap(processes: list[psutil.Process], grace_s: float = 5.0) -> None:
    """Stop whatever vLLM's own shutdown left behind (e.g. the workers of a killed EngineCore).

    Python's resource tracker is left alone: it ignores SIGTERM, and exits by itself when this
    process does, after removing the shared memory the engine's processes left in /dev/shm
    (killing it leaks those segments)."""
    exiting = [p for p in processes if _alive(p) and not _is_resource_tracker(p)]
    # vLLM's shutdown asks its processes to exit; one may still be on its way out
    _gone, left = psutil.wait_procs(exiting, timeout=_EXIT_WAIT_S)
    left = [p for p in left if _alive(p)]
    names = sorted(_name(p) for p in left)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(left, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if left:
        log.warning(
            "stopped %d engine process(es) left after shutdown: %s", len(left), ", ".join(names)
        )


def _name(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.Error:
        return "?"


@dataclass(frozen=True)
class _Opened:
    client: Any  # vLLM's AsyncLLM
    app: Any  # the FastAPI app `vllm serve` runs, its state filled in
    stack: contextlib.AsyncExitStack
    info: ModelInfo
    phases: dict[str, float] = field(default_factory=dict)  # engine build, app build: seconds


async def _open(args: argparse.Namespace) -> _Opened:
    """Runs on the engine loop: AsyncLLM, then vLLM's own app over it, as `vllm serve` builds
    them (without its HTTP server)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app

    stack = contextlib.AsyncExitStack()
    started = time.perf_counter()
    try:
        client = await stack.enter_async_context(build_async_engine_client(args))
        tasks = await client.get_supported_tasks()
        built = time.perf_counter()
        app = build_app(args, tasks, client.model_config)
        app.add_exception_handler(RequestValidationError, _validation_answer)
        app.middleware_stack = app.build_middleware_stack()  # built once already: take it in
        await init_app_state(client, app.state, args, tasks)
        lifespan = _Lifespan(app)
        await lifespan.start()
        stack.push_async_callback(lifespan.stop)  # before the engine client closes
    except BaseException:
        await stack.aclose()
        raise
    phases = {"engine build": built - started, "app build": time.perf_counter() - built}
    return _Opened(client, app, stack, _model_info(client.model_config, args, tasks), phases)


class _Lifespan:
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
            await asyncio.wait_for(self._answer(), _LEAVE_S)

    async def _answer(self) -> Mapping[str, Any]:
        assert self._task is not None
        reading = asyncio.ensure_future(self._from_app.get())
        await asyncio.wait({reading, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if reading.done():
            return reading.result()
        reading.cancel()
        self._task.result()  # raises what ended the lifespan
        return {"type": "lifespan ended"}


async def _validation_answer(_request: Request, exc: Exception) -> Response:
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
        on_cpu=_on_cpu(),
    )


def _on_cpu() -> bool:
    """Whether vLLM runs the model on CPU (its CPU build), not an accelerator."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())
