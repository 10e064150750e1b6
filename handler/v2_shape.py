"""Native answers in the shape RunPod's official worker (worker-vllm v2.x, in-process) gave them,
the shape RunPod's vLLM docs show, for clients that read ``output[0]["choices"][0]["tokens"]``.

In: the engine's OpenAI answer to a native chat or completion request (a response dict, or a
stream's SSE events in batches; streams must carry usage in every chunk, vLLM's
``stream_options.continuous_usage_stats``). Out:

* one-shot: ``{"choices": [{"tokens": ["<whole text>"]}, ...], "usage": {"input": N,
  "output": M}}``, one choice per ``n``;
* streamed: one such dict per batch, ``tokens`` holding the batch's text pieces in order and
  ``usage`` the counts so far (``output`` over all choices, as v2 counted). A batch with no text is
  not sent, except the stream's last when its counts are news (or nothing was sent yet).

``tokens`` carries the generated text (``content`` for chat, ``text`` for completions); reasoning
split off by a reasoning parser and tool calls are not in it (v2 had neither). Errors are left to
the caller: :func:`~handler.streaming.parse_events` raises on an error event.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from handler.streaming import parse_events


def v2_usage(usage: Any) -> dict[str, int]:
    """OpenAI usage as v2's ``{"input", "output"}``."""
    usage = usage if isinstance(usage, dict) else {}
    return {
        "input": int(usage.get("prompt_tokens") or 0),
        "output": int(usage.get("completion_tokens") or 0),
    }


def v2_response(response: dict[str, Any]) -> dict[str, Any]:
    """A one-shot chat or completion response in v2's shape."""
    choices = sorted(response.get("choices") or [], key=lambda c: int(c.get("index") or 0))
    return {
        "choices": [{"tokens": [_whole_text(c)]} for c in choices],
        "usage": v2_usage(response.get("usage")),
    }


def _whole_text(choice: dict[str, Any]) -> str:
    if "message" in choice:
        return str((choice.get("message") or {}).get("content") or "")
    return str(choice.get("text") or "")


def _piece(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


class V2Stream:
    """Frames one stream's batches of SSE events as v2 batches; ``n`` choices each."""

    def __init__(self, n: int) -> None:
        self.n = max(n, 1)
        self.usage: dict[str, int] | None = None
        self.sent: dict[str, int] | None = None
        self.any_sent = False

    def frame(self, batch: Iterable[str]) -> list[dict[str, Any]]:
        events = list(batch)
        tokens: list[list[str]] = [[] for _ in range(self.n)]
        for chunk in parse_events(events):
            if isinstance(chunk.get("usage"), dict):
                self.usage = v2_usage(chunk["usage"])
            for choice in chunk.get("choices") or []:
                self._add(tokens, int(choice.get("index") or 0), _piece(choice))
        ended = any("[DONE]" in event for event in events)
        if not any(tokens) and not (ended and (not self.any_sent or self.usage != self.sent)):
            return []
        self.any_sent, self.sent = True, self.usage
        out: dict[str, Any] = {"choices": [{"tokens": t} for t in tokens]}
        out["usage"] = self.usage or v2_usage(None)
        return [out]

    @staticmethod
    def _add(tokens: list[list[str]], index: int, piece: str) -> None:
        if not piece:
            return
        while len(tokens) <= index:
            tokens.append([])
        tokens[index].append(piece)
