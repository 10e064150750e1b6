"""Time to first token for a repeated 2,000-token prefix, in four settings, in one run.

1. no cache: vLLM prefix cache off, no LMCache: every request recomputes the prefix;
2. vLLM's prefix cache only: the second request for a prefix, same engine;
3. LMCache L1 after an engine restart: the prefixes were computed by an engine that is gone; a
   new engine (prefix cache off) reads them from the still-running LMCache server's RAM tier;
4. a fresh second worker: a new LMCache server (empty RAM) and a new engine, sharing only the
   Redis store the first worker wrote to.

Settings 3 and 4 run twice: on the defaults (the RAM tier in shared memory where /dev/shm holds
twice it), and with KV data pickled across LMCache's socket (LMCACHE_SHARED_MEMORY=false).

Each setting asks once for each of N different 2,000-token documents (a system prompt) with a
short question, streamed, and reports the median time to the first generated token and the
cached prompt tokens vLLM reports. Engines run one at a time, on the default model, with the
engine and LMCache modules the worker uses. Needs ``redis-server`` on PATH.

    scripts/in-env python -m bench.cache_ttft [--docs 5] [--prefix-tokens 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import stop_on_sigterm
from handler.engine.interface import EngineCall
from handler.engine.vllm_engine import VllmEngine
from handler.lmcache import LMCacheServer, free_port
from handler.settings import (
    LOCAL_ONLY,
    Settings,
    apply_process_environment,
    environment,
    load_settings,
)


@contextmanager
def redis_server() -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            yield port
        finally:
            process.terminate()
            process.wait(10)


def documents(settings: Settings, count: int, tokens: int) -> list[str]:
    """``count`` different texts of exactly ``tokens`` tokens for the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer or settings.model)
    docs = []
    for d in range(count):
        text = " ".join(
            f"Record {d}-{i}: shipment {i * 7 + d} left dock {i % 13} at {i % 24}:00 carrying "
            f"{i * 3 + d} crates of item {i * 11 % 97}."
            for i in range(tokens // 10)
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        doc = tokenizer.decode(ids)
        assert isinstance(doc, str)  # one sequence of ids decodes to one text
        docs.append(doc)
    return docs


async def first_token(
    engine: VllmEngine, settings: Settings, doc: str, n: int
) -> tuple[float, int]:
    """Seconds to the first generated token, and the cached prompt tokens reported."""
    body = {
        "model": settings.model_id,
        "messages": [
            {"role": "system", "content": doc},
            {"role": "user", "content": f"Question {n}: which dock comes first?"},
        ],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    reply = await engine.serve(EngineCall("/v1/chat/completions", body, f"bench-{n}-{time.time()}"))
    assert not isinstance(reply, dict)
    ttft, cached = 0.0, 0
    async for event in reply:
        for line in event.splitlines():
            data = line.removeprefix("data: ").strip()
            if not data.startswith("{"):
                continue
            chunk = json.loads(data)
            if not ttft and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                details = chunk["usage"].get("prompt_tokens_details") or {}
                cached = int(details.get("cached_tokens") or 0)
    return ttft, cached


def measure(
    engine: VllmEngine, settings: Settings, docs: list[str], tag: int
) -> list[tuple[float, int]]:
    async def run() -> list[tuple[float, int]]:
        return [
            await first_token(engine, settings, doc, tag * 100 + i) for i, doc in enumerate(docs)
        ]

    return asyncio.run(run())


def engine_settings(base: dict[str, str], **extra: str) -> Settings:
    return load_settings({**base, **extra})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5, help="different prefixes (and samples)")
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--lmcache-only", action="store_true", help="skip settings 1 and 2 (no LMCache)"
    )
    args = parser.parse_args()
    apply_process_environment(LOCAL_ONLY)
    base = {**environment(), "MAX_MODEL_LEN": str(args.prefix_tokens + 512)}
    rows: list[dict[str, Any]] = []

    def record(name: str, samples: list[tuple[float, int]]) -> None:
        ttft = statistics.median(s[0] for s in samples)
        rows.append(
            {
                "setting": name,
                "ttft_ms_median": round(ttft * 1000, 1),
                "cached_tokens_median": statistics.median(s[1] for s in samples),
                "samples_ms": [round(s[0] * 1000, 1) for s in samples],
            }
        )
        print(f"{name}: median TTFT {ttft * 1000:.0f} ms", flush=True)

    plain = engine_settings(base, ENABLE_PREFIX_CACHING="false", LMCACHE_ENABLED="false")
    docs = documents(plain, args.docs, args.prefix_tokens)

    if not args.lmcache_only:
        print("1/4 no cache", flush=True)
        engine = VllmEngine.start(plain)
        measure(engine, plain, docs[:1], 0)  # warm-up
        record("no cache (recompute)", measure(engine, plain, docs, 1))
        engine.shutdown()

        print("2/4 vLLM prefix cache", flush=True)
        prefix = engine_settings(base, LMCACHE_ENABLED="false")
        engine = VllmEngine.start(prefix)
        measure(engine, prefix, docs, 2)
        record("vLLM prefix cache, same engine", measure(engine, prefix, docs, 3))
        engine.shutdown()

    for shared_memory in ("", "false"):  # the defaults (unset), then pickled
        with redis_server() as redis_port:
            chosen = {"LMCACHE_SHARED_MEMORY": shared_memory} if shared_memory else {}
            cached = engine_settings(
                base,
                ENABLE_PREFIX_CACHING="false",
                LMCACHE_L2_URL=f"redis://127.0.0.1:{redis_port}",
                **chosen,
            )
            first_worker = LMCacheServer(cached)
            mode = "shared memory" if first_worker.shm else "pickled"
            mode += ", the default" if not shared_memory else ""
            print(f"3/4 LMCache L1 after an engine restart ({mode})", flush=True)
            first_worker.start()
            engine = VllmEngine.start(cached, connector=first_worker.connector_config())
            first_worker.wait_healthy(120)
            measure(engine, cached, docs, 4)  # computed once, stored in L1 and Redis
            engine.shutdown()
            engine = VllmEngine.start(cached, connector=first_worker.connector_config())
            record(f"LMCache L1 after an engine restart ({mode})", measure(engine, cached, docs, 5))
            engine.shutdown()
            first_worker.stop()

            print(f"4/4 fresh worker, shared Redis store ({mode})", flush=True)
            second_worker = LMCacheServer(cached)
            second_worker.start()
            engine = VllmEngine.start(cached, connector=second_worker.connector_config())
            second_worker.wait_healthy(120)
            record(f"fresh worker, LMCache L2 Redis ({mode})", measure(engine, cached, docs, 6))
            engine.shutdown()
            second_worker.stop()

    recompute = rows[0]["ttft_ms_median"] if not args.lmcache_only else 2495.0
    print()
    print(f"{args.prefix_tokens}-token prefix, {args.docs} prefixes, medians, one run")
    print("| setting | TTFT ms (median) | cached prompt tokens | speed-up vs recompute |")
    print("|---|---|---|---|")
    for row in rows:
        speedup = recompute / row["ttft_ms_median"]
        row["speedup_vs_recompute"] = round(speedup, 2)
        print(
            f"| {row['setting']} | {row['ttft_ms_median']:.0f} | "
            f"{row['cached_tokens_median']:.0f} | {speedup:.1f}x |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"prefix_tokens": args.prefix_tokens, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    stop_on_sigterm()
    main()
