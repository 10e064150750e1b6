"""The worker against the bare engine and `vllm serve`, under load, in one run: ``make bench``.

The same requests (distinct random prompts of ``--prompt-tokens`` token ids, greedy,
``ignore_eos``, ``--max-tokens`` generated) go through each path chosen with ``--paths``:

* ``bare``: vLLM's ``AsyncLLM`` built from the worker's own engine arguments (same model, dtype,
  KV cache, LMCache connector and server), called in this process;
* ``serve``: ``vllm serve`` (vLLM's own OpenAI server, ``bench/vllm_serve.py``) started with
  exactly the worker's engine arguments (built by the worker's own code), on loopback, with its
  own LMCache server; driven by the same OpenAI SDK client;
* ``full``: the OpenAI SDK -> the local RunPod endpoint (``python -m local_endpoint``) -> a worker
  process under runpod's production loop (job-take, stream POSTs, job-done) -> the handler ->
  vLLM's app -> the engine;
* ``post100``: the full path with 100 ms added to every stream POST (RunPod's round trip);
* ``before``: the full path (endpoint and worker) run from another checkout of this repository,
  ``--before REV`` (extracted with ``git archive`` into a temporary folder; the repository is not
  touched), for a before/after comparison in the same run.

at each concurrency (``--concurrency``), streamed and one-shot (``--modes``). Every engine is up
for the whole run (an idle vLLM engine takes no CPU), and each cell's requests go in rounds of
``concurrency`` at once, each round through every path in turn (each round starting one path
further on), so the machine's drift in speed (large on a shared 2-core host) touches all paths
alike. First a TTFT probe (``--probe``): short streams one at a time through every path in
turn. Per cell: time to first token (p50, p99; streamed; and each round's p50),
inter-token latency (a stream's first to last token over its tokens, p50, p99), request
latency, output tokens/s over the cell, stream POSTs per job (from the endpoint's metrics), and
the CPU time each process spent per 1,000 output tokens. Then the full path's ratios to every
other path, the targets, and (concurrency > 1) how far the run can tell TTFT p50s apart,
within this run.

Writes ``OUT/load.json`` (``--baseline`` compares a new run with an older file) and
``OUT/load.png``, and prints Markdown tables.

Usage: scripts/in-env python -m bench.load [--out DIR] [--paths bare,serve,full,post100]
    [--concurrency 1,4,16] [--modes streamed,one-shot] [--rounds N] [--before REV]
    [--lmcache on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import rotated, stop_on_sigterm
from handler.lmcache import free_port
from handler.settings import LOCAL_ONLY, apply_process_environment, load_settings
from local_endpoint.__main__ import KEEP_ALIVE_S
from local_endpoint.harness import KEY, MODEL_ID, LocalEndpoint, local_env, stop

ROOT = Path(__file__).resolve().parents[1]

STREAM_POSTS = "runpod_local_job_stream_posts"
# vLLM's engine processes busy-wait for 1 s after their last message (shm_broadcast's
# SpinCondition): the engine used before a round must be quiet before the round starts
SETTLE_S = 1.2


@dataclass
class Sample:
    """One request, client side."""

    latency: float
    tokens: int
    ttft: float | None = None  # streamed only
    itl: float | None = None  # (last token - first token) / (tokens - 1), streamed only


# The paths, in the order of the tables; what each is called in them.
PATHS = {
    "bare": "bare AsyncLLM",
    "serve": "vllm serve",
    "full": "full path",
    "post100": "full path, POST +100 ms",
    "before": "full path before",
    "before100": "full path before, POST +100 ms",
}
POST_DELAY_MS = {"post100": 100.0, "before100": 100.0}
BEFORE = ("before", "before100")  # the paths run from --before REV


@dataclass
class Cell:
    path: str  # a key of PATHS
    streamed: bool
    concurrency: int
    post_delay_ms: float = 0.0
    probe: bool = False  # the TTFT probe: short streams, one at a time
    requests: int = 0
    wall_s: float = 0.0
    output_tokens: int = 0
    tok_s: float = 0.0
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    latency_p50_ms: float = 0.0
    posts_per_job: float | None = None
    cpu_s_per_1k_tokens: dict[str, float] = field(default_factory=dict)
    ttft_p50_by_round_ms: list[float] = field(default_factory=list)  # in the order they ran
    samples: list[Sample] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        mode = "streamed" if self.streamed else "one-shot"
        if self.probe:
            mode = "TTFT probe"
        if self.path in POST_DELAY_MS:
            where = "full path before" if self.path in BEFORE else "full path"
            return f"{where}, {mode}, POST +{self.post_delay_ms:.0f} ms"
        return f"{PATHS[self.path]}, {mode}"

    def summarise(self, wall_s: float) -> None:
        self.requests, self.wall_s = len(self.samples), wall_s
        self.output_tokens = sum(s.tokens for s in self.samples)
        self.tok_s = self.output_tokens / wall_s
        self.latency_p50_ms = percentile([s.latency for s in self.samples], 50) * 1000
        ttfts = [s.ttft for s in self.samples if s.ttft is not None]
        itls = [s.itl for s in self.samples if s.itl is not None]
        if ttfts:
            self.ttft_p50_ms = percentile(ttfts, 50) * 1000
            self.ttft_p99_ms = percentile(ttfts, 99) * 1000
        if itls:
            self.itl_p50_ms = percentile(itls, 50) * 1000
            self.itl_p99_ms = percentile(itls, 99) * 1000


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Progress:
    """One line per cell on stderr, rewritten in place on a terminal."""

    def __init__(self, total_cells: int) -> None:
        self.total, self.done = total_cells, 0
        self.tty = sys.stderr.isatty()

    def update(self, what: str, finished: int, planned: int, cells: int) -> None:
        line = f"[cells {self.done + cells}/{self.total}] {what}: {finished}/{planned} requests"
        if self.tty:
            print("\r" + line, end="\n" if finished >= planned else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
        if finished >= planned:
            self.done += cells


ROLES = (
    ("EngineCore", "engine core (scheduler)"),
    ("VLLM::Worker", "engine worker (model)"),
    ("lmcache", "LMCache server"),
    ("local_endpoint", "local endpoint"),
    ("vllm_serve.py", "vllm serve: API server, vLLM frontend"),
    ("-m handler", "worker: runpod loop, handler, vLLM frontend"),
)


@dataclass(frozen=True)
class ProcCpu:
    role: str
    seconds: float
    family: frozenset[int]  # its pid and its ancestors'


Owns = Callable[[int, frozenset[int]], bool]  # (pid, family) -> belongs to the path measured
IDLE = "other paths' processes (idle)"


def cpu_by_process() -> dict[int, ProcCpu]:
    """CPU seconds so far of this process and each of its descendants, with its role. This
    process is the client (for the bare engine also vLLM's frontend: AsyncLLM runs in it)."""
    me = psutil.Process()
    found: dict[int, ProcCpu] = {}
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            text = proc.name() + " " + " ".join(proc.cmdline())
            role = next((r for key, r in ROLES if key in text), "other")
            role = "client" if proc.pid == me.pid else role
            family = frozenset([proc.pid, *(p.pid for p in proc.parents())])
            found[proc.pid] = ProcCpu(role, times.user + times.system, family)
    return found


def cpu_spent(before: dict[int, ProcCpu], owns: Owns) -> dict[str, float]:
    """CPU spent since ``before`` by role, for the processes of the path measured; the rest
    (the other paths' engines and servers, idle but not at zero) under :data:`IDLE`."""
    spent: dict[str, float] = {}
    for pid, now in cpu_by_process().items():
        if pid in before:
            role = now.role if pid == os.getpid() or owns(pid, now.family) else IDLE
            spent[role] = spent.get(role, 0.0) + now.seconds - before[pid].seconds
    return spent


Call = Callable[[list[int], int], Awaitable[Sample]]  # (prompt ids, max tokens) -> a sample


@dataclass
class Way:
    """One way to send a request, with what measures it: a cell's samples, wall time and CPU
    add up over its rounds."""

    cell: Cell
    call: Call
    posts: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)  # (POSTs, jobs) so far
    owns: Owns = lambda _pid, _family: True
    cpu: dict[str, float] = field(default_factory=dict)
    post_count: list[float] = field(default_factory=lambda: [0.0, 0.0])


