"""A job input parsed as the handler parses it, for tests that turn one job into one engine call
(``to_engine_call``): a batch has no single call, so it is refused here."""

from __future__ import annotations

from typing import Any

from handler.protocol import NativeBatch, NativeJob, NativeRoute, OpenAIRouteJob, parse_job


def parse_single(job_input: Any) -> OpenAIRouteJob | NativeJob | NativeRoute:
    """``parse_job`` for an input that is not a batch."""
    job = parse_job(job_input)
    assert not isinstance(job, NativeBatch), "a batch has no single engine call"
    return job
