"""A resent answer's tokens. A chat client resends the model's answer as text, and the tokenizer may split that
text otherwise than the model generated it (the model may write "Hel" + "lo" where the tokenizer has
"Hello"): the prompt's tokens then part from the cached ones inside the answer, and everything after would be
computed again. Where the prompt goes on with the very text of the cached tokens, the cached tokens stand in
for it, and the model reads its answer as it wrote it.
"""

from __future__ import annotations

from collections.abc import Callable

CONTEXT = 4  # tokens decoded before those compared: SentencePiece drops a leading space at a decode's start
BACKOFF = 8  # cached tokens given up at most, looking for a place where the prompt's tokens also end


def resync(
    decode: Callable[[list[int]], str], cached: list[int], prompt: list[int], live: int
) -> tuple[list[int], int]:
    """``prompt`` with the cached tokens from ``live`` (the tokens both share) on in place of its own wherever
    they spell the same text, and how many of its tokens the cache then holds; ``(prompt, live)`` where they do
    not. At least the prompt's last token is left to run."""
    if live >= len(cached) or live >= len(prompt) - 1:
        return prompt, live
    start = max(0, live - CONTEXT)
    ours, theirs = decode(cached[start : live + 1]), decode(prompt[start : live + 1])
    if not (ours.startswith(theirs) or theirs.startswith(ours)):  # the texts part here (a new conversation)
        return prompt, live
    for end in range(len(cached), max(live, len(cached) - BACKOFF), -1):
        text = decode(cached[start:end])
        at = _end_of(lambda stop: decode(prompt[start:stop]), text, live + 1, len(prompt) - 1)
        if at is not None:
            return cached[:end] + prompt[at:], end
    return prompt, live


def _end_of(text_to: Callable[[int], str], text: str, low: int, high: int) -> int | None:
    """The ``stop`` in ``[low, high]`` where ``text_to(stop)`` is ``text``, if any: bisection on the length of
    the text, which grows with ``stop``."""
    while low < high:
        middle = (low + high) // 2
        if len(text_to(middle)) < len(text):
            low = middle + 1
        else:
            high = middle
    return low if text_to(low) == text else None
