"""Where a request's time to first token goes when ``--concurrency`` requests arrive together:
the full path against `vllm serve`, hop by hop.

Starts the full path (local endpoint, one worker) and `vllm serve` (``bench/vllm_serve.py``,
the worker's engine arguments) with ``bench/trace/sitecustomize.py`` first on their path, which
timestamps each hop (job queued, job-take answered, answer read by runpod's loop, job started,
handler into vLLM's app, vLLM's engine request, its first output, the first SSE event, the first
coalesced batch, the first stream POST, its arrival at the endpoint, the first chunk relayed).
Then ``--bursts`` bursts through each path in turn (after the same settle time as
``bench/load.py``), short streams (``--max-tokens``) of distinct random prompts. Every request
is tagged (``user`` for the full path, ``X-Request-Id`` for `vllm serve`), so the hops of the
processes line up. ``--lmcache on,off`` starts both paths in both modes, all up at once, and
sends each burst to the four in turn, so the machine's drift touches both modes alike; each
burst starts one path further on, so no path always runs right after the same other one.

Prints, per path, each hop's median time after the client sent the request, and the median
step from the hop before it; and each burst's spread of arrivals at the engine.

Usage: scripts/in-env python -m bench.burst_timeline [--bursts 4] [--concurrency 16]
    [--lmcache on|off|on,off] [--prompt-tokens 128] [--post-delay-ms 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import rotated, stop_on_sigterm
from bench.load import (
    SETTLE_S,
    Started,
    start_endpoint,
    start_vllm_serve,
    stop_endpoint,
    stop_vllm_serve,
    wait_ready,
)
from handler.lmcache import free_port
from handler.settings import LOCAL_ONLY, apply_process_environment
from local_endpoint.harness import (
    MODEL_ID,
    LocalEndpoint,
    local_env,
)

ROOT = Path(__file__).resolve().parents[1]

TRACE = ROOT / "bench" / "trace"
CLIENT_SENT, CLIENT_FIRST = "client: request sent", "client: first token"


def mark(out: Any, hop: str, key: str) -> None:
    out.write(json.dumps({"t": time.time(), "hop": hop, "key": key}) + "\n")


async def one(client: Any, ids: list[int], tag: str, serve: bool, n: int, out: Any) -> None:
    extra: dict[str, Any] = {"extra_headers": {"X-Request-Id": tag}} if serve else {"user": tag}
    mark(out, CLIENT_SENT, tag)
    stream = await client.completions.create(
        model=MODEL_ID,
        prompt=ids,
        max_tokens=n,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
        **extra,
    )
    first = True
    async for chunk in stream:
        if first and chunk.choices and chunk.choices[0].text:
            mark(out, CLIENT_FIRST, tag)
            first = False


def read_marks(folder: Path) -> list[dict[str, Any]]:
    marks = []
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                marks.append(json.loads(line))
    return marks


def burst_steps(marks: list[dict[str, Any]], requests: dict[str, dict[str, float]]) -> list[str]:
    """The engine steps that scheduled a burst's first requests, in order: how many of the
    burst's requests each took in (``new``), until all were in."""
    first = "engine core: first step scheduled"
    bursts: dict[str, list[float]] = defaultdict(list)
    for tag, times in requests.items():
        if first in times:
            bursts[tag.rsplit("-", 1)[0]].append(times[first])
    steps = sorted(m["t"] for m in marks if m["hop"] == "engine core: step")
    shapes = []
    for starts in bursts.values():
        counts = [
            sum(1 for t in starts if t == s) for s in steps if min(starts) <= s <= max(starts)
        ]
        shapes.append("+".join(str(c) for c in counts))
    return shapes


