"""User search text -> a full-text query that can never be a syntax error.

Users may type words, ``"quoted phrases"``, ``OR`` between alternatives and ``-word`` to
exclude (the web-search conventions PostgreSQL's ``websearch_to_tsquery`` understands).
Everything else (FTS5 operators such as ``NEAR``, ``*``, ``^``, column filters,
parentheses, stray quotes, SQL, emoji) is treated as plain text: only runs of letters and
digits survive, and every term reaches FTS5 inside double quotes, so it is a string to
match and never an operator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r'(-?)"([^"]*)"?|(\S+)')
_WORD = re.compile(r"[^\W_]+")  # letters and digits; FTS5's unicode61 splits on the rest


@dataclass(frozen=True)
class SearchQuery:
    """AND of clauses; each clause an OR of phrases; a phrase is a list of words."""

    clauses: tuple[tuple[tuple[str, ...], ...], ...]
    excluded: tuple[tuple[str, ...], ...]

    def to_fts5(self) -> str:
        def phrase(words: tuple[str, ...]) -> str:
            return '"' + " ".join(words) + '"'  # words hold no quotes: see _WORD

        positive = " AND ".join(
            "(" + " OR ".join(phrase(p) for p in clause) + ")" for clause in self.clauses
        )
        if self.excluded:
            positive = f"({positive}) NOT (" + " OR ".join(phrase(p) for p in self.excluded) + ")"
        return positive

    def to_websearch(self) -> str:
        def phrase(words: tuple[str, ...]) -> str:
            return '"' + " ".join(words) + '"'

        parts = [" or ".join(phrase(p) for p in clause) for clause in self.clauses]
        parts += ["-" + phrase(p) for p in self.excluded]
        return " ".join(parts)


def parse_search_query(text: str | None, *, max_terms: int = 32) -> SearchQuery | None:
    """Parse user search text; ``None`` when nothing searchable is left."""
    if not text:
        return None
    clauses: list[list[tuple[str, ...]]] = []
    excluded: list[tuple[str, ...]] = []
    pending_or = False
    terms = 0
    for match in _TOKEN.finditer(text[:1000]):
        negated, quoted, bare = match.group(1), match.group(2), match.group(3)
        if bare is not None:
            if bare == "OR":
                pending_or = bool(clauses)
                continue
            if bare.startswith("-") and len(bare) > 1:
                negated, bare = "-", bare[1:]
            raw = bare
        else:
            raw = quoted or ""
        words = tuple(w.lower() for w in _WORD.findall(raw))
        if not words or terms >= max_terms:
            continue
        terms += 1
        if negated:
            excluded.append(words)
        elif pending_or and clauses:
            clauses[-1].append(words)
        else:
            clauses.append([words])
        pending_or = False
    if not clauses:
        return None
    return SearchQuery(tuple(tuple(c) for c in clauses), tuple(excluded))
