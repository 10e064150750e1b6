"""The worker's Prometheus endpoint (``WORKER_METRICS_PORT``): vLLM's own metrics (requests,
tokens, prefix-cache hits, ...) from the process-wide registry, plus the worker's live gauges."""

from __future__ import annotations

from handler.protocol import Engine
from handler.settings import Settings


def serve_metrics(settings: Settings, engine: Engine) -> None:
    """Start the metrics server on a daemon thread; a no-op when the port is 0."""
    if not settings.metrics_port:
        return
    from prometheus_client import REGISTRY, Gauge, start_http_server

    running = Gauge(
        "worker_engine_running_requests",
        "Requests the engine is generating for right now (read at scrape time).",
        registry=REGISTRY,
    )
    running.set_function(engine.running_requests)
    dead = Gauge("worker_engine_dead", "1 once the engine can serve no more requests.")
    dead.set_function(lambda: float(engine.dead))
    start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=REGISTRY)
