"""Cold start, launch to the first `/v1/models` answer, against `vllm serve`: `make bench-cold`.

Each row starts something from nothing and times it from its launch to its first answer to
``GET /v1/models``, LMCache off (``vllm serve`` has none), on the default model:

* **vllm serve**: vLLM's own server (what ``vllm serve`` runs after parsing its flags:
  ``run_server`` in ``vllm.entrypoints.launchers.api_server.entry``) in a process of its own, with
  the very argument namespace ``handler.engine.build_args`` makes from the worker's settings, so
  the flags cannot drift (the CPU build's ``vllm`` console script is broken). It builds vLLM's
  argument parser as ``vllm serve`` does; polled every 20 ms.
* **worker**: ``python -m local_endpoint`` with one worker (``python -m handler`` under runpod's
  production loop); the request goes in through the endpoint's OpenAI route as soon as the
  endpoint listens and waits in the queue, so it is answered at the worker's first job-take.
  Launch is the worker process's creation time.
* **worker, second start**: the same again on the same compile-cache folder.

First ``--rounds`` pairs with ``ENFORCE_EAGER=true`` (the worker's added time; vllm serve and
worker alternate), then with torch.compile on (``ENFORCE_EAGER=false``): a worker on an empty
``COMPILE_CACHE_DIR`` (a folder on a stand-in volume), a second worker on the same folder, and
``vllm serve`` on it too (``VLLM_CACHE_ROOT``). The worker's cold-start phases (its ``cold start:``
log lines) are shown side by side, and vLLM's own lines on the compile cache (loaded, or compiled
again and why).

Writes ``OUT/cold_start.json`` and prints Markdown tables.

Usage: scripts/in-env python -m bench.cold_start [--rounds N] [--out DIR] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench import stop_on_sigterm
from handler.cold_start import process_age_s
from handler.lmcache import free_port
from handler.settings import (
    ENGINE_LIMITS,
    LOCAL_ONLY,
    LOOPBACK_HOST,
    TELEMETRY_OFF,
    load_settings,
)
from local_endpoint.harness import (
    KEY,
    LocalEndpoint,
    local_env,
    stop,
)

ROOT = Path(__file__).resolve().parents[1]

START_TIMEOUT_S = 600.0
POLL_S = 0.02
PHASE = re.compile(r"handler\.worker: cold start: (.+) took ([0-9.]+) s")
# vLLM's own lines about its compile cache (decorators.py, monitor.py)
VLLM_CACHE_LINES = re.compile(
    r"(Directly load AOT compilation.*|Compiling model again due to a load failure.*"
    r"|torch\.compile.* took [0-9.]+ s.*|saved AOT compiled function.*)"
)

# vLLM's server, as `vllm serve` runs it once its flags are parsed, on a namespace from a file.
SERVE = """
import pickle, sys
import uvloop
from vllm.entrypoints.launchers.api_server.entry import run_server
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.utils.argparse_utils import FlexibleArgumentParser
cli_env_setup()
make_arg_parser(FlexibleArgumentParser())  # what `vllm serve` spends on its parser
with open(sys.argv[1], "rb") as f:
    args = pickle.load(f)
