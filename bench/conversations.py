"""Conversations across workers: what LMCache's shared store buys when each turn of a
conversation goes to whichever worker takes it. ``make bench-chat``.

``--conversations`` conversations of ``--turns`` turns each: one long system prompt shared by
all of them (``--system-tokens``, several LMCache chunks), a history that grows by each answer
(``--reply-tokens``, greedy; ``--min-reply-tokens`` holds back the end of an answer until it
has that many, vLLM's ``min_tokens``, for assistants that answer at length) and a short user
question a turn. Every turn is a new streamed
request (the OpenAI SDK, ``stream_options.include_usage``) through the local endpoint's OpenAI
route to ``--workers`` workers sharing its one queue: the endpoint hands it to whichever worker
takes it, so a conversation's turns land on different workers.

Two modes (``--modes``), each an endpoint with workers of its own, all up at once:

* ``off``: LMCache off, vLLM's own prefix cache only (each worker's own);
* ``on``: LMCache on (each worker's cache server, RAM tier), the workers sharing a real
  ``redis-server`` on loopback, started and stopped here; vLLM's prefix cache on as well (the
  worker's defaults).

Requests go one at a time. Round ``t`` sends turn ``t`` of every conversation, in a seeded
random order (the same in both modes); each turn goes to both modes in turn, each request
starting with the other mode, so the machine's drift in speed touches both alike. Before each
request, ``--think-s`` of pause: a user reading the answer; on two shared cores it also lets
the engine that served the last request stop spinning (``bench/load.py``'s ``SETTLE_S``). Each
endpoint's queue hands one-at-a-time jobs to its workers in turn, so the shuffled order decides
which turns move.

Per request: time to first token, ``usage.prompt_tokens`` and
``usage.prompt_tokens_details.cached_tokens`` (vLLM counts its own prefix cache hits and the
connector's, LMCache's, together), the worker that served it (the chunk id carries the job id,
``/status`` its ``workerId``), and from that worker's metrics how many of the cached tokens came
from its own prefix cache (``vllm:prefix_cache_hits_total``) and how many from LMCache
(``vllm:external_prefix_cache_hits_total``).

Prints Markdown tables (per turn, both modes; same worker against moved; the targets), a
least-squares line of TTFT against the prompt tokens not served from a cache (what a turn costs
with nothing to compute, and so the best ratio any cache could reach here), and writes
``OUT/conversations.json`` and ``OUT/conversations.png``.

Usage: scripts/in-env python -m bench.conversations [--out DIR] [--conversations 6]
    [--turns 6] [--system-tokens 1024] [--reply-tokens 64] [--min-reply-tokens 0] [--workers 2]
    [--modes off,on]
    [--think-s 1.5] [--seed 0]
       scripts/in-env python -m bench.conversations --report OUT/conversations.json [--out DIR]
       (no engines: the tables and the chart again from a run's data)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletionMessageParam

from bench import rotated, stop_on_sigterm
from bench.cache_ttft import documents, redis_server
from bench.load import machine, percentile, stop_endpoint, target
from handler.settings import LOCAL_ONLY, apply_process_environment, load_settings
from local_endpoint.harness import MODEL_ID, LocalEndpoint, local_endpoint, local_env

ROOT = Path(__file__).resolve().parents[1]

MODES = ("off", "on")
MODE_NAMES = {"off": "LMCache off (vLLM prefix cache)", "on": "LMCache on (shared Redis)"}
LOCAL_HITS = "vllm:prefix_cache_hits_total"  # the engine's own prefix cache
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"  # the KV connector's: LMCache
TARGET_SHARE, TARGET_SPEEDUP = 0.85, 2.0


@dataclass(frozen=True)
class Sample:
    """One turn of one conversation, as the client and the serving worker saw it."""

    mode: str  # a key of MODE_NAMES
    conversation: int
    turn: int  # 1-based
    worker: str
    moved: bool | None  # served by another worker than the conversation's previous turn
    prompt_tokens: int
    cached_tokens: int
    ttft_ms: float
    completion_tokens: int
    local_hits: int | None = None  # of cached_tokens: the worker's own prefix cache
    external_hits: int | None = None  # of cached_tokens: LMCache


@dataclass(frozen=True)
class Summary:
    """A group of samples (one turn, one mode; or turns 2+ split by routing)."""

    requests: int
    prompt_tokens_median: float
    cached_share: float  # cached tokens over prompt tokens, summed over the group
    cached_share_min: float  # the lowest single request's share
    lmcache_share: float | None  # LMCache's part of cached_share
    ttft_p50_ms: float
    moved: int
    workers: list[str] = field(default_factory=list)


# -- pure parts: what a run's samples say ---------------------------------------------------------


def summarise(samples: list[Sample]) -> Summary:
    prompt = sum(s.prompt_tokens for s in samples)
    external = [s.external_hits for s in samples]
    return Summary(
        requests=len(samples),
        prompt_tokens_median=percentile([float(s.prompt_tokens) for s in samples], 50),
        cached_share=round(sum(s.cached_tokens for s in samples) / prompt, 4),
        cached_share_min=round(min(s.cached_tokens / s.prompt_tokens for s in samples), 4),
        lmcache_share=(
            None if None in external else round(sum(e or 0 for e in external) / prompt, 4)
        ),
        ttft_p50_ms=round(percentile([s.ttft_ms for s in samples], 50), 1),
        moved=sum(1 for s in samples if s.moved),
        workers=sorted({s.worker for s in samples}),
    )


def turn_rows(samples: list[Sample]) -> list[dict[str, Any]]:
    """One row a turn, then turns 2 and later pooled (``turn`` "2+"): each mode's summary and
    the off/on ratio of TTFT p50s."""
    turns = sorted({s.turn for s in samples})
    groups: list[tuple[str, list[Sample]]] = [
        (str(t), [s for s in samples if s.turn == t]) for t in turns
    ]
    if len(turns) > 1:
        groups.append(("2+", [s for s in samples if s.turn >= 2]))
    return [_row(label, group) for label, group in groups]


def routing_rows(samples: list[Sample]) -> list[dict[str, Any]]:
    """Turns 2 and later, split by whether the turn stayed on the previous turn's worker."""
    later = [s for s in samples if s.turn >= 2]
    groups = [
        ("same worker as the previous turn", [s for s in later if not s.moved]),
        ("moved to another worker", [s for s in later if s.moved]),
    ]
    return [_row(label, group) for label, group in groups if group]


