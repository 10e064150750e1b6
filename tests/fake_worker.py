"""A worker process like ``python -m handler``, but with the fake engine: runpod's real production
loop (webhooks, JobScaler, per-job stop; on an engine loop thread, as in the real worker) around
the real handler, with no vLLM. The local
endpoint runs it with ``--worker-module tests.fake_worker``.

``FAKE_ENGINE_PAUSE`` (seconds before each streamed event, and a one-shot answer's time in the
engine) makes requests last long enough to cancel; ``WORKER_METRICS_PORT`` serves the fake
engine's running-request gauge, as the real worker does. As in the real worker, an engine that
dies makes the worker stop taking jobs and exit 1 (:class:`handler.worker.EngineWatch`): a
request whose last message is :data:`DIE` is answered, then the engine dies a moment later, the
way a crashed engine core is noticed; a request whose last message is :data:`DIES_IN` followed by
this worker's id (``RUNPOD_POD_ID``) finds the engine dead (the job fails with a 503), in that
worker only, so the same job retried on its replacement completes. ``FAKE_WORKER_SHM=1`` makes
the worker hold POSIX shared memory and a semaphore the way multiprocessing does for vLLM, and
start a child that maps a segment of its own and outlives the worker if it is killed, as the
LMCache server does (:data:`CACHE_SERVER`); the worker's own /dev/shm names are printed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import threading
from multiprocessing import shared_memory
from typing import Any

from handler import job_loop
from handler.cold_start import RUNPOD_LOG_DEFAULTS, configure_logging
from handler.engine.interface import EngineCall, EngineReply
from handler.jobs import make_handler
from handler.metrics import serve_metrics
from handler.settings import apply_process_environment, load_settings
from handler.worker import EngineWatch, runpod_config, sigterm_self
from tests.fakes import FakeEngine

DIE = "__engine_dies_after_this__"
DIES_IN = "__engine_dies_in_worker__ "
DEATH_DELAY_S = 0.05


class MortalEngine(FakeEngine):
    async def serve(self, call: EngineCall) -> EngineReply:
        messages = (call.body or {}).get("messages") or [{}]
        last = messages[-1].get("content") if isinstance(messages, list) else None
        if last == DIES_IN + os.environ.get("RUNPOD_POD_ID", ""):
            self.is_dead = True
        reply = await super().serve(call)
        if last == DIE:
            asyncio.get_running_loop().call_later(DEATH_DELAY_S, setattr, self, "is_dead", True)
        return reply


# A program of its own, not a multiprocessing child: no resource tracker removes its segment
CACHE_SERVER = """
import mmap, os, secrets, signal, sys, time
name = "fake_cache_pool_" + secrets.token_hex(4)
fd = os.open("/dev/shm/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
os.ftruncate(fd, 64 << 20)
pool = mmap.mmap(fd, 64 << 20)
pool.write(b"kv" * (32 << 20))  # touched, as a RAM tier in use is
heap = bytearray(b"h") * (384 << 20)  # a server's own memory: it takes a while to exit
signal.signal(signal.SIGTERM, lambda *_: (os.unlink("/dev/shm/" + name), sys.exit(0)))
print(name, flush=True)
while True:
    time.sleep(60)
"""


def hold_shared_memory() -> list[Any]:
    """A shared-memory segment and a semaphore, as vLLM's processes make them (spawn context:
    the semaphore's name stays in /dev/shm, both registered with the resource tracker)."""
    segment = shared_memory.SharedMemory(create=True, size=1 << 16)
    lock = multiprocessing.get_context("spawn").Lock()
    semaphore = "sem." + str(lock._semlock.name).lstrip("/")  # type: ignore[attr-defined]
    print(f"fake worker shared memory: {segment.name} {semaphore}", flush=True)
    server = subprocess.Popen(
        [sys.executable, "-c", CACHE_SERVER], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    server.stdout.readline()  # its segment is made: as the LMCache server's, before the engine
    return [segment, lock, server]


def main() -> None:
    apply_process_environment(RUNPOD_LOG_DEFAULTS)
    settings = load_settings({**os.environ, "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "fake-model"})
    configure_logging(settings)
    held = hold_shared_memory() if os.environ.get("FAKE_WORKER_SHM") == "1" else []
    engine = MortalEngine(pause=float(os.environ.get("FAKE_ENGINE_PAUSE", "0")))
    watch = EngineWatch(settings.engine_dead_grace_s, sigterm_self)
    serve_metrics(settings, engine)
    # as in the real worker: runpod's job loop runs on the engine's loop, in a thread of its own
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-engine-loop", daemon=True)
    thread.start()
    try:
        job_loop.start(
            runpod_config(settings, make_handler(engine, settings, watch.trigger)),
            settings.shutdown_grace_s,
            loop,
        )
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
    for part in held:
        if isinstance(part, subprocess.Popen):
            part.terminate()
            part.wait(10)
    del held
    if watch.triggered:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
