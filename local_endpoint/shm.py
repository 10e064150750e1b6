"""What a worker's process group holds in ``/dev/shm``, so that what a killed group left can go.

Python's multiprocessing (vLLM uses it) makes POSIX shared memory (``psm_*``) and semaphores
(``sem.mp-*``) there; its resource tracker removes them once their processes exit, but a SIGKILL
of the whole process group kills the tracker too, and they stay until the machine restarts. The
worker pool notes which entries a group's processes map or hold open (:func:`held_by`, while the
group runs and once more before it is killed); once the group is gone, :func:`remove_left`
removes those still there that were made after the group started and that no live process holds.
Nothing else in ``/dev/shm`` is touched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import psutil

SHM = Path("/dev/shm")


def held_by(pids: Iterable[int], shm: Path = SHM) -> set[str]:
    """Names of the ``shm`` entries the processes ``pids`` map or have open. Matched by inode:
    glibc's ``sem_open`` maps a temporary file that it then renames, so a semaphore's mapping
    shows a deleted name."""
    prefix = f"{shm}/"
    inodes: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            maps = Path(f"/proc/{pid}/maps").read_text()
            if prefix in maps:
                for line in maps.splitlines():
                    fields = line.split(None, 5)
                    if len(fields) == 6 and fields[5].startswith(prefix):
                        inodes.add(int(fields[4]))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                        inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    if not inodes:
        return set()
    with os.scandir(shm) as entries:
        return {entry.name for entry in entries if entry.inode() in inodes}


def remove_left(names: Iterable[str], since: float, shm: Path = SHM) -> list[str]:
    """Remove the entries ``names`` that still exist, were made at ``since`` (wall clock) or
    later, and that no live process holds; the names removed."""
    candidates = []
    for name in sorted(set(names)):
        with contextlib.suppress(OSError):
            if (shm / name).stat().st_ctime >= since - 1:
                candidates.append(name)
    if not candidates:
        return []
    in_use = held_by(psutil.pids(), shm)
    removed = []
    for name in candidates:
        if name not in in_use:
            with contextlib.suppress(FileNotFoundError):
                (shm / name).unlink()
                removed.append(name)
    return removed
