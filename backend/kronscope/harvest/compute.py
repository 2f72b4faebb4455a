"""The pass: subject model prefix -> SAE -> per-unit streaming state. No database here.

Per batch of contexts: activations ``[B, L, d]`` from the model prefix, then the SAE in
chunks of whole contexts (so a chunk's working set stays near the CPU cache and a
context's maximum is known inside one chunk):

- Dense units are handled units-major, ``[U, T]``: the KronSAE parents come straight out
  of a transposed encoder matmul (``W_enc^T @ x^T``), JumpReLU/ReLU latents are transposed
  once. Every reduction then runs along contiguous memory, and the histogram's scattered
  increments stay within one unit's bins.
- TopK-style latents stay sparse (``[T, k]`` values and indices); KronSAE latents are
  chosen from the same parents (the SAE's own head-bound TopK), so the encoder runs once.

Per chunk and block: moments (active count, sum, max, fixed-bin histogram), the
per-context maximum for the top-contexts state, sampling candidates (active tokens whose
key beats the unit's current K-th key) for the reservoir, and for KronSAE the
both-parents-active counts via one batched matmul of the parent masks per head.
Special tokens and padding are zeroed before anything looks at the values: they never
count.

On CPU with numba installed, this bookkeeping runs in the one-pass kernels of
:mod:`~kronscope.harvest.fused` (each value read once, the top-k merges in loops over the
touched rows); the torch ops below stay as the path without numba and as the reference the
kernels are tested against (the same state, entry for entry).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..sae import SAE, KronSAE, TopKStyleSAE
from ..sae.kronsae import safe_sqrt
from .encoder import TransposedEncoder
from .errors import HarvestError
from .keys import MAX_CONTEXTS, POSITION_BITS, token_keys, top_keys
from .params import HarvestParams
from .state import HarvestState, UnitBlock
from .streaming import ROWS_AT_ONCE, KeyedTop, RowsFn

PutRows = Callable[[KeyedTop, Tensor, Tensor, Tensor, Tensor, bool], None]
"""``put(top, ids, unit, rank, slot, peak)``: write the rows of candidates ``ids``, the new
entries ``(unit, rank, slot)`` of ``top`` (see :func:`~kronscope.harvest.fused.put_rows`)."""


def load_fused() -> ModuleType | None:
    """The numba kernels of :mod:`kronscope.harvest.fused`, or None without numba."""
    try:
        from . import fused
    except ImportError:
        return None
    return fused


MAX_CANDIDATES = 1 << 19
"""Reservoir candidates handled at once (bounds the memory of the first batches)."""
DEFAULT_CHUNK_ELEMENTS = 1 << 25
"""Dense values per chunk (128 MB of float32): whole contexts, at least one. Fewer, larger
chunks cost less bookkeeping (fewer kernel passes, and fewer top-list rows written and
then replaced within the same batch): with a F = 16,384 KronSAE on SmolLM2 (12,288
parents; batches of 16 contexts of 128 tokens, 100 MB of parents), one chunk a batch
instead of four cut the harvest's time beyond the bare prefix from 237, 253 and 233 ms a
batch to 210, 238 and 190 ms in three runs (each in one process over the same 49
batches, the settings interleaved)."""


@dataclass(frozen=True)
class Batch:
    """One batch of contexts with their global indices."""

    index: Tensor
    """[B] int64 global context indices."""
    input_ids: Tensor
    attention_mask: Tensor
    special_mask: Tensor
    """[B, L] bool, True for tokens that never count."""


class ContextsLike(Protocol):
    """What the harvest needs of ``kronscope.lm.Contexts``."""

    input_ids: Tensor
    attention_mask: Tensor
    special_mask: Tensor

    def __len__(self) -> int: ...


class ModelLike(Protocol):
    """What the harvest needs of ``kronscope.lm.SubjectModel``."""

    def activations(
        self, input_ids: Tensor, attention_mask: Tensor | None, hook_name: str
    ) -> Tensor: ...


def iter_batches(contexts: ContextsLike, batch_size: int, indices: Tensor) -> Iterator[Batch]:
    """Batches of the given global context indices, in order."""
    ids, mask, special = contexts.input_ids, contexts.attention_mask, contexts.special_mask
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        yield Batch(idx, ids[idx], mask[idx], special[idx])


def kron_topk_t(
    a: Tensor, h: int, m: int, n: int, k: int, composition: str
) -> tuple[Tensor, Tensor]:
    """KronSAE's exact TopK (``KronSAE._topk_from_parents``: the k largest latents lie in
    the k heads with the largest bound ``max p * max q``) on parents laid out units-major,
    ``a`` [h*(m+n), T] -> values, indices [T, k]. Same algorithm, same tie order; only the
    layout differs, so every reduction over a head's parents is contiguous."""
    T = a.shape[1]
    av = a.view(h, m + n, T)
    p, q = av[:, :m], av[:, m:]
    if composition == "product":
        pmax, pmin, qmax, qmin = p.amax(1), p.amin(1), q.amax(1), q.amin(1)
        bound = torch.stack([pmax * qmax, pmin * qmin, pmax * qmin, pmin * qmax]).amax(0)
    else:
        bound = p.amax(1) * q.amax(1)  # [h, T]; parents are >= 0
    kh = min(k, h)
    # topk along contiguous rows: the copy costs less than the strided reads it saves
    heads = bound.t().contiguous().topk(kh, dim=1, sorted=False).indices  # [T, kh]
    tt = torch.arange(T, device=a.device).unsqueeze(1)
    ps, qs = p[heads, :, tt], q[heads, :, tt]  # [T, kh, m], [T, kh, n]
    pairs = (ps.unsqueeze(-1) * qs.unsqueeze(-2)).reshape(T, kh * m * n)
    top = pairs.topk(k, dim=-1)
    mn = m * n
    indices = heads.gather(1, top.indices // mn) * mn + top.indices % mn
    values = safe_sqrt(top.values) if composition == "mand" else top.values
    return values, indices


def _dense_rows(a3: Tensor, unit: Tensor, ctx: Tensor) -> RowsFn:
    """Rows of candidates ``(unit[i], ctx[i])`` of dense values ``a3`` [U, C, L]."""

    def rows(ids: Tensor) -> Tensor:
        return a3[unit[ids], ctx[ids]]

    return rows


def _write_rows(
    kernels: ModuleType,
    top: KeyedTop,
    src: np.ndarray,
    src_row: np.ndarray,
    clamp: bool,
    unit: Tensor,
    rank: Tensor,
    slot: Tensor,
    peak: bool,
) -> None:
    """:func:`~kronscope.harvest.fused.put_rows` into ``top``: new entry f (``unit``,
    ``rank``, ``slot``) gets row ``src[src_row[f]]``."""
    kernels.put_rows(
        src,
        src_row,
        clamp,
        unit.numpy(),
        rank.numpy(),
        slot.numpy(),
        top.tokens.view(torch.int16).numpy().view(np.uint16),
        top.pos.numpy(),
        top.value.numpy(),
        peak,
    )


class _Scratch:
    """Work buffers for the dense ``[U, T]`` matrices, reused from chunk to chunk.

    On CPU a fresh tensor of this size is fresh memory from the OS: every op that makes
    one pays its page faults, which can cost more than the op itself (elementwise ops on
    the parents' matrix ran several times faster into a reused buffer than into a new one).
    A buffer only lives for one chunk: nothing keeps a view of it beyond the chunk."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        numel = 1
        for size in shape:
            numel *= size
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


class Harvester:
    """Runs the model prefix and the SAE over batches and updates a :class:`HarvestState`."""

    def __init__(
        self,
        sae: SAE,
        model: ModelLike,
        params: HarvestParams,
        *,
        ctx_len: int,
        hook_name: str | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        bookkeeping_threads: int | None = None,
        fused: bool | None = None,
    ):
        self.sae = sae
        self.model = model
        self.params = params
        self.ctx_len = ctx_len
        hook = hook_name or sae.cfg.hook_name
        if not hook:
            raise HarvestError(
                "the SAE's configuration names no hook (metadata.hook_name): pass hook_name"
            )
        self.hook_name = hook
        self.kron = isinstance(sae, KronSAE)
        self.device = sae.device
        self.chunk_elements = chunk_elements
        self.bookkeeping_threads = bookkeeping_threads
        """CPU threads for the streaming updates (None: all of torch's threads)."""
        # Non-negative dense values (all but the KronSAE ``product`` ablation's parents)
        # let a plain sum stand for the sum over active values.
        self.parents_nonneg = not (self.kron and sae.cfg.composition == "product")
        p = params
        self._shift = p.hist_shift
        self._code_lo = p.hist_code_lo
        self._bins = p.hist_bins
        self._col_offsets: dict[int, Tensor] = {}
        self._scratch = _Scratch()
        # The one-pass numba kernels (CPU only): None = when numba imports, True = required,
        # False = the torch ops (the reference they are tested against).
        kernels = None
        if fused is not False and self.device.type == "cpu":
            kernels = load_fused()
        if fused and kernels is None:
            raise HarvestError(
                "the fused harvest kernels need numba (pip install numba) and a CPU device"
            )
        self._kernels = kernels
        self._ctx_max_buf = np.zeros(0, np.int32)
        self._encoder = TransposedEncoder(sae) if self.kron else None

    @property
    def fused(self) -> bool:
        """Whether the bookkeeping runs in the numba kernels (else in torch ops)."""
        return self._kernels is not None

    def prepare(self) -> float:
        """Compile the fused kernels (or load them from numba's cache) on a tiny chunk, so
        that no batch pays for it. Returns the seconds it took (0 on the torch path)."""
        if self._kernels is None:
            return 0.0
        t0 = time.perf_counter()
        L, C = 4, 2
        group, m = self._dense_group()
        units = max(group, 2)
        block = UnitBlock.empty("warm-up", units, 2, 2, L, self._bins, self.device)
        gen = torch.Generator().manual_seed(0)
        a = torch.rand(units, C * L, generator=gen)
        values = torch.rand(C * L, 2, generator=gen)
        indices = torch.stack([torch.zeros(C * L), torch.ones(C * L)], 1).to(torch.int64)
        index = torch.arange(C, dtype=torch.int64)
        keys = ~token_keys(0, index, L).reshape(-1)
        both = torch.zeros(units // group * m * (group - m), dtype=torch.int64) if m else None
        if m and self.parents_nonneg:
            bound = np.zeros((units // group, C * L), np.float32)
            self._dense_fused(block, a, index, keys, L, both, bound)
            k = 3  # its own outputs: the latents here are not the warm-up block's units
            out = np.zeros((C * L, k), np.float32), np.zeros((C * L, k), np.int64)
            self._kernels.kron_topk(a.numpy(), bound, m, group - m, *out)
        else:
            self._dense_fused(block, a, index, keys, L, both)
        valid = torch.ones(C * L, dtype=torch.bool)
        self._sparse_fused(block, values, indices, valid, index, keys, L)
        return time.perf_counter() - t0

    def _dense_group(self) -> tuple[int, int]:
        """(rows per group, bases per group) of the dense units for :func:`dense_pass`:
        a KronSAE head's m + n parents with m bases, else single units."""
        sae = self.sae
        if isinstance(sae, KronSAE):
            return sae.m + sae.n, sae.m
        return 1, 0

    # -- state --------------------------------------------------------------------------
    @property
    def n_latents(self) -> int:
        return self.sae.d_sae

    @property
    def n_parents(self) -> int:
        if not self.kron:
            return 0
        sae = self.sae
        assert isinstance(sae, KronSAE)
        return sae.h * (sae.m + sae.n)

    def new_state(self, meta: dict | None = None) -> HarvestState:
        p, L, dev = self.params, self.ctx_len, self.device
        latent = UnitBlock.empty(
            "latent", self.n_latents, p.examples, p.samples, L, p.hist_bins, dev
        )
        state = HarvestState(latent, meta=dict(meta or {}))
        if self.kron:
            state.parent = UnitBlock.empty(
                "parent", self.n_parents, p.examples, p.samples, L, p.hist_bins, dev
            )
            state.both_parents_active = torch.zeros(self.n_latents, dtype=torch.int64, device=dev)
        return state

    # -- checks -------------------------------------------------------------------------
    def check(self, contexts: ContextsLike) -> None:
        """Fail before the pass on inputs that cannot work (clear messages)."""
        n = len(contexts)
        if n == 0:
            raise HarvestError("the corpus gave no contexts: there is nothing to harvest")
        if n >= MAX_CONTEXTS:
            raise HarvestError(f"{n} contexts is more than a harvest supports ({MAX_CONTEXTS - 1})")
        ids = contexts.input_ids
        if ids.shape[1] != self.ctx_len:
            raise HarvestError(f"contexts have {ids.shape[1]} tokens, expected {self.ctx_len}")
        if self.ctx_len >= 1 << POSITION_BITS:
            raise HarvestError(
                f"ctx_len {self.ctx_len} is too long (at most {(1 << POSITION_BITS) - 1})"
            )
        max_len = getattr(self.model, "max_length", None)
        if isinstance(max_len, int) and self.ctx_len > max_len:
            raise HarvestError(
                f"ctx_len {self.ctx_len} is longer than the model allows ({max_len} positions)"
            )
        if bool(contexts.special_mask.all()):
            raise HarvestError("the corpus has no usable tokens: every token is special or padding")
        # One context through the prefix: the hook's width must be the SAE's d_in.
        acts = self.model.activations(ids[:1], contexts.attention_mask[:1], self.hook_name)
        if acts.shape[-1] != self.sae.d_in:
            raise HarvestError(
                f"the SAE reads activations of width d_in = {self.sae.d_in}, but hook "
                f"{self.hook_name!r} of model {getattr(self.model, 'name', '?')!r} gives width "
                f"{acts.shape[-1]}"
            )

    # -- the pass -----------------------------------------------------------------------
    @torch.no_grad()
    def process(self, state: HarvestState, batch: Batch) -> None:
        """Update ``state`` with one batch of contexts."""
        acts = self.model.activations(batch.input_ids, batch.attention_mask, self.hook_name)
        self.process_activations(state, batch.index, acts, batch.special_mask)

    @torch.no_grad()
    def process_activations(
        self, state: HarvestState, index: Tensor, acts: Tensor, special: Tensor
    ) -> None:
        """Update ``state`` from activations ``[B, L, d]`` of contexts ``index`` [B]."""
        dev = self.device
        B, L, _ = acts.shape
        acts = acts.to(dev)
        index = index.to(dev, torch.int64)
        valid = ~special.to(dev, torch.bool)
        keys = ~token_keys(self.params.seed, index, L)  # larger = sampled first
        state.tokens_seen += B * L
        state.tokens_valid += int(valid.sum())
        # Contexts per chunk: bounded by the dense [units, tokens] matrix (KronSAE parents,
        # JumpReLU/ReLU latents); TopK latents alone are sparse, the whole batch is small.
        dense_units = self.n_parents if self.kron else (0 if self.sae.sparse else self.n_latents)
        cc = B if dense_units == 0 else max(1, self.chunk_elements // (dense_units * L))
        cc = -(-B // -(-B // cc))  # as many chunks, of equal sizes (16 = 8 + 8, not 10 + 6)
        for c0 in range(0, B, cc):
            sl = slice(c0, c0 + cc)
            self._chunk(state, index[sl], acts[sl], valid[sl], keys[sl])

    def _chunk(
        self, state: HarvestState, index: Tensor, acts: Tensor, valid: Tensor, keys: Tensor
    ) -> None:
        C, L, d = acts.shape
        x = acts.reshape(C * L, d)
        v = valid.reshape(-1)
        k = keys.reshape(-1)
        invalid = (~v).nonzero().squeeze(1)
        sae = self.sae
        if self.kron:
            assert isinstance(sae, KronSAE) and state.parent is not None
            width, T = sae.h * (sae.m + sae.n), C * L
            enc = self._encoder
            assert enc is not None
            out = (
                None if enc.onednn else self._scratch.get("a", (width, T), torch.float32, x.device)
            )
            a = enc(x, out)
            fused = self._kernels is not None
            # the kernels read raw pre-activations as ReLU'd ones (only values > 0 count)
            if self.parents_nonneg and not fused:
                a.relu_()
            if invalid.numel():
                a.index_fill_(1, invalid, 0.0)
            with self._bookkeeping():
                if fused:
                    both = state.both_parents_active
                    # mAND or ReLU product: the kernels' TopK (the u*v ablation: torch's)
                    bound = (
                        self._np("bound", (sae.h, T), torch.float32)
                        if self.parents_nonneg
                        else None
                    )
                    self._dense_fused(state.parent, a, index, k, L, both, bound)
                    if bound is not None:
                        values, indices = self._kron_topk_fused(a, bound)
                    else:
                        values, indices = kron_topk_t(
                            a, sae.h, sae.m, sae.n, sae.k, sae.composition
                        )
                    self._sparse_fused(state.latent, values, indices, v, index, k, L)
                    return
                values, indices = kron_topk_t(a, sae.h, sae.m, sae.n, sae.k, sae.composition)
                act = self._dense(state.parent, a, index, k, L, self.parents_nonneg)
                self._both(state, act, C * L)
                self._sparse(state.latent, values, indices, v, index, k, L)
        elif isinstance(sae, TopKStyleSAE):
            values, indices = sae.encode(x)
            with self._bookkeeping():
                if self._kernels is not None:
                    self._sparse_fused(state.latent, values, indices, v, index, k, L)
                else:
                    self._sparse(state.latent, values, indices, v, index, k, L)
        else:
            f = sae.encode_dense(x).to(torch.float32).t().contiguous()  # [F, T]
            if invalid.numel():
                f.index_fill_(1, invalid, 0.0)
            with self._bookkeeping():
                if self._kernels is not None:
                    self._dense_fused(state.latent, f, index, k, L, None)
                else:
                    self._dense(state.latent, f, index, k, L, True)

    @contextmanager
    def _bookkeeping(self) -> Iterator[None]:
        """Run the streaming updates on ``bookkeeping_threads`` CPU threads (default all).

        They are many medium-sized ops. On an idle 2-core machine ``benchmarks/
        harvest_speed.py`` (F = 16,384, 400k tokens) measured the harvest at 1.49x the
        prefix time with both threads, 1.65x with one (before the work buffers of
        ``_Scratch``, which brought it to 1.42x); on a machine shared with other busy
        processes, fewer threads can be faster, since a pre-empted thread stalls every op.
        Nothing changes on GPU."""
        n = torch.get_num_threads()
        want = self.bookkeeping_threads or n
        if self.device.type != "cpu" or want >= n:
            yield
            return
        torch.set_num_threads(want)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    # -- dense units [U, T] ---------------------------------------------------------------
    def _offsets(self, units: int) -> Tensor:
        off = self._col_offsets.get(units)
        if off is None:
            off = (
                torch.arange(units, dtype=torch.int32, device=self.device) * self._bins
                - self._code_lo
            ).unsqueeze(1)
            self._col_offsets[units] = off
        return off

    def _dense(
        self, block: UnitBlock, a: Tensor, index: Tensor, keys: Tensor, L: int, nonneg: bool
    ) -> Tensor:
        """Update a block from dense values ``a`` [U, T] (invalid tokens already zero).
        Returns the activity mask as float [U, T] (1.0 where a > 0)."""
        U, T = a.shape
        C = T // L
        mo = block.moments
        # 1.0 where active: sign() is one pass where the values are known to be >= 0.
        scratch = self._scratch
        if nonneg:
            actf = torch.sign(a, out=scratch.get("active", (U, T), torch.float32, a.device))
        else:
            actf = (a > 0).to(torch.float32)
        n = actf.sum(1).to(torch.int64)  # exact: T < 2^24
        mo.n_active += n
        mo.total += (a.sum(1) if nonneg else a.clamp(min=0).sum(1)).to(torch.float64)
        # Histogram: bin code from the float bits; zeros and negatives land in bin 0 and
        # are taken out again (there are T - n of them per unit).
        code = torch.bitwise_right_shift(
            a.view(torch.int32), self._shift, out=scratch.get("code", (U, T), torch.int32, a.device)
        )
        code.clamp_(self._code_lo, self._code_lo + self._bins - 1).add_(self._offsets(U))
        hist = torch.bincount(code.view(-1), minlength=U * self._bins).view(U, self._bins)
        hist[:, 0] -= T - n
        mo.hist += hist
        a3 = a.view(U, C, L)
        ctx_max = a3.amax(2)  # [U, C]
        torch.maximum(mo.max, ctx_max.amax(1), out=mo.max)

        # Top contexts: (unit, context) pairs whose key beats the unit's K-th.
        tk = top_keys(ctx_max, index.unsqueeze(0))
        u, b = ((ctx_max > 0) & (tk > block.top.floor.unsqueeze(1))).nonzero(as_tuple=True)
        if u.numel():
            block.top.offer(u, tk[u, b], index[b], None, _dense_rows(a3, u, b), grouped=True)

        self._sample_dense(block, a, index, keys, L)
        return actf

    def _sample_dense(
        self, block: UnitBlock, a: Tensor, index: Tensor, keys: Tensor, L: int
    ) -> None:
        """Reservoir candidates of dense units: active tokens whose key beats the unit's
        current K-th. Only units whose floor is below the best key in sight can take
        anything; once units have seen many active tokens that is a small set, so only
        their rows are looked at. While the reservoirs fill (the first batches) nearly
        every active token is a candidate: the tokens are then taken in slices of about
        ``MAX_CANDIDATES`` candidates, the floors rising between slices, so memory stays
        bounded."""
        U, T = a.shape
        a3 = a.view(U, T // L, L)
        start, step = 0, T
        while start < T:
            stop = min(T, start + step)
            kk = keys[start:stop]
            floor = block.sample.floor
            need = (floor < kk.max()).nonzero().squeeze(1)
            if need.numel() == 0:
                start = stop
                continue
            whole = need.numel() == U
            sub = a[:, start:stop] if whole else a[:, start:stop].index_select(0, need)
            cand = torch.gt(
                sub, 0, out=self._scratch.get("cand", tuple(sub.shape), torch.bool, a.device)
            )
            cand &= kk.unsqueeze(0) > floor[need].unsqueeze(1)
            # count_nonzero: a bool sum() would first copy the mask to int64.
            if stop - start > 1 and (n := int(torch.count_nonzero(cand))) > MAX_CANDIDATES:
                step = max(1, (stop - start) * MAX_CANDIDATES // n)
                continue  # the same start, a thinner slice
            ul, tl = cand.nonzero(as_tuple=True)
            if ul.numel():
                u = ul if whole else need[ul]
                t = tl + start
                ctx_of = t // L
                block.sample.offer(
                    u,
                    keys[t],
                    index[ctx_of],
                    sub[ul, tl],
                    _dense_rows(a3, u, ctx_of),
                    pos=t % L,
                    grouped=True,
                )
            start = stop

    def _both(self, state: HarvestState, actf: Tensor, T: int) -> None:
        """both_parents_active[g, i, j] += sum_t [p[g,i] > 0][q[g,j] > 0] (one bmm)."""
        sae = self.sae
        assert isinstance(sae, KronSAE) and state.both_parents_active is not None
        m3 = actf.view(sae.h, sae.m + sae.n, T)
        both = torch.bmm(m3[:, : sae.m], m3[:, sae.m :].transpose(1, 2))  # [h, m, n]
        state.both_parents_active += both.reshape(-1).round().to(torch.int64)

    # -- sparse units ([T, k] values and indices) -------------------------------------------
    def _sparse(
        self,
        block: UnitBlock,
        values: Tensor,
        indices: Tensor,
        valid: Tensor,
        index: Tensor,
        keys: Tensor,
        L: int,
    ) -> None:
        F = block.units
        C = values.shape[0] // L
        mo = block.moments
        values = values.to(torch.float32)
        t, j = ((values > 0) & valid.unsqueeze(1)).nonzero(as_tuple=True)
        u = indices[t, j]
        val = values[t, j]
        mo.n_active += torch.bincount(u, minlength=F)
        mo.total += torch.bincount(u, weights=val.to(torch.float64), minlength=F)
        code = (val.view(torch.int32) >> self._shift).clamp_(
            self._code_lo, self._code_lo + self._bins - 1
        ) - self._code_lo
        mo.hist += torch.bincount(u * self._bins + code, minlength=F * self._bins).view(
            F, self._bins
        )
        ctx_of = t // L
        pos = t % L
        pair = u * C + ctx_of
        ctx_max = torch.zeros(F * C, dtype=torch.float32, device=values.device)
        ctx_max.scatter_reduce_(0, pair, val, "amax")
        ctx_max = ctx_max.view(F, C)
        torch.maximum(mo.max, ctx_max.amax(1), out=mo.max)

        def rows_for(pairs: Tensor) -> Tensor:
            """[E] flat (unit*C + context) pairs -> [E, L] values."""
            uniq, inv = torch.unique(pairs, return_inverse=True)
            loc = torch.searchsorted(uniq, pair).clamp_(max=len(uniq) - 1)
            hit = uniq[loc] == pair
            out = torch.zeros(len(uniq), L, dtype=torch.float32, device=values.device)
            out[loc[hit], pos[hit]] = val[hit]
            return out[inv]

        tk = top_keys(ctx_max, index.unsqueeze(0))
        cu, cb = ((ctx_max > 0) & (tk > block.top.floor.unsqueeze(1))).nonzero(as_tuple=True)
        if cu.numel():
            block.top.offer(
                cu, tk[cu, cb], index[cb], None, lambda ids: rows_for(cu[ids] * C + cb[ids])
            )

        k = keys[t]
        ok = (k > block.sample.floor[u]).nonzero().squeeze(1)
        if ok.numel():
            su, st = u[ok], t[ok]
            block.sample.offer(
                su,
                k[ok],
                index[ctx_of[ok]],
                val[ok],
                lambda ids: rows_for(su[ids] * C + st[ids] // L),
                pos=pos[ok],
            )

    # -- the fused path (numba kernels, one pass over the values) ---------------------------
    def _np(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
        """A reused work buffer as a numpy array (see :class:`_Scratch`)."""
        return self._scratch.get(name, shape, dtype, torch.device("cpu")).numpy()

    def _dense_fused(
        self,
        block: UnitBlock,
        a: Tensor,
        index: Tensor,
        keys: Tensor,
        L: int,
        both: Tensor | None,
        bound: np.ndarray | None = None,
    ) -> None:
        """:meth:`_dense` (and, given ``both``, :meth:`_both`) in one kernel pass over
        ``a`` [U, T] (float32, contiguous; invalid tokens already zero; values <= 0 are
        inactive, so KronSAE parents need no ReLU first). Given ``bound`` [h, T], also the
        heads' TopK bounds for :meth:`_kron_topk_fused`."""
        kernels = self._kernels
        assert kernels is not None
        U, T = a.shape
        C = T // L
        K = block.sample.k
        group, m = self._dense_group() if both is not None else (1, 0)
        an = a.numpy()
        mo = block.moments
        top_key = self._np("top_key", (U, C), torch.int64)
        top_c = self._np("top_c", (U, C), torch.int64)
        top_n = self._np("top_n", (U,), torch.int64)
        sample_key = self._np("sample_key", (U, K), torch.int64)
        sample_t = self._np("sample_t", (U, K), torch.int64)
        sample_n = self._np("sample_n", (U,), torch.int64)
        kernels.dense_pass(
            an,
            an.view(np.int32),
            group,
            m,
            L,
            index.numpy(),
            keys.numpy(),
            block.top.floor.contiguous().numpy(),
            block.sample.floor.contiguous().numpy(),
            self._shift,
            self._code_lo,
            mo.n_active.numpy(),
            mo.total.numpy(),
            mo.max.numpy().view(np.int32),  # maxima are >= 0: bits order like values
            mo.hist.numpy(),
            both.numpy() if both is not None else np.zeros(0, np.int64),
            bound if bound is not None else np.zeros((0, 0), np.float32),
            top_key,
            top_c,
            top_n,
            sample_key,
            sample_t,
            sample_n,
        )
        rows = a.view(U * C, L)  # row u * C + c: unit u's values in chunk context c
        put = self._put_rows(rows, clamp=self.parents_nonneg)
        u, tk, c = (torch.from_numpy(x) for x in kernels.gather_candidates(top_key, top_c, top_n))
        if u.numel():
            self._offer(block.top, u, tk, index[c], None, put(u * C + c))
        u, sk, t = (
            torch.from_numpy(x) for x in kernels.gather_candidates(sample_key, sample_t, sample_n)
        )
        if u.numel():
            ctx_of = t // L
            self._offer(block.sample, u, sk, index[ctx_of], a[u, t], put(u * C + ctx_of), t % L)

    def _kron_topk_fused(self, a: Tensor, bound: np.ndarray) -> tuple[Tensor, Tensor]:
        """:func:`kron_topk_t` in a kernel, from raw parents ``a`` [h*(m+n), T] and the
        bounds :func:`dense_pass` wrote (mAND and ReLU product)."""
        kernels = self._kernels
        assert kernels is not None
        sae = self.sae
        assert isinstance(sae, KronSAE)
        T = a.shape[1]
        values = self._np("topk_values", (T, sae.k), torch.float32)
        indices = self._np("topk_indices", (T, sae.k), torch.int64)
        kernels.kron_topk(a.numpy(), bound, sae.m, sae.n, values, indices)
        products = torch.from_numpy(values)
        return (safe_sqrt(products) if sae.composition == "mand" else products), torch.from_numpy(
            indices
        )

    def _put_rows(self, src: Tensor, clamp: bool) -> Callable[[Tensor], PutRows]:
        """For :meth:`_offer`: candidate e's per-token row is ``src[row[e]]`` (float32
        [R, L]); values <= 0 read as 0 when ``clamp``."""
        kernels = self._kernels
        assert kernels is not None
        sn = src.numpy()

        def for_rows(row: Tensor) -> PutRows:
            def put(top: KeyedTop, ids: Tensor, fu: Tensor, fr: Tensor, fs: Tensor, peak: bool):
                _write_rows(kernels, top, sn, row[ids].numpy(), clamp, fu, fr, fs, peak)

            return put

        return for_rows

    def _sparse_fused(
        self,
        block: UnitBlock,
        values: Tensor,
        indices: Tensor,
        valid: Tensor,
        index: Tensor,
        keys: Tensor,
        L: int,
    ) -> None:
        """:meth:`_sparse` in one kernel pass over the [T, k] values and indices."""
        kernels = self._kernels
        assert kernels is not None
        F = block.units
        C = values.shape[0] // L
        vn = values.to(torch.float32).contiguous().numpy()
        inn = indices.to(torch.int64).contiguous().numpy()
        valid_n = valid.contiguous().numpy()
        mo = block.moments
        # all zero between calls: the kernel clears what it sets
        ctx_max = self._sparse_ctx_max(F * C)[: F * C].reshape(F, C)
        tu, tk, tc, su, st, sj = (
            torch.from_numpy(x)
            for x in kernels.sparse_pass(
                vn,
                vn.view(np.int32),
                inn,
                valid_n,
                L,
                index.numpy(),
                keys.numpy(),
                block.top.floor.contiguous().numpy(),
                block.sample.floor.contiguous().numpy(),
                self._shift,
                self._code_lo,
                mo.n_active.numpy(),
                mo.total.numpy(),
                mo.max.numpy(),
                mo.hist.numpy(),
                ctx_max,
            )
        )

        def put_from(unit: Tensor, c: Tensor) -> PutRows:
            """Rows of candidates ``(unit[e], c[e])``, built for the new entries only."""

            def put(top: KeyedTop, ids: Tensor, fu: Tensor, fr: Tensor, fs: Tensor, peak: bool):
                rows = kernels.sparse_rows(
                    vn, inn, valid_n, L, unit[ids].numpy(), c[ids].numpy(), F
                )
                _write_rows(kernels, top, rows, np.arange(len(ids)), False, fu, fr, fs, peak)

            return put

        if tu.numel():
            self._offer(block.top, tu, tk, index[tc], None, put_from(tu, tc))
        if su.numel():
            self._offer(
                block.sample,
                su,
                keys[st],
                index[st // L],
                torch.from_numpy(vn)[st, sj],
                put_from(su, st // L),
                st % L,
            )

    def _offer(
        self,
        top: KeyedTop,
        unit: Tensor,
        key: Tensor,
        ctx: Tensor,
        value: Tensor | None,
        put: PutRows,
        pos: Tensor | None = None,
    ) -> None:
        """:meth:`KeyedTop.offer` with the merge and the rows' writes in kernels (same
        result: a few loops over the touched rows instead of some forty torch ops over
        them); ``put`` writes the rows of the new entries."""
        kernels = self._kernels
        assert kernels is not None
        E = unit.numel()
        cand_pos = torch.zeros(E, dtype=torch.int32) if pos is None else pos.to(torch.int32)
        cand_value = (
            torch.zeros(E, dtype=torch.float32) if value is None else value.to(torch.float32)
        )
        fu, fr, fs, fid = (
            torch.from_numpy(x)
            for x in kernels.keyed_merge(
                top.keys.numpy(),
                top.ctx.numpy(),
                top.pos.numpy(),
                top.value.numpy(),
                top.slot.numpy(),
                unit.to(torch.int64).contiguous().numpy(),
                key.contiguous().numpy(),
                ctx.to(torch.int64).contiguous().numpy(),
                cand_pos.contiguous().numpy(),
                cand_value.contiguous().numpy(),
            )
        )
        for lo in range(0, len(fid), ROWS_AT_ONCE):  # bounded memory in the first batches
            part = slice(lo, lo + ROWS_AT_ONCE)
            # top contexts: also the first position of the row's maximum, and its value
            put(top, fid[part], fu[part], fr[part], fs[part], pos is None)

    def _sparse_ctx_max(self, size: int) -> np.ndarray:
        """[size] int32 scratch, all zero (the kernel leaves it so)."""
        buf = self._ctx_max_buf
        if buf.shape[0] < size:
            buf = np.zeros(size, np.int32)
            self._ctx_max_buf = buf
        return buf
