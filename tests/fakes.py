"""A fake engine behind the handler's Engine interface: scripted answers shaped like vLLM's.

It records every call, streams SSE events the way vLLM's OpenAI layer does (a role-only chunk,
one chunk per token, a finish chunk, a usage chunk when asked, then [DONE]), and notes when a
stream was closed before its end (the real engine aborts the request then).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from handler.engine.interface import EngineCall, EngineReply, ModelInfo
from handler.errors import EngineDead, EngineError

TOKENS = ["The", " capital", " of", " France", " is", " Paris", "."]
TEXT = "".join(TOKENS)
CREATED = 1700000000


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def usage(prompt: int = 12, completion: int = len(TOKENS)) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _stream(
    call: EngineCall, prefix: str, obj: str, choices: list[dict[str, Any]], generated: int
) -> list[str]:
    """vLLM's SSE framing: one chunk per choice, a usage chunk when asked, then [DONE]."""
    assert call.body is not None  # a streamed request is a POST with a body
    head = {
        "id": f"{prefix}-{call.request_id}",
        "object": obj,
        "created": CREATED,
        "model": call.body["model"],
    }
    events = [sse({**head, "choices": [{"index": 0, "logprobs": None, **c}]}) for c in choices]
    options = call.body.get("stream_options") or {}
    if options.get("continuous_usage_stats"):  # vLLM: usage so far in every chunk
        so_far = [sum(1 for c in choices[: i + 1] if _generated(c)) for i in range(len(choices))]
        events = [
            sse(
                {
                    **head,
                    "choices": [{"index": 0, "logprobs": None, **c}],
                    "usage": usage(completion=k),
                }
            )
            for c, k in zip(choices, so_far, strict=True)
        ]
    if options.get("include_usage"):
        events.append(sse({**head, "choices": [], "usage": usage(completion=generated)}))
    return [*events, "data: [DONE]\n\n"]


def _generated(choice: dict[str, Any]) -> bool:
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


def _finish(i: int, tokens: list[str], reason: str) -> str | None:
    return reason if i == len(tokens) - 1 else None


def chat_events(call: EngineCall, tokens: list[str] = TOKENS) -> list[str]:
    role = {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    deltas = [
        {"delta": {"content": t}, "finish_reason": _finish(i, tokens, "stop")}
        for i, t in enumerate(tokens)
    ]
    return _stream(call, "chatcmpl", "chat.completion.chunk", [role, *deltas], len(tokens))


def completion_events(call: EngineCall, tokens: list[str] = TOKENS) -> list[str]:
    texts = [
        {"text": t, "finish_reason": _finish(i, tokens, "length")} for i, t in enumerate(tokens)
    ]
    return _stream(call, "cmpl", "text_completion", texts, len(tokens))


def chat_response(call: EngineCall) -> dict[str, Any]:
    assert call.body is not None  # a chat request is a POST with a body
    return {
        "id": f"chatcmpl-{call.request_id}",
        "object": "chat.completion",
        "created": CREATED,
        "model": call.body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": TEXT},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage(),
    }


MODELS = {
    "object": "list",
    "data": [
        {
            "id": "fake-model",
            "object": "model",
            "created": CREATED,
            "owned_by": "vllm",
            "root": "fake-model",
            "parent": None,
            "max_model_len": 2048,
        }
    ],
}


INFO = ModelInfo(context_length=2048, dtype="bfloat16")
ENGINE_CORE_ERROR = {
    "message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
    "type": "InternalServerError",
    "param": None,
    "code": 500,
}


class FakeEngine:
    """Answers like vLLM for the model 'fake-model'; records calls and early-closed streams."""

    model_info = INFO
    loop = None  # served from any loop

    def __init__(
        self,
        *,
        fail_after: int | None = None,
        pause: float = 0.0,
        error_event_after: int | None = None,
        dies_mid_stream: bool = False,
    ) -> None:
        self.calls: list[EngineCall] = []
        self.closed_early: list[str] = []
        self.fail_after = fail_after
        # vLLM ends a stream that fails after it started with an error event (a 500 when its
        # engine core died)
        self.error_event_after = error_event_after
        self.dies_mid_stream = dies_mid_stream
        self.pause = pause
        self.is_dead = False
        self.active = 0
        self.peak = 0  # most requests in flight at once
        self.shut = False

    @property
    def dead(self) -> bool:
        return self.is_dead

    def running_requests(self) -> int:
        return self.active

    def shutdown(self) -> None:
        self.shut = True

    async def serve(self, call: EngineCall) -> EngineReply:
        self.calls.append(call)
        if self.is_dead:
            raise EngineDead()
        if call.route == "/v1/models":
            return MODELS
        assert call.body is not None  # every other route the fake serves is a POST with a body
        if call.body.get("model") != "fake-model":
            raise EngineError(
                f"The model `{call.body.get('model')}` does not exist.",
                status=404,
                type="NotFoundError",
                param="model",
            )
        if not call.stream:
            await self._hold()
            return chat_response(call)
        maker = chat_events if call.route == "/v1/chat/completions" else completion_events
        return self._stream(call, maker(call))

    async def _hold(self) -> None:
        """A one-shot request's time in the engine."""
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.pause)
        finally:
            self.active -= 1

    async def _stream(self, call: EngineCall, events: list[str]) -> AsyncIterator[str]:
        self.active += 1
        finished = False
        try:
            for i, event in enumerate(events):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("engine exploded at /opt/vllm/core.py line 3")
                if self.error_event_after is not None and i == self.error_event_after:
                    self.is_dead = self.dies_mid_stream
                    yield sse({"error": ENGINE_CORE_ERROR})
                    yield "data: [DONE]\n\n"
                    break
                await asyncio.sleep(self.pause)
                yield event
            finished = True
        finally:
            self.active -= 1
            if not finished:
                self.closed_early.append(call.request_id)
