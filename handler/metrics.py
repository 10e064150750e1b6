"""The worker's Prometheus endpoint (``WORKER_METRICS_PORT``): vLLM's own metrics (requests,
tokens, prefix-cache and connector hits, ...) from the process-wide registry, the LMCache
server's counters (``lmcache_mp_*``, read from it at scrape time), and the worker's live gauges.

Every ``model_name`` label names the model as clients do (the served name): LMCache labels its
series with the model's local folder, which is no name a client knows (and a path on the host)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from handler.engine.interface import Engine
from handler.lmcache import LMCacheServer
from handler.settings import Settings

log = logging.getLogger("handler.metrics")


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


class ServedNames(Collector):
    """Everything ``source`` serves, with each ``model_name`` label in ``names`` replaced."""

    def __init__(self, source: CollectorRegistry, names: Mapping[str, str]) -> None:
        self._source = source
        self._names = dict(names)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        for family in self._source.collect():
            family.samples = [
                sample._replace(labels=self._relabel(sample.labels)) for sample in family.samples
            ]
            yield family

    def _relabel(self, labels: dict[str, str]) -> dict[str, str]:
        name = labels.get("model_name")
        if name is None or name not in self._names:
            return labels
        return {**labels, "model_name": self._names[name]}


def served_registry(settings: Settings, source: CollectorRegistry = REGISTRY) -> CollectorRegistry:
    """What the metrics server serves: ``source`` with the model's folder shown as its served
    name."""
    registry = CollectorRegistry(auto_describe=False)
    names = {settings.model: settings.model_id} if settings.model != settings.model_id else {}
    registry.register(ServedNames(source, names))
    return registry


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
    try:
        start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=served_registry(settings)
        )
    except OSError as exc:  # metrics are for watching the worker: never a reason to stop it
        log.warning(
            "metrics: cannot serve on %s:%d (%s); the worker runs without them",
            settings.metrics_host,
            settings.metrics_port,
            exc.strerror or type(exc).__name__,
        )
