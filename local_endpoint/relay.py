"""Pure helpers that shape job records into RunPod's and OpenAI's HTTP answers."""

from __future__ import annotations

import json
from typing import Any

from handler.errors import WorkerError, error_body, sanitize
from local_endpoint.jobstore import Job, Status


def ms(seconds: float) -> int:
    return round(seconds * 1000)


def status_body(job: Job) -> dict[str, Any]:
    """RunPod's /status answer."""
    body: dict[str, Any] = {"id": job.id, "status": job.status.value}
    if job.started is not None:
        body["delayTime"] = ms(job.started - job.created)
        if job.finished is not None:
            body["executionTime"] = ms(job.finished - job.started)
    if job.worker_id is not None:
        body["workerId"] = job.worker_id
    if job.status is Status.COMPLETED:
        body["output"] = job.output
    if job.error is not None:
        body["error"] = job.error
    return body


def openai_job_input(route: str, body: Any) -> dict[str, Any]:
    """The job RunPod's OpenAI route makes of a request (a GET carries no ``openai_input``)."""
    job_input: dict[str, Any] = {"openai_route": route}
    if body is not None:
        job_input["openai_input"] = body
    return job_input


def wants_stream(body: Any) -> bool:
    return isinstance(body, dict) and body.get("stream") is True


def one_shot_output(output: Any) -> Any:
    """A generator handler's aggregated output is the list of its yields; a one-shot OpenAI
    answer is its single yield."""
    if isinstance(output, list) and len(output) == 1:
        return output[0]
    return output


def job_failure(job: Job) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error body for a job that did not complete.

    The worker fails a job with the OpenAI error object as JSON text; its ``code`` is the HTTP
    status. Anything else (a crash report from the SDK) becomes a 500 with its first line.
    """
    if job.status is Status.CANCELLED:
        return 409, error_body(
            WorkerError("The job was cancelled.", status=409, type="CancelledError")
        )
    text = job.error or "The job failed without an error message."
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        code = parsed["error"].get("code")
        status = code if isinstance(code, int) and 400 <= code <= 599 else 500
        return status, parsed
    return 500, error_body(WorkerError(f"The worker failed the job: {sanitize(text)}"))


def sse_chunk(chunk: Any) -> str:
    """A streamed chunk as SSE text: the worker yields SSE text already; anything else is framed."""
    if isinstance(chunk, str):
        return chunk
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def sse_failure(job: Job) -> str:
    """How a stream that already started ends when its job fails: an error event, then [DONE]."""
    _, body = job_failure(job)
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\ndata: [DONE]\n\n"
