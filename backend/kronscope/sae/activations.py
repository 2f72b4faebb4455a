"""Activation sources for SAE training: a deterministic stream of ``[tokens, d_in]`` rows.

Every source is a *stream*: a fixed sequence of activation vectors that is a pure
function of its construction arguments (model, contexts, hook, seed). Batch ``b`` of
size ``B`` starting at token ``t0`` is rows ``[t0 + b*B, t0 + (b+1)*B)``. Resuming a
run therefore only needs the number of tokens already consumed: nothing about the
stream's past has to be stored.

- ``TensorSource``: rows of an in-memory tensor, in a seeded permutation (tests,
  synthetic data).
- ``LMActivationSource``: a subject model run over corpus contexts. The contexts are put
  in a seeded order and cut into *buffers* of ``buffer_contexts`` contexts; the
  non-special tokens of one buffer are pooled and shuffled (seeded by the seed and the
  buffer's number), which mixes tokens of many contexts in every batch. A buffer is
  always computed in the same model sub-batches, so it is bit-identical when it is
  computed again, and resuming skips whole buffers without running the model (token
  counts come from the special-token mask).
- ``cache_activations`` writes any stream to safetensors shards plus ``manifest.json``;
  ``CachedActivations`` reads it back as the same stream, so several SAEs train on
  identical activations (the benchmark) without re-running the model.

Train/held-out split: contexts are numbered in the order ``make_contexts(..., seed=0)``
returns them; the last ``HELDOUT_FRACTION`` (5%, at least one context) are held out.
Training never reads them, ``kronscope eval`` reads only them (``split_contexts``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

HELDOUT_FRACTION = 0.05
"""Share of the contexts (the last ones, in ``make_contexts`` order) held out for eval."""
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard_{:05d}.safetensors"
SHARD_TENSOR = "activations"


class ActivationError(ValueError):
    """The activations asked for cannot be provided (too few tokens, a bad cache...)."""


@runtime_checkable
class ActivationSource(Protocol):
    """What the trainer reads: a deterministic, position-addressable stream of rows."""

    d_in: int

    @property
    def available_tokens(self) -> int:
        """Rows in the stream."""
        ...

    def read(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of the stream as float32 [stop - start, d_in] (CPU)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able facts identifying the stream (stored in checkpoints)."""
        ...


def iter_batches(source: ActivationSource, batch_size: int, start: int = 0) -> Iterator[Tensor]:
    """Full batches ``[batch_size, d_in]`` of the stream from token ``start`` on."""
    pos = start
    while pos + batch_size <= source.available_tokens:
        yield source.read(pos, pos + batch_size)
        pos += batch_size


class TensorSource:
    """An in-memory tensor [N, d_in] streamed in a seeded permutation of its rows."""

    def __init__(
        self, activations: Tensor, seed: int = 0, shuffle: bool = True, name: str = "tensor"
    ):
        if activations.ndim != 2:
            raise ActivationError(
                f"expected activations [tokens, d_in], got shape {list(activations.shape)}"
            )
        self.d_in = int(activations.shape[1])
        self.seed, self.name = seed, name
        if shuffle:
            gen = torch.Generator().manual_seed(seed)
            activations = activations[torch.randperm(activations.shape[0], generator=gen)]
        self._data = activations.float().contiguous()

    @property
    def available_tokens(self) -> int:
        return int(self._data.shape[0])

    def read(self, start: int, stop: int) -> Tensor:
        return self._data[start:stop]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "tensor",
            "name": self.name,
            "seed": self.seed,
            "tokens": self.available_tokens,
        }


def split_contexts(
    n_contexts: int, heldout_fraction: float = HELDOUT_FRACTION
) -> tuple[list[int], list[int]]:
    """Indices of the training and the held-out contexts (the last ``heldout_fraction``)."""
    if n_contexts < 2:
        raise ActivationError(
            f"the corpus gives {n_contexts} context(s); at least 2 are needed to hold one out for evaluation"
        )
    heldout = min(n_contexts - 1, max(1, math.ceil(n_contexts * heldout_fraction)))
    cut = n_contexts - heldout
    return list(range(cut)), list(range(cut, n_contexts))


