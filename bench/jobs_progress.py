"""What runpod's in-flight job list costs per job: 32 jobs with 100 KB prompts each taken and
finished, as runpod's ``JobsProgress`` records them (the whole job, pickled to
``./.runpod_jobs.pkl`` on every add and remove) and as the worker's job loop hands them to it
(:class:`handler.job_loop.JobIds`: the id only).

    scripts/in-env python -m bench.jobs_progress [--jobs 32] [--prompt-kb 100] [--rounds 20]

Prints the median time of one add plus one remove, and the state file's size with every job in
flight. Runs in a temporary directory (runpod writes its file to the working directory).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stop_on_sigterm


def run(progress: Any, jobs: list[dict[str, Any]], rounds: int, state: Path) -> tuple[float, int]:
    """Median seconds for one job's add and remove with ``len(jobs)`` in flight, and the file's
    size when all are."""
    per_job: list[float] = []
    size = 0
    for _ in range(rounds):
        adds = []
        for job in jobs:
            started = time.perf_counter()
            progress.add(job)
            adds.append(time.perf_counter() - started)
        size = state.stat().st_size
        for job, added in zip(jobs, adds, strict=True):
            started = time.perf_counter()
            progress.remove(job)
            per_job.append(added + time.perf_counter() - started)
    return statistics.median(per_job), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--prompt-kb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    os.chdir(tempfile.mkdtemp(prefix="jobs-progress-"))  # before runpod reads the directory
    from runpod.serverless.modules.worker_state import JobsProgress

    from handler.job_loop import JobIds

    size = args.prompt_kb * 1024
    # a prompt of its own per job (pickle would store one shared string once)
    jobs = [
        {"id": f"job-{i}", "input": {"messages": [{"role": "user", "content": f"{i:<{size}}"}]}}
        for i in range(args.jobs)
    ]
    state = Path(".runpod_jobs.pkl")
    print(
        f"{args.jobs} jobs of {args.prompt_kb} KB prompts, {args.rounds} rounds; per job: "
        "add + remove"
    )
    for name, progress in (("runpod (whole job)", JobsProgress()), ("JobIds (id only)", None)):
        tracker = progress if progress is not None else JobIds(JobsProgress())
        median, size = run(tracker, jobs, args.rounds, state)
        print(
            f"{name:20s} median {median * 1000:8.3f} ms per job, file {size:>10,d} bytes "
            f"with {args.jobs} in flight"
        )


if __name__ == "__main__":
    stop_on_sigterm()
    main()
