"""Count how often modules run: the proof that a hooked forward pass stopped early."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def count_runs(model: nn.Module, paths: list[str]) -> Iterator[Counter[str]]:
    """Within the block, ``counts[path]`` is how many times that sub-module ran forward."""
    counts: Counter[str] = Counter()
    handles = []
    for path in paths:
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(lambda *_a, _p=path: counts.update([_p])))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
