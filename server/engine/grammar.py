"""Constrained decoding: grammars that the sampled tokens must follow, enforced token by token by llguidance.

A request's JSON schema (``response_format``) or tool-call format is compiled once, before the request is
admitted; each generation then gets a ``Matcher`` that says which tokens may come next (a mask over the
vocabulary) and follows the tokens sampled. llguidance over xgrammar: it needs no other package (xgrammar pulls
in triton and a TVM runtime), builds a request's matcher in under a millisecond against xgrammar's 120 ms
compile per schema, and its 40-100 us per mask are well under 1 % of a decode step here (README, Structured
outputs).
"""

from __future__ import annotations

import functools
import json
import threading

import numpy as np
import torch

# JSON written as OpenAI's models write it ({"a": 1, "b": [2, 3]}), no free whitespace: a model cannot pad
# the answer with blank lines until max_tokens, and a schema that bounds its values bounds the answer.
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _laid_out(schema: dict) -> dict:
    return schema if "x-guidance" in schema else {**schema, "x-guidance": JSON_LAYOUT}


class GrammarError(ValueError):
    """A schema or grammar the engine cannot enforce; the message says why."""


class Grammars:
    """Grammars for one tokenizer. llguidance's view of the tokenizer takes half a second to build, so it is
    built at the first constrained request, not at start-up."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._hf_tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()

    @functools.cached_property
    def _tokenizer(self):
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self._hf_tokenizer)

    def _checked(self, grammar: str) -> str:
        import llguidance

        with self._lock:  # cached_property is not thread-safe: build the tokenizer once
            tokenizer = self._tokenizer
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise GrammarError(messages[0])
        return grammar

    def json_schema(self, schema: dict) -> str:
        """JSON that validates against ``schema``; any JSON object for ``{"type": "object"}``."""
        import llguidance

        try:
            return self._checked(llguidance.LLMatcher.grammar_from_json_schema(_laid_out(schema)))
        except ValueError as exc:
            raise GrammarError(str(exc)) from None

    def tool_calls(self, functions: dict[str, dict], parallel: bool, begin: str, end: str) -> str:
        """One call (or several, ``parallel``), each ``begin {"name": ..., "arguments": {...}} end``, the
        arguments valid against the function's parameter schema."""
        import llguidance

        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, parameters in functions.items()
        ]
        call_schema = _laid_out(calls[0] if len(calls) == 1 else {"anyOf": calls})
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        lark = f"{start}\ncall: {json.dumps(begin)} %json {json.dumps(call_schema)} {json.dumps(end)}\n"
        return self._checked(llguidance.LLMatcher.grammar_from_lark(lark))

    def matcher(self, grammar: str) -> Matcher:
        import llguidance

        return Matcher(llguidance.LLMatcher(self._tokenizer, grammar, log_level=0), self.vocab_size)


class Matcher:
    """A generation's place in its grammar: the tokens allowed next, and the tokens it took."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._matcher, self._vocab_size = matcher, vocab_size

    def allowed(self) -> torch.Tensor:
        """A bool mask over the model's vocabulary (ids past the tokenizer's are never allowed)."""
        mask = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        # count: cut to the vocabulary, or padded with zeros where the tokenizer's is smaller
        return torch.from_numpy(np.unpackbits(mask, count=self._vocab_size, bitorder="little").view(np.bool_))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but the end of the text may follow."""
        return self._matcher.is_stopped()
