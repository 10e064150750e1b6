"""Streaming to RunPod: batching of SSE events, and framing for the two job shapes.

In production every value a handler yields is one HTTP POST to RunPod, and runpod's SDK awaits
each POST before it pulls the next value. :func:`coalesce` therefore reads the engine's events in a
task of its own and hands out batches: the first with the stream's first generated output, the
moment it comes (vLLM's chat stream opens with a role-only chunk, and a first token can decode to
"": those wait for it, for one interval at most, so that the first token is in the first POST,
not behind it), later ones merged until the next flush tick, and whatever piled up while a POST
was in flight.
Ticks are multiples of the flush interval on one clock, so all of the worker's streams flush
together, once an interval (:func:`next_tick`).
A batch never splits an event, so no SSE event and no UTF-8 character is ever cut.

Framing: :func:`sse_text` joins a batch for the OpenAI route (what an OpenAI client reads);
:func:`chunk_dicts` parses it into OpenAI chunk dicts for the native shape and merges adjacent text
deltas, so one POST carries one chunk. An ``error`` event inside a stream raises EngineError there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from handler.engine.interface import END, Failure
from handler.errors import EngineError


async def pump(source: AsyncIterator[str], deliver: Callable[[object], None]) -> None:
    """Hand every event of ``source`` to ``deliver``, then END or the Failure that ended it.

    Cancellation propagates (no END): the reader that cancelled knows.
    """
    try:
        async for item in source:
            deliver(item)
    except Exception as exc:  # handed to the reader, which raises it in the job's task
        deliver(Failure(exc))
    else:
        deliver(END)


def _take_ready(queue: asyncio.Queue[object], batch: list[object]) -> None:
    while not queue.empty() and not _is_last(batch[-1]):
        batch.append(queue.get_nowait())


def _is_last(item: object) -> bool:
    return item is END or isinstance(item, Failure)


async def _fill_until(
    queue: asyncio.Queue[object], batch: list[object], deadline: float, clock: Callable[[], float]
) -> None:
    """Add events to the batch until the deadline passes or the stream ends."""
    while True:
        _take_ready(queue, batch)
        remaining = deadline - clock()
        if _is_last(batch[-1]) or remaining <= 0:
            return
        try:
            batch.append(await asyncio.wait_for(queue.get(), remaining))
        except TimeoutError:
            return


async def _fill_until_output(
    queue: asyncio.Queue[object], batch: list[object], deadline: float, clock: Callable[[], float]
) -> None:
    """Before a stream's first output: add events until one carries output (it goes at once, and
    with it what came before it: a role-only chunk, a first token that decoded to ""), or the
    deadline passes, or the stream ends. Each stream POST is a round trip to RunPod, and one
    sent before the output would hold the first token behind it."""
    while True:
        _take_ready(queue, batch)
        last = batch[-1]
        if _is_last(last) or any(carries_output(e) for e in batch if isinstance(e, str)):
            return
        remaining = deadline - clock()
        if remaining <= 0:
            return
        try:
            batch.append(await asyncio.wait_for(queue.get(), remaining))
        except TimeoutError:
            return


class Pacer:
    """How long each stream merges its events: the flush interval, or longer when the worker's
    streams together would POST more than ``posts_per_s`` times a second (each POST costs the
    worker CPU time, which on a CPU-bound machine is the engine's)."""

    def __init__(self, interval_s: float, posts_per_s: float) -> None:
        self._base, self._rate = interval_s, posts_per_s
        self.active = 0

    def interval(self) -> float:
        if self._base <= 0 or self._rate <= 0:
            return self._base
        return max(self._base, self.active / self._rate)

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


async def coalesce(
    events: AsyncIterator[str],
    interval: float | Callable[[], float],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[list[str]]:
    """Batches of consecutive events; each batch is one yield, hence one POST to RunPod.

    Until an event with generated output has gone out, events without output (a role-only
    chunk, an empty first token) wait for the first one, for at most an interval, and the batch
    that holds it goes at once: nothing holds the first token, and it is in the stream's first
    POST. ``interval`` (seconds, or a function
    read before each batch, such as :meth:`Pacer.interval`) <= 0 gives every event its own
    batch. Closing or cancelling the reader cancels the
    task that reads ``events`` (which aborts the engine request behind it).
    """
    current = interval if callable(interval) else (lambda: interval)
    queue: asyncio.Queue[object] = asyncio.Queue()
    reader = asyncio.create_task(pump(events, queue.put_nowait))
    try:
        output_sent, last_flush = False, clock()
        while True:
            batch: list[object] = [await queue.get()]
            wait = current()
            if wait > 0 and output_sent:
                await _fill_until(queue, batch, next_tick(last_flush, wait), clock)
            elif wait > 0:
                await _fill_until_output(queue, batch, clock() + wait, clock)
            events_out = [item for item in batch if isinstance(item, str)]
            if events_out:
                yield events_out
                output_sent = output_sent or any(map(carries_output, events_out))
                last_flush = clock()
            if isinstance(batch[-1], Failure):
                raise batch[-1].exc
            if batch[-1] is END:
                return
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def next_tick(last_flush: float, interval: float) -> float:
    """When a stream that flushed at ``last_flush`` flushes next: the first multiple of
    ``interval`` on the clock at least half an interval later. Every stream of the worker flushes
    on the same ticks, so its POSTs go out together, once an interval, instead of one at a time
    all through it: the worker, and whatever receives them, wake once for all of them."""
    return math.ceil((last_flush + interval / 2) / interval - 1e-9) * interval  # (float error)


_OUTPUT_KEYS = ("content", "reasoning_content", "reasoning", "tool_calls", "text")


def carries_output(event: str) -> bool:
    """Whether an SSE event carries generated output (not only a role, or an empty string).

    Parses JSON, so it runs only until the first such event of a stream.
    """
    try:
        chunks = parse_events([event])
    except (ValueError, EngineError):
        return True  # an error event or unparsable text: send, do not hold
    for chunk in chunks:
        if str(chunk.get("type", "")).endswith(".delta") and chunk.get("delta"):
            return True  # a Responses API event: response.output_text.delta and its kind
        for choice in chunk.get("choices") or []:
            fields = {**choice, **(choice.get("delta") or {})}
            if any(fields.get(key) for key in _OUTPUT_KEYS):
                return True
    return False


def sse_text(batch: Iterable[str]) -> str:
    """OpenAI route: the batch as the SSE text an OpenAI client reads."""
    return "".join(batch)


def parse_events(batch: Iterable[str]) -> list[dict[str, Any]]:
    """SSE events as JSON objects, without the closing [DONE]; an error event raises."""
    out: list[dict[str, Any]] = []
    for event in batch:
        for line in event.splitlines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                continue
            value = json.loads(data)
            if isinstance(value, dict) and isinstance(value.get("error"), dict):
                raise engine_error(value["error"])
            out.append(value)
    return out


def split_at_error(batch: list[str]) -> tuple[list[str], EngineError | None]:
    """The events before an error event, and that error (vLLM ends a stream that fails after it
    started with one: ``data: {"error": {...}}``, or Anthropic's ``event: error``)."""
    for i, event in enumerate(batch):
        if '"error"' not in event:  # the key; inside generated text its quotes are escaped
            continue
        for line in event.splitlines():
            data = line[len("data:") :].strip() if line.startswith("data:") else ""
            if not data.startswith("{"):
                continue
            try:
                value = json.loads(data)
            except ValueError:
                continue
            if isinstance(value, dict) and isinstance(value.get("error"), dict):
                return batch[:i], engine_error(value["error"])
    return batch, None


def usage_in(batch: Iterable[str]) -> dict[str, Any] | None:
    """The ``usage`` object of the batch's last event that has one (only those are parsed)."""
    for event in reversed(list(batch)):
        if '"usage":{' in event or '"usage": {' in event:
            for line in reversed(event.splitlines()):
                data = line[len("data:") :].strip() if line.startswith("data:") else ""
                if data.startswith("{"):
                    value = json.loads(data)
                    if isinstance(value.get("usage"), dict):
                        return dict(value["usage"])
    return None


def cached_tokens(usage: dict[str, Any]) -> int:
    """``usage.prompt_tokens_details.cached_tokens`` (0 when absent)."""
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def engine_error(info: dict[str, Any]) -> EngineError:
    """An OpenAI error object from the engine as an EngineError."""
    code = info.get("code")
    return EngineError(
        str(info.get("message") or "engine error"),
        param=info.get("param") if isinstance(info.get("param"), str) else None,
        status=code if isinstance(code, int) and 400 <= code < 600 else 500,
        type=str(info.get("type") or "InternalServerError"),
    )


def chunk_dicts(batch: Iterable[str]) -> list[dict[str, Any]]:
    """Native shape: the batch's chunks, adjacent text deltas merged into one chunk."""
    merged: list[dict[str, Any]] = []
    for chunk in parse_events(batch):
        if merged and _mergeable(merged[-1], chunk):
            merged[-1] = _merge(merged[-1], chunk)
        else:
            merged.append(chunk)
    return merged


_TEXT_KEYS = ("content", "reasoning_content", "reasoning", "text")
_LIST_KEYS = ("content", "tokens", "token_logprobs", "top_logprobs", "text_offset")


def _mergeable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("id") != b.get("id") or not a.get("choices") or not b.get("choices"):
        return False
    if a.get("usage") and not b.get("usage"):
        return False
    a_index = {c.get("index"): c for c in a["choices"]}
    for choice in b["choices"]:
        prev = a_index.get(choice.get("index"))
        if prev is not None and prev.get("finish_reason") is not None:
            return False
        if (choice.get("delta") or {}).get("tool_calls") or (prev or {}).get("delta", {}).get(
            "tool_calls"
        ):
            return False
    return True


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    choices = {c.get("index"): c for c in a["choices"]}
    for choice in b["choices"]:
        index = choice.get("index")
        choices[index] = _merge_choice(choices[index], choice) if index in choices else choice
    out = {**a, "choices": [choices[i] for i in sorted(choices, key=lambda i: i or 0)]}
    if b.get("usage") is not None:
        out["usage"] = b["usage"]
    return out


def _merge_choice(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    if "delta" in a or "delta" in b:
        out["delta"] = _concat(a.get("delta") or {}, b.get("delta") or {})
    if "text" in a or "text" in b:
        out["text"] = (a.get("text") or "") + (b.get("text") or "")
    out["logprobs"] = _merge_logprobs(a.get("logprobs"), b.get("logprobs"))
    for key in ("finish_reason", "stop_reason"):
        if b.get(key) is not None:
            out[key] = b[key]
    return out


def _concat(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {**b, **a}
    for key in _TEXT_KEYS:
        if a.get(key) is not None or b.get(key) is not None:
            out[key] = (a.get(key) or "") + (b.get(key) or "")
    return out


def _merge_logprobs(a: Any, b: Any) -> Any:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return a if b is None else b
    out = dict(a)
    for key in _LIST_KEYS:
        if isinstance(a.get(key), list) and isinstance(b.get(key), list):
            out[key] = a[key] + b[key]
    return out
