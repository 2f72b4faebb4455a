"""Subject models and corpora: load a model by name, read activations at a hook while
running only the layers before it, tokenise, and cut corpora into contexts.

Knows nothing of the database or the web. Fixed names other code relies on:
``load_model``, ``resolve_model``, ``SubjectModel`` (``activations``, ``tokenize``,
``forward_with_splice``, ...), ``load_corpus``, ``make_contexts`` and the three errors.
"""

from __future__ import annotations

from .corpus import Contexts, Corpus, load_corpus, make_contexts
from .errors import CorpusError, HookError, ModelNotFoundError
from .hooks import HookPoint
from .model import SubjectModel, TokenBatch, clear_model_cache, load_model
from .resolve import BUILTIN_MODELS, ModelSource, resolve_model

__all__ = [
    "BUILTIN_MODELS",
    "Contexts",
    "Corpus",
    "CorpusError",
    "HookError",
    "HookPoint",
    "ModelNotFoundError",
    "ModelSource",
    "SubjectModel",
    "TokenBatch",
    "clear_model_cache",
    "load_corpus",
    "load_model",
    "make_contexts",
    "resolve_model",
]
