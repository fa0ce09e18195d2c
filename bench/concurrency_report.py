"""``q8chat bench --concurrency``'s report: each competitor's figures over the rounds (``concurrency.run``'s), its
ratios taken within each round, and the markdown table of them."""

from __future__ import annotations

import statistics

from bench import llamacpp, llamaserver
from bench.chats import CHAT_TURNS

# What each q8chat competitor is compared with: in process with in process, served with served.
RIVALS = {"q8chat": llamacpp.VARIANT, "q8chat-served": llamaserver.NAME}


def _ratios(rounds: list[dict[str, dict[int, dict]]], name: str, level: int, base: str, base_level: int) -> dict:
    """The median and range over the rounds of ``name``'s aggregate rate at ``level`` against ``base``'s at
    ``base_level`` in the same round; a round where ``base`` measured no rate (no stream decoded while all did)
    is left out, and with none left, all three are None."""
    pairs = [(r[name][level]["aggregate_decode_tok_s"], r[base][base_level]["aggregate_decode_tok_s"]) for r in rounds]
    ratios = [rate / against for rate, against in pairs if against]
    if not ratios:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def over_rounds(rounds: list[dict[str, dict[int, dict]]]) -> dict[str, dict[int, dict]]:
    """Each competitor's figures at each level over the rounds: medians of the rounds' figures, and its rate
    against its own single stream and against its rival's at the same level as ratios within each round
    (paired: measured minutes apart, under the same machine weather), their median and range."""
    combined: dict[str, dict[int, dict]] = {}
    for name, levels in rounds[0].items():
        one, rival = min(levels), RIVALS.get(name)
        combined[name] = {}
        for level in levels:
            rows = [r[name][level] for r in rounds]
            itl = [row["itl_p50_ms"] / r[name][one]["itl_p50_ms"] for row, r in zip(rows, rounds, strict=True)]
            combined[name][level] = {
                **{
                    key: round(statistics.median(row[key] for row in rows), 3)
                    for key in ("aggregate_decode_tok_s", "itl_p50_ms", "itl_p95_ms", "ttft_mean_s", "ttft_max_s")
                },
                "completion_tokens": [row["completion_tokens"] for row in rows],
                "vs_one_stream": _ratios(rounds, name, level, name, one),
                "itl_p50_vs_one_stream": round(statistics.median(itl), 3),
                "vs_rival": _ratios(rounds, name, level, rival, level) if rival in rounds[0] else None,
            }
    return combined


def _cell(ratio: dict | None) -> str:
    if ratio is None or ratio["median"] is None:
        return "-"
    spread = f" ({ratio['min']:.2f}–{ratio['max']:.2f})" if ratio["min"] != ratio["max"] else ""
    return f"{ratio['median']:.2f}x{spread}"


def markdown(report: dict) -> str:
    """One row per competitor and level: aggregate decode against the competitor's own single stream, and
    q8chat's against llama.cpp's at the same level (in process against in process, served against
    served), as medians over the rounds of ratios within each round."""
    results = report["concurrency"]
    lines = [
        f"CPU: {report['machine']['model_name']} ({' '.join(report['machine']['flags'])}), "
        f"{report['machine']['threads']} threads; q8chat's KV cache: {report['workload']['kv_cache_dtype']}; "
        f"medians of {report['workload']['rounds']} rounds, each ratio taken within a round (range)",
        "",
        "| competitor | streams | aggregate tok/s | vs 1 stream | vs llama.cpp | ITL p50 / p95 ms "
        "| ITL p50 vs 1 stream | TTFT mean s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in results.items():
        for level, row in rows.items():
            lines.append(
                f"| {name} | {level} | {row['aggregate_decode_tok_s']} | {_cell(row['vs_one_stream'])} | "
                f"{_cell(row['vs_rival'])} | {row['itl_p50_ms']} / {row['itl_p95_ms']} | "
                f"{row['itl_p50_vs_one_stream']:.2f}x | {row['ttft_mean_s']} |"
            )
    lines += ["", f"Two users alternating {CHAT_TURNS}-turn chats, prompts after each user's first from the cache:"]
    for flags, share in report.get("alternating_chats", {}).items():
        lines.append(
            f"- `{flags}`: {share['cached_share']:.0%} over all, {share['min_cached_share']:.0%} at least; of the "
            f"history resent (all but the new question), {share['history_share']:.0%} over all, "
            f"{share['min_history_share']:.0%} at least"
        )
    return "\n".join(lines)