async def one_round(path: Way, prompts: list[list[int]], max_tokens: int) -> None:
    """``len(prompts)`` requests at once; the cell's wall time grows by the round's."""
    await asyncio.sleep(SETTLE_S)
    cpu, (posts, jobs) = cpu_by_process(), path.posts()
    started = time.perf_counter()
    samples = await asyncio.gather(*(path.call(p, max_tokens) for p in prompts))
    path.cell.wall_s += time.perf_counter() - started
    path.cell.samples += samples
    ttfts = [s.ttft for s in samples if s.ttft is not None]
    if ttfts:
        path.cell.ttft_p50_by_round_ms.append(round(percentile(ttfts, 50) * 1000, 1))
    for role, seconds in cpu_spent(cpu, path.owns).items():
        path.cpu[role] = path.cpu.get(role, 0.0) + seconds
    now_posts, now_jobs = path.posts()
    path.post_count[0] += now_posts - posts
    path.post_count[1] += now_jobs - jobs


def finish(path: Way) -> Cell:
    cell = path.cell
    cell.summarise(cell.wall_s)
    per_1k = 1000 / max(cell.output_tokens, 1)
    cell.cpu_s_per_1k_tokens = {r: round(s * per_1k, 2) for r, s in sorted(path.cpu.items())}
    if path.post_count[1]:
        cell.posts_per_job = path.post_count[0] / max(path.post_count[1], 1)
    return cell


