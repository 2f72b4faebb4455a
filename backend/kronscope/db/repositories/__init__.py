"""Repositories: all SQL of KronScope, one module per domain.

Functions take a ``Session`` first and only ``flush()``: the caller (a request, a worker,
the harvester) owns the transaction and commits. Page reads take the ``Sae`` and read its
active harvest, so a harvest still being written is never visible.

- ``saes``          create / get_by_slug / get_by_hash / list / delete (cascades)
- ``harvests``      lifecycle, resume checkpoint, atomic completion, clean-up
- ``examples``      tokens, contexts, examples: bulk writes and page reads
- ``stats``         unit statistics: bulk write, latent list, head grid, lookups
- ``explanations``  history, soft delete, full-text search
- ``jobs``          queue: claim (SKIP LOCKED on PostgreSQL), progress, finish, requeue
- ``keys``          API keys (hashed), verify, revoke
"""

from . import examples, explanations, harvests, jobs, keys, saes, stats
from ._bulk import bulk_insert
from ._common import Page

__all__ = [
    "Page",
    "bulk_insert",
    "examples",
    "explanations",
    "harvests",
    "jobs",
    "keys",
    "saes",
    "stats",
]