class LMActivationSource:
    """Activations of ``model`` at ``hook`` over some of ``contexts``, special tokens skipped.

    ``contexts`` follows the ``kronscope.lm.corpus.Contexts`` contract (``input_ids``,
    ``attention_mask``, ``special_mask`` [N, L]); ``model`` the ``SubjectModel`` one
    (``activations(input_ids, attention_mask, hook_name)``).
    """

    def __init__(
        self,
        model: Any,
        contexts: Any,
        hook: str,
        *,
        indices: list[int] | None = None,
        seed: int = 0,
        buffer_contexts: int = 256,
        lm_batch_size: int = 16,
        shuffle: bool = True,
        describe: dict[str, Any] | None = None,
    ):
        self.model, self.contexts, self.hook = model, contexts, hook
        self.seed, self.shuffle = seed, shuffle
        self.lm_batch_size = max(1, lm_batch_size)
        self.d_in = int(model.d_model)
        order = torch.tensor(
            indices if indices is not None else range(len(contexts)), dtype=torch.long
        )
        if shuffle:
            order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))]
        self._buffers = [
            order[i : i + buffer_contexts] for i in range(0, len(order), buffer_contexts)
        ]
        keep = ~contexts.special_mask.bool()
        per_context = keep.sum(1)
        sizes = [int(per_context[b].sum()) for b in self._buffers]
        self._starts = [0]
        for s in sizes:
            self._starts.append(self._starts[-1] + s)
        self._cached: tuple[int, Tensor] | None = None
        self._describe = dict(describe or {})

    @property
    def available_tokens(self) -> int:
        return self._starts[-1]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "lm",
            "hook": self.hook,
            "seed": self.seed,
            "tokens": self.available_tokens,
            **self._describe,
        }

    @torch.no_grad()
    def _buffer(self, b: int) -> Tensor:
        if self._cached is not None and self._cached[0] == b:
            return self._cached[1]
        ctx = self._buffers[b]
        parts = []
        for i in range(0, len(ctx), self.lm_batch_size):
            idx = ctx[i : i + self.lm_batch_size]
            ids, mask = self.contexts.input_ids[idx], self.contexts.attention_mask[idx]
            keep = ~self.contexts.special_mask[idx].bool()
            acts = self.model.activations(ids, mask, self.hook)
            parts.append(acts.float().cpu()[keep])
        rows = torch.cat(parts) if parts else torch.zeros(0, self.d_in)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            rows = rows[torch.randperm(rows.shape[0], generator=gen)]
        self._cached = (b, rows)
        return rows

    def read(self, start: int, stop: int) -> Tensor:
        if not 0 <= start <= stop <= self.available_tokens:
            raise ActivationError(
                f"rows [{start}, {stop}) are outside the stream of {self.available_tokens} tokens"
            )
        out = []
        b = max(0, _bisect(self._starts, start))
        pos = start
        while pos < stop:
            lo, hi = self._starts[b], self._starts[b + 1]
            if hi > pos:
                rows = self._buffer(b)
                out.append(rows[pos - lo : min(stop, hi) - lo])
                pos = min(stop, hi)
            b += 1
        return torch.cat(out) if out else torch.zeros(0, self.d_in)


def _bisect(starts: list[int], pos: int) -> int:
    """Index of the buffer holding row ``pos`` (``starts`` ascending, first 0)."""
    lo, hi = 0, len(starts) - 1
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if starts[mid] <= pos:
            lo = mid
        else:
            hi = mid
    return lo


# -- the disk cache ------------------------------------------------------------------------


