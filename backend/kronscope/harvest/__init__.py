"""The harvest: one pass of the subject model and an SAE over a corpus.

Compute (``compute``, ``streaming``, ``state``, ``keys``) knows nothing of the database;
``writer`` and ``runner`` store the result through the repositories.
"""

from .compute import Batch, Harvester, iter_batches
from .errors import HarvestError, HarvestInterrupted
from .params import HarvestParams
from .state import HarvestState, UnitBlock

__all__ = [
    "Batch",
    "HarvestError",
    "HarvestInterrupted",
    "HarvestParams",
    "HarvestState",
    "Harvester",
    "UnitBlock",
    "iter_batches",
]