def by_request(marks: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """tag -> hop -> first time seen; job ids and vLLM request ids resolved to the tag."""
    tags = {m["key"]: m["hop"].removeprefix("tag ") for m in marks if m["hop"].startswith("tag ")}
    known = set(tags.values()) | {m["key"] for m in marks if m["hop"] == CLIENT_SENT}
    found: dict[str, dict[str, float]] = defaultdict(dict)
    for m in sorted(marks, key=lambda m: m["t"]):
        if m["hop"].startswith("tag "):
            continue
        key = m["key"]
        tag = key if key in known else tags.get(key)
        if tag is None:  # vLLM's request id holds the job id (full path) or the tag (serve)
            tag = next((t for k, t in tags.items() if k in key), None)
            tag = tag or next((t for t in known if t in key), None)
        if tag is not None:
            found[tag].setdefault(m["hop"], m["t"])
    return found


def report(name: str, requests: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Each hop's median time after the request was sent, in the order of those medians."""
    hops: dict[str, list[float]] = defaultdict(list)
    for times in requests.values():
        if CLIENT_SENT in times:
            for hop, t in times.items():
                hops[hop].append((t - times[CLIENT_SENT]) * 1000)
    rows = sorted(((statistics.median(v), hop, len(v)) for hop, v in hops.items()))
    print(f"\n{name}: {len(requests)} requests\n")
    print("| hop | ms after sent (p50) | step (p50 of medians) | requests |")
    print("|---|---|---|---|")
    last = 0.0
    for median, hop, count in rows:
        print(f"| {hop} | {median:.1f} | {median - last:+.1f} | {count} |")
        last = median
    return {"path": name, "hops": [{"hop": h, "p50_ms": round(m, 1), "n": n} for m, h, n in rows]}


def burst_ttfts(requests: dict[str, dict[str, float]], prefix: str) -> list[float]:
    """Per burst, in order: the median time to first token of its requests (tagged
    ``{prefix}{burst}-{i}e``), ms."""
    bursts: dict[int, list[float]] = defaultdict(list)
    for tag, times in requests.items():
        if CLIENT_SENT in times and CLIENT_FIRST in times:
            burst = int(tag.rsplit("-", 1)[0].removeprefix(prefix))
            bursts[burst].append((times[CLIENT_FIRST] - times[CLIENT_SENT]) * 1000)
    return [round(statistics.median(bursts[b]), 1) for b in sorted(bursts)]


def paired(result: dict[str, Any], path: str) -> dict[str, Any] | None:
    """LMCache on against off for ``path`` when both ran, burst by burst (a burst's on and off
    runs are in the same round): the median of the differences of the bursts' TTFT p50s."""
    on, off = result.get(f"{path}, LMCache on"), result.get(f"{path}, LMCache off")
    if on is None or off is None:
        return None
    pairs = list(zip(on["burst_ttft_p50_ms"], off["burst_ttft_p50_ms"], strict=False))
    differences = sorted(round(a - b, 1) for a, b in pairs)
    return {"on_minus_off_ms": round(statistics.median(differences), 1), "per_burst": differences}


def spreads(requests: dict[str, dict[str, float]], hop: str) -> list[float]:
    """Per burst: last minus first arrival at ``hop``, ms (tags are burst-index)."""
    bursts: dict[str, list[float]] = defaultdict(list)
    for tag, times in requests.items():
        if hop in times:
            bursts[tag.rsplit("-", 1)[0]].append(times[hop])
    return [round((max(v) - min(v)) * 1000, 1) for v in bursts.values()]


PATHS = {"full path": "f", "vllm serve": "v"}
MODE_TAGS = {"on": "n", "off": "o"}


def path_name(path: str, mode: str, modes: list[str]) -> str:
    return path if len(modes) == 1 else f"{path}, LMCache {mode}"


async def run(options: argparse.Namespace, env: dict[str, str], tmp: Path) -> dict[str, Any]:
    import openai

    modes: list[str] = options.modes
    traces = tmp / "trace"
    traces.mkdir()
    endpoints: list[LocalEndpoint] = []
    serves: list[Started] = []
    clients: dict[str, Any] = {}
    prefixes: dict[str, str] = {}
    try:
        for mode in modes:
            traced = {
                **env,
                "BURST_TRACE_DIR": str(traces),
                "LMCACHE_ENABLED": "true" if mode == "on" else "false",
            }
            folder = tmp / f"full-{mode}"
            folder.mkdir()
            full = start_endpoint(ROOT, folder, traced, options.post_delay_ms, first=str(TRACE))
            endpoint = LocalEndpoint("", full.process, full.log)
            endpoints.append(endpoint)
            port = free_port()
            serve_env = {**traced, "PYTHONPATH": f"{TRACE}:{ROOT}"}
            serve_dir = tmp / f"serve-{mode}"
            serve_dir.mkdir()
            serves.append(start_vllm_serve(serve_dir, serve_env, port))
            await asyncio.to_thread(wait_ready, [full, serves[-1]])
            endpoint.url = json.loads((folder / "ready.json").read_text())["url"]
            for path, client in (
                (
                    "full path",
                    openai.AsyncOpenAI(
                        base_url=endpoint.openai_base,
                        api_key=endpoint.key,
                        max_retries=0,
                        timeout=600,
                    ),
                ),
                (
                    "vllm serve",
                    openai.AsyncOpenAI(
                        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
                    ),
                ),
            ):
                name = path_name(path, mode, modes)
                clients[name] = client
                prefixes[name] = PATHS[path] + (MODE_TAGS[mode] if len(modes) > 1 else "")
        rng = random.Random(options.seed)

        def prompt() -> list[int]:
            return [rng.randrange(1000, 48000) for _ in range(options.prompt_tokens)]

        with (tmp / "client.jsonl").open("w", buffering=1) as out:
            for name, client in clients.items():  # warm-up
                await asyncio.gather(
                    *(
                        one(client, prompt(), f"w{prefixes[name]}-{i}e", "serve" in name, 4, out)
                        for i in range(4)
                    )
                )
            for burst in range(options.bursts):
                for name in rotated(list(clients), burst):
                    client = clients[name]
                    await asyncio.sleep(SETTLE_S)
                    tags = [f"{prefixes[name]}{burst}-{i}e" for i in range(options.concurrency)]
                    await asyncio.gather(
                        *(
                            one(client, prompt(), tag, "serve" in name, options.max_tokens, out)
                            for tag in tags
                        )
                    )
        for client in clients.values():
            await client.close()
    finally:
        with contextlib.ExitStack() as stopping:  # each one stopped, even if one stop fails
            for started in endpoints:
                stopping.callback(stop_endpoint, started)
            for serve in serves:
                stopping.callback(stop_vllm_serve, serve)
    marks = read_marks(traces) + read_marks(tmp)
    requests = by_request(marks)
    result: dict[str, Any] = {
        "lmcache": options.lmcache,
        "prompt_tokens": options.prompt_tokens,
        "concurrency": options.concurrency,
        "post_delay_ms": options.post_delay_ms,
    }
    for name, prefix in prefixes.items():
        mine = {
            t: v for t, v in requests.items() if t.startswith(prefix) and t[len(prefix)].isdigit()
        }
        result[name] = report(name, mine)
        engine_spread = spreads(mine, "vLLM: request to the engine")
        print(f"\n{name}: arrivals at the engine spread over (ms, per burst): {engine_spread}")
        result[name]["engine_arrival_spread_ms"] = engine_spread
        shapes = burst_steps(marks, mine)
        print(f"{name}: requests per engine step while a burst was taken in: {shapes}")
        result[name]["burst_steps"] = shapes
        result[name]["burst_ttft_p50_ms"] = burst_ttfts(mine, prefix)
    for path in PATHS:
        both = paired(result, path)
        if both is not None:
            result[f"{path}, on - off"] = both
            n, median = len(both["per_burst"]), both["on_minus_off_ms"]
            print(
                f"\n{path}: TTFT p50 per burst, LMCache on - off, median of the {n} pairs: "
                f"{median:+.1f} ms (sorted: {both['per_burst']})"
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--lmcache", default="on", help="on, off, or on,off: both, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the medians here")
    parser.add_argument(
        "--post-delay-ms",
        type=float,
        default=0.0,
        help="the local endpoint's added delay per stream POST (RunPod's round trip)",
    )
    parser.add_argument(
        "--switch-interval", help="sys.setswitchinterval in the traced processes (an experiment)"
    )
    options = parser.parse_args()
    options.modes = [m.strip() for m in options.lmcache.split(",") if m.strip()]
    if not options.modes or set(options.modes) - set(MODE_TAGS):
        raise SystemExit("--lmcache: on, off, or on,off")
    env = local_env()
    if options.switch_interval:
        env["BURST_SWITCH_INTERVAL"] = options.switch_interval
    apply_process_environment({**env, **LOCAL_ONLY})
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        result = asyncio.run(run(options, env, Path(folder)))
    if options.json:
        options.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    stop_on_sigterm()
    main()