def cache_activations(
    source: ActivationSource,
    path: str | Path,
    tokens: int | None = None,
    *,
    shard_tokens: int = 65_536,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Path:
    """Write the first ``tokens`` rows of ``source`` to ``path`` (shards + manifest), atomically."""
    path = Path(path)
    total = source.available_tokens if tokens is None else tokens
    if total > source.available_tokens:
        raise ActivationError(
            f"{total:,} tokens were asked for but the source has only {source.available_tokens:,}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="tok", desc="caching activations", unit_scale=True)
        shards = []
        for n, start in enumerate(range(0, total, shard_tokens)):
            rows = source.read(start, min(total, start + shard_tokens)).to(dtype).contiguous()
            name = SHARD_PATTERN.format(n)
            save_file({SHARD_TENSOR: rows}, str(tmp / name))
            shards.append({"file": name, "tokens": int(rows.shape[0])})
            if bar is not None:
                bar.update(rows.shape[0])
        if bar is not None:
            bar.close()
        manifest = {
            "format": "kronscope-activations/1",
            "d_in": source.d_in,
            "tokens": total,
            "dtype": str(dtype).removeprefix("torch."),
            "source": source.describe(),
            "shards": shards,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class CachedActivations:
    """A cache written by ``cache_activations``, read back as the same stream.

    ``offset``/``limit`` select a window of it (the benchmark's held-out rows)."""

    def __init__(self, path: str | Path, offset: int = 0, limit: int | None = None):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ActivationError(f"{self.path}: not an activation cache ({exc})") from exc
        self.d_in = int(self.manifest["d_in"])
        self._starts = [0]
        for shard in self.manifest["shards"]:
            self._starts.append(self._starts[-1] + int(shard["tokens"]))
        total = self._starts[-1]
        if not 0 <= offset <= total:
            raise ActivationError(f"offset {offset} is outside the cache of {total} tokens")
        self.offset = offset
        self._tokens = total - offset if limit is None else min(limit, total - offset)
        self._cached: tuple[int, Tensor] | None = None
        self._hash: str | None = None

    @property
    def available_tokens(self) -> int:
        return self._tokens

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "cache",
            "path": str(self.path),
            "offset": self.offset,
            "tokens": self._tokens,
            "source": self.manifest.get("source", {}),
        }

    def _shard(self, n: int) -> Tensor:
        if self._cached is None or self._cached[0] != n:
            file = self.path / self.manifest["shards"][n]["file"]
            with safe_open(str(file), framework="pt") as f:
                self._cached = (n, f.get_tensor(SHARD_TENSOR).float())
        return self._cached[1]

    def read(self, start: int, stop: int) -> Tensor:
        if not 0 <= start <= stop <= self._tokens:
            raise ActivationError(
                f"rows [{start}, {stop}) are outside the cache window of {self._tokens} tokens"
            )
        start, stop = start + self.offset, stop + self.offset
        out = []
        n = _bisect(self._starts, start)
        pos = start
        while pos < stop:
            lo, hi = self._starts[n], self._starts[n + 1]
            if hi > pos:
                out.append(self._shard(n)[pos - lo : min(stop, hi) - lo])
                pos = min(stop, hi)
            n += 1
        return torch.cat(out) if out else torch.zeros(0, self.d_in)


# -- a subject model over a corpus, split into training and held-out contexts ---------------


class LMData:
    """A subject model, a corpus cut into contexts, and the train / held-out split.

    Contexts come from ``make_contexts(corpus, model, ctx_len, seed=0)``: the split is the
    same whatever the training seed (see the module docstring)."""

    def __init__(
        self, model: Any, corpus: Any, contexts: Any, hook: str, ctx_len: int, corpus_spec: str
    ):
        self.model, self.corpus, self.contexts = model, corpus, contexts
        self.hook, self.ctx_len, self.corpus_spec = hook, ctx_len, corpus_spec
        self.train_indices, self.heldout_indices = split_contexts(len(contexts))

    def info(self) -> dict[str, Any]:
        """Facts stored in checkpoints (``metadata.training``) and compared on resume."""
        return {
            "model": self.model.name,
            "hook": self.hook,
            "corpus": {
                "name": self.corpus.name,
                "spec": self.corpus_spec,
                "sha256": self.corpus.sha256,
            },
            "ctx_len": self.ctx_len,
            "split": f"contexts of make_contexts(seed=0); the last {HELDOUT_FRACTION:.0%} are held out",
            "train_contexts": len(self.train_indices),
            "heldout_contexts": len(self.heldout_indices),
        }

    def train_source(
        self,
        seed: int,
        *,
        buffer_tokens: int = 131_072,
        lm_batch_size: int = 16,
        tokens: int | None = None,
    ) -> LMActivationSource:
        """The training stream: training contexts in a seeded order, buffered and shuffled.

        A buffer holds about ``buffer_tokens`` real tokens, or ``tokens`` when fewer are
        needed in all (so a short run does not pay for a whole buffer)."""
        info = self.info()
        real = (~self.contexts.special_mask.bool()).sum(1)[self.train_indices].float().mean()
        wanted = buffer_tokens if tokens is None else min(buffer_tokens, tokens)
        buffer_contexts = max(1, math.ceil(wanted / max(1.0, float(real))))
        return LMActivationSource(
            self.model,
            self.contexts,
            self.hook,
            indices=self.train_indices,
            seed=seed,
            buffer_contexts=buffer_contexts,
            lm_batch_size=lm_batch_size,
            describe={
                "model": info["model"],
                "corpus_sha256": self.corpus.sha256,
                "ctx_len": self.ctx_len,
                "buffer_tokens": buffer_tokens,
                "buffer_contexts": buffer_contexts,
                "lm_batch_size": lm_batch_size,
            },
        )

    def heldout_contexts(self, tokens: int | None) -> list[int]:
        """Held-out contexts, in order, until they hold ``tokens`` non-special tokens."""
        counts = (~self.contexts.special_mask.bool()).sum(1)
        chosen, total = [], 0
        for i in self.heldout_indices:
            if tokens is not None and total >= tokens:
                break
            chosen.append(i)
            total += int(counts[i])
        return chosen

    def heldout_source(self, tokens: int | None, lm_batch_size: int = 16) -> LMActivationSource:
        """Activations of the held-out contexts (in order, unshuffled)."""
        return LMActivationSource(
            self.model,
            self.contexts,
            self.hook,
            indices=self.heldout_contexts(tokens),
            shuffle=False,
            buffer_contexts=max(1, 65_536 // self.ctx_len),
            lm_batch_size=lm_batch_size,
            describe={
                "model": self.model.name,
                "corpus_sha256": self.corpus.sha256,
                "split": "heldout",
            },
        )


def open_lm_data(
    model_name: str,
    hook: str,
    corpus: str = "builtin",
    ctx_len: int = 128,
    *,
    device: str = "auto",
    allow_paths: bool = True,
) -> LMData:
    """Load the model, check the hook, read the corpus and cut it into contexts."""
    from ..lm import load_corpus, load_model, make_contexts

    if ctx_len < 2:
        raise ActivationError(f"context length must be at least 2, got {ctx_len}")
    model = load_model(model_name, device=device, allow_paths=allow_paths)
    model.resolve_hook(hook)  # HookError names the hook and what exists
    corp = load_corpus(corpus)
    contexts = make_contexts(corp, model, ctx_len, seed=0)
    return LMData(model, corp, contexts, hook, ctx_len, corpus)
