"""What LoRA adapters by name (LORA_DIR) cost, in one run: the base model's streamed tokens/s on a
worker with adapters enabled against one without, and an adapter's first-use load time.

Two local endpoints (``python -m local_endpoint``, a real worker each, LMCache off, the default
model) run together: ``off`` with ``LORA_DIR`` blank, ``on`` with a ``LORA_DIR`` folder,
``MAX_LORAS=2`` and ``MAX_CPU_LORAS=4``. Through the OpenAI SDK:

1. first use: ``--adapters`` copies of one random adapter (made with peft, rank 8, every linear
   layer) are put into the folder one by one; each is asked for one token twice (the first
   request loads it, the second finds it loaded), then the base model once. The load as a client
   sees it is the first request's latency less the second's; the worker's own log line gives the
   time from the name's first request to the adapter being loaded (check, copy, engine load).
2. base-model tokens/s: greedy streams of ``--max-tokens`` (``ignore_eos``), distinct prompts,
   ``concurrency`` at once, in ``--rounds`` rounds per concurrency; each round goes to both
   workers in turn (the first of them alternating), so the machine's drift touches both alike.
   Per round: output tokens over the round's wall time. The ``on`` worker holds adapters loaded
   (step 1) while it serves the base model.

Prints medians and the on/off ratio, writes ``--json`` if given.

    scripts/in-env python -m bench.lora_cost [--rounds 8] [--concurrency 1,4] [--max-tokens 128]
        [--adapters 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI

from bench import stop_on_sigterm
from handler.settings import LOCAL_ONLY, apply_process_environment
from local_endpoint.harness import MODEL_ID, LocalEndpoint, local_endpoint, local_env

ROOT = Path(__file__).resolve().parents[1]
MAKE_ADAPTER = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
layers = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
config = LoraConfig(r=8, lora_alpha=64, target_modules=layers, init_lora_weights=False)
get_peft_model(model, config).save_pretrained(sys.argv[2])
"""
LOADED = re.compile(r"LoRA adapter '([^']+)' loaded in ([0-9.]+) s")


def make_adapter(base: str, out: Path) -> None:
    """A random LoRA adapter for the default model, made by peft in a process of its own."""
    subprocess.run(
        [sys.executable, "-c", MAKE_ADAPTER, base, str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )


async def one_token(client: AsyncOpenAI, model: str) -> float:
    started = time.perf_counter()
    await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=1,
        temperature=0,
    )
    return time.perf_counter() - started


async def stream(client: AsyncOpenAI, prompt: str, max_tokens: int) -> int:
    """One greedy stream of the base model; its completion tokens."""
    chunks = await client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    tokens = 0
    async for chunk in chunks:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens


async def round_tok_s(client: AsyncOpenAI, prompts: list[str], max_tokens: int) -> float:
    started = time.perf_counter()
    tokens = await asyncio.gather(*(stream(client, p, max_tokens) for p in prompts))
    return sum(tokens) / (time.perf_counter() - started)


async def first_uses(
    on: LocalEndpoint, folder: Path, adapter: Path, count: int
) -> list[dict[str, Any]]:
    client = on.async_openai()
    rows = []
    for i in range(count):
        name = f"load-{i}"
        shutil.copytree(adapter, folder / name)
        first = await one_token(client, name)
        second = await one_token(client, name)
        base = await one_token(client, MODEL_ID)
        rows.append({"adapter": name, "first_s": first, "second_s": second, "base_s": base})
    logged = dict(LOADED.findall(on.log.read_text(errors="replace")))
    for row in rows:
        row["logged_load_s"] = float(logged[row["adapter"]])
    return rows


async def throughput(
    endpoints: dict[str, LocalEndpoint], concurrency: int, rounds: int, max_tokens: int
) -> dict[str, list[float]]:
    clients = {tag: endpoint.async_openai() for tag, endpoint in endpoints.items()}
    found: dict[str, list[float]] = {tag: [] for tag in endpoints}
    serial = 0
    for r in range(rounds):
        order = list(clients) if r % 2 == 0 else list(reversed(clients))
        for tag in order:
            prompts = []
            for _ in range(concurrency):
                serial += 1
                prompts.append(f"Request {serial}: write a long story about a lighthouse.")
            found[tag].append(await round_tok_s(clients[tag], prompts, max_tokens))
            await asyncio.sleep(1.2)  # the engine's processes spin for 1 s after their work
    return found


def report(loads: list[dict[str, Any]], tok_s: dict[int, dict[str, list[float]]]) -> str:
    median = statistics.median
    lines = ["| base model, streamed | LORA_DIR off, tok/s | on, tok/s | on / off |"]
    lines.append("|---|---|---|---|")
    for concurrency, found in tok_s.items():
        off, on = median(found["off"]), median(found["on"])
        lines.append(f"| {concurrency} at once | {off:.1f} | {on:.1f} | {on / off:.2f} |")
    lines += [
        "",
        "| first use of an adapter (one-token chat) | median | all |",
        "|---|---|---|",
    ]
    for key, what in [
        ("first_s", "first request (loads it), s"),
        ("second_s", "second request, s"),
        ("base_s", "base model request, s"),
        ("logged_load_s", "the worker's log: loaded in, s"),
    ]:
        values = [row[key] for row in loads]
        shown = ", ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {what} | {median(values):.3f} | {shown} |")
    extra = median([row["first_s"] - row["second_s"] for row in loads])
    lines.append(f"| first less second, s | {extra:.3f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=5)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    for name in ("httpx", "httpx2"):  # a line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    env = {**local_env(), "LMCACHE_ENABLED": "false"}
    apply_process_environment({**env, **LOCAL_ONLY})
    with tempfile.TemporaryDirectory(prefix="lora-cost-") as scratch:
        tmp = Path(scratch)
        make_adapter(env["MODEL_NAME"], tmp / "adapter")
        (tmp / "loras").mkdir()
        on_env = {**env, "LORA_DIR": str(tmp / "loras"), "MAX_LORAS": "2", "MAX_CPU_LORAS": "4"}
        (tmp / "off").mkdir()
        (tmp / "on").mkdir()
        with (
            local_endpoint(tmp / "off", {**env, "LORA_DIR": ""}) as off,
            local_endpoint(tmp / "on", on_env) as on,
        ):
            loads = asyncio.run(first_uses(on, tmp / "loras", tmp / "adapter", options.adapters))
            tok_s = {
                c: asyncio.run(
                    throughput({"off": off, "on": on}, c, options.rounds, options.max_tokens)
                )
                for c in (int(x) for x in options.concurrency.split(","))
            }
    print(report(loads, tok_s))
    if options.json:
        options.json.write_text(json.dumps({"loads": loads, "tok_s": tok_s}, indent=1))


if __name__ == "__main__":
    stop_on_sigterm()
    main()
