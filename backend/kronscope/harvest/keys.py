"""Sort keys that make streaming selections exact and independent of batching and sharding.

- ``token_keys``: every token (global context index, position) gets a pseudo-random int64
  from a bijective 64-bit mixer (the splitmix64 finaliser) of ``seed`` and its position, the
  same for all units. A unit's reservoir sample is its active tokens with the *smallest*
  keys: exactly uniform, the same whatever the batch order or the number of shards, and
  two partial samples merge by keeping the smallest keys. Bijectivity makes keys unique
  for a given seed, so there are no ties.
- ``top_keys``: the order of top-activating contexts, value descending then context index
  ascending, packed into one int64 (positive float32 bits are ordered like the values):
  ``bits(value) * 2^32 + (2^32 - 1 - context)``. Larger key = better.

Both are "keep the largest int64" problems (reservoir keys are stored bit-flipped,
``~key``), so one structure (:class:`~kronscope.harvest.streaming.KeyedTop`) serves both.
"""

from __future__ import annotations

import torch
from torch import Tensor

EMPTY = -(2**63)
"""Key of an empty slot: below every real key."""

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
POSITION_BITS = 20
"""Positions below 2^20 (a context of a million tokens)."""
MAX_CONTEXTS = 1 << 32
"""Context indices must stay below 2^32 (``top_keys`` and ``token_keys`` both rely on it)."""


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _lsr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 (two's complement, wrapping): a bijection."""
    x = x ^ _lsr(x, 30)
    x = x * _signed(_C1)
    x = x ^ _lsr(x, 27)
    x = x * _signed(_C2)
    return x ^ _lsr(x, 31)


def mix64_py(x: int) -> int:
    """Pure-Python reference of :func:`mix64` (for tests)."""
    x &= _MASK64
    x ^= x >> 30
    x = (x * _C1) & _MASK64
    x ^= x >> 27
    x = (x * _C2) & _MASK64
    x ^= x >> 31
    return _signed(x)


def token_keys(seed: int, contexts: Tensor, length: int) -> Tensor:
    """[C] global context indices -> [C, length] int64 sampling keys (smaller = sampled first)."""
    ctx = contexts.to(torch.int64).reshape(-1, 1)
    pos = torch.arange(length, dtype=torch.int64, device=ctx.device)
    x = (ctx << POSITION_BITS) + pos + _signed(_GOLDEN * (seed + 1))
    return mix64(x)


def token_key_py(seed: int, context: int, position: int) -> int:
    """Pure-Python reference of one :func:`token_keys` entry."""
    return mix64_py((context << POSITION_BITS) + position + _GOLDEN * (seed + 1))


def top_keys(values: Tensor, contexts: Tensor) -> Tensor:
    """Keys of (value > 0, context) pairs: larger = ranks first. Broadcasts."""
    bits = values.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return bits * MAX_CONTEXTS + (MAX_CONTEXTS - 1 - contexts.to(torch.int64))
