"""The engine's processes: found once it is up, and stopped if vLLM's own shutdown left any."""

from __future__ import annotations

import contextlib
import logging

import psutil

log = logging.getLogger("handler.engine")


def child_processes() -> list[psutil.Process]:
    """The engine's process tree (EngineCore and its workers), recorded once it is up."""
    return list(psutil.Process().children(recursive=True))


def _alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie that has exited and only waits to be collected."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _is_resource_tracker(proc: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


_EXIT_WAIT_S = 2.0  # how long the engine's processes get to exit by themselves after shutdown


def reap(processes: list[psutil.Process], grace_s: float = 5.0) -> None:
    """Stop whatever vLLM's own shutdown left behind (e.g. the workers of a killed EngineCore).

    Python's resource tracker is left alone: it ignores SIGTERM, and exits by itself when this
    process does, after removing the shared memory the engine's processes left in /dev/shm
    (killing it leaks those segments)."""
    exiting = [p for p in processes if _alive(p) and not _is_resource_tracker(p)]
    # vLLM's shutdown asks its processes to exit; one may still be on its way out
    _gone, left = psutil.wait_procs(exiting, timeout=_EXIT_WAIT_S)
    left = [p for p in left if _alive(p)]
    names = sorted(_name(p) for p in left)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(left, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if left:
        log.warning(
            "stopped %d engine process(es) left after shutdown: %s", len(left), ", ".join(names)
        )


def _name(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.Error:
        return "?"