def _row(label: str, group: list[Sample]) -> dict[str, Any]:
    row: dict[str, Any] = {"turn": label}
    for mode in MODES:
        mine = [s for s in group if s.mode == mode]
        row[mode] = asdict(summarise(mine)) if mine else None
    if row["off"] and row["on"] and row["on"]["ttft_p50_ms"] > 0:
        row["ttft_off_over_on"] = round(row["off"]["ttft_p50_ms"] / row["on"]["ttft_p50_ms"], 2)
    else:
        row["ttft_off_over_on"] = None
    return row


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, from turn 2 on: LMCache on serves at least 85% of prompt tokens
    from a cache, and its TTFT p50 is at least 2x better than off; pooled, and the worst turn."""
    later = [r for r in rows if r["turn"] not in ("1", "2+")]
    pooled = [r for r in rows if r["turn"] == "2+"]
    found = []
    if later and all(r["on"] for r in later):
        for name, rows_ in (("turns 2+ pooled", pooled), ("worst turn from 2", later)):
            share = min(r["on"]["cached_share"] for r in rows_)
            found.append(target(f"cached share, LMCache on, {name}", share, TARGET_SHARE))
    if later and all(r["ttft_off_over_on"] is not None for r in later):
        for name, rows_ in (("turns 2+ pooled", pooled), ("worst turn from 2", later)):
            speedup = min(r["ttft_off_over_on"] for r in rows_)
            found.append(target(f"TTFT p50 off / on, {name}", speedup, TARGET_SPEEDUP))
    return found


def counters_agree(samples: list[Sample]) -> tuple[int, int]:
    """Of the samples with the worker's counters, how many have them add up to
    ``cached_tokens`` (its own prefix cache hits plus LMCache's)."""
    known = [s for s in samples if s.local_hits is not None and s.external_hits is not None]
    agree = [s for s in known if (s.local_hits or 0) + (s.external_hits or 0) == s.cached_tokens]
    return len(agree), len(known)


def ttft_fit(samples: list[Sample]) -> dict[str, Any]:
    """Per mode, least squares over every request: TTFT ms = intercept + slope x the prompt
    tokens not served from a cache. The intercept is what a request costs with nothing to
    compute (queue, job hand-over, the engine's step and first decode, the stream); the best
    off/on ratio a cache serving every prompt token could reach is off's TTFT p50 (turns 2+)
    over on's intercept."""
    fit: dict[str, Any] = {}
    for mode in MODES:
        points = [(s.prompt_tokens - s.cached_tokens, s.ttft_ms) for s in samples if s.mode == mode]
        xs = [float(x) for x, _ in points]
        if len(set(xs)) < 2:
            continue
        mx, my = sum(xs) / len(xs), sum(y for _, y in points) / len(points)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in points) / sxx
        fit[mode] = {"intercept_ms": round(my - slope * mx, 1), "ms_per_token": round(slope, 3)}
    later_off = [s.ttft_ms for s in samples if s.mode == "off" and s.turn >= 2]
    if later_off and "on" in fit and fit["on"]["intercept_ms"] > 0:
        best = percentile(later_off, 50) / fit["on"]["intercept_ms"]
        fit["best_off_over_on_if_all_cached"] = round(best, 2)
    return fit


