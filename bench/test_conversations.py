"""bench/conversations.py's arithmetic and tables on made-up samples (the benchmark itself needs
engines: ``make bench-chat``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bench import conversations as conv
from bench.conversations import Sample


def sample(
    mode: str,
    c: int,
    turn: int,
    prompt: int,
    cached: int,
    ttft: float,
    worker: str = "w0",
    moved: bool | None = None,
    external: int | None = 0,
) -> Sample:
    local = None if external is None else cached - external
    return Sample(mode, c, turn, worker, moved, prompt, cached, ttft, 8, local, external)


SAMPLES = [
    # turn 1: conversation 0 computes the system prompt; conversation 1 finds it
    sample("off", 0, 1, 1000, 0, 900.0, "w0"),
    sample("off", 1, 1, 1000, 0, 1000.0, "w1"),
    sample("on", 0, 1, 1000, 0, 950.0, "w0"),
    sample("on", 1, 1, 1000, 768, 300.0, "w1", external=768),
    # turn 2: conversation 0 stays, conversation 1 moves
    sample("off", 0, 2, 1100, 1024, 100.0, "w0", moved=False),
    sample("off", 1, 2, 1100, 1024, 400.0, "w0", moved=True),
    sample("on", 0, 2, 1100, 1024, 120.0, "w0", moved=False),
    sample("on", 1, 2, 1100, 1024, 200.0, "w0", moved=True, external=256),
]


def summary(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "requests": 2,
        "prompt_tokens_median": 1000.0,
        "cached_share": 0.0,
        "cached_share_min": 0.0,
        "lmcache_share": 0.0,
        "ttft_p50_ms": 0.0,
        "moved": 0,
        "workers": ["w0", "w1"],
    }
    return base | fields


def test_turn_rows_sum_tokens_over_each_turn_and_pool_the_later_turns() -> None:
    assert conv.turn_rows(SAMPLES) == [
        {
            "turn": "1",
            "off": summary(ttft_p50_ms=950.0),
            "on": summary(
                cached_share=0.384, cached_share_min=0.0, lmcache_share=0.384, ttft_p50_ms=625.0
            ),
            "ttft_off_over_on": 1.52,
        },
        {
            "turn": "2",
            "off": summary(
                prompt_tokens_median=1100.0,
                cached_share=0.9309,
                cached_share_min=0.9309,
                ttft_p50_ms=250.0,
                moved=1,
                workers=["w0"],
            ),
            "on": summary(
                prompt_tokens_median=1100.0,
                cached_share=0.9309,
                cached_share_min=0.9309,
                lmcache_share=0.1164,
                ttft_p50_ms=160.0,
                moved=1,
                workers=["w0"],
            ),
            "ttft_off_over_on": 1.56,
        },
        {
            "turn": "2+",
            "off": summary(
                prompt_tokens_median=1100.0,
                cached_share=0.9309,
                cached_share_min=0.9309,
                ttft_p50_ms=250.0,
                moved=1,
                workers=["w0"],
            ),
            "on": summary(
                prompt_tokens_median=1100.0,
                cached_share=0.9309,
                cached_share_min=0.9309,
                lmcache_share=0.1164,
                ttft_p50_ms=160.0,
                moved=1,
                workers=["w0"],
            ),
            "ttft_off_over_on": 1.56,
        },
    ]


def test_a_mode_not_run_leaves_its_cells_and_the_ratio_empty() -> None:
    rows = conv.turn_rows([s for s in SAMPLES if s.mode == "on"])
    assert [(r["turn"], r["off"], r["ttft_off_over_on"]) for r in rows] == [
        ("1", None, None),
        ("2", None, None),
        ("2+", None, None),
    ]
    assert conv.targets(rows) == [
        {
            "name": "cached share, LMCache on, turns 2+ pooled",
            "value": 0.931,
            "target": ">= 0.85",
            "met": True,
        },
        {
            "name": "cached share, LMCache on, worst turn from 2",
            "value": 0.931,
            "target": ">= 0.85",
            "met": True,
        },
    ]


def test_unknown_counters_leave_the_lmcache_share_unknown() -> None:
    group = [sample("on", 0, 2, 100, 50, 10.0, external=None), sample("on", 1, 2, 100, 50, 20.0)]
    assert conv.summarise(group).lmcache_share is None
    assert conv.counters_agree(group) == (1, 1)
    wrong = sample("on", 2, 2, 100, 50, 10.0)
    assert conv.counters_agree([replace(wrong, local_hits=10)]) == (0, 1)


def test_routing_rows_split_later_turns_by_where_they_went() -> None:
    rows = conv.routing_rows(SAMPLES)
    assert [
        (r["turn"], r["off"]["ttft_p50_ms"], r["on"]["ttft_p50_ms"], r["ttft_off_over_on"])
        for r in rows
    ] == [
        ("same worker as the previous turn", 100.0, 120.0, 0.83),
        ("moved to another worker", 400.0, 200.0, 2.0),
    ]


def test_targets_take_the_pooled_turns_and_the_worst_turn() -> None:
    later = [
        sample(mode, c, turn, 1000, cached, ttft, moved=True)
        for turn, cached_on, ttft_on in ((2, 900, 100.0), (3, 800, 300.0))
        for c in (0, 1)
        for mode, cached, ttft in (("off", 500, 400.0), ("on", cached_on, ttft_on))
    ]
    first = [sample(mode, c, 1, 1000, 0, 500.0) for mode in ("off", "on") for c in (0, 1)]
    assert conv.targets(conv.turn_rows(first + later)) == [
        {
            "name": "cached share, LMCache on, turns 2+ pooled",
            "value": 0.85,
            "target": ">= 0.85",
            "met": True,
        },
        {
            "name": "cached share, LMCache on, worst turn from 2",
            "value": 0.8,
            "target": ">= 0.85",
            "met": False,
        },
        {
            "name": "TTFT p50 off / on, turns 2+ pooled",
            "value": 2.0,
            "target": ">= 2.0",
            "met": True,
        },
        {
            "name": "TTFT p50 off / on, worst turn from 2",
            "value": 1.33,
            "target": ">= 2.0",
            "met": False,
        },
    ]


def test_turn_table_is_markdown_with_both_modes() -> None:
    assert conv.turn_table(conv.turn_rows(SAMPLES)[:2]).splitlines() == [
        "| turn | requests | prompt tokens (median) | moved (off, on) | cached, off | cached, on "
        "| of which LMCache, on | lowest request, on | TTFT p50 ms, off | TTFT p50 ms, on "
        "| off / on |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| 1 | 2 | 1000 | 0, 0 | 0.0% | 38.4% | 38.4% | 0.0% | 950 | 625 | 1.52x |",
        "| 2 | 2 | 1100 | 1, 1 | 93.1% | 93.1% | 11.6% | 93.1% | 250 | 160 | 1.56x |",
    ]
    assert conv.routing_table(conv.routing_rows(SAMPLES)).splitlines()[2:] == [
        "| same worker as the previous turn | 1, 1 | 93.1% | 93.1% | 0.0% | 100 | 120 | 0.83x |",
        "| moved to another worker | 1, 1 | 93.1% | 93.1% | 23.3% | 400 | 200 | 2.00x |",
    ]


def test_ttft_fit_is_a_line_per_mode_and_the_best_ratio_a_full_cache_could_give() -> None:
    on = [sample("on", c, 2, 1000, 1000 - u, 100.0 + u) for c, u in enumerate((0, 100, 200))]
    off = [sample("off", c, 2, 1000, 1000 - u, 150.0 + 2 * u) for c, u in enumerate((0, 100, 300))]
    fit = conv.ttft_fit(on + off)
    assert fit == {
        "off": {"intercept_ms": 150.0, "ms_per_token": 2.0},
        "on": {"intercept_ms": 100.0, "ms_per_token": 1.0},
        "best_off_over_on_if_all_cached": 3.5,  # off's p50 350 ms over on's 100 ms
    }
    assert conv.fit_text(fit).splitlines() == [
        "TTFT, off: 150 ms + 2.00 ms per prompt token not from a cache (least squares over "
        "every request)",
        "TTFT, on: 100 ms + 1.00 ms per prompt token not from a cache (least squares over "
        "every request)",
        "best TTFT p50 off / on, turns 2+, if every prompt token came from a cache: 3.50x",
    ]
    assert conv.ttft_fit(on[:1]) == {}  # one point draws no line


def test_parse_metrics_sums_label_sets_and_skips_comments() -> None:
    text = "\n".join(
        [
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 5120.0',
            'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 256.0',
            "worker_engine_running_requests 0.0",
            "",
        ]
    )
    assert conv.parse_metrics(text) == {
        "vllm:prefix_cache_hits_total": 5376.0,
        "worker_engine_running_requests": 0.0,
    }


def test_job_id_is_the_chunk_id_without_vllms_prefix_and_the_workers_suffix() -> None:
    chunk = "chatcmpl-local-ff3d13dc-f6e4-4972-8a4f-14274b5648ff-a58addf5"
    assert conv.job_id(chunk) == "local-ff3d13dc-f6e4-4972-8a4f-14274b5648ff"


def test_rounds_are_seeded_permutations() -> None:
    order = conv.rounds(5, 4, seed=1)
    assert len(order) == 4
    assert all(sorted(r) == [0, 1, 2, 3, 4] for r in order)
    assert order == conv.rounds(5, 4, seed=1)
    assert order != conv.rounds(5, 4, seed=2)


def test_max_model_len_holds_the_last_turn_in_whole_steps() -> None:
    assert conv.max_model_len(1024, 6, 64) == 2048
    assert conv.max_model_len(2000, 8, 64) == 3072  # 2000 + 8 * 112 + 128 = 3024


def test_chart_writes_a_png(tmp_path: Path) -> None:
    rows = conv.turn_rows(SAMPLES)
    conv.chart(SAMPLES, rows, conv.routing_rows(SAMPLES), "made up", tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
