"""Benchmarks of the worker against `vllm serve` and the bare engine: `make bench*` runs them as
``python -m bench.<name>``; each module says what it measures."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType
from typing import TypeVar

T = TypeVar("T")


def rotated(items: Sequence[T], start: int) -> list[T]:
    """``items`` from index ``start`` (modulo their number) round to the one before it: round
    ``start`` of an interleaved benchmark begins one path further on, so that no path always
    runs right after the same other one."""
    k = start % len(items)
    return [*items[k:], *items[:k]]


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the unwind short
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """A benchmark stopped with SIGTERM (``kill``, a job's time limit) unwinds as on Ctrl-C, so
    the endpoints, workers, servers and Redis it started are stopped by the code that started
    them; without this, Python dies at once and leaves them all running."""
    signal.signal(signal.SIGTERM, _interrupt)