def fit_text(fit: dict[str, Any]) -> str:
    lines = [
        f"TTFT, {mode}: {fit[mode]['intercept_ms']:.0f} ms + {fit[mode]['ms_per_token']:.2f} ms "
        "per prompt token not from a cache (least squares over every request)"
        for mode in MODES
        if mode in fit
    ]
    if "best_off_over_on_if_all_cached" in fit:
        lines.append(
            "best TTFT p50 off / on, turns 2+, if every prompt token came from a cache: "
            f"{fit['best_off_over_on_if_all_cached']:.2f}x"
        )
    return "\n".join(lines)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: each metric's value summed over its label sets."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        with contextlib.suppress(ValueError, IndexError):
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def job_id(chunk_id: str) -> str:
    """The endpoint's job id in a chat chunk's id: the worker gives vLLM ``<job id>-<8 hex>``
    as the request id, which vLLM's chat route prefixes with ``chatcmpl-``."""
    return chunk_id.removeprefix("chatcmpl-").rsplit("-", 1)[0]


def rounds(conversations: int, turns: int, seed: int) -> list[list[int]]:
    """The order of the conversations in each round (turn), seeded: the same in every mode."""
    rng = random.Random(seed)
    return [rng.sample(range(conversations), conversations) for _ in range(turns)]


def user_message(conversation: int, turn: int, turns: int) -> str:
    shipment = 7 * (conversation * turns + turn)
    return (
        f"Conversation {conversation}, question {turn}: when did shipment {shipment} leave, "
        "and from which dock?"
    )


