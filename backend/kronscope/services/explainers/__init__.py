"""Explanation generators. Each turns the evidence of one unit (its top and sampled
examples, and for KronSAE latents its parents' explanations) into one short text.

- ``heuristic``: offline; the most frequent max-activating tokens and what precedes them.
- ``openai_compat``: any OpenAI-compatible chat endpoint (``/v1/chat/completions``).

Both are pure: they read nothing from the database and write nothing; the explain job
(``services.explanations``) gathers the evidence and writes the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class ExplainerError(Exception):
    """An explainer could not produce a usable text; the message says why, plainly."""


@dataclass(frozen=True)
class Snippet:
    """One example: its tokens and the unit's value at each."""

    tokens: list[str]
    values: list[float]
    position: int
    """The position that matters: the maximum (top examples) or the sampled one."""

    @property
    def value(self) -> float:
        return self.values[self.position] if 0 <= self.position < len(self.values) else 0.0

    @property
    def token(self) -> str:
        return self.tokens[self.position] if 0 <= self.position < len(self.tokens) else ""


@dataclass(frozen=True)
class Evidence:
    """What an explainer knows about one unit."""

    sae: str
    kind: str
    """``latent``, ``base`` or ``extension``."""
    index: int
    """Flat index: latent 0..F-1, base g*m+i, extension g*n+j."""
    label: str
    """How to name the unit in text, e.g. ``latent 17 (head 2, base 0, extension 1)``."""
    top: list[Snippet]
    samples: list[Snippet] = field(default_factory=list)
    base_text: str | None = None
    """KronSAE latents: the best explanation of the base parent, if any."""
    extension_text: str | None = None
    base_label: str | None = None
    extension_label: str | None = None

    @property
    def has_parents(self) -> bool:
        return self.base_label is not None and self.extension_label is not None


class Explainer(Protocol):
    source: str
    """Recorded with every explanation: ``heuristic`` or ``llm:<model>``."""

    def explain(self, evidence: Evidence) -> str | None:
        """One text, or None when there is nothing to explain (a dead unit)."""
        ...


def show_token(token: str) -> str:
    """A token as explanations quote it: ``' the'``, with newlines and tabs visible."""
    text = (
        token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    )
    return f"'{text}'"


__all__ = ["Evidence", "Explainer", "ExplainerError", "Snippet", "show_token"]
