"""Temporary timestamps at each hop of a request, for ``bench/burst_timeline.py``; in no other run.

Python imports ``sitecustomize`` at start-up from the first folder on ``sys.path`` that has one:
the timeline tool puts this folder first on ``PYTHONPATH`` of the processes it starts (the local
endpoint, its worker, `vllm serve`) and sets ``BURST_TRACE_DIR``. Without that variable nothing
is patched. With it, the functions below are wrapped when their module is first imported, and
each process appends ``{"t": wall clock, "hop": name, "key": job or request id}`` lines to
``BURST_TRACE_DIR/<pid>.jsonl``. Nothing in the project imports this module.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

_DIR = os.environ.get("BURST_TRACE_DIR")
_out: Any = None


def mark(hop: str, key: Any, at: float | None = None) -> None:
    global _out
    if _out is None:
        _out = open(os.path.join(_DIR or ".", f"{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
    t = time.time() if at is None else at
    _out.write(json.dumps({"t": t, "hop": hop, "key": str(key)}) + "\n")


def _job_key(job: Any) -> Any:
    return job.get("id") if isinstance(job, dict) else getattr(job, "id", job)


# -- the local endpoint ---------------------------------------------------------------------------


def _patch_jobstore(module: Any) -> None:
    store = module.JobStore
    submit, take, add_output = store.submit, store.take, store.add_output

    def traced_submit(self: Any, job_input: Any, *args: Any, **kwargs: Any) -> Any:
        job = submit(self, job_input, *args, **kwargs)
        body = job_input.get("openai_input") if isinstance(job_input, dict) else None
        tag = body.get("user") if isinstance(body, dict) else None
        mark("endpoint: job queued", job.id)
        if tag:
            mark("tag " + str(tag), job.id)
        return job

    async def traced_take(self: Any, *args: Any, **kwargs: Any) -> Any:
        jobs = await take(self, *args, **kwargs)
        for job in jobs:
            mark(f"endpoint: job-take answered ({len(jobs)} in it)", job.id)
        return jobs

    def traced_add_output(self: Any, job: Any, output: Any) -> None:
        if job.stream_posts == 0:
            mark("endpoint: first stream POST in", job.id)
        add_output(self, job, output)

    store.submit, store.take, store.add_output = traced_submit, traced_take, traced_add_output


def _patch_app(module: Any) -> None:
    relay = module.relay

    async def traced_relay(store: Any, job: Any) -> Any:
        first = True
        async for chunk in relay(store, job):
            if first:
                mark("endpoint: first chunk to client", job.id)
                first = False
            yield chunk

    module.relay = traced_relay


# -- the worker: runpod's loop, the handler -------------------------------------------------------


def _patch_rp_scale(module: Any) -> None:
    get_job = module.get_job

    async def traced_get_job(session: Any, num_jobs: int = 1) -> Any:
        jobs = await get_job(session, num_jobs)
        for job in jobs or []:
            mark(f"worker: job-take answer read ({len(jobs)} in it)", _job_key(job))
        return jobs

    module.get_job = traced_get_job


def _patch_job_loop(module: Any) -> None:
    handle_job, post_result = module.handle_job, module.post_result
    posted: set[str] = set()
    with_output: set[str] = set()

    async def traced_handle_job(session: Any, config: Any, job: Any) -> Any:
        mark("worker: job started", _job_key(job))
        return await handle_job(session, config, job)

    async def traced_post_result(
        session: Any, job: Any, data: Any, kind: str, **kwargs: Any
    ) -> Any:
        key = _job_key(job)
        first = kind == module.STREAM and key not in posted
        if first:
            posted.add(key)
            mark("worker: first stream POST sent", key)
        output = kind == module.STREAM and key not in with_output and _carries_output(data)
        if output:
            with_output.add(key)
            mark("worker: first stream POST with output sent", key)
        delivered = await post_result(session, job, data, kind, **kwargs)
        if first:
            mark("worker: first stream POST answered", key)
        if output:
            mark("worker: first stream POST with output answered", key)
        return delivered

    module.handle_job, module.post_result = traced_handle_job, traced_post_result


def _carries_output(data: Any) -> bool:
    """Whether a stream POST's value carries generated output (the OpenAI route's SSE text)."""
    from handler.streaming import carries_output

    value = data.get("output") if isinstance(data, dict) else None
    return not isinstance(value, str) or carries_output(value)


def _patch_engine(module: Any) -> None:
    engine = module.VllmEngine
    serve = engine.serve

    async def traced_serve(self: Any, call: Any) -> Any:
        mark("worker: handler calls vLLM's app", call.request_id)
        reply = await serve(self, call)
        if isinstance(reply, dict):
            return reply
        return _first_event(reply, "worker: first SSE event from vLLM's app", call.request_id)

    engine.serve = traced_serve


def _patch_streaming(module: Any) -> None:
    coalesce = module.coalesce

    @functools.wraps(coalesce)
    async def traced_coalesce(events: Any, *args: Any, **kwargs: Any) -> Any:
        key = getattr(events, "trace_key", None)
        first = True
        async for batch in coalesce(events, *args, **kwargs):
            if first and key:
                mark("worker: first batch out of coalesce", key)
                first = False
            yield batch

    module.coalesce = traced_coalesce


class _Traced:
    """An async iterator that marks its first item; ``trace_key`` names the request."""

    def __init__(self, inner: Any, hop: str, key: str) -> None:
        self._inner, self._hop, self.trace_key = inner, hop, key
        self._first = True

    def __aiter__(self) -> _Traced:
        return self

    async def __anext__(self) -> Any:
        item = await self._inner.__anext__()
        if self._first:
            mark(self._hop, self.trace_key)
            self._first = False
        return item

    async def aclose(self) -> None:
        await self._inner.aclose()


def _first_event(reply: Any, hop: str, key: str) -> _Traced:
    return _Traced(reply, hop, key)


def _patch_jobs(module: Any) -> None:
    # handler.jobs imported coalesce by name
    streaming = sys.modules.get("handler.streaming")
    if streaming is not None:
        module.coalesce = streaming.coalesce


# -- vLLM's frontend (the worker's and `vllm serve`'s) --------------------------------------------


def _patch_async_llm(module: Any) -> None:
    llm = module.AsyncLLM
    generate = llm.generate

    async def traced_generate(
        self: Any, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any
    ) -> Any:
        mark("vLLM: request to the engine", request_id)
        first = True
        async for out in generate(self, prompt, sampling_params, request_id, *args, **kwargs):
            if first:
                mark("vLLM: first output from the engine", request_id)
                first = False
            yield out

    llm.generate = traced_generate


# -- vLLM's engine core: which step first scheduled each request -----------------------------------


def _patch_scheduler(module: Any) -> None:
    scheduler = module.Scheduler
    schedule = scheduler.schedule

    def traced_schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = schedule(self, *args, **kwargs)
        new = [r.req_id for r in output.scheduled_new_reqs]
        at = time.time()  # one time for the step and the requests it took in
        if output.total_num_scheduled_tokens:
            tokens = output.total_num_scheduled_tokens
            mark("engine core: step", f"{len(new)} new, {tokens} tokens", at)
        for req_id in new:
            mark("engine core: first step scheduled", req_id, at)
        return output

    scheduler.schedule = traced_schedule


_PATCHES: dict[str, Callable[[Any], None]] = {
    "local_endpoint.jobstore": _patch_jobstore,
    "local_endpoint.client_routes": _patch_app,
    "runpod.serverless.modules.rp_scale": _patch_rp_scale,
    "handler.job_loop": _patch_job_loop,
    "handler.engine.vllm_engine": _patch_engine,
    "handler.streaming": _patch_streaming,
    "handler.jobs": _patch_jobs,
    "vllm.v1.engine.async_llm": _patch_async_llm,
    "vllm.v1.core.sched.scheduler": _patch_scheduler,
}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, patch: Callable[[Any], None]) -> None:
        self._inner, self._patch = inner, patch

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        self._patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, patch)
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder())
    # an experiment: how long a thread may hold the GIL while another waits (Python's 5 ms)
    if os.environ.get("BURST_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["BURST_SWITCH_INTERVAL"]))
