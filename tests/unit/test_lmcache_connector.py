"""The lookup wait of the worker's LMCache connector (the pure part; the engine runs it in the
integration tests and ``make bench-burst``)."""

from __future__ import annotations

import pytest

from handler.engine.lmcache_connector import Found, answer_within, can_hit


class Answers:
    """A lookup that is known after ``unknown`` asks, on a clock that sleeps advance."""

    def __init__(self, unknown: int, tokens: int = 0) -> None:
        self.unknown, self.tokens, self.asks, self.now = unknown, tokens, 0, 100.0

    def ask(self) -> Found:
        self.asks += 1
        return (None, True) if self.asks <= self.unknown else (self.tokens, self.tokens > 0)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_an_answer_known_at_once_is_not_waited_for() -> None:
    answers = Answers(unknown=0, tokens=512)
    assert answer_within(answers.ask, 0.02, answers.clock, answers.sleep) == ((512, True), 0.0)
    assert answers.asks == 1


def test_an_answer_on_its_way_is_waited_for_in_the_same_pass() -> None:
    answers = Answers(unknown=2)  # LMCache's: the acknowledgement, then the prefetch status
    found, waited = answer_within(answers.ask, 0.02, answers.clock, answers.sleep)
    assert found == (0, False)  # a miss, answered now rather than two scheduler passes later
    assert answers.asks == 3
    assert waited == pytest.approx(0.0004)


def test_a_slow_server_gets_lmcaches_own_answer_after_the_budget() -> None:
    answers = Answers(unknown=10**6)
    found, waited = answer_within(answers.ask, 0.02, answers.clock, answers.sleep)
    assert found == (None, True)  # not known yet: vLLM asks again next pass
    assert 0.02 <= waited < 0.0203


def test_no_budget_left_asks_once() -> None:
    answers = Answers(unknown=1)
    assert answer_within(answers.ask, 0.0, answers.clock, answers.sleep) == ((None, True), 0.0)
    assert answers.asks == 1


@pytest.mark.parametrize(
    ("tokens", "reserve", "hits"),
    [
        (255, False, False),
        (256, False, True),
        (256, True, False),
        (257, True, True),
        (0, False, False),
    ],
)
def test_a_prompt_shorter_than_one_chunk_cannot_hit(tokens: int, reserve: bool, hits: bool) -> None:
    assert can_hit(tokens, 256, reserve) is hits
