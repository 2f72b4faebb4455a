"""Errors of the subject-model layer. Each message names the thing at fault in plain words."""

from __future__ import annotations


class ModelNotFoundError(LookupError):
    """A model name resolves to nothing: says which name and where it looked."""


class HookError(ValueError):
    """A hook name that does not exist in the model or cannot be mapped to a module."""


class CorpusError(ValueError):
    """A corpus that is empty, unreadable, malformed or yields no usable tokens."""