uvloop.run(run_server(args))
"""


@dataclass
class Run:
    name: str
    eager: bool
    seconds: float  # launch -> first /v1/models answer
    phases: dict[str, float] = field(default_factory=dict)
    vllm_cache: list[str] = field(default_factory=list)


def settle(limit_s: float = 30.0) -> None:
    """Wait (up to ``limit_s``) until the machine is quiet: a start must not share the CPU with
    what the previous one (or another user of the engine lock) left running."""
    deadline = time.monotonic() + limit_s
    while psutil.cpu_percent(interval=1.0) > 15 and time.monotonic() < deadline:
        pass


def base_env(eager: bool, cache_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "VLLM_CACHE_ROOT"}
    env.update(local_env())
    env.update({**TELEMETRY_OFF, **ENGINE_LIMITS, **LOOPBACK_HOST, **LOCAL_ONLY})
    env.update(
        {
            "LMCACHE_ENABLED": "false",
            "ENFORCE_EAGER": "true" if eager else "false",
            "COMPILE_CACHE_DIR": str(cache_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def get(url: str, timeout: float, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def vllm_serve(name: str, env: dict[str, str], work: Path, logs: Path) -> Run:
    from handler.engine.args import build_args

    env = {**env, "VLLM_CACHE_ROOT": env["COMPILE_CACHE_DIR"]}
    args = build_args(load_settings(env))
    port = free_port()
    args.host, args.port = "127.0.0.1", port
    args_file = work / "serve-args.pickle"
    args_file.write_bytes(pickle.dumps(args))
    log = logs / f"{slug(name)}.log"
    url = f"http://127.0.0.1:{port}/v1/models"
    with log.open("wb") as out:
        launched = time.time()
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(args_file)],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}: {tail(log)}")
            if time.time() - launched > START_TIMEOUT_S:
                raise RuntimeError(f"{name} not ready in {START_TIMEOUT_S} s: {tail(log)}")
            try:
                if get(url, timeout=5) == 200:
                    seconds = time.time() - launched
                    break
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(POLL_S)
    finally:
        stop_group(process)
    return Run(name, env["ENFORCE_EAGER"] == "true", seconds, {}, cache_lines(log))


def worker(name: str, env: dict[str, str], work: Path, logs: Path) -> Run:
    """The local endpoint with one worker; the first /v1/models goes in as soon as it listens."""
    port = free_port()
    log = logs / f"{slug(name)}.log"
    command = [sys.executable, "-m", "local_endpoint", "--port", str(port), "--api-key", KEY]
    command += ["--workers", "1", "--no-restart"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    endpoint = LocalEndpoint(url=f"http://127.0.0.1:{port}", process=process, log=log)
    answered: list[float] = []
    headers = {"Authorization": f"Bearer {KEY}"}

    def ask() -> None:  # waits in the endpoint's queue for the worker's first job-take
        while not answered:
            try:
                if get(endpoint.openai_base + "/models", START_TIMEOUT_S, headers) == 200:
                    answered.append(time.time())
                    return
            except (OSError, urllib.error.URLError):
                time.sleep(POLL_S)

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    try:
        asking.join(START_TIMEOUT_S)
        if not answered:
            raise RuntimeError(f"{name}: no answer in {START_TIMEOUT_S} s: {tail(log)}")
        age = process_age_s(endpoint.workers()[0]["pid"])  # the worker is still running
        seconds = answered[0] - (time.time() - age)
    finally:
        stop(endpoint)
    phases = {m[1]: float(m[2]) for m in PHASE.finditer(log.read_text(errors="replace"))}
    phases["first job-take to answer"] = seconds - sum(phases.values())
    return Run(name, env["ENFORCE_EAGER"] == "true", seconds, phases, cache_lines(log))


def two_at_once(name: str, env: dict[str, str], work: Path, logs: Path) -> Run:
    """Two workers start together on one empty compile-cache folder: both must get ready and
    answer, and the endpoint must stop cleanly (exit 0, no process left). The time is the
    endpoint's launch to both workers polling for jobs."""
    ready = work / "ready-two.json"
    log = logs / f"{slug(name)}.log"
    command = [sys.executable, "-m", "local_endpoint", "--port", "0", "--api-key", KEY]
    command += ["--workers", "2", "--no-restart", "--ready-file", str(ready)]
    with log.open("wb") as out:
        launched = time.time()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    endpoint = LocalEndpoint(url="", process=process, log=log)
    try:
        while not ready.exists():
            if process.poll() is not None or time.time() - launched > START_TIMEOUT_S:
                raise RuntimeError(f"{name}: not ready: {tail(log)}")
            time.sleep(POLL_S)
        seconds = time.time() - launched
        endpoint.url = json.loads(ready.read_text())["url"]
        states = [w.get("state") for w in endpoint.workers()]
        answers = [endpoint.call("GET", "/openai/v1/models")[0] for _ in range(2)]
        if answers != [200, 200]:
            raise RuntimeError(f"{name}: answers {answers}, workers {states}: {tail(log)}")
    finally:
        stop(endpoint)  # raises unless exit 0 and nothing left
    return Run(name, False, seconds, {}, cache_lines(log))


