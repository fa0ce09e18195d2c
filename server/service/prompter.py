"""Chat messages or raw text to token ids. What users (and tools) send is never parsed as special tokens."""

from __future__ import annotations

from prompts import ChatTemplate, split_special
from prompts.tools import default_tool_format, with_tools


class Prompter:
    def __init__(self, tokenizer, template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.tool_format = default_tool_format()
        self._special = list(tokenizer.all_special_tokens) + [t for t in ("</s>",) if t in tokenizer.get_vocab()]

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """``messages``: {"role", "content", "tool_calls": [{"name", "arguments"}], "tool_call_id"};
        ``tools``: the functions' {"name", "description", "parameters"}. A template that handles tools gets
        them as Hugging Face passes them; any other, in q8chat's default tool format."""
        if self.template.handles_tools:
            messages = [_hugging_face_message(m) for m in messages]
            tools = [{"type": "function", "function": t} for t in tools] if tools else None
        else:
            messages, tools = with_tools(messages, tools, self.tool_format), None
        pieces = self.template.render(
            messages,
            add_generation_prompt=True,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
            tools=tools,
        )
        ids: list[int] = []
        for kind, value in split_special(pieces, self._special):
            ids.extend([self.tokenizer.convert_tokens_to_ids(value)] if kind == "special" else self._text_ids(value))
        return ids

    def completion_ids(self, prompt: str, add_special: bool = False) -> list[int]:
        """A raw prompt belongs wholly to the client, special tokens included (as in vLLM)."""
        return self.tokenizer(prompt, add_special_tokens=add_special).input_ids


def _hugging_face_message(message: dict) -> dict:
    out = {"role": message["role"], "content": message.get("content") or ""}
    if message.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "function": c} for c in message["tool_calls"]]
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    return out
