"""Prometheus metrics of the local endpoint, on a registry of its own (served at ``/metrics``).

Histograms are fed by the job store's transitions; queue depth and worker states are read from
the store and the worker pool at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from local_endpoint.jobstore import Job, Observer, Status

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
POST_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class _Live(Collector):
    def __init__(
        self,
        counts: Callable[[], Mapping[Status, int]],
        workers: Callable[[], Mapping[str, int]],
    ) -> None:
        self._counts = counts
        self._workers = workers

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily(
            "runpod_local_jobs", "Jobs queued or running now.", labels=["status"]
        )
        counts = self._counts()
        for status in (Status.IN_QUEUE, Status.IN_PROGRESS):
            jobs.add_metric([status.value], counts[status])
        yield jobs
        workers = GaugeMetricFamily(
            "runpod_local_workers", "Worker processes by state.", labels=["state"]
        )
        for state, count in self._workers().items():
            workers.add_metric([state], count)
        yield workers


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.finished = Counter(
            "runpod_local_jobs_finished",
            "Jobs that reached a final state.",
            ["status"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "runpod_local_job_queue_wait_seconds",
            "From submission until a worker took the job.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "runpod_local_job_time_to_first_byte_seconds",
            "From submission until the first output reached the endpoint "
            "(first stream POST, or the result of a job that streamed nothing).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stream_posts = Histogram(
            "runpod_local_job_stream_posts",
            "Stream POSTs the worker made for one job.",
            buckets=POST_BUCKETS,
            registry=self.registry,
        )
        self.execution = Histogram(
            "runpod_local_job_execution_seconds",
            "From take until the job's final state.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observer(self) -> Observer:
        return Observer(taken=self._taken, first_output=self._first_output, finished=self._finish)

    def watch(
        self,
        counts: Callable[[], Mapping[Status, int]],
        workers: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry.register(_Live(counts, workers))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _taken(self, job: Job) -> None:
        if job.started is not None:
            self.queue_wait.observe(job.started - job.created)

    def _first_output(self, job: Job) -> None:
        if job.first_output is not None:
            self.first_byte.observe(job.first_output - job.created)

    def _finish(self, job: Job) -> None:
        self.finished.labels(job.status.value).inc()
        if job.started is not None and job.finished is not None:
            self.stream_posts.observe(job.stream_posts)
            self.execution.observe(job.finished - job.started)
