"""The worker's Prometheus endpoint (``WORKER_METRICS_PORT``): vLLM's own metrics (requests,
tokens, prefix-cache and connector hits, ...) from the process-wide registry, the LMCache
server's counters (``lmcache_mp_*``, read from it at scrape time), and the worker's live gauges."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY, Gauge, start_http_server
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from handler.lmcache import LMCacheServer
from handler.protocol import Engine
from handler.settings import Settings


class CacheServerMetrics(Collector):
    """The LMCache server's own metrics, re-served; nothing when it does not answer."""

    def __init__(self, cache: LMCacheServer) -> None:
        self._cache = cache

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not call the server (its series appear once it is up)."""
        return []

    def collect(self) -> Iterable[Metric]:
        for family in text_string_to_metric_families(self._cache.metrics_text()):
            if family.name.startswith("lmcache"):
                yield family


def serve_metrics(settings: Settings, engine: Engine, cache: LMCacheServer | None = None) -> None:
    """Start the metrics server on a daemon thread; a no-op when the port is 0."""
    if not settings.metrics_port:
        return
    running = Gauge(
        "worker_engine_running_requests",
        "Requests the engine is generating for right now (read at scrape time).",
        registry=REGISTRY,
    )
    running.set_function(engine.running_requests)
    dead = Gauge("worker_engine_dead", "1 once the engine can serve no more requests.")
    dead.set_function(lambda: float(engine.dead))
    if cache is not None:
        restarts = Gauge("worker_lmcache_restarts", "Times the LMCache server was restarted.")
        restarts.set_function(lambda: float(cache.restarts))
        REGISTRY.register(CacheServerMetrics(cache))
    start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=REGISTRY)
