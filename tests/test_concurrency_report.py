"""``q8chat bench --concurrency``'s figures: a round's streams summarized (the aggregate rate counted while every
stream decodes), and the report over several rounds: ratios taken within each round (the machine's speed drifts
between rounds), their median and range; the figures themselves as medians."""

from bench import llamaserver
from bench.concurrency import summarize
from bench.concurrency_report import markdown, over_rounds
from bench.served import StreamTiming


def row(rate: float, itl_ms: float) -> dict:
    return {
        "streams": 1,
        "completion_tokens": [8],
        "aggregate_decode_tok_s": float(rate),
        "itl_p50_ms": float(itl_ms),
        "itl_p95_ms": 2.0 * itl_ms,
        "ttft_mean_s": 0.2,
        "ttft_max_s": 0.3,
    }


# the second round ran in a fast spell: every figure higher, the ratios within it no better
ROUNDS = [
    {"q8chat-served": {1: row(100, 10), 4: row(300, 13)}, llamaserver.NAME: {1: row(50, 20), 4: row(75, 50)}},
    {"q8chat-served": {1: row(150, 7), 4: row(420, 9.5)}, llamaserver.NAME: {1: row(60, 17), 4: row(80, 48)}},
    {"q8chat-served": {1: row(120, 8), 4: row(372, 10)}, llamaserver.NAME: {1: row(55, 18), 4: row(70, 52)}},
]


def test_ratios_are_paired_within_each_round_and_figures_are_medians():
    four = over_rounds(ROUNDS)["q8chat-served"][4]
    assert four["aggregate_decode_tok_s"] == 372 and four["itl_p50_ms"] == 10
    # 300/100, 420/150, 372/120; the medians' ratio would be 372/120 = 3.1
    assert four["vs_one_stream"] == {"median": 3.0, "min": 2.8, "max": 3.1}
    assert four["vs_rival"] == {"median": 5.25, "min": 4.0, "max": 5.314}  # 300/75, 420/80, 372/70
    assert four["itl_p50_vs_one_stream"] == 1.3  # 1.3, 1.357, 1.25
    assert four["completion_tokens"] == [[8], [8], [8]]
    assert over_rounds(ROUNDS)[llamaserver.NAME][4]["vs_rival"] is None  # llama.cpp is the rival, it has none


def test_a_round_without_a_rate_is_left_out_of_the_ratios():
    stalled = [
        {"q8chat-served": {1: row(0.0, 10), 4: row(300, 13)}},
        {"q8chat-served": {1: row(100, 8), 4: row(250, 9)}},
    ]
    assert over_rounds(stalled)["q8chat-served"][4]["vs_one_stream"] == {"median": 2.5, "min": 2.5, "max": 2.5}
    assert over_rounds(stalled[:1])["q8chat-served"][4]["vs_one_stream"]["median"] is None


def test_the_markdown_table_gives_each_ratio_with_its_range():
    report = {
        "machine": {"model_name": "AMD EPYC", "flags": ["avx2", "avx512_vnni"], "threads": 2},
        "workload": {"kv_cache_dtype": "int8 (serve's default)", "rounds": 3},
        "concurrency": over_rounds(ROUNDS),
    }
    table = markdown(report)
    assert "int8 (serve's default); medians of 3 rounds" in table
    assert "| q8chat-served | 4 | 372.0 | 3.00x (2.80–3.10) | 5.25x (4.00–5.31) | 10.0 / 20.0 | 1.30x | 0.2 |" in table
    assert f"| {llamaserver.NAME} | 1 | 55.0 | 1.00x | - |" in table


def stream(start: float, times: list[float]) -> StreamTiming:
    return StreamTiming(start, times, len(times), "", 10, 0)


def test_the_aggregate_rate_counts_tokens_while_every_stream_decodes():
    """Two streams: one decodes from 1.0 s, the other waits for its prompt until 2.0 s and then outlasts it. Only
    the tokens after 2.0 s (the last first token) and up to 3.0 s (the first last token) count; the gaps and
    first-token times are every stream's."""
    early = stream(0.0, [1.0, 1.5, 2.0, 2.5, 3.0])
    late = stream(0.0, [2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5])
    summary = summarize([early, late])
    assert summary["aggregate_decode_tok_s"] == 6.0  # 2.5 and 3.0 of one, 2.25 to 3.0 of the other: 6 in 1 s
    assert summary["itl_p50_ms"] == 250.0 and summary["itl_p95_ms"] == 500.0
    assert summary["ttft_mean_s"] == 1.5 and summary["ttft_max_s"] == 2.0
    assert summary["completion_tokens"] == [5, 7]
    apart = summarize([stream(0.0, [1.0, 1.5]), stream(0.0, [2.0, 2.5])])
    assert apart["aggregate_decode_tok_s"] == 0.0  # never decoding together: no rate, not a division by zero
