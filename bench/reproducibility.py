"""Does a seeded request give the same text alone and beside 8 others, and what does the setting
that makes it so cost? One run, engines one at a time, on the default model.

For each setting (the model's bfloat16, ``DTYPE=float32``, ``MAX_NUM_SEQS=1``): for each of N
seeds, the request runs alone, then at once with 8 other seeded requests; the texts are compared
(sampled at temperature 1 and greedy). The 9-request batch's wall time gives the output tokens/s
the setting reaches with that much concurrency.

    scripts/in-env python -m bench.reproducibility [--seeds 3] [--tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import stop_on_sigterm
from handler.engine.interface import EngineCall
from handler.engine.vllm_engine import VllmEngine
from handler.settings import LOCAL_ONLY, apply_process_environment, environment, load_settings

SETTINGS = {
    "bfloat16": {},
    "float32": {"DTYPE": "float32"},
    "MAX_NUM_SEQS=1": {"MAX_NUM_SEQS": "1"},
}


def request(prompt: str, seed: int | None, tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0.0 if seed is None else 1.0,
        "ignore_eos": True,
    }
    if seed is not None:
        body["seed"] = seed
    return body


async def ask(engine: VllmEngine, body: dict[str, Any], rid: str) -> str:
    reply = await engine.serve(EngineCall("/v1/chat/completions", {**body, "request_id": rid}, rid))
    assert isinstance(reply, dict)
    return str(reply["choices"][0]["message"]["content"])


async def measure(engine: VllmEngine, seeds: int, tokens: int) -> dict[str, Any]:
    same, total, rates = 0, 0, []
    for s in range(seeds):
        for seed in (1000 + s, None):  # sampled, then greedy
            target = request(f"Write a short poem about the sea, number {s}.", seed, tokens)
            others = [
                request(f"Tell story {i} about dragons.", 10 * s + i, tokens) for i in range(8)
            ]
            alone = await ask(engine, target, f"a{s}{seed}")
            started = time.perf_counter()
            texts = await asyncio.gather(
                *(ask(engine, b, f"m{s}{seed}{i}") for i, b in enumerate([target, *others]))
            )
            rates.append(9 * tokens / (time.perf_counter() - started))
            same += texts[0] == alone
            total += 1
    return {"same": same, "pairs": total, "tokens_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    apply_process_environment(LOCAL_ONLY)
    base = {
        **environment(),
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "bench",
        "LMCACHE_ENABLED": "false",
    }
    results: dict[str, Any] = {}
    for name, extra in SETTINGS.items():
        print(f"[{name}] starting the engine", file=sys.stderr, flush=True)
        engine = VllmEngine.start(load_settings({**base, **extra}))
        try:
            results[name] = asyncio.run(measure(engine, args.seeds, args.tokens))
        finally:
            engine.shutdown()
        print(f"[{name}] {results[name]}", file=sys.stderr, flush=True)
    reference = results["bfloat16"]["tokens_per_s"]
    print("| setting | same text alone vs beside 8 | output tok/s, 9 at once | vs bfloat16 |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['same']}/{r['pairs']} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / reference:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    stop_on_sigterm()
    main()
