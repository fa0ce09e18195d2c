"""Tool calls out of the model's text: the calls it wrote in the tool format (``prompts.tools``) become
``tool_calls``, whole or as they stream, and what it wrote around them stays content."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from prompts.tools import ToolFormat


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(text: str, names: set[str]) -> ParsedCall | None:
    """One call's JSON (``{"name": ..., "arguments": {...}}``), if it is one of a function in ``names``."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in names:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(new_call_id(), call["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass
class ToolCallStream:
    """Text deltas in, (content delta, completed calls) out. Text that could still be the start of a call is
    held back; a call's text is held until it ends, then parsed; a block that is no call stays content."""

    fmt: ToolFormat
    names: set[str]
    _pending: str = ""
    _in_call: bool = False
    calls: list[ParsedCall] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._pending += text
        content, done = [], []
        while True:
            if self._in_call:
                end = self._pending.find(self._end)
                if end < 0:
                    break
                block, self._pending = self._pending[:end], self._pending[end + len(self._end) :]
                self._in_call = False
                call = parse_call(block.strip(), self.names)
                if call is None:
                    content.append(self._begin + block + self._end)
                else:
                    done.append(call)
                continue
            begin = self._pending.find(self._begin)
            if begin >= 0:
                content.append(self._pending[:begin])
                self._pending = self._pending[begin + len(self._begin) :]
                self._in_call = True
                continue
            hold = _partial_suffix(self._pending, self._begin)
            content.append(self._pending[: len(self._pending) - hold])
            self._pending = self._pending[len(self._pending) - hold :]
            break
        self.calls += done
        return "".join(content), done

    @property
    def _begin(self) -> str:  # the markers without the whitespace the format puts around the JSON
        return self.fmt.call_begin.strip()

    @property
    def _end(self) -> str:
        return self.fmt.call_end.strip()

    def finish(self) -> str:
        """What is left at the end of the text, as content (an unfinished call included)."""
        left = (self._begin if self._in_call else "") + self._pending
        self._pending, self._in_call = "", False
        return left


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``."""
    return max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


def split_calls(text: str, fmt: ToolFormat, names: set[str]) -> tuple[str, list[ParsedCall]]:
    """A whole answer: its content (what is not a call) and its calls."""
    stream = ToolCallStream(fmt, names)
    content, _ = stream.feed(text)
    return (content + stream.finish()).strip(), stream.calls