def max_model_len(system_tokens: int, turns: int, reply_tokens: int) -> int:
    """Room for the last turn's prompt (each turn adds an answer, a question of about 30
    tokens and the template's markers) and its answer, in whole 256-token steps."""
    need = system_tokens + turns * (reply_tokens + 48) + reply_tokens + 64
    return max(2048, -(-need // 256) * 256)


# -- tables and the chart -------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _cell(row: dict[str, Any], mode: str, key: str, fmt: str = "{:.0f}") -> str:
    summary = row.get(mode)
    if not summary or summary.get(key) is None:
        return "—"
    value = summary[key]
    return _pct(value) if "share" in key else fmt.format(value)


def turn_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| turn | requests | prompt tokens (median) | moved (off, on) | cached, off | cached, on "
        "| of which LMCache, on | lowest request, on | TTFT p50 ms, off | TTFT p50 ms, on "
        "| off / on |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        some = r["on"] or r["off"]
        ratio = "—" if r["ttft_off_over_on"] is None else f"{r['ttft_off_over_on']:.2f}x"
        lines.append(
            f"| {r['turn']} | {some['requests']} | {some['prompt_tokens_median']:.0f} "
            f"| {_cell(r, 'off', 'moved')}, {_cell(r, 'on', 'moved')} "
            f"| {_cell(r, 'off', 'cached_share')} | {_cell(r, 'on', 'cached_share')} "
            f"| {_cell(r, 'on', 'lmcache_share')} | {_cell(r, 'on', 'cached_share_min')} "
            f"| {_cell(r, 'off', 'ttft_p50_ms')} | {_cell(r, 'on', 'ttft_p50_ms')} | {ratio} |"
        )
    return "\n".join(lines)


def routing_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| turns 2+ | requests (off, on) | cached, off | cached, on | of which LMCache, on "
        "| TTFT p50 ms, off | TTFT p50 ms, on | off / on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "—" if r["ttft_off_over_on"] is None else f"{r['ttft_off_over_on']:.2f}x"
        lines.append(
            f"| {r['turn']} | {_cell(r, 'off', 'requests')}, {_cell(r, 'on', 'requests')} "
            f"| {_cell(r, 'off', 'cached_share')} | {_cell(r, 'on', 'cached_share')} "
            f"| {_cell(r, 'on', 'lmcache_share')} | {_cell(r, 'off', 'ttft_p50_ms')} "
            f"| {_cell(r, 'on', 'ttft_p50_ms')} | {ratio} |"
        )
    return "\n".join(lines)


def target_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | this run | met |", "|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} {r['target']} | {r['value']} | {'yes' if r['met'] else 'no'} |"
        )
    return "\n".join(lines)


