"""Where vLLM keeps its compile cache: on RunPod's network volume when one is mounted and
writable, so the second and later workers of an endpoint load what the first one compiled.

In: ``COMPILE_CACHE_DIR`` (default ``/runpod-volume/vllm-cache``, the folder RunPod's official
vLLM worker uses; blank turns it off) and ``VLLM_CACHE_ROOT``, both from the settings, and the
file system. Out: a :class:`CacheFolder`: the ``VLLM_CACHE_ROOT`` the entry point puts in the
process environment before vLLM is imported (or none: vLLM's own folder, in the container), and
one line for the log that says which and why. Raises nothing.

Why ``VLLM_CACHE_ROOT`` and not ``compilation_config.cache_dir``: vLLM 0.32 keeps every
compiled artifact under ``VLLM_CACHE_ROOT/torch_compile_cache/``, in folders named by a hash of
what the compiled code depends on (vLLM's version and config: model, dtype, parallelism,
compilation flags; torch's version and Inductor config; the traced source files; the GPU's name
and CUDA version), so one folder serves any mix of models, versions and GPUs. An explicit
``cache_dir`` drops that hash, and the ahead-of-time artifacts (``torch_aot_compile/``) ignore it.

The folder is used when its parent exists (the volume is mounted: ``/runpod-volume`` is absent
without a network volume) and a file can be written, synced and removed in it; otherwise the
compile cache stays in the container, and the reason is logged. An explicit ``VLLM_CACHE_ROOT``
wins over ``COMPILE_CACHE_DIR``.

Several workers starting at once on the same folder: creating it tolerates a concurrent create,
each start's write probe has a name of its own, and vLLM 0.32 with torch 2.13 writes each
compiled artifact to a temporary file and renames it into place (the ahead-of-time model,
Inductor's artifacts in ``binary`` format, vLLM's model-info cache), so a reader sees a whole
artifact or none; workers that start before the first has saved compile too, and the last rename
wins. ``VLLM_COMPILE_CACHE_SAVE_FORMAT=binary`` (vLLM's default) is pinned because the
``unpacked`` format writes folders that concurrent writers clobber (vllm-project/vllm#24601). One
file is rewritten in place: the small index of vLLM's piecewise backend
(``vllm_compile_cache.py``, GPU builds), read only by a start that finds no ahead-of-time
artifact yet; a start that read it half-written would fail, and RunPod would start the worker
again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Below this much free space the volume is not used: vLLM does not handle most failed
# compile-cache writes, so a full volume would fail the start.
MIN_FREE_BYTES = 1 << 30
# Applied with setdefault: the only format whose artifacts are renamed into place.
SAFE_FORMAT: dict[str, str] = {"VLLM_COMPILE_CACHE_SAVE_FORMAT": "binary"}
_PROBE_BYTES = 64 * 1024


@dataclass(frozen=True)
class CacheFolder:
    """The compile-cache decision: ``root`` for ``VLLM_CACHE_ROOT`` (None: leave vLLM's own)."""

    root: str | None
    shared: bool
    reason: str  # one line for the log
    problem: bool = False  # a volume is there but cannot take the cache: worth a warning
    environment: dict[str, str] = field(default_factory=dict)  # for the process environment


def choose(
    configured: str | None,
    vllm_cache_root: str | None = None,
    min_free_bytes: int = MIN_FREE_BYTES,
) -> CacheFolder:
    """The folder for vLLM's compile cache, from ``COMPILE_CACHE_DIR`` (``configured``; None or
    blank: off) and an explicit ``VLLM_CACHE_ROOT``."""
    if vllm_cache_root:
        return CacheFolder(
            None, False, f"VLLM_CACHE_ROOT={vllm_cache_root} is set: vLLM's cache stays there"
        )
    if configured is None or not configured.strip():
        return _local("COMPILE_CACHE_DIR is blank")
    folder = Path(configured.strip())
    if not folder.parent.is_dir():
        return _local(f"{folder.parent} is not mounted")
    problem = _unusable(folder, min_free_bytes)
    if problem:
        return _local(f"{folder} is {problem}", problem=True)
    return CacheFolder(
        str(folder),
        True,
        f"vLLM's compile cache in {folder}, shared with the endpoint's other workers",
        environment={"VLLM_CACHE_ROOT": str(folder), **SAFE_FORMAT},
    )


def _local(why: str, problem: bool = False) -> CacheFolder:
    where = "vLLM's compile cache stays in the container (compiled at each start)"
    return CacheFolder(None, False, f"{why}: {where}", problem)


def _unusable(folder: Path, min_free_bytes: int) -> str | None:
    """Why the folder cannot take the cache (not writable, nearly full), or None."""
    try:
        folder.mkdir(exist_ok=True)  # another worker creating it at the same moment is fine
        # an empty file fits on a full volume or under an exhausted quota; a synced block does not
        descriptor, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        try:
            os.write(descriptor, b"\0" * _PROBE_BYTES)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
            os.unlink(probe)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return f"not writable ({exc.strerror or type(exc).__name__})"
    if free < min_free_bytes:
        return f"nearly full ({free >> 20} MiB free)"
    return None