async def interleaved(
    ways: list[Way], prompts: list[list[int]], per_round: int, max_tokens: int, progress: Progress
) -> list[Cell]:
    """The prompts in rounds of ``per_round`` at once; each round goes through every way in
    turn, so drift in the machine's speed touches all of them alike, and each round starts one
    way further on, so no way always follows the same other one."""
    first = ways[0].cell
    mode = "TTFT probe" if first.probe else ("streamed" if first.streamed else "one-shot")
    what = f"{mode}, concurrency {first.concurrency}, {len(ways)} paths in turn"
    for index, start in enumerate(range(0, len(prompts), per_round)):
        for way in rotated(ways, index):
            await one_round(way, prompts[start : start + per_round], max_tokens)
        progress.update(what, start + per_round, len(prompts), len(ways))
    return [finish(way) for way in ways]


class Clock:
    """Times one request: first and last token, tokens seen."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None

    def saw_tokens(self) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now

    def sample(self, tokens: int, streamed: bool) -> Sample:
        end = time.perf_counter()
        if not streamed or self.first is None or self.last is None:
            return Sample(latency=end - self.start, tokens=tokens)
        itl = (self.last - self.first) / (tokens - 1) if tokens > 1 else None
        return Sample(end - self.start, tokens, self.first - self.start, itl)


# -- the bare engine -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bare_engine(env: dict[str, str]) -> Any:
    """vLLM's AsyncLLM from the worker's own arguments, with the worker's LMCache server."""
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

    from handler.cold_start import start_cache
    from handler.engine.args import build_args

    settings = load_settings(env)
    cache = start_cache(settings)
    try:
        args = build_args(settings, cache.connector_config() if cache else None)
        async with build_async_engine_client(args) as llm:
            if cache is not None:
                cache.wait_healthy(120)
            yield llm
    finally:
        if cache is not None:
            cache.stop()


async def bare_request(llm: Any, ids: list[int], max_tokens: int, streamed: bool) -> Sample:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.DELTA if streamed else RequestOutputKind.FINAL_ONLY
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=kind)
    clock, tokens = Clock(), 0
    async for out in llm.generate({"prompt_token_ids": ids}, params, f"bare-{time.time_ns()}"):
        new = len(out.outputs[0].token_ids)
        if new and streamed:
            clock.saw_tokens()
        tokens = tokens + new if streamed else new
    return clock.sample(tokens, streamed)


# -- the full path and `vllm serve` ---------------------------------------------------------------