def chart(
    samples: list[Sample],
    rows: list[dict[str, Any]],
    routing: list[dict[str, Any]],
    title: str,
    out: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_turn = [r for r in rows if r["turn"] != "2+"]
    xs = list(range(len(per_turn)))
    colours = {"off": "tab:gray", "on": "tab:blue"}
    fig, (share_ax, ttft_ax, route_ax) = plt.subplots(1, 3, figsize=(17, 5.2))
    for k, mode in enumerate(MODES):
        at = [x + (k - 0.5) * 0.38 for x in xs]
        present = [(x, r[mode]) for x, r in zip(at, per_turn, strict=True) if r[mode]]
        if not present:
            continue
        total = [s["cached_share"] * 100 for _, s in present]
        lmcache = [(s["lmcache_share"] or 0) * 100 for _, s in present]
        own = [t - e for t, e in zip(total, lmcache, strict=True)]
        spots = [x for x, _ in present]
        share_ax.bar(spots, own, 0.38, color=colours[mode], label=f"{mode}: vLLM prefix cache")
        if any(lmcache):
            share_ax.bar(spots, lmcache, 0.38, bottom=own, color="tab:orange", label="on: LMCache")
        ttft_ax.bar(
            spots, [s["ttft_p50_ms"] for _, s in present], 0.38, color=colours[mode], alpha=0.6
        )
        for moved, marker in ((False, "o"), (True, "x")):
            dots = [s for s in samples if s.mode == mode and bool(s.moved) == moved]
            ttft_ax.scatter(
                [at[s.turn - 1] for s in dots],
                [s.ttft_ms for s in dots],
                marker=marker,
                color=colours[mode],
                s=18,
                label=f"{mode}: {'moved' if moved else 'same worker or turn 1'}",
            )
        route = [r[mode]["ttft_p50_ms"] if r[mode] else 0 for r in routing]
        spots = [j + (k - 0.5) * 0.38 for j in range(len(routing))]
        route_ax.bar(spots, route, 0.38, color=colours[mode], label=MODE_NAMES[mode])
    share_ax.axhline(TARGET_SHARE * 100, color="black", linewidth=0.8, linestyle="--")
    share_ax.set_title("prompt tokens served from a cache, % (dashed: 85% target)", fontsize=10)
    share_ax.set_ylim(0, 100)
    ttft_ax.set_yscale("log")
    ttft_ax.set_title("time to first token, ms (log): p50 (bars) and each request", fontsize=10)
    route_ax.set_title("turns 2+: TTFT p50, ms, by where the turn went", fontsize=10)
    for ax in (share_ax, ttft_ax):
        ax.set_xticks(xs, [f"turn {r['turn']}" for r in per_turn])
    route_ax.set_xticks(range(len(routing)), [r["turn"] for r in routing], fontsize=8)
    for ax in (share_ax, ttft_ax, route_ax):
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# -- running it -----------------------------------------------------------------------------------


@dataclass
class Plan:
    conversations: int
    turns: int
    system_tokens: int
    reply_tokens: int
    workers: int
    modes: list[str]
    think_s: float
    seed: int
    min_reply_tokens: int = 0


@dataclass
class Answer:
    text: str
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    job: str


def ask(
    endpoint: LocalEndpoint,
    messages: list[ChatCompletionMessageParam],
    max_tokens: int,
    min_tokens: int = 0,
) -> Answer:
    """One streamed chat turn through the endpoint's OpenAI route."""
    started = time.perf_counter()
    stream = endpoint.openai().chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"min_tokens": min_tokens} if min_tokens else None,
    )
    first: float | None = None
    text: list[str] = []
    chunk_id, usage = "", None
    for chunk in stream:
        chunk_id = chunk_id or chunk.id
        choice = chunk.choices[0] if chunk.choices else None
        if choice and (choice.delta.content or choice.finish_reason) and first is None:
            first = time.perf_counter() - started  # an answer that ends at once ends here
        if choice and choice.delta.content:
            text.append(choice.delta.content)
        usage = chunk.usage or usage
    if usage is None or first is None:
        raise RuntimeError(f"stream {chunk_id} ended without an answer and its usage")
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details and details.cached_tokens else 0
    return Answer(
        "".join(text),
        first * 1000,
        usage.prompt_tokens,
        cached,
        usage.completion_tokens,
        job_id(chunk_id),
    )


def read_counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        values = parse_metrics(response.read().decode())
    return {name: values.get(name, 0.0) for name in (LOCAL_HITS, EXTERNAL_HITS)}


def warm_up(endpoint: LocalEndpoint, workers: int, text: str) -> None:
    """A chat about ``text`` (unrelated to the conversations, as long as their system prompt)
    until every worker has served one: no worker's first long prefill is measured. The queue
    hands one-at-a-time jobs to the workers in turn."""
    served: set[str] = set()
    for n in range(4 * workers):
        if len(served) == workers:
            return
        question = f"{text}\n\nSay hello, {n}."
        answer = ask(endpoint, [{"role": "user", "content": question}], 4)
        served.add(str(endpoint.status(answer.job).get("workerId")))
    raise RuntimeError(f"only workers {sorted(served)} took warm-up jobs")