def stop_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
    time.sleep(1.0)  # let the engine's processes leave before the next start


def cache_lines(log: Path) -> list[str]:
    return [m[1].strip() for m in VLLM_CACHE_LINES.finditer(log.read_text(errors="replace"))]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def table(runs: list[Run]) -> str:
    lines = [
        "| start | torch.compile | launch → first `/v1/models` (s) |",
        "|---|---|---|",
    ]
    for run in runs:
        compiled = "off (eager)" if run.eager else "on"
        lines.append(f"| {run.name} | {compiled} | {run.seconds:.1f} |")
    return "\n".join(lines)


def phase_table(runs: list[Run]) -> str:
    shown = [run for run in runs if run.phases]
    names: list[str] = []
    for run in shown:
        names += [name for name in run.phases if name not in names]
    lines = ["| phase | " + " | ".join(run.name for run in shown) + " |"]
    lines.append("|---|" + "---|" * len(shown))
    for name in names:
        cells = [f"{run.phases[name]:.2f}" if name in run.phases else "—" for run in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| **launch → first answer** | " + " | ".join(f"**{r.seconds:.2f}**" for r in shown) + " |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="eager vllm serve / worker pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile part")
    parser.add_argument(
        "--two-at-once",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also start two workers at once on an empty compile-cache folder",
    )
    options = parser.parse_args()

    runs: list[Run] = []
    logs = Path(tempfile.mkdtemp(prefix="bench-cold-logs-"))  # kept: each start's whole log
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        work = Path(tmp)
        eager_cache = work / "volume-eager" / "vllm-cache"
        eager_cache.parent.mkdir()
        env = base_env(True, eager_cache)
        # untimed: vLLM's first start on an empty cache root inspects the model class in a
        # subprocess (about 10 s here) and saves the result there, in modelinfos/
        settle()
        vllm_serve("warm-up", env, work, logs)
        for round_ in range(1, options.rounds + 1):
            for start in (vllm_serve, worker):
                kind = "vllm serve" if start is vllm_serve else "worker"
                settle()
                run = start(f"{kind} #{round_}", env, work, logs)
                print(f"{run.name} (eager): {run.seconds:.1f} s", flush=True)
                runs.append(run)
        if not options.no_compile:
            cache = work / "volume" / "vllm-cache"
            cache.parent.mkdir()
            env = base_env(False, cache)
            for start, name in (
                (worker, "worker, empty compile cache"),
                (worker, "worker, second start"),
                (vllm_serve, "vllm serve, same cache"),
            ):
                settle()
                run = start(name, env, work, logs)
                print(f"{run.name}: {run.seconds:.1f} s; vLLM: {run.vllm_cache}", flush=True)
                runs.append(run)
            sizes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
            print(f"compile cache folder: {sizes / 2**20:.1f} MiB", flush=True)
        if options.two_at_once:
            fresh = work / "volume-two" / "vllm-cache"
            fresh.parent.mkdir()
            settle()
            run = two_at_once(
                "2 workers at once, empty cache (both polling)", base_env(False, fresh), work, logs
            )
            print(f"{run.name}: both ready in {run.seconds:.1f} s; vLLM: {run.vllm_cache}")
            runs.append(run)

    eager = [r for r in runs if r.eager]
    serve = [r.seconds for r in eager if r.name.startswith("vllm serve")]
    mine = [r.seconds for r in eager if r.name.startswith("worker")]
    print("\n" + table(runs) + "\n")
    print(phase_table(runs) + "\n")
    if serve and mine:
        rounds = ", ".join(f"{w - s:+.2f} s" for s, w in zip(serve, mine, strict=False))
        medians = statistics.median(mine) - statistics.median(serve)
        print(f"worker - vllm serve, eager: by round {rounds}; medians {medians:+.2f} s")
    for run in runs:
        if run.vllm_cache:
            print(f"{run.name}: " + " / ".join(run.vllm_cache))
    options.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": [asdict(run) for run in runs],
    }
    (options.out / "cold_start.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {options.out / 'cold_start.json'}; each start's log in {logs}")


if __name__ == "__main__":
    stop_on_sigterm()
    main()
