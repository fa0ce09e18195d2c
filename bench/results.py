"""What one benchmark variant measured: a sample per repetition, reported as medians."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Sample:
    ttft_s: float  # prompt of --prompt-tokens, empty cache
    decode_tok_s: float
    second_turn_ttft_s: float  # the first turn's prompt and reply reused, --new-tokens new


@dataclass
class Result:
    variant: str
    weight_mb: float
    samples: list[Sample] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # what only some variants measure (start-up, memory)

    def summary(self) -> dict:
        def median(key: str) -> float:
            return round(statistics.median(getattr(s, key) for s in self.samples), 4)

        return {
            "variant": self.variant,
            "weight_mb": round(self.weight_mb, 1),
            "decode_tok_s": median("decode_tok_s"),
            "ttft_s": median("ttft_s"),
            "second_turn_ttft_s": median("second_turn_ttft_s"),
            **self.extra,
        }
