"""Errors of the harvest. Messages say what is wrong and what to do, in plain words."""

from __future__ import annotations


class HarvestError(RuntimeError):
    """A harvest cannot start or cannot go on (bad input, unusable saved state, ...)."""


class HarvestInterrupted(HarvestError):
    """The pass stopped early (a fault hook, a signal); the saved state allows a resume."""
