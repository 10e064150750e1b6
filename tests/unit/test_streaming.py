from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from handler.engine.interface import EngineCall
from handler.errors import EngineError
from handler.streaming import (
    Pacer,
    carries_output,
    chunk_dicts,
    coalesce,
    next_tick,
    parse_events,
    sse_text,
)
from tests.fakes import TEXT, chat_events, completion_events, sse


def tok(text: str) -> str:
    return sse({"id": "c", "choices": [{"index": 0, "text": text, "finish_reason": None}]})


ROLE = sse({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})


async def gated(gate: asyncio.Queue[str | None], log: list[str]) -> AsyncIterator[str]:
    try:
        while (event := await gate.get()) is not None:
            yield event
    finally:
        log.append("closed")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def collect(source: AsyncIterator[str], interval: float) -> list[list[str]]:
    return [batch async for batch in coalesce(source, interval)]


async def test_interval_zero_sends_every_event_alone() -> None:
    async def source() -> AsyncIterator[str]:
        for e in "abcd":
            yield e

    assert await collect(source(), 0) == [["a"], ["b"], ["c"], ["d"]]


async def test_the_first_output_goes_at_once_with_what_came_before_it_then_events_merge() -> None:
    gate: asyncio.Queue[str | None] = asyncio.Queue()
    log: list[str] = []
    batches: list[list[str]] = []

    async def consume() -> None:
        async for batch in coalesce(gated(gate, log), 60.0):
            batches.append(batch)

    task = asyncio.create_task(consume())
    for event in [ROLE, tok("")]:  # no output yet, twice: held for the first output
        await gate.put(event)
        await settle()
    assert batches == []
    await gate.put(tok("The"))  # the first token: out before the next event exists
    await settle()
    assert batches == [[ROLE, tok(""), tok("The")]]
    for event in [tok(" capital"), tok(" is"), tok(" Paris")]:
        await gate.put(event)
        await settle()
    assert len(batches) == 1  # held: the interval has not passed
    await gate.put(None)
    await task
    assert batches == [
        [ROLE, tok(""), tok("The")],
        [tok(" capital"), tok(" is"), tok(" Paris")],
    ]
    assert log == ["closed"]


async def test_events_without_output_wait_for_it_one_interval_at_most() -> None:
    gate: asyncio.Queue[str | None] = asyncio.Queue()
    batches: list[list[str]] = []
    out = asyncio.Event()

    async def consume() -> None:
        async for batch in coalesce(gated(gate, []), 0.05):
            batches.append(batch)
            out.set()

    task = asyncio.create_task(consume())
    await gate.put(ROLE)  # and no token follows (a tool-call parser holding its output)
    await asyncio.wait_for(out.wait(), 30)  # goes once the 50 ms interval has passed
    assert batches == [[ROLE]]
    await gate.put(tok("The"))
    await gate.put(None)
    await task
    assert batches == [[ROLE], [tok("The")]]


async def test_a_stream_that_ends_before_any_output_is_not_held() -> None:
    async def source() -> AsyncIterator[str]:
        yield ROLE
        yield tok("")

    # the end is what lets the batch go, not the 60 s interval (which would time this out)
    assert await asyncio.wait_for(collect(source(), 60.0), 30) == [[ROLE, tok("")]]


async def test_a_held_event_goes_out_when_the_interval_passes() -> None:
    gate: asyncio.Queue[str | None] = asyncio.Queue()
    batches: list[list[str]] = []

    async def consume() -> None:
        async for batch in coalesce(gated(gate, []), 0.05):
            batches.append(batch)

    task = asyncio.create_task(consume())
    for event in [tok("a"), tok("b")]:
        await gate.put(event)
        await settle()
    assert batches == [[tok("a")]]  # b is held: the interval has not passed
    await asyncio.sleep(0.5)  # far past the 50 ms interval, with no new event
    assert batches == [[tok("a")], [tok("b")]]
    await gate.put(None)
    await task


async def test_events_that_pile_up_during_a_slow_post_are_one_batch() -> None:
    async def source() -> AsyncIterator[str]:
        for e in "abcde":
            await asyncio.sleep(0)
            yield tok(e)

    batches: list[list[str]] = []
    async for batch in coalesce(source(), 0.001):
        batches.append(batch)
        await asyncio.sleep(0.05)  # the POST to RunPod
    assert batches == [[tok("a")], [tok(e) for e in "bcde"]]


async def test_a_failing_source_delivers_what_came_then_raises() -> None:
    async def source() -> AsyncIterator[str]:
        yield "a"
        raise RuntimeError("boom")

    got: list[list[str]] = []
    with pytest.raises(RuntimeError, match="boom"):
        async for batch in coalesce(source(), 0):
            got.append(batch)
    assert got == [["a"]]


async def test_cancelling_the_reader_closes_the_source() -> None:
    gate: asyncio.Queue[str | None] = asyncio.Queue()
    log: list[str] = []

    async def consume() -> None:
        async for _ in coalesce(gated(gate, log), 0.01):
            pass

    task = asyncio.create_task(consume())
    await gate.put("a")
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["closed"]