class Lane:
    """One mode's endpoint and where each of its conversations stands."""

    def __init__(self, mode: str, endpoint: LocalEndpoint, plan: Plan, system: str) -> None:
        self.mode, self.endpoint, self.plan = mode, endpoint, plan
        self.history: list[list[ChatCompletionMessageParam]] = [
            [{"role": "system", "content": system}] for _ in range(plan.conversations)
        ]
        self.last_worker: dict[int, str] = {}
        self.counters: dict[str, dict[str, float]] = {}

    def baseline(self) -> None:
        """Each worker's cache counters now: every sample's hits are counted from here."""
        self.counters = {
            w["id"]: read_counters(str(w["metrics_url"])) for w in self.endpoint.workers()
        }

    def turn(self, c: int, turn: int) -> Sample:
        """Conversation ``c``'s next turn: a user question, the streamed answer kept."""
        history = self.history[c]
        history.append({"role": "user", "content": user_message(c, turn, self.plan.turns)})
        answer = ask(self.endpoint, history, self.plan.reply_tokens, self.plan.min_reply_tokens)
        history.append({"role": "assistant", "content": answer.text})
        worker = str(self.endpoint.status(answer.job).get("workerId"))
        url = next(str(w["metrics_url"]) for w in self.endpoint.workers() if w["id"] == worker)
        before, after = self.counters[worker], read_counters(url)
        self.counters[worker] = after
        last = self.last_worker.get(c)
        self.last_worker[c] = worker
        return Sample(
            mode=self.mode,
            conversation=c,
            turn=turn,
            worker=worker,
            moved=None if last is None else last != worker,
            prompt_tokens=answer.prompt_tokens,
            cached_tokens=answer.cached_tokens,
            ttft_ms=round(answer.ttft_ms, 1),
            completion_tokens=answer.completion_tokens,
            local_hits=round(after[LOCAL_HITS] - before[LOCAL_HITS]),
            external_hits=round(after[EXTERNAL_HITS] - before[EXTERNAL_HITS]),
        )


def start_lane(
    stack: contextlib.ExitStack, env: dict[str, str], plan: Plan, mode: str, system: str
) -> Lane:
    """The mode's endpoint and workers (LMCache on: and a Redis of its own), stopped with
    ``stack``."""
    mode_env = {**env, "LMCACHE_ENABLED": "true" if mode == "on" else "false"}
    if mode == "on":
        port = stack.enter_context(redis_server())
        mode_env["LMCACHE_L2_URL"] = f"redis://127.0.0.1:{port}"
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    started = time.perf_counter()
    endpoint = stack.enter_context(
        local_endpoint(tmp, mode_env, "--workers", str(plan.workers), start_timeout=600)
    )
    print(f"{mode}: {plan.workers} workers ready in {time.perf_counter() - started:.0f} s")
    return Lane(mode, endpoint, plan, system)


def run(env: dict[str, str], plan: Plan, system: str, warm_text: str) -> list[Sample]:
    """Every mode's endpoint up at once; each turn goes through every mode in turn (each
    request starting with the other mode), so the machine's drift touches both alike."""
    samples: list[Sample] = []
    with contextlib.ExitStack() as stack:
        lanes = [start_lane(stack, env, plan, mode, system) for mode in plan.modes]
        for lane in lanes:
            warm_up(lane.endpoint, plan.workers, warm_text)
            lane.baseline()
        schedule = [
            (turn, c)
            for turn, order in enumerate(rounds(plan.conversations, plan.turns, plan.seed), 1)
            for c in order
        ]
        for k, (turn, c) in enumerate(schedule):
            for lane in rotated(lanes, k):
                time.sleep(plan.think_s)
                samples.append(lane.turn(c, turn))
                progress(len(samples), len(schedule) * len(lanes), samples[-1])
        for lane in lanes:
            stop_endpoint(lane.endpoint)  # a failed stop check is a warning: samples are kept
    return samples


def progress(done: int, total: int, s: Sample) -> None:
    moved = {None: "first", True: "moved", False: "same"}[s.moved]
    print(
        f"[{done}/{total} {s.mode}] conversation {s.conversation} turn {s.turn} on {s.worker} "
        f"({moved}): {s.cached_tokens}/{s.prompt_tokens} cached (LMCache {s.external_hits}), "
        f"TTFT {s.ttft_ms:.0f} ms",
        file=sys.stderr,
        flush=True,
    )


