"""The worker against the bare engine, under load, in one run: ``make bench``.

The same requests (distinct random prompts of ``--prompt-tokens`` token ids, greedy,
``ignore_eos``, ``--max-tokens`` generated) go through

* **bare**: vLLM's ``AsyncLLM`` built from the worker's own engine arguments (same model, dtype,
  KV cache, LMCache connector and server), called in this process;
* **full**: the OpenAI SDK -> the local RunPod endpoint (``python -m handler.local``) -> a worker
  process under runpod's production loop (job-take, stream POSTs, job-done) -> the handler ->
  vLLM's OpenAI layer -> the engine; once as is, once with 100 ms added to every stream POST
  (``--stream-post-delay-ms``, RunPod's round trip).

at each concurrency (``--concurrency``), streamed and one-shot. All three engines are up for the
whole run (an idle vLLM engine takes no CPU), and each cell's requests go in rounds of
``concurrency`` at once, each round through every path in turn, so the machine's drift in speed
(large on a shared 2-core host) touches all paths alike. First a TTFT probe: 20 short streams
one at a time through the bare engine and the full path in turn. Per cell: time to first token
(p50, p99; streamed), inter-token latency (a stream's first to last token over its tokens, p50,
p99), request latency, output tokens/s over the cell, and stream POSTs per job (from the
endpoint's metrics), and the CPU time each process spent per 1,000 output tokens. Then the
targets, as ratios within this run.

Writes ``OUT/load.json`` (``--baseline`` compares a new run with an older file) and
``OUT/load.png``, and prints a Markdown table.

Usage: scripts/in-env python bench/load.py [--out DIR] [--concurrency 1,4,16] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handler.settings import LOCAL_ONLY, apply_process_environment, load_settings  # noqa: E402
from tests.integration.conftest import MODEL_ID, local_env  # noqa: E402
from tests.local_endpoint import LocalEndpoint, local_endpoint  # noqa: E402

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


@dataclass
class Cell:
    path: str  # "bare" or "full"
    streamed: bool
    concurrency: int
    post_delay_ms: float
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
    samples: list[Sample] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        mode = "streamed" if self.streamed else "one-shot"
        if self.probe:
            mode = "TTFT probe"
        if self.path == "bare":
            return f"bare AsyncLLM, {mode}"
        return f"full path, {mode}, POST +{self.post_delay_ms:.0f} ms"

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
    ("handler.local", "local endpoint"),
    ("-m handler", "worker: runpod loop, handler, vLLM frontend"),
)


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and each of its descendants, with its role. This
    process is the client (for the bare engine also vLLM's frontend: AsyncLLM runs in it)."""
    me = psutil.Process()
    found: dict[int, tuple[str, float]] = {}
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            text = proc.name() + " " + " ".join(proc.cmdline())
            role = next((r for key, r in ROLES if key in text), "other")
            found[proc.pid] = ("client" if proc.pid == me.pid else role, times.user + times.system)
    return found


def cpu_spent(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    spent: dict[str, float] = {}
    for pid, (role, seconds) in cpu_by_process().items():
        if pid in before:
            spent[role] = spent.get(role, 0.0) + seconds - before[pid][1]
    return spent


Call = Callable[[list[int], int], Awaitable[Sample]]  # (prompt ids, max tokens) -> a sample


@dataclass
class Way:
    """One way to send a request, with what measures it: a cell's samples, wall time and CPU
    add up over its rounds."""

    cell: Cell
    call: Call
    posts: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)  # (POSTs, jobs) so far
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
    for role, seconds in cpu_spent(cpu).items():
        path.cpu[role] = path.cpu.get(role, 0.0) + seconds
    now_posts, now_jobs = path.posts()
    path.post_count[0] += now_posts - posts
    path.post_count[1] += now_jobs - jobs


def finish(path: Way) -> Cell:
    cell = path.cell
    cell.summarise(cell.wall_s)
    per_1k = 1000 / max(cell.output_tokens, 1)
    cell.cpu_s_per_1k_tokens = {r: round(s * per_1k, 2) for r, s in sorted(path.cpu.items())}
    if cell.path == "full":
        cell.posts_per_job = path.post_count[0] / max(path.post_count[1], 1)
    return cell


