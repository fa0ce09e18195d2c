"""Every text that enters the model: chat templates, their rendering and stop strings, and the shipped
calibration and evaluation text. Imports no torch and nothing else of the project."""

from importlib import resources

from prompts.chat import (
    BUILTIN,
    ROLES,
    ChatTemplate,
    Piece,
    TemplateError,
    builtin_template,
    load_template,
    split_special,
)


def calibration_text() -> str:
    """Wikipedia articles for SmoothQuant calibration (see data/SOURCES.md)."""
    return resources.files("prompts").joinpath("data/calibration.txt").read_text("utf-8")


def heldout_text() -> str:
    """Wikipedia articles disjoint from the calibration text, for perplexity."""
    return resources.files("prompts").joinpath("data/heldout.txt").read_text("utf-8")


__all__ = [
    "BUILTIN",
    "ROLES",
    "ChatTemplate",
    "Piece",
    "TemplateError",
    "builtin_template",
    "calibration_text",
    "heldout_text",
    "load_template",
    "split_special",
]
