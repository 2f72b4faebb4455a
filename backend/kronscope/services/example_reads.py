"""Example reads for feature pages, with each harvest's token strings cached in-process.

``db.repositories.examples.top_examples`` / ``sampled_examples`` look the display string of
every token up on every call: an ``IN`` list of up to a few thousand ids per page, which
costs more CPU (compiling and binding the statement) than everything else on a latent
page together. A complete harvest's token table never changes, so pages read it once per
process into an LRU of vocabularies and reuse it. The cache key includes the harvest's
``finished_at``, so an id reused after a delete (SQLite rowids) is never served stale.

The examples themselves come from the repository, given that vocabulary (``vocab=``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..db.models import Harvest, Sae, Token
from ..db.repositories import examples as examples_repo
from ..db.repositories.examples import ExampleView

VOCAB_CACHE_SIZE = 8
"""Harvests whose vocabularies are kept (each is the distinct tokens of one corpus)."""

_lock = threading.Lock()
_vocabs: OrderedDict[tuple[str, int, datetime | None], dict[int, str]] = OrderedDict()


def clear_cache() -> None:
    with _lock:
        _vocabs.clear()


def vocabulary(session: Session, harvest_id: int) -> dict[int, str]:
    """Every token string the harvest stored, by id (cached for complete harvests)."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, sa.Engine) else bind.engine
    finished = session.scalar(sa.select(Harvest.finished_at).where(Harvest.id == harvest_id))
    key = (engine.url.render_as_string(hide_password=True), harvest_id, finished)
    with _lock:
        found = _vocabs.get(key)
        if found is not None:
            _vocabs.move_to_end(key)
            return found
    rows = session.execute(
        sa.select(Token.token_id, Token.text).where(Token.harvest_id == harvest_id)
    )
    vocab = {int(row[0]): row[1] for row in rows}
    if finished is not None:  # only a finished harvest's tokens are final
        with _lock:
            _vocabs[key] = vocab
            while len(_vocabs) > VOCAB_CACHE_SIZE:
                _vocabs.popitem(last=False)
    return vocab


def top_examples(
    session: Session, sae: Sae, unit_kind: int, unit_index: int, *, limit: int | None = None
) -> list[ExampleView]:
    """Top-activating examples of a unit of the active harvest, best first."""
    if sae.active_harvest_id is None:
        return []
    vocab = vocabulary(session, sae.active_harvest_id)
    return examples_repo.top_examples(session, sae, unit_kind, unit_index, limit=limit, vocab=vocab)


def sampled_examples(
    session: Session, sae: Sae, unit_kind: int, unit_index: int
) -> list[ExampleView]:
    """Every reservoir sample of a unit of the active harvest."""
    if sae.active_harvest_id is None:
        return []
    vocab = vocabulary(session, sae.active_harvest_id)
    return examples_repo.sampled_examples(session, sae, unit_kind, unit_index, vocab=vocab)