async def interleaved(
    ways: list[Way], prompts: list[list[int]], per_round: int, max_tokens: int, progress: Progress
) -> list[Cell]:
    """The prompts in rounds of ``per_round`` at once; each round goes through every way in
    turn, so drift in the machine's speed touches all of them alike."""
    first = ways[0].cell
    mode = "TTFT probe" if first.probe else ("streamed" if first.streamed else "one-shot")
    what = f"{mode}, concurrency {first.concurrency}, {len(ways)} paths in turn"
    for start in range(0, len(prompts), per_round):
        for way in ways:
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

    from handler.engine import build_args
    from handler.worker import start_cache

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


# -- the full path ---------------------------------------------------------------------------------


async def full_request(client: Any, ids: list[int], max_tokens: int, streamed: bool) -> Sample:
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


@contextlib.contextmanager
def full_path(env: dict[str, str], post_delay_ms: float) -> Iterator[LocalEndpoint]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_endpoint(
            Path(tmp), env, "--stream-post-delay-ms", str(post_delay_ms), start_timeout=600
        ) as endpoint,
    ):
        yield endpoint


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    concurrency: list[int]
    rounds: int
    max_tokens: int
    prompt_tokens: int
    vocab: int
    seed: int = 0
    probe_requests: int = 20
    probe_tokens: int = 8

    def requests(self, concurrency: int) -> int:
        return max(4, self.rounds * concurrency)

    def prompts(self, streamed: bool, concurrency: int) -> list[list[int]]:
        """Distinct prompts per cell (no cache hits), the same for both paths."""
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


async def measure(env: dict[str, str], plan: Plan, progress: Progress) -> list[Cell]:
    """Every engine up at once (an idle one takes no CPU), then every cell, paths interleaved."""
    import openai

    async with bare_engine(env) as llm, contextlib.AsyncExitStack() as stack:
        endpoints = {d: stack.enter_context(full_path(env, d)) for d in (0.0, 100.0)}
        clients = {
            d: openai.AsyncOpenAI(base_url=e.openai_base, api_key=e.key, max_retries=0, timeout=900)
            for d, e in endpoints.items()
        }
        for client in clients.values():
            stack.push_async_callback(client.close)

        def bare(streamed: bool) -> Call:
            return lambda ids, n: bare_request(llm, ids, n, streamed)

        def full(delay: float, streamed: bool) -> Call:
            return lambda ids, n: full_request(clients[delay], ids, n, streamed)

        def posts(delay: float) -> Callable[[], tuple[float, float]]:
            e = endpoints[delay]
            return lambda: (
                endpoint_metric(e, STREAM_POSTS + "_sum"),
                endpoint_metric(e, STREAM_POSTS + "_count"),
            )

        for call in (bare(True), full(0.0, True), full(100.0, True)):
            await asyncio.gather(*(call(p, 16) for p in plan.warmup()))
        # the TTFT probe: short streams one at a time, the engine otherwise idle (the long
        # cells have too few requests at concurrency 1 for a stable median)
        probes = [
            Way(Cell("bare", True, 1, 0.0, probe=True), bare(True)),
            Way(Cell("full", True, 1, 0.0, probe=True), full(0.0, True), posts(0.0)),
        ]
        cells = await interleaved(probes, plan.probe_prompts(), 1, plan.probe_tokens, progress)
        for streamed in (True, False):
            for c in plan.concurrency:
                paths = [
                    Way(Cell("bare", streamed, c, 0.0), bare(streamed)),
                    Way(Cell("full", streamed, c, 0.0), full(0.0, streamed), posts(0.0)),
                ]
                if streamed:
                    delayed = Cell("full", streamed, c, 100.0)
                    paths.append(Way(delayed, full(100.0, streamed), posts(100.0)))
                prompts = plan.prompts(streamed, c)
                cells += await interleaved(paths, prompts, c, plan.max_tokens, progress)
    return sorted(cells, key=lambda x: (x.path, x.post_delay_ms, not x.probe, not x.streamed))


def find(
    cells: list[Cell], path: str, streamed: bool, c: int, delay: float = 0.0, probe: bool = False
) -> Cell:
    return next(
        x
        for x in cells
        if (x.path, x.streamed, x.concurrency, x.post_delay_ms, x.probe)
        == (path, streamed, c, delay, probe)
    )


