"""bench/load.py's arithmetic and bench/burst_timeline.py's matching of hops to requests, on
made-up cells and marks (the benchmarks themselves need engines: ``make bench``)."""

from __future__ import annotations

from bench import burst_timeline, load, rotated

WORKER = load.WORKER


def cell(path: str, c: int, tok_s: float, ttft: float, worker_cpu: float = 1.0) -> load.Cell:
    x = load.Cell(path, True, c, tok_s=tok_s, ttft_p50_ms=ttft)
    x.cpu_s_per_1k_tokens = {WORKER: worker_cpu}
    return x


def plan(paths: list[str]) -> load.Plan:
    return load.Plan([1, 16], 2, 256, 128, 49152, paths=paths, modes=[True], before="abc")


def test_ratios_put_the_full_path_over_every_other_path() -> None:
    cells = [
        cell("bare", 16, 200.0, 2000.0),
        cell("serve", 16, 190.0, 2010.0),
        cell("full", 16, 180.5, 2050.0, worker_cpu=2.1),
        cell("before", 16, 190.0, 2100.0, worker_cpu=2.0),
    ]
    assert load.ratio_rows(cells, plan(["bare", "serve", "full", "before"])) == [
        {
            "mode": "streamed",
            "concurrency": 16,
            "tok_s_full_over_bare": 0.902,
            "ttft_p50_full_minus_bare_ms": 50.0,
            "tok_s_full_over_serve": 0.95,
            "ttft_p50_full_minus_serve_ms": 40.0,
            "tok_s_full_over_before": 0.95,
            "ttft_p50_full_minus_before_ms": -50.0,
            "worker_cpu_full_over_before": 1.05,
        }
    ]


def test_targets_are_those_the_chosen_paths_can_check() -> None:
    cells = [
        cell("serve", 1, 20.0, 180.0),
        cell("full", 1, 19.8, 190.0, worker_cpu=2.2),
        cell("before", 1, 20.0, 200.0, worker_cpu=2.0),
        cell("serve", 16, 190.0, 2010.0),
        cell("full", 16, 180.0, 2040.0),
        cell("before", 16, 180.0, 2100.0),
    ]
    rows = load.targets(cells, plan(["serve", "full", "before"]))
    assert [(r["name"], r["value"], r["met"]) for r in rows] == [
        ("output tok/s, full / vllm serve, streamed, c=1", 0.99, True),
        ("output tok/s, full / before, streamed, c=1", 0.99, True),
        ("worker CPU-s per 1k tokens, full / before, streamed, c=1", 1.1, False),
        ("output tok/s, full / vllm serve, streamed, c=16", 0.947, False),
        ("TTFT p50, full - vllm serve, ms, c=16", 30.0, False),
        ("output tok/s, full / before, streamed, c=16", 1.0, True),
        ("worker CPU-s per 1k tokens, full / before, streamed, c=16", 1.0, True),
    ]


def test_cpu_of_other_paths_is_kept_apart() -> None:
    me = load.cpu_by_process()
    spent = load.cpu_spent(me, lambda _pid, _family: False)
    assert set(spent) <= {"client", load.IDLE}


def test_hops_of_all_processes_line_up_by_tag() -> None:
    marks = [
        {"t": 10.000, "hop": burst_timeline.CLIENT_SENT, "key": "f0-1e"},
        {"t": 10.002, "hop": "endpoint: job queued", "key": "job-a"},
        {"t": 10.002, "hop": "tag f0-1e", "key": "job-a"},
        {"t": 10.010, "hop": "vLLM: request to the engine", "key": "cmpl-job-a-0"},
        {"t": 10.011, "hop": "vLLM: request to the engine", "key": "cmpl-v0-10e-0"},
        {"t": 10.020, "hop": burst_timeline.CLIENT_SENT, "key": "v0-1e"},
        {"t": 10.021, "hop": "vLLM: request to the engine", "key": "cmpl-v0-1e-0"},
    ]
    assert dict(burst_timeline.by_request(marks)) == {
        "f0-1e": {
            burst_timeline.CLIENT_SENT: 10.000,
            "endpoint: job queued": 10.002,
            "vLLM: request to the engine": 10.010,
        },
        "v0-1e": {burst_timeline.CLIENT_SENT: 10.020, "vLLM: request to the engine": 10.021},
    }


def rounds_cell(path: str, rounds: list[float]) -> load.Cell:
    """Four requests a round at concurrency 4, TTFTs 0-30 ms apart around each round's base."""
    x = load.Cell(path, True, 4)
    for base in rounds:
        x.samples += [load.Sample(2.0, 10, base + i / 100, 0.05) for i in range(4)]
        x.ttft_p50_by_round_ms.append(round((base + 0.015) * 1000, 1))
    x.summarise(10.0)
    return x


def test_ttft_interval_comes_from_the_rounds() -> None:
    steady = [rounds_cell("serve", [1.0] * 6), rounds_cell("full", [1.02] * 6)]
    four = load.Plan([1, 4], 6, 256, 128, 49152, paths=["serve", "full"], modes=[True])
    [row] = load.ttft_interval(steady, four)
    assert (row["other"], row["difference_ms"], row["interval_95_ms"]) == (
        "serve",
        20.0,
        [20.0, 20.0],
    )

    # a round that lands 300 ms later (a burst split across prefill steps) widens it
    bursty = [rounds_cell("serve", [1.0, 1.3] * 3), rounds_cell("full", [1.02, 1.32] * 3)]
    [row] = load.ttft_interval(bursty, four)
    low, high = row["interval_95_ms"]
    assert low < -200 and high > 200
    assert "+20 ms, 95% bootstrap interval over rounds" in load.rounds_text([row])


def test_bursts_are_paired_on_against_off_round_by_round() -> None:
    requests = {
        f"{prefix}{burst}-{i}e": {
            burst_timeline.CLIENT_SENT: 100.0 * burst,
            burst_timeline.CLIENT_FIRST: 100.0 * burst + ms / 1000,
        }
        for prefix, base in (("fn", 500), ("fo", 480))
        for burst in range(3)
        for i, ms in enumerate((base + 10 * burst, base + 10 * burst + 2, base + 99))
    }
    on = {t: v for t, v in requests.items() if t.startswith("fn")}
    off = {t: v for t, v in requests.items() if t.startswith("fo")}
    assert burst_timeline.burst_ttfts(on, "fn") == [502.0, 512.0, 522.0]
    result = {
        "full path, LMCache on": {"burst_ttft_p50_ms": burst_timeline.burst_ttfts(on, "fn")},
        "full path, LMCache off": {"burst_ttft_p50_ms": burst_timeline.burst_ttfts(off, "fo")},
    }
    assert burst_timeline.paired(result, "full path") == {
        "on_minus_off_ms": 20.0,
        "per_burst": [20.0, 20.0, 20.0],
    }
    assert burst_timeline.paired(result, "vllm serve") is None


def test_each_round_starts_one_path_further_on() -> None:
    paths = ["serve", "full", "post100"]
    assert [rotated(paths, k) for k in range(4)] == [
        ["serve", "full", "post100"],
        ["full", "post100", "serve"],
        ["post100", "serve", "full"],
        ["serve", "full", "post100"],
    ]
