"""A benchmark stopped with SIGTERM stops what it started (:func:`bench.stop_on_sigterm`): a real
Python process, signalled while inside a ``try``, runs its ``finally``, also when a second
SIGTERM comes while it does."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = """
import sys, time
from bench import stop_on_sigterm
if sys.argv[2] == "on":
    stop_on_sigterm()
try:
    print("ready", flush=True)
    time.sleep(60)
finally:
    print("unwinding", flush=True)
    sys.stdin.readline()  # stopping a child takes a while: a second signal may come meanwhile
    open(sys.argv[1], "w").write("children stopped")
"""


def signalled(tmp_path: Path, handler: str, signals: int) -> tuple[int, str | None]:
    mark = tmp_path / "mark"
    process = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(mark), handler],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stdout.readline() == "ready\n"  # inside the try
    process.send_signal(signal.SIGTERM)
    if handler == "on":
        assert process.stdout.readline() == "unwinding\n"
        for _ in range(signals - 1):
            process.send_signal(signal.SIGTERM)
        process.stdin.write("go on\n")
        process.stdin.flush()
    code = process.wait(30)
    return code, mark.read_text() if mark.exists() else None


@pytest.mark.parametrize(
    ("handler", "signals", "cleaned"),
    [("on", 1, "children stopped"), ("on", 2, "children stopped"), ("off", 1, None)],
)
def test_sigterm_runs_the_cleanup(
    tmp_path: Path, handler: str, signals: int, cleaned: str | None
) -> None:
    code, mark = signalled(tmp_path, handler, signals)
    assert mark == cleaned
    assert code != 0  # stopped, not a normal end