def targets(cells: list[Cell], plan: Plan) -> list[dict[str, Any]]:
    """The issue's targets, each a ratio or difference within this run."""
    bare, full = find(cells, "bare", True, 1, probe=True), find(cells, "full", True, 1, probe=True)
    overhead = (full.ttft_p50_ms or 0.0) - (bare.ttft_p50_ms or 0.0)
    name = "TTFT p50 overhead ms (probe: idle engine, one at a time)"
    rows = [target(name, overhead, 10.0, at_most=True)]
    for c in plan.concurrency:
        for streamed in (True, False):
            bare, full = find(cells, "bare", streamed, c), find(cells, "full", streamed, c)
            mode = "streamed" if streamed else "one-shot"
            rows.append(
                target(f"output tok/s, full / bare, {mode}, c={c}", full.tok_s / bare.tok_s, 0.95)
            )
        bare = find(cells, "bare", True, c)
        delayed = find(cells, "full", True, c, 100.0)
        rows.append(
            target(f"output tok/s, POST +100 ms / bare, c={c}", delayed.tok_s / bare.tok_s, 0.9)
        )
    return rows


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


def chart(cells: list[Cell], plan: Plan, where: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [x for x in cells if not x.probe]  # the probe is in the table
    labels = list(dict.fromkeys(x.label for x in cells))
    panels = [
        ("output tokens/s (higher is better)", lambda x: x.tok_s),
        ("time to first token p50, ms", lambda x: x.ttft_p50_ms),
        ("inter-token latency p50, ms", lambda x: x.itl_p50_ms),
        ("stream POSTs per job", lambda x: x.posts_per_job),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    width = 0.8 / len(labels)
    for ax, (title, value) in zip(axes.flat, panels, strict=True):
        for k, label in enumerate(labels):
            xs, ys = [], []
            for j, c in enumerate(plan.concurrency):
                cell = next((x for x in cells if x.label == label and x.concurrency == c), None)
                v = value(cell) if cell else None
                if v is not None:
                    xs.append(j + (k - (len(labels) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(plan.concurrency)), [f"c={c}" for c in plan.concurrency])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        f"{MODEL_ID}, prompt {plan.prompt_tokens} tokens, {plan.max_tokens} generated, greedy; "
        f"{where['cpu']}, {where['cores']} cores, no GPU",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument(
        "--rounds", type=int, default=2, help="requests per cell: rounds x concurrency, at least 4"
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--baseline", type=Path, help="an earlier load.json to compare with")
    options = parser.parse_args()

    env = local_env()
    apply_process_environment({**env, **LOCAL_ONLY})
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(env["MODEL_NAME"]).vocab_size
    plan = Plan(
        [int(c) for c in options.concurrency.split(",")],
        options.rounds,
        options.max_tokens,
        options.prompt_tokens,
        vocab,
    )
    progress = Progress(len(plan.concurrency) * 5 + 2)
    started = time.perf_counter()
    cells = asyncio.run(measure(env, plan, progress))

    where = machine()
    rows = targets(cells, plan)
    options.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "make bench (" + " ".join(["bench/load.py", *sys.argv[1:]]) + ")",
        "machine": where,
        "plan": {k: v for k, v in asdict(plan).items() if k != "vocab"},
        "model": MODEL_ID,
        "took_s": round(time.perf_counter() - started, 1),
        "cells": [
            {k: v for k, v in asdict(c).items() if k != "samples"} | {"label": c.label}
            for c in cells
        ],
        "targets": rows,
    }
    (options.out / "load.json").write_text(json.dumps(result, indent=1) + "\n")
    chart(cells, plan, where, options.out / "load.png")
    print(f"\n{MODEL_ID}; {where['cpu']}, {where['cores']} cores; took {result['took_s']} s")
    print(f"{plan.requests(1)}..{plan.requests(max(plan.concurrency))} requests per cell\n")
    print(table(cells) + "\n\n" + target_table(rows))
    print("\nCPU seconds per 1,000 output tokens, by process\n\n" + cpu_table(cells))
    if options.baseline:
        print("\nagainst " + str(options.baseline) + "\n")
        print(compare(cells, json.loads(options.baseline.read_text())))
    print(f"\nwrote {options.out / 'load.json'} and {options.out / 'load.png'}")


if __name__ == "__main__":
    main()
