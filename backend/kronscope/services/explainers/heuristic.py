"""The offline explainer: what the top examples peak on, and what comes before it.

For a unit it counts the token at the maximum of every top example (and, as weaker
evidence, the token at the sampled position of every sampled example), names the most
frequent ones and the token that most often precedes the leading one, e.g.
``fires on ' the' after ' in' (6 of 10 top examples); also ' a', ' an'``.

For a KronSAE latent the text also says what the AND selects, from its parents'
explanations: ``...; base h2/b0: "..."; extension h2/e1: "..."; fires when both``. The wording is deterministic, so the same evidence always gives the same text.
"""

from __future__ import annotations

from collections import Counter

from . import Evidence, Snippet, show_token

SOURCE = "heuristic"
MAX_PARENT_CHARS = 80


def _quote(text: str | None) -> str:
    if not text:
        return "unexplained"
    text = " ".join(text.split())
    if len(text) > MAX_PARENT_CHARS:
        text = text[: MAX_PARENT_CHARS - 1].rstrip() + "…"
    return f'"{text}"'


def _active(snippets: list[Snippet]) -> list[Snippet]:
    return [s for s in snippets if s.value > 0 and s.token != ""]


class HeuristicExplainer:
    source = SOURCE

    def explain(self, evidence: Evidence) -> str | None:
        top = _active(evidence.top)
        samples = _active(evidence.samples)
        if not top and not samples:
            return None
        base = top or samples
        what = "top examples" if top else "sampled examples"
        counts = Counter(s.token for s in base)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        lead, lead_count = ranked[0]
        before = Counter(
            s.tokens[s.position - 1] for s in base if s.token == lead and s.position > 0
        )
        text = f"fires on {show_token(lead)}"
        if before:
            prev, prev_count = sorted(before.items(), key=lambda kv: (-kv[1], kv[0]))[0]
            if (prev_count * 2 >= lead_count and prev_count >= 2) or len(base) == 1:
                text += f" after {show_token(prev)}"
        text += f" ({lead_count} of {len(base)} {what})"
        others = [t for t, _ in ranked[1:3]]
        weaker = [
            t
            for t, _ in sorted(
                Counter(s.token for s in samples if s.token not in counts).items(),
                key=lambda kv: (-kv[1], kv[0]),
            )[:2]
        ]
        if others:
            text += "; also " + ", ".join(show_token(t) for t in others)
        if weaker and top:
            text += "; weaker on " + ", ".join(show_token(t) for t in weaker)
        if evidence.has_parents:
            text += (
                f"; {evidence.base_label}: {_quote(evidence.base_text)}; "
                f"{evidence.extension_label}: {_quote(evidence.extension_text)}; fires when both"
            )
        return text
