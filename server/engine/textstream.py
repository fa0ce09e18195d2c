"""Token ids to streamed text: UTF-8-safe incremental detokenization and stop-string hold-back."""

from __future__ import annotations

# Prompt tokens decoded along with the first new tokens, so tokenizers that drop a word's leading
# space when it starts a decode (SentencePiece) still produce it.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Turns one token id at a time into new text, never splitting a multi-byte character.

    Decodes a short sliding window twice per token (before and after the new id) and releases only
    the difference, and only once it no longer ends in U+FFFD (an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""


class StopStrings:
    """Cuts text at the first stop string and holds back any tail that could still become one."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        buffer = self._pending + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buffer[: min(hits)], True
        hold = max((k for s in self._stops for k in range(1, len(s)) if buffer.endswith(s[:k])), default=0)
        self._pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """At the end of generation the held-back tail is plain text."""
        text, self._pending = self._pending, ""
        return text
