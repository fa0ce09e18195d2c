"""Chat templates: turn a list of messages into the pieces of a prompt.

A template is a Jinja text (a shipped ``templates/*.toml`` file, a user's file, or the tokenizer's own
``chat_template``). Message contents are rendered as placeholders and put back afterwards as
*untrusted* pieces, so a tokenizer can parse special tokens (``<|im_end|>``, ``</s>``) only in the
template's own text: what a user types is always plain text and cannot close a turn.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from jinja2 import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN = ("vicuna", "chatml")
ROLES = ("system", "user", "assistant")
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


class TemplateError(ValueError):
    """A template cannot be found, parsed or rendered."""


@dataclass(frozen=True)
class Piece:
    """A run of prompt text. ``trusted`` text comes from the template and may contain special tokens."""

    text: str
    trusted: bool


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    default_system: str | None = None
    stop: tuple[str, ...] = ()

    @property
    def handles_tools(self) -> bool:
        """Whether the template renders tools itself (its Jinja reads ``tools``, as Hugging Face's do)."""
        return re.search(r"\btools\b", self.source) is not None

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
        tools: list[dict] | None = None,
    ) -> list[Piece]:
        """Render ``messages`` ([{"role", "content"}]) into trusted template text and untrusted contents;
        ``tools`` reach a template that ``handles_tools``."""
        contents = [m["content"] for m in messages]
        masked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        try:
            text = _compile(self.source).render(
                messages=masked,
                add_generation_prompt=add_generation_prompt,
                default_system=self.default_system,
                bos_token=bos_token,
                eos_token=eos_token,
                tools=tools,
            )
        except JinjaTemplateError as exc:
            raise TemplateError(f"template {self.name!r} failed to render: {exc}") from None
        pieces: list[Piece] = []
        position = 0
        for match in _PLACEHOLDER.finditer(text):
            if match.start() > position:
                pieces.append(Piece(text[position : match.start()], True))
            pieces.append(Piece(contents[int(match.group(1))], False))
            position = match.end()
        if position < len(text):
            pieces.append(Piece(text[position:], True))
        return pieces

    def render_text(self, messages: list[dict], **kwargs) -> str:
        """The prompt as one string (for display and tests; tokenize ``render`` instead)."""
        return "".join(p.text for p in self.render(messages, **kwargs))


@lru_cache(maxsize=16)
def _compile(source: str):
    """Jinja with the settings Hugging Face uses for chat templates, sandboxed."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except JinjaTemplateError as exc:
        raise TemplateError(f"template does not parse: {exc}") from None


def _raise(message: str):
    raise TemplateError(message)


def _from_toml(name: str, text: str) -> ChatTemplate:
    try:
        data = tomllib.loads(text)
        return ChatTemplate(
            name=name,
            source=data["template"],
            default_system=data.get("default_system"),
            stop=tuple(data.get("stop", ())),
        )
    except (tomllib.TOMLDecodeError, KeyError) as exc:
        raise TemplateError(f"template {name!r} is not a valid template file: {exc}") from None


def builtin_template(name: str) -> ChatTemplate:
    return _from_toml(name, resources.files("prompts").joinpath(f"templates/{name}.toml").read_text("utf-8"))


def load_template(
    spec: str, model_template: str | None = None, eos_token: str | None = None, fallback: str = "vicuna"
) -> ChatTemplate:
    """``auto`` (the model's own template if it has one, else ``fallback``: the built-in its family's chat
    models use), a built-in name, or a file (``.toml`` like the built-ins, or a bare ``.jinja``)."""
    model_stop = (eos_token,) if eos_token else ()
    if spec == "auto":
        if model_template:
            return ChatTemplate(name="model", source=model_template, stop=model_stop)
        spec = fallback
    if spec in BUILTIN:
        return builtin_template(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TemplateError(f"unknown template {spec!r}: expected auto, {', '.join(BUILTIN)} or a template file")
    text = path.read_text("utf-8")
    if path.suffix == ".toml":
        return _from_toml(path.stem, text)
    _compile(text)
    return ChatTemplate(name=path.stem, source=text, stop=model_stop)


def split_special(pieces: list[Piece], special_tokens: list[str]) -> list[tuple[str, str]]:
    """Turn pieces into ``("special", token)`` and ``("text", text)`` runs. Special tokens are found in
    trusted pieces only; neighbouring text is merged so it tokenizes as one string would."""
    pattern = (
        re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)))
        if special_tokens
        else None
    )
    runs: list[tuple[str, str]] = []

    def add_text(text: str) -> None:
        if not text:
            return
        if runs and runs[-1][0] == "text":
            runs[-1] = ("text", runs[-1][1] + text)
        else:
            runs.append(("text", text))

    for piece in pieces:
        if not piece.trusted or pattern is None:
            add_text(piece.text)
            continue
        position = 0
        for match in pattern.finditer(piece.text):
            add_text(piece.text[position : match.start()])
            runs.append(("special", match.group(0)))
            position = match.end()
        add_text(piece.text[position:])
    return runs