CALL = EngineCall(
    "/v1/chat/completions",
    {"model": "m", "stream": True, "stream_options": {"include_usage": True}},
    "r1",
)


@pytest.mark.parametrize(
    ("event", "output"),
    [
        (ROLE, False),
        (tok(""), False),
        (tok("x"), True),
        ("data: [DONE]\n\n", False),
        (sse({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]}), True),
        (sse({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]}), True),
        (sse({"error": {"message": "m", "type": "t", "code": 400}}), True),
        ("data: {oops", True),
    ],
)
def test_carries_output(event: str, output: bool) -> None:
    assert carries_output(event) is output


def test_sse_text_is_the_events_joined() -> None:
    events = chat_events(CALL)
    assert sse_text(events) == "".join(events)
    assert sse_text(events).endswith("data: [DONE]\n\n")


def test_chunk_dicts_merge_text_deltas_and_keep_usage_apart() -> None:
    merged = chunk_dicts(chat_events(CALL))
    head = {
        "id": "chatcmpl-r1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
    }
    assert merged == [
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": TEXT},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
        },
        {
            **head,
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
        },
    ]


def test_chunk_dicts_merge_completion_text() -> None:
    call = EngineCall("/v1/completions", {"model": "m", "stream": True}, "r2")
    assert chunk_dicts(completion_events(call)) == [
        {
            "id": "cmpl-r2",
            "object": "text_completion",
            "created": 1700000000,
            "model": "m",
            "choices": [{"index": 0, "text": TEXT, "logprobs": None, "finish_reason": "length"}],
        }
    ]


def test_chunk_dicts_merge_logprobs_and_keep_tool_calls_apart() -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, object], lp: list[str] | None = None) -> str:
        logprobs = None if lp is None else {"content": lp}
        return sse(
            {
                **head,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}
                ],
            }
        )

    tool: dict[str, object] = {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    merged = chunk_dicts(
        [chunk({"content": "a"}, ["a"]), chunk({"content": "b"}, ["b"]), chunk(tool), chunk(tool)]
    )
    assert [c["choices"][0]["delta"] for c in merged] == [{"content": "ab"}, tool, tool]
    assert merged[0]["choices"][0]["logprobs"] == {"content": ["a", "b"]}


def test_an_error_event_raises() -> None:
    error = {"error": {"message": "bad", "type": "BadRequestError", "param": "n", "code": 400}}
    with pytest.raises(EngineError) as caught:
        parse_events([sse(error)])
    assert (caught.value.status, caught.value.type, caught.value.param) == (
        400,
        "BadRequestError",
        "n",
    )


def test_pacer_lengthens_the_interval_when_many_streams_share_the_post_budget() -> None:
    pacer = Pacer(0.05, posts_per_s=100)
    seen: list[float | tuple[int, float]] = []
    with pacer.streaming():
        seen.append(pacer.interval())  # one stream: the flush interval
        with contextlib.ExitStack() as more:
            for _ in range(15):
                more.enter_context(pacer.streaming())
            seen.append((pacer.active, pacer.interval()))  # 16 streams share 100 POSTs/s
    assert seen == [0.05, (16, 0.16)]
    assert pacer.active == 0
    assert Pacer(0, posts_per_s=100).interval() == 0  # coalescing off stays off
    unlimited = Pacer(0.05, posts_per_s=0)
    with unlimited.streaming(), unlimited.streaming():
        assert unlimited.interval() == 0.05


async def test_coalesce_reads_a_callable_interval_before_each_batch() -> None:
    gate: asyncio.Queue[str | None] = asyncio.Queue()
    intervals = iter([0.0, 60.0, 60.0, 0.0, 0.0])
    batches: list[list[str]] = []

    async def consume() -> None:
        async for batch in coalesce(gated(gate, []), lambda: next(intervals)):
            batches.append(batch)

    task = asyncio.create_task(consume())
    await gate.put(tok("The"))
    await settle()
    for event in [tok(" capital"), tok(" is")]:  # merged under the 60 s interval...
        await gate.put(event)
        await settle()
    assert batches == [[tok("The")]]
    await gate.put(None)  # ...until the stream ends
    await task
    assert batches == [[tok("The")], [tok(" capital"), tok(" is")]]


@pytest.mark.parametrize("interval", [0.05, 0.16, 0.3])
def test_streams_flush_on_shared_ticks_an_interval_apart(interval: float) -> None:
    # sixteen streams whose last flushes fell anywhere within one interval
    lasts = [100.0 + interval * (0.5 + i / 16) for i in range(16)]
    ticks = {round(next_tick(last, interval), 9) for last in lasts}
    assert len(ticks) <= 2  # at most two shared ticks, not sixteen separate moments
    for last in lasts:
        deadline = next_tick(last, interval)
        assert last + interval / 2 <= deadline < last + 1.5 * interval
        assert abs(deadline / interval - round(deadline / interval)) < 1e-6  # on the grid
        # and from then on every interval, on the grid
        assert next_tick(deadline, interval) == pytest.approx(deadline + interval)
