"""Tools in a chat: the function signatures, the calls an assistant made and the tools' results, as text a
chat template renders. A template that handles tools itself (its Jinja reads ``tools``) gets them as Hugging
Face passes them; any other gets them in the default format of ``templates/tools.toml``."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class ToolFormat:
    system: str  # the tools block, with {tools}
    call_begin: str
    call_end: str
    response: str  # a tool's result, with {content}

    def call(self, name: str, arguments: object) -> str:
        return self.call_begin + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + self.call_end


@cache
def default_tool_format() -> ToolFormat:
    data = tomllib.loads(resources.files("prompts").joinpath("templates/tools.toml").read_text("utf-8"))
    return ToolFormat(data["system"], data["call_begin"], data["call_end"], data["response"])


def with_tools(messages: list[dict], tools: list[dict] | None, fmt: ToolFormat) -> list[dict]:
    """``messages`` ({"role", "content", "tool_calls": [{"name", "arguments"}], ...}) as plain system, user
    and assistant turns in the format ``fmt``: the tools' signatures ({"name", "description", "parameters"})
    join the system message, an assistant's calls follow its content, a tool's result is a user turn."""
    out = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(fmt.call(c["name"], _arguments(c["arguments"])) for c in message["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        elif role == "tool":
            role, content = "user", fmt.response.replace("{content}", content)
        out.append({"role": role, "content": content})
    if tools:
        block = fmt.system.replace(
            "{tools}", "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
        )
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _arguments(arguments: str) -> object:
    """A call's arguments as the client sent them back (JSON text), as an object where they parse."""
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments
