"""What the handler needs from an inference engine (vLLM in production, a fake in the tests).

:class:`Engine` serves an :class:`EngineCall` (a route of vLLM's server, its method, its JSON body,
the request id) with an :data:`EngineReply`: a JSON-safe response dict, or the SSE events of a
streamed answer. :class:`ModelInfo` is what it knows of the served model. A stream carried between
tasks or threads ends with :data:`END`, or with a :class:`Failure` carrying what ended it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Method = Literal["GET", "POST"]

END = object()  # marks the end of a pumped stream


class Failure:
    """Carries a pumped stream's exception to its reader."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@dataclass(frozen=True)
class EngineCall:
    """One request to vLLM's server: a path of :data:`PUBLIC_ROUTES` (placeholders filled in),
    its method, its JSON body (None for a GET) and the request id vLLM is to use."""

    route: str
    body: Mapping[str, Any] | None = None
    request_id: str = ""
    method: Method = "POST"

    @property
    def stream(self) -> bool:
        return bool((self.body or {}).get("stream"))


@dataclass(frozen=True)
class ModelInfo:
    """What the engine knows of the served model, for the /v1/models listing."""

    context_length: int
    dtype: str  # weight dtype, as torch names it without the prefix: "bfloat16"
    quantization: str | None = None  # vLLM's quantization method ("fp8", "awq"), if any
    multimodal: bool = False
    tools: bool = False  # a tool-call parser is set (tool_choice "auto" works)
    reasoning: bool = False  # a reasoning parser is set
    generates: bool = True  # chat and completions work
    embeds: bool = False  # /v1/embeddings works
    scores: bool = False  # /score, /rerank and /classify work (a cross-encoder)
    loaded_at: int = 0  # when the engine loaded the model (Unix seconds): the cards' `created`
    on_cpu: bool = False  # the model runs on CPU (vLLM's CPU build), not an accelerator


# An engine answers with a JSON-safe response dict, or with SSE events ('data: {...}\n\n', ending
# with 'data: [DONE]\n\n') for a streamed request.
EngineReply = dict[str, Any] | AsyncIterator[str]


class Engine(Protocol):
    """What the handler needs from an inference engine (vLLM in production, a fake in tests)."""

    async def serve(self, call: EngineCall) -> EngineReply:
        """Run one OpenAI request; raise a WorkerError for an error answer."""
        ...

    @property
    def dead(self) -> bool:
        """True once the engine can serve no more requests."""
        ...

    @property
    def model_info(self) -> ModelInfo:
        """Facts about the served model."""
        ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the engine runs on, where the job loop should run too; None: any."""
        ...

    def running_requests(self) -> int:
        """Requests the engine is generating for right now."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and every process it started."""
        ...
