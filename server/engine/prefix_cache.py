"""Past conversations' KV caches, kept within a byte budget, so that users who take turns do not recompute
their histories: the decoder's cache holds one conversation a slot (the last request's); the engine copies
it here when nothing runs, or else before another request overwrites it, and a prompt that continues a kept
conversation further than the live cache copies it back (a copy of the keys and values costs a small
fraction of recomputing them). Least recently used conversations go first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def common_prefix_length(a, b) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(differ[0]) if len(differ) else n


@dataclass
class Kept:
    ids: tuple[int, ...]  # the tokens whose keys and values ``kv`` holds, from position 0
    kv: object  # the decoder's snapshot
    nbytes: int


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._kept: OrderedDict[tuple[int, ...], Kept] = OrderedDict()  # least recently used first
        self.hits = 0  # prompts that continued a kept conversation
        self.misses = 0  # prompts that continued none further than the live cache
        self.nbytes = 0  # kept; a counter, read by metrics from another thread

    def __len__(self) -> int:
        return len(self._kept)

    def longest(
        self, prompt_ids: list[int], better_than: int, reach: Callable[[tuple[int, ...], int], int] | None = None
    ) -> tuple[Kept | None, int]:
        """The kept conversation that ``prompt_ids`` goes on with the furthest, if further than ``better_than``
        (what the live cache offers), and how many leading tokens the two share; it becomes the most recent.
        How far a conversation goes on is ``reach(ids, shared)``, by default the shared tokens alone: the
        engine's counts a resent answer's text as the kept tokens that wrote it (``resync``), so that of two
        conversations the prompt parts from at the same answer, the later one is taken."""
        best, shared_best, furthest = None, better_than, better_than
        for kept in self._kept.values():
            if len(kept.ids) <= furthest:  # it cannot go further than that
                continue
            shared = common_prefix_length(kept.ids, prompt_ids)
            far = shared if reach is None else reach(kept.ids, shared)
            if far > furthest:
                best, shared_best, furthest = kept, shared, far
        if best is None:
            self.misses += 1
            return None, better_than
        self.hits += 1
        self._kept.move_to_end(best.ids)
        return best, shared_best

    def covers(self, ids: tuple[int, ...]) -> bool:
        """Whether a kept conversation already holds all of ``ids``."""
        return any(kept.ids[: len(ids)] == ids for kept in self._kept.values())

    def keep(self, ids: tuple[int, ...], kv: object, nbytes: int) -> None:
        """Keep a conversation, dropping those it continues and then the least recently used ones until it
        fits the budget (nothing is kept if it alone does not)."""
        if nbytes > self.budget_bytes:
            return
        for other in [key for key in self._kept if ids[: len(key)] == key]:
            self.nbytes -= self._kept.pop(other).nbytes
        while self._kept and self.nbytes + nbytes > self.budget_bytes:
            self.nbytes -= self._kept.popitem(last=False)[1].nbytes
        self._kept[ids] = Kept(ids, kv, nbytes)
        self.nbytes += nbytes