async def openai_request(client: Any, ids: list[int], max_tokens: int, streamed: bool) -> Sample:
    """One completion through the OpenAI SDK (the full path's client and `vllm serve`'s)."""
    request: dict[str, Any] = {
        "model": MODEL_ID,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    clock = Clock()
    if not streamed:
        answer = await client.completions.create(**request)
        return clock.sample(answer.usage.completion_tokens, streamed)
    stream = await client.completions.create(
        **request, stream=True, stream_options={"include_usage": True}
    )
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            clock.saw_tokens()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return clock.sample(tokens, streamed)


def endpoint_metric(endpoint: LocalEndpoint, name: str) -> float:
    for line in endpoint.text("/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@dataclass
class Started:
    """A server process this run started, and how to know it is ready."""

    process: subprocess.Popen[bytes]
    log: Path
    ready: Callable[[], bool]
    what: str

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_endpoint(
    root: Path, tmp: Path, env: dict[str, str], delay_ms: float, first: str | None = None
) -> Started:
    """``python -m local_endpoint`` from the checkout at ``root`` (its endpoint and its worker),
    one worker, key :data:`KEY`; does not wait. ``first``: a folder put before ``root`` on the
    path (the burst timeline's tracer)."""
    ready, log = tmp / "ready.json", tmp / "local-endpoint.log"
    command = [sys.executable, "-m", "local_endpoint", "--port", "0", "--api-key", KEY]
    command += ["--ready-file", str(ready), "--stream-post-delay-ms", str(delay_ms)]
    # the checkout's own modules first: `-m` puts the working folder first on sys.path, and the
    # worker it starts inherits the environment
    path = str(root) if first is None else f"{first}:{root}"
    full_env = {**os.environ, **env, "PYTHONPATH": path}
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    return Started(process, log, ready.exists, f"local endpoint ({root})")


def start_vllm_serve(tmp: Path, env: dict[str, str], port: int) -> Started:
    """``bench/vllm_serve.py``: `vllm serve` with the worker's engine arguments; does not wait."""
    log = tmp / "vllm-serve.log"
    command = [sys.executable, "-m", "bench.vllm_serve", "--port", str(port)]
    # idle connections kept as long as the local endpoint keeps them: with vLLM's 5 s, the
    # client's connection (httpx keeps one 5 s) was sometimes closed under a request between
    # bursts ("Connection error"); no effect on a request's time
    keep_alive = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(KEEP_ALIVE_S)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env, **keep_alive},
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    return Started(process, log, ready, "vllm serve")


def wait_ready(servers: list[Started], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    for server in servers:
        while not server.ready():
            if server.process.poll() is not None:
                code = server.process.returncode
                raise RuntimeError(f"{server.what} exited with {code}:\n{server.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.what} not ready in {timeout} s:\n{server.tail()}")
            time.sleep(0.5)


def stop_endpoint(endpoint: LocalEndpoint) -> None:
    """The tests' stop (exit 0, nothing left behind); a failed check is reported, and does not
    lose the run's results."""
    try:
        stop(endpoint)
    except AssertionError as exc:
        print(f"warning: {exc}", file=sys.stderr)


def stop_vllm_serve(server: Started, timeout: float = 120) -> None:
    """SIGTERM, as a user stops `vllm serve`; then SIGKILL whatever of it is left."""
    family = psutil.Process(server.process.pid).children(recursive=True)
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
    _gone, alive = psutil.wait_procs(family, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def checkout(rev: str, into: Path) -> Path:
    """The tree of ``rev`` extracted into ``into`` (``git archive``: nothing in the repository
    changes), with the current checkout's untracked ``.venv`` link, if any."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev], cwd=ROOT, check=True, capture_output=True
    ).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    concurrency: list[int]
    rounds: int
    max_tokens: int
    prompt_tokens: int
    vocab: int
    paths: list[str] = field(default_factory=lambda: ["bare", "serve", "full", "post100"])
    modes: list[bool] = field(default_factory=lambda: [True, False])  # streamed?
    lmcache: bool = True
    before: str | None = None
    seed: int = 0
    probe_requests: int = 20
    probe_tokens: int = 8

    def requests(self, concurrency: int) -> int:
        return max(4, self.rounds * concurrency)

    def prompts(self, streamed: bool, concurrency: int) -> list[list[int]]:
        """Distinct prompts per cell (no cache hits), the same for every path."""
        rng = random.Random(f"{self.seed}-{streamed}-{concurrency}")
        return [
            [rng.randrange(1000, self.vocab - 1000) for _ in range(self.prompt_tokens)]
            for _ in range(self.requests(concurrency))
        ]

    def probe_prompts(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-probe")
        return [
            [rng.randrange(1000, self.vocab - 1000) for _ in range(self.prompt_tokens)]
            for _ in range(self.probe_requests)
        ]

    def warmup(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-warmup")
        return [[rng.randrange(1000, self.vocab - 1000) for _ in range(32)] for _ in range(4)]

    def cells(self) -> int:
        streamed = sum(self.modes) * len(self.concurrency) * len(self.paths)
        one_shot = (len(self.modes) - sum(self.modes)) * len(self.concurrency)
        one_shot *= len([p for p in self.paths if p not in POST_DELAY_MS])
        return streamed + one_shot + (len(self.paths) if self.probe_requests else 0)


@dataclass
class Lane:
    """How one path is called: a request maker per mode, and its stream POST counter."""

    call: Callable[[bool], Call]
    posts: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)
    owns: Owns = lambda _pid, _family: True


def openai_lane(client: Any, endpoint: LocalEndpoint | None = None) -> Lane:
    def call(streamed: bool) -> Call:
        return lambda ids, n: openai_request(client, ids, n, streamed)

    if endpoint is None:
        return Lane(call)
    e = endpoint
    return Lane(
        call,
        lambda: (
            endpoint_metric(e, STREAM_POSTS + "_sum"),
            endpoint_metric(e, STREAM_POSTS + "_count"),
        ),
    )


@contextlib.asynccontextmanager
async def lanes(env: dict[str, str], plan: Plan, tmp: Path) -> Any:
    """Every path of the plan, started together (the servers while the bare engine loads)."""
    import openai

    roots = {"full": ROOT, "post100": ROOT}
    if set(BEFORE) & set(plan.paths):
        tree = checkout(plan.before or "HEAD", tmp / "before-tree")
        roots.update({name: tree for name in BEFORE})
    servers: dict[str, Started] = {}
    port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        for name in plan.paths:
            if name in roots:
                (tmp / name).mkdir()
                delay = POST_DELAY_MS.get(name, 0.0)
                servers[name] = start_endpoint(roots[name], tmp / name, env, delay)
                started = servers[name]
                stack.callback(stop_endpoint, LocalEndpoint("", started.process, started.log))
            elif name == "serve":
                servers[name] = start_vllm_serve(tmp, env, port)
                stack.callback(stop_vllm_serve, servers[name])
        found: dict[str, Lane] = {}
        if "bare" in plan.paths:
            llm = await stack.enter_async_context(bare_engine(env))
            found["bare"] = Lane(lambda s: lambda ids, n: bare_request(llm, ids, n, s))
        await asyncio.to_thread(wait_ready, list(servers.values()))
        for name, server in servers.items():
            endpoint: LocalEndpoint | None = None
            if name == "serve":
                base, key = f"http://127.0.0.1:{port}/v1", "unused"
            else:
                url = json.loads((tmp / name / "ready.json").read_text())["url"]
                endpoint = LocalEndpoint(url=url, process=server.process, log=server.log)
                base, key = endpoint.openai_base, endpoint.key
            client = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=900)
            stack.push_async_callback(client.close)
            found[name] = openai_lane(client, endpoint)
            root = server.process.pid
            found[name].owns = lambda _pid, family, root=root: root in family  # type: ignore[misc]
        roots_now = frozenset(server.process.pid for server in servers.values())
        if "bare" in found:  # this process's own engine: not under any server started
            found["bare"].owns = lambda _pid, family: not family & roots_now
        yield {name: found[name] for name in plan.paths}


async def measure(env: dict[str, str], plan: Plan, progress: Progress) -> list[Cell]:
    """Every engine up at once (an idle one takes no CPU), then every cell, paths interleaved."""
    with tempfile.TemporaryDirectory() as folder:
        async with lanes(env, plan, Path(folder)) as found:
            for lane in found.values():
                await asyncio.gather(*(lane.call(True)(p, 16) for p in plan.warmup()))
            cells: list[Cell] = []
            if plan.probe_requests:
                # the TTFT probe: short streams one at a time, the engine otherwise idle (the long
                # cells have too few requests at concurrency 1 for a stable median)
                probes = [
                    Way(Cell(name, True, 1, probe=True), lane.call(True), lane.posts, lane.owns)
                    for name, lane in found.items()
                    if name not in POST_DELAY_MS
                ]
                prompts = plan.probe_prompts()
                cells += await interleaved(probes, prompts, 1, plan.probe_tokens, progress)
            for streamed in plan.modes:
                for c in plan.concurrency:
                    ways = [
                        Way(
                            Cell(name, streamed, c, POST_DELAY_MS.get(name, 0.0)),
                            lane.call(streamed),
                            lane.posts,
                            lane.owns,
                        )
                        for name, lane in found.items()
                        if streamed or name not in POST_DELAY_MS  # one POST a job: no delay
                    ]
                    prompts = plan.prompts(streamed, c)
                    cells += await interleaved(ways, prompts, c, plan.max_tokens, progress)
    order = list(PATHS)
    return sorted(
        cells, key=lambda x: (not x.probe, not x.streamed, x.concurrency, order.index(x.path))
    )


def find(cells: list[Cell], path: str, streamed: bool, c: int, probe: bool = False) -> Cell | None:
    return next(
        (
            x
            for x in cells
            if (x.path, x.streamed, x.concurrency, x.probe) == (path, streamed, c, probe)
        ),
        None,
    )


WORKER = "worker: runpod loop, handler, vLLM frontend"


def worker_cpu(cell: Cell) -> float | None:
    return cell.cpu_s_per_1k_tokens.get(WORKER)


def ratio_rows(cells: list[Cell], plan: Plan) -> list[dict[str, Any]]:
    """The full path against every other path, cell by cell: output tok/s as a ratio, TTFT p50
    as a difference in ms, and (against ``before``) the worker's CPU per 1,000 tokens as a ratio."""
    rows = []
    for x in cells:
        if x.path != "full":
            continue
        row: dict[str, Any] = {"mode": x.label.split(", ", 1)[1], "concurrency": x.concurrency}
        for other in ("bare", "serve", "before", "post100"):
            ref = find(cells, other, x.streamed, x.concurrency, x.probe)
            if ref is None:
                continue
            row[f"tok_s_full_over_{other}"] = round(x.tok_s / ref.tok_s, 3)
            if x.ttft_p50_ms is not None and ref.ttft_p50_ms is not None:
                row[f"ttft_p50_full_minus_{other}_ms"] = round(x.ttft_p50_ms - ref.ttft_p50_ms, 1)
            if other == "before" and worker_cpu(x) and worker_cpu(ref):
                row["worker_cpu_full_over_before"] = round(worker_cpu(x) / worker_cpu(ref), 3)  # type: ignore[operator]
        rows.append(row)
    return rows


def targets(cells: list[Cell], plan: Plan) -> list[dict[str, Any]]:
    """The issues' targets that this run's paths can check, each a ratio or difference."""
    rows: list[dict[str, Any]] = []
    full_probe = find(cells, "full", True, 1, probe=True)
    for other, bound in (("bare", 10.0), ("serve", 10.0)):
        ref = find(cells, other, True, 1, probe=True)
        if full_probe and ref:
            overhead = (full_probe.ttft_p50_ms or 0.0) - (ref.ttft_p50_ms or 0.0)
            name = f"TTFT p50, full - {other}, ms (probe: idle engine, one at a time)"
            rows.append(target(name, overhead, bound, at_most=True))
    for c in plan.concurrency:
        for streamed in plan.modes:
            full = find(cells, "full", streamed, c)
            if full is None:
                continue
            mode = "streamed" if streamed else "one-shot"
            bare, serve = find(cells, "bare", streamed, c), find(cells, "serve", streamed, c)
            if bare:
                rows.append(
                    target(
                        f"output tok/s, full / bare, {mode}, c={c}", full.tok_s / bare.tok_s, 0.95
                    )
                )
            if serve and streamed and c in (1, 16):
                rows.append(
                    target(
                        f"output tok/s, full / vllm serve, {mode}, c={c}",
                        full.tok_s / serve.tok_s,
                        0.98,
                    )
                )
            if serve and streamed and c == 16:
                ttft = (full.ttft_p50_ms or 0.0) - (serve.ttft_p50_ms or 0.0)
                rows.append(
                    target(f"TTFT p50, full - vllm serve, ms, c={c}", ttft, 20.0, at_most=True)
                )
            before = find(cells, "before", streamed, c)
            if before and streamed and c in (1, 16):
                rows.append(
                    target(
                        f"output tok/s, full / before, {mode}, c={c}",
                        full.tok_s / before.tok_s,
                        0.95,
                    )
                )
                now, then = worker_cpu(full), worker_cpu(before)
                if now and then:
                    name = f"worker CPU-s per 1k tokens, full / before, {mode}, c={c}"
                    rows.append(target(name, now / then, 1.05, at_most=True))
            delayed = find(cells, "post100", streamed, c)
            if bare and delayed:
                rows.append(
                    target(
                        f"output tok/s, POST +100 ms / bare, c={c}", delayed.tok_s / bare.tok_s, 0.9
                    )
                )
            if serve and delayed and streamed and c in (1, 16):
                # each stream POST a round trip to RunPod: the first token waits for one only
                bound = 100.0 + (20.0 if c > 1 else 0.0)
                ttft = (delayed.ttft_p50_ms or 0.0) - (serve.ttft_p50_ms or 0.0)
                name = f"TTFT p50, POST +100 ms - vllm serve, ms, c={c}"
                rows.append(target(name, ttft, bound, at_most=True))
                name = f"output tok/s, POST +100 ms / vllm serve, c={c}"
                rows.append(target(name, delayed.tok_s / serve.tok_s, 0.98))
    return rows


def ttft_interval(cells: list[Cell], plan: Plan) -> list[dict[str, Any]]:
    """Streamed, c > 1: how far this run can tell the full path's TTFT p50 from each other
    path's. A burst's TTFTs move together (how its arrivals fall on the engine's prefill steps
    moves a round's p50 by hundreds of ms on this machine), so the interval comes from the
    rounds: 2,000 times, each path's rounds drawn again with replacement (seeded), the pooled
    TTFT p50s compared; the 2.5th and 97.5th percentiles of the difference."""
    rows = []
    rng = random.Random(plan.seed)
    for c in plan.concurrency:
        full = find(cells, "full", True, c)
        if c == 1 or full is None or len(full.ttft_p50_by_round_ms) < 2:
            continue
        for other in ("bare", "serve", "before"):
            ref = find(cells, other, True, c)
            if ref is None or ref.ttft_p50_ms is None or full.ttft_p50_ms is None:
                continue
            a, b = _rounds(full, c), _rounds(ref, c)
            draws = sorted(
                percentile([t for _ in a for t in rng.choice(a)], 50)
                - percentile([t for _ in b for t in rng.choice(b)], 50)
                for _ in range(2000)
            )
            rows.append(
                {
                    "concurrency": c,
                    "other": other,
                    "full_ms": full.ttft_p50_by_round_ms,
                    "other_ms": ref.ttft_p50_by_round_ms,
                    "difference_ms": round(full.ttft_p50_ms - ref.ttft_p50_ms, 1),
                    "interval_95_ms": [round(draws[50] * 1000, 1), round(draws[1949] * 1000, 1)],
                }
            )
    return rows


def _rounds(cell: Cell, concurrency: int) -> list[list[float]]:
    """A cell's TTFTs (s), round by round (its samples are kept in the order they ran)."""
    out = []
    for start in range(0, len(cell.samples), concurrency):
        ttfts = [s.ttft for s in cell.samples[start : start + concurrency] if s.ttft is not None]
        if ttfts:
            out.append(ttfts)
    return out


def rounds_text(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        low, high = row["interval_95_ms"]
        name = PATHS[row["other"]]
        lines.append(
            f"c={row['concurrency']}, TTFT p50 by round (ms, in the order run): {name} "
            f"{row['other_ms']}; full path {row['full_ms']}. TTFT p50 full - {name}: "
            f"{row['difference_ms']:+.0f} ms, 95% bootstrap interval over rounds "
            f"[{low:+.0f}, {high:+.0f}] ({len(row['full_ms'])} rounds)."
        )
    return "\n".join(lines)


def target(name: str, value: float, bound: float, at_most: bool = False) -> dict[str, Any]:
    met = value <= bound if at_most else value >= bound
    bound_text = f"{'<=' if at_most else '>='} {bound}"
    return {"name": name, "value": round(value, 3), "target": bound_text, "met": met}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": None,
        "python": platform.python_version(),
    }


def fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(cells: list[Cell]) -> str:
    lines = [
        "| path | concurrency | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
        "output tok/s | stream POSTs per job |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in cells:
        lines.append(
            f"| {x.label} | {x.concurrency} | {fmt(x.ttft_p50_ms)} | {fmt(x.ttft_p99_ms)} | "
            f"{fmt(x.itl_p50_ms, 1)} | {fmt(x.itl_p99_ms, 1)} | {x.tok_s:.1f} | "
            f"{fmt(x.posts_per_job, 1)} |"
        )
    return "\n".join(lines)


def ratio_table(rows: list[dict[str, Any]]) -> str:
    """The full path over each other path, one line per cell."""
    columns = [
        ("tok/s full / bare", "tok_s_full_over_bare", 2),
        ("tok/s full / vllm serve", "tok_s_full_over_serve", 2),
        ("tok/s full / before", "tok_s_full_over_before", 2),
        ("TTFT p50 full - bare ms", "ttft_p50_full_minus_bare_ms", 0),
        ("TTFT p50 full - vllm serve ms", "ttft_p50_full_minus_serve_ms", 0),
        ("TTFT p50 full - before ms", "ttft_p50_full_minus_before_ms", 0),
        ("worker CPU/1k tokens full / before", "worker_cpu_full_over_before", 2),
    ]
    shown = [c for c in columns if any(c[1] in row for row in rows)]
    lines = [
        "| full path | concurrency | " + " | ".join(c[0] for c in shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    for row in rows:
        values = []
        for _, key, digits in shown:
            value = row.get(key)
            text = (
                "—"
                if value is None
                else f"{value:+.{digits}f}"
                if "minus" in key
                else f"{value:.{digits}f}"
            )
            values.append(text)
        lines.append(f"| {row['mode']} | {row['concurrency']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def cpu_table(cells: list[Cell]) -> str:
    """Where the CPU went: seconds per 1,000 output tokens, by process."""
    roles = list(dict.fromkeys(r for x in cells for r in x.cpu_s_per_1k_tokens))
    lines = [
        "| path | concurrency | " + " | ".join(roles) + " | all |",
        "|---|---|" + "---|" * (len(roles) + 1),
    ]
    for x in cells:
        spent = x.cpu_s_per_1k_tokens
        cols = [f"{spent[r]:.1f}" if r in spent else "—" for r in roles]
        lines.append(
            f"| {x.label} | {x.concurrency} | {' | '.join(cols)} | {sum(spent.values()):.1f} |"
        )
    return "\n".join(lines)


def target_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | this run | bound | met |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['value']} | {row['target']} | "
            f"{'yes' if row['met'] else '**no**'} |"
        )
    return "\n".join(lines)


def compare(cells: list[Cell], baseline: dict[str, Any]) -> str:
    """Output tok/s and TTFT p50 of this run over the baseline's, cell by cell."""
    old = {c["label"] + str(c["concurrency"]): c for c in baseline["cells"]}
    lines = ["| path | concurrency | tok/s now / then | TTFT p50 now / then |", "|---|---|---|---|"]
    for x in cells:
        then = old.get(x.label + str(x.concurrency))
        if then is None:
            continue
        ttft = (
            f"{x.ttft_p50_ms / then['ttft_p50_ms']:.2f}"
            if x.ttft_p50_ms and then.get("ttft_p50_ms")
            else "—"
        )
        lines.append(f"| {x.label} | {x.concurrency} | {x.tok_s / then['tok_s']:.2f} | {ttft} |")
    return "\n".join(lines)


def _bars(ax: Any, series: dict[str, list[float | None]], ticks: list[str]) -> None:
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        xs = [
            j + (k - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v is not None
        ]
        ax.bar(xs, [v for v in values if v is not None], width, label=label)
    ax.set_xticks(range(len(ticks)), ticks)
    ax.grid(axis="y", alpha=0.3)


def chart(
    cells: list[Cell], ratios: list[dict[str, Any]], plan: Plan, where: dict[str, Any], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [x for x in cells if not x.probe]  # the probe is in the table
    labels = list(dict.fromkeys(x.label for x in cells))
    ticks = [f"c={c}" for c in plan.concurrency]
    panels: list[tuple[str, Callable[[Cell], float | None]]] = [
        ("output tokens/s (higher is better)", lambda x: x.tok_s),
        ("time to first token p50, ms", lambda x: x.ttft_p50_ms),
        ("inter-token latency p50, ms", lambda x: x.itl_p50_ms),
        ("stream POSTs per job", lambda x: x.posts_per_job),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    for ax, (title, value) in zip(axes.flat, panels, strict=False):
        series = {}
        for label in labels:
            row = [
                next((x for x in cells if x.label == label and x.concurrency == c), None)
                for c in plan.concurrency
            ]
            series[label] = [value(x) if x else None for x in row]
        _bars(ax, series, ticks)
        ax.set_title(title, fontsize=10)
    axes.flat[0].legend(fontsize=7)
    streamed = [r for r in ratios if r["mode"] == "streamed"]
    by_c = {r["concurrency"]: r for r in streamed}
    for ax, (title, key, unit) in zip(
        axes.flat[4:],
        (
            ("full path's output tok/s over each path (streamed)", "tok_s_full_over_", ""),
            (
                "full path's TTFT p50 minus each path's, ms (streamed)",
                "ttft_p50_full_minus_",
                "_ms",
            ),
        ),
        strict=True,
    ):
        series = {}
        for other in ("bare", "serve", "before", "post100"):
            values = [by_c.get(c, {}).get(f"{key}{other}{unit}") for c in plan.concurrency]
            if any(v is not None for v in values):
                series[f"over {PATHS[other]}" if not unit else f"minus {PATHS[other]}"] = values
        _bars(ax, series, ticks)
        ax.axhline(0 if unit else 1, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{MODEL_ID}, prompt {plan.prompt_tokens} tokens, {plan.max_tokens} generated, greedy, "
        f"LMCache {'on' if plan.lmcache else 'off'}; {where['cpu']}, {where['cores']} cores, "
        "no GPU",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def parse_plan(options: argparse.Namespace, vocab: int) -> Plan:
    paths = [p.strip() for p in options.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise SystemExit(f"--paths: unknown {unknown}; choose from {', '.join(PATHS)}")
    if set(BEFORE) & set(paths) and not options.before:
        raise SystemExit("--paths before[100] needs --before REV (a commit of this repository)")
    if options.before and not set(BEFORE) & set(paths):
        paths.append("before")
    modes = [m.strip() for m in options.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"streamed", "one-shot"}:
        raise SystemExit("--modes: streamed, one-shot or both")
    return Plan(
        [int(c) for c in options.concurrency.split(",")],
        options.rounds,
        options.max_tokens,
        options.prompt_tokens,
        vocab,
        paths=[p for p in PATHS if p in paths],
        modes=[m == "streamed" for m in ("streamed", "one-shot") if m in modes],
        lmcache=options.lmcache == "on",
        before=options.before,
        probe_requests=options.probe,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--paths",
        default="bare,serve,full,post100",
        help=f"comma-separated, of: {', '.join(PATHS)} (before: see --before)",
    )
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--modes", default="streamed,one-shot")
    parser.add_argument(
        "--rounds", type=int, default=2, help="requests per cell: rounds x concurrency, at least 4"
    )
    parser.add_argument("--probe", type=int, default=20, help="TTFT probe requests; 0: none")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument(
        "--before", help="a commit whose full path runs too, as path `before` (e.g. ffbb7be)"
    )
    parser.add_argument("--lmcache", choices=("on", "off"), default="on")
    parser.add_argument("--baseline", type=Path, help="an earlier load.json to compare with")
    options = parser.parse_args()

    env = local_env()
    env["LMCACHE_ENABLED"] = "true" if options.lmcache == "on" else "false"
    apply_process_environment({**env, **LOCAL_ONLY})
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(env["MODEL_NAME"]).vocab_size
    plan = parse_plan(options, vocab)
    for name in ("httpx", "httpx2"):  # a line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    progress = Progress(plan.cells())
    started = time.perf_counter()
    cells = asyncio.run(measure(env, plan, progress))

    where = machine()
    rows, ratios = targets(cells, plan), ratio_rows(cells, plan)
    by_round = ttft_interval(cells, plan)
    options.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "make bench (" + " ".join(["python -m bench.load", *sys.argv[1:]]) + ")",
        "machine": where,
        "plan": {k: v for k, v in asdict(plan).items() if k != "vocab"},
        "model": MODEL_ID,
        "took_s": round(time.perf_counter() - started, 1),
        "cells": [
            {k: v for k, v in asdict(c).items() if k != "samples"} | {"label": c.label}
            for c in cells
        ],
        "ratios": ratios,
        "targets": rows,
        "ttft_by_round": by_round,
    }
    (options.out / "load.json").write_text(json.dumps(result, indent=1) + "\n")
    chart(cells, ratios, plan, where, options.out / "load.png")
    lmcache = "on" if plan.lmcache else "off"
    print(f"\n{MODEL_ID}; LMCache {lmcache}; {where['cpu']}, {where['cores']} cores")
    print(
        f"took {result['took_s']} s; {plan.requests(min(plan.concurrency))}.."
        f"{plan.requests(max(plan.concurrency))} requests per cell\n"
    )
    print(table(cells) + "\n\n" + ratio_table(ratios) + "\n\n" + target_table(rows))
    if by_round:
        print("\n" + rounds_text(by_round))
    print("\nCPU seconds per 1,000 output tokens, by process\n\n" + cpu_table(cells))
    if options.baseline:
        print("\nagainst " + str(options.baseline) + "\n")
        print(compare(cells, json.loads(options.baseline.read_text())))
    print(f"\nwrote {options.out / 'load.json'} and {options.out / 'load.png'}")


if __name__ == "__main__":
    stop_on_sigterm()
    main()
