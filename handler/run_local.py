"""``python -m handler.run_local [JOB_FILE]``: run one job through the real handler and engine.

runpod's own local mode (``test_input.json`` without webhooks) never iterates a generator handler.
This runner does what the production loop does with each value (runpod's ``run_job_generator``),
prints every yield, then the answer text. Exit status 0 on success, 1 if the job failed.
Default job file: ``test_input.json``. Settings come from the environment, as for the worker.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from handler.cold_start import (
    RUNPOD_LOG_DEFAULTS,
    ColdStart,
    configure_logging,
    load_or_exit,
    locate_model,
    start_cache,
    start_engine,
    stop_all,
)
from handler.settings import LOCAL_ONLY, apply_process_environment
from handler.streaming import parse_events


def answer_text(outputs: list[Any]) -> str:
    """The generated text in a job's outputs, whatever their shape."""
    texts: list[str] = []
    for output in outputs:
        chunks = parse_events([output]) if isinstance(output, str) else [output]
        for chunk in chunks:
            for choice in chunk.get("choices") or []:
                texts.append(_choice_text(choice))
    return "".join(texts)


def _choice_text(choice: dict[str, Any]) -> str:
    for key in ("message", "delta"):
        if isinstance(choice.get(key), dict):
            return str(choice[key].get("content") or "")
    return str(choice.get("text") or "")


async def run_job(handler: Any, job: dict[str, Any]) -> tuple[list[Any], str | None]:
    """Outputs and error of one job, as runpod's production loop sees them."""
    from runpod.serverless.modules.rp_job import run_job_generator

    outputs: list[Any] = []
    async for item in run_job_generator(handler, job):
        if item.get("error"):
            return outputs, str(item["error"])
        outputs.append(item["output"])
    return outputs, None


def read_job(argv: list[str]) -> dict[str, Any]:
    """The job from ``--test_input JSON`` (runpod's flag), a file argument, or test_input.json."""
    if "--test_input" in argv and argv.index("--test_input") + 1 < len(argv):
        job = json.loads(argv[argv.index("--test_input") + 1])
    else:
        files = [a for a in argv if not a.startswith("-")]
        job = json.loads(Path(files[0] if files else "test_input.json").read_text())
    if not isinstance(job, dict):
        raise SystemExit("a test job must be a JSON object with an 'input' key")
    job.setdefault("id", "local-test")
    return job


def run_and_report(engine: Any, settings: Any, job: dict[str, Any]) -> int:
    """Run one job through the handler, print every yield and the answer; 0 if it succeeded."""
    from handler.jobs import make_handler

    started = time.perf_counter()
    outputs, error = asyncio.run(run_job(make_handler(engine, settings), job))
    elapsed = time.perf_counter() - started
    for output in outputs:
        print("yield:", json.dumps(output, ensure_ascii=False))
    if error is not None:
        print("job failed:", error)
        return 1
    print(f"job {job['id']} done in {elapsed:.2f} s, {len(outputs)} yield(s)")
    print("answer:", answer_text(outputs))
    return 0


def main(argv: list[str] | None = None) -> int:
    job = read_job(sys.argv[1:] if argv is None else argv)
    apply_process_environment({**LOCAL_ONLY, **RUNPOD_LOG_DEFAULTS})
    settings = load_or_exit()
    configure_logging(settings)

    cold = ColdStart()
    with cold.phase("model location"):
        settings = locate_model(settings)
    cache = start_cache(settings)
    engine = None
    try:
        with cold.phase("engine"):
            engine, cache = start_engine(settings, cache)
        print(cold.summary(), flush=True)
        return run_and_report(engine, settings, job)
    finally:
        stop_all(engine, cache)


if __name__ == "__main__":
    raise SystemExit(main())
