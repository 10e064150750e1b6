"""One stream through the handler against the bare AsyncLLM, same prompt tokens, one run.

Prints cold start, then for 256-token streams (greedy, ignore_eos): time to first token, output
tokens/s and yields per stream, for the bare engine and for the handler as runpod's production
loop drives it (runpod's run_job_generator; each yield awaits a stand-in POST of 0 or 100 ms),
with coalescing on (STREAM_FLUSH_INTERVAL_MS=50) and off (0). Runs alternate; medians reported.

Usage: scripts/in-env python -m bench.stream_overhead [--repeats N]   (or: make bench-stream)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import stop_on_sigterm
from handler.settings import LOCAL_ONLY, apply_process_environment, load_settings
from handler.streaming import parse_events
from local_endpoint.harness import local_env

ROOT = Path(__file__).resolve().parents[1]

MAX_TOKENS = 256
PROMPT = "Write a long story about a lighthouse keeper and the sea."


async def bare_stream(engine: Any, token_ids: list[int]) -> dict[str, float]:
    """AsyncLLM.generate on the engine's own loop: the floor the handler is measured against."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    async def go() -> dict[str, float]:
        params = SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        start = time.perf_counter()
        first, tokens = None, 0
        async for out in engine._client.generate(
            {"prompt_token_ids": token_ids}, params, f"bare-{time.time_ns()}"
        ):
            tokens += len(out.outputs[0].token_ids)
            if first is None and tokens:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        return {"ttft": first or total, "tok_s": tokens / total, "yields": float("nan")}

    fut = asyncio.run_coroutine_threadsafe(go(), engine._loop)  # bench-only use of internals
    return await asyncio.wrap_future(fut)


async def handler_stream(
    engine: Any, settings: Any, token_ids: list[int], post_delay: float
) -> dict[str, float]:
    from runpod.serverless.modules.rp_job import run_job_generator

    from handler.jobs import make_handler

    job = {
        "id": f"bench-{time.time_ns()}",
        "input": {
            "openai_route": "/v1/completions",
            "openai_input": {
                "model": settings.model_id,
                "prompt": token_ids,
                "stream": True,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            },
        },
    }
    start = time.perf_counter()
    first, yields, tokens = None, 0, 0
    async for item in run_job_generator(make_handler(engine, settings), job):
        yields += 1
        for chunk in parse_events([item["output"]]):
            if first is None and any(c.get("text") for c in chunk.get("choices") or []):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        await asyncio.sleep(post_delay)  # the POST to RunPod, awaited before the next pull
    total = time.perf_counter() - start
    return {"ttft": first or total, "tok_s": tokens / total, "yields": float(yields)}


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


async def measure(
    engine: Any, settings_on: Any, settings_off: Any, ids: list[int], repeats: int
) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {}
    cases: list[tuple[str, Callable[[], Awaitable[dict[str, float]]]]] = [
        ("bare AsyncLLM", lambda: bare_stream(engine, ids)),
        ("handler, coalescing on, POST 0 ms", lambda: handler_stream(engine, settings_on, ids, 0)),
        (
            "handler, coalescing off, POST 0 ms",
            lambda: handler_stream(engine, settings_off, ids, 0),
        ),
        (
            "handler, coalescing on, POST 100 ms",
            lambda: handler_stream(engine, settings_on, ids, 0.1),
        ),
        (
            "handler, coalescing off, POST 100 ms",
            lambda: handler_stream(engine, settings_off, ids, 0.1),
        ),
    ]
    await bare_stream(engine, ids)  # warm-up
    for i in range(repeats):
        for name, case in cases:
            runs.setdefault(name, []).append(await case())
            print(f"  round {i + 1}/{repeats}: {name}", file=sys.stderr, flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    env = local_env()
    apply_process_environment({**env, **LOCAL_ONLY})
    settings_on = load_settings({**env, "STREAM_FLUSH_INTERVAL_MS": "50"})
    settings_off = load_settings({**env, "STREAM_FLUSH_INTERVAL_MS": "0"})

    from transformers import AutoTokenizer

    from handler.engine.vllm_engine import VllmEngine

    ids = AutoTokenizer.from_pretrained(settings_on.model)(PROMPT)["input_ids"]
    started = time.perf_counter()
    engine = VllmEngine.start(settings_on)
    cold = time.perf_counter() - started
    try:
        runs = asyncio.run(measure(engine, settings_on, settings_off, ids, repeats))
    finally:
        engine.shutdown()
    bare = runs["bare AsyncLLM"]
    print(f"\ncold start (import vllm, engine, OpenAI layer): {cold:.1f} s")
    print(f"{MAX_TOKENS}-token stream, prompt {len(ids)} tokens, median of {repeats}\n")
    print("| path | TTFT ms | tokens/s | vs bare tokens/s | yields per stream |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():
        ratio = median(rows, "tok_s") / median(bare, "tok_s")
        yields = median(rows, "yields")
        print(
            f"| {name} | {median(rows, 'ttft') * 1000:.0f} | {median(rows, 'tok_s'):.1f} | "
            f"{ratio:.2f} | {'—' if yields != yields else f'{yields:.0f}'} |"
        )


if __name__ == "__main__":
    stop_on_sigterm()
    main()
