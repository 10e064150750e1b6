"""Options of the local endpoint (``python -m local_endpoint --help``); the workers it starts take
their own settings from the environment, as on RunPod."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from handler.errors import from_validation_error


class Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on; 0 picks a free one.")
    endpoint_id: str = Field(
        "local", pattern=r"^[A-Za-z0-9_-]+$", description="The endpoint id in /v2/{id}/..."
    )
    workers: int = Field(1, ge=0, le=16, description="Worker processes sharing the queue.")
    api_key: str | None = Field(
        None,
        min_length=1,
        description="Require `Authorization: Bearer KEY` from clients (401 otherwise).",
    )
    stream_post_delay_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="Added delay per stream POST from a worker, to model RunPod's round trip.",
    )
    take_timeout_s: float = Field(
        30.0, gt=0, description="How long a worker's job-take and stop long-polls are held."
    )
    grace_s: float = Field(
        60.0, gt=0, description="On shutdown, how long workers get to finish in-flight jobs."
    )
    execution_timeout_s: float = Field(
        600.0,
        ge=5,
        le=7 * 24 * 3600,
        description="A job running longer is TIMED_OUT and stopped (RunPod's endpoint setting; "
        "a job's policy.executionTimeout overrides it).",
    )
    job_ttl_s: float = Field(
        24 * 3600.0,
        ge=10,
        le=7 * 24 * 3600,
        description="A job not ended this long after submission is TIMED_OUT (RunPod's "
        "endpoint setting; a job's policy.ttl overrides it).",
    )
    restart: bool = Field(True, description="Start a worker again after it exits.")
    worker_module: str = Field(
        "handler",
        pattern=r"^[A-Za-z_][\w.]*$",
        description="Python module each worker runs with `python -m` (tests use a fake engine).",
    )
    ready_file: Path | None = Field(
        None, description="Write {'url': ...} as JSON here once every worker is ready."
    )


def parse_options(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m local_endpoint",
        description="A local stand-in for RunPod serverless (public API, OpenAI route, worker "
        "webhooks) with real workers behind it, all on loopback.",
    )
    for name, field in Options.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "restart":
            parser.add_argument(
                "--no-restart", dest=name, action="store_false", help="Do not restart workers."
            )
            continue
        parser.add_argument(flag, dest=name, help=f"{field.description} (default: {field.default})")
    parsed = vars(parser.parse_args(list(argv)))
    given = {key: value for key, value in parsed.items() if value is not None}
    try:
        return Options.model_validate(given)
    except ValidationError as exc:
        parser.error(from_validation_error(exc).message)