def parse_plan(options: argparse.Namespace) -> Plan:
    modes = [m.strip() for m in options.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise SystemExit("--modes: off, on or both")
    if options.conversations < 1 or options.turns < 1 or options.workers < 1:
        raise SystemExit("--conversations, --turns and --workers must be at least 1")
    if not 0 <= options.min_reply_tokens <= options.reply_tokens:
        raise SystemExit("--min-reply-tokens: from 0 to --reply-tokens")
    return Plan(
        conversations=options.conversations,
        turns=options.turns,
        system_tokens=options.system_tokens,
        reply_tokens=options.reply_tokens,
        workers=options.workers,
        min_reply_tokens=options.min_reply_tokens,
        modes=[m for m in MODES if m in modes],
        think_s=options.think_s,
        seed=options.seed,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=1024, help="shared system prompt")
    parser.add_argument("--reply-tokens", type=int, default=64, help="max_tokens of an answer")
    parser.add_argument(
        "--min-reply-tokens", type=int, default=0, help="min_tokens of an answer (0: none)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="off,on", help="off, on or both (LMCache)")
    parser.add_argument("--think-s", type=float, default=1.5, help="pause before each request")
    parser.add_argument("--seed", type=int, default=0, help="the order of each round")
    parser.add_argument(
        "--report", type=Path, help="no run: the tables and chart again from a run's JSON"
    )
    options = parser.parse_args()
    if options.report:
        earlier = json.loads(options.report.read_text())
        earlier["samples"] = [Sample(**x) for x in earlier["samples"]]
        report(earlier, options.out)
        return
    plan = parse_plan(options)

    env = local_env()
    model_len = max_model_len(plan.system_tokens, plan.turns, plan.reply_tokens)
    env["MAX_MODEL_LEN"] = str(model_len)
    apply_process_environment({**env, **LOCAL_ONLY})
    for name in ("httpx", "httpx2"):  # a line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    records, other = documents(load_settings(env), 2, plan.system_tokens)
    system = "You answer questions about these shipping records.\n\n" + records
    started = time.perf_counter()
    samples = run(env, plan, system, other)
    command = " ".join(["python -m bench.conversations", *sys.argv[1:]])
    run_record = {
        "command": f"make bench-chat ({command})",
        "machine": machine(),
        "model": MODEL_ID,
        "plan": asdict(plan) | {"max_model_len": model_len},
        "took_s": round(time.perf_counter() - started, 1),
        "samples": samples,
    }
    report(run_record, options.out)


def report(run_record: dict[str, Any], out: Path) -> None:
    """Analyse a run's samples; write OUT/conversations.json and .png; print the tables."""
    samples: list[Sample] = run_record["samples"]
    rows, routing = turn_rows(samples), routing_rows(samples)
    goals, fit = targets(rows), ttft_fit(samples)
    agree, known = counters_agree(samples)
    result = run_record | {
        "turns": rows,
        "routing": routing,
        "targets": goals,
        "ttft_fit": fit,
        "counters_agree": {"agree": agree, "of": known},
        "samples": [asdict(s) for s in samples],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "conversations.json").write_text(json.dumps(result, indent=1) + "\n")
    plan, where = run_record["plan"], run_record["machine"]
    title = (
        f"{run_record['model']}: {plan['conversations']} conversations x {plan['turns']} turns "
        f"over {plan['workers']} workers, {plan['system_tokens']}-token shared system prompt, "
        f"answers of {plan.get('min_reply_tokens') or 1}-{plan['reply_tokens']} tokens; "
        f"{where['cpu']}, {where['cores']} cores, "
        "no GPU"
    )
    chart(samples, rows, routing, title, out / "conversations.png")
    print(f"\n{title}\n{run_record['command']}; took {run_record['took_s']} s\n")
    print(turn_table(rows) + "\n\n" + routing_table(routing) + "\n\n" + target_table(goals))
    print("\n" + fit_text(fit))
    print(
        f"\nThe serving worker's counters (own prefix cache + LMCache hits) equal cached_tokens "
        f"in {agree} of {known} requests."
    )
    print(f"\nwrote {out / 'conversations.json'} and {out / 'conversations.png'}")


if __name__ == "__main__":
    stop_on_sigterm()
    main()
