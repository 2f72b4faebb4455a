"""One-pass CPU kernels (numba) for the harvest's per-chunk bookkeeping.

The torch path of :class:`~kronscope.harvest.compute.Harvester` updates the state with a
chain of torch ops, each a full pass over the chunk's ``[units, tokens]`` values (signs,
sums, bin codes, a bincount, per-context maxima, candidate masks, nonzero, ...). On a CPU
those passes, not the arithmetic, are what the bookkeeping costs. The kernels here read
each value once and do everything a value takes part in:

- moments: active count, sum (float64), maximum, fixed-bin histogram;
- the per-context maximum and, from it, the top-contexts candidates (key beats the unit's
  current K-th key);
- the reservoir candidates: active tokens whose key beats the unit's current K-th key. A
  unit keeps only the best ``K`` of them in a small sorted list while it scans, since no
  other candidate of this chunk can enter its reservoir; this also bounds the candidates
  of the first batches (while the reservoirs fill, every active token beats the floor);
- KronSAE: the both-parents-active counts of a head, while its parents' rows are in cache.

The results are those of the torch path: the same counts, histograms, maxima and kept
entries (keys are unique per unit, so which candidates win never depends on their order
or on how they are split). Sums differ only in float rounding (float64 accumulation here,
float32 partial sums there).

Value comparisons use the float32 bits where that is cheaper: for positive floats the
int32 bits are ordered like the values, and a top-contexts key is built from them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

TWO32 = np.int64(1 << 32)


@njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc"})
def dense_pass(
    a: np.ndarray,
    bits: np.ndarray,
    group: int,
    m: int,
    L: int,
    ctx: np.ndarray,
    keys: np.ndarray,
    top_floor: np.ndarray,
    sample_floor: np.ndarray,
    shift: int,
    code_lo: int,
    n_active: np.ndarray,
    total: np.ndarray,
    vmax_bits: np.ndarray,
    hist: np.ndarray,
    both: np.ndarray,
    bound: np.ndarray,
    top_key: np.ndarray,
    top_c: np.ndarray,
    top_n: np.ndarray,
    sample_key: np.ndarray,
    sample_t: np.ndarray,
    sample_n: np.ndarray,
) -> None:
    """Dense units ``a`` [U, T] (float32; ``bits`` the same memory as int32), units in
    groups of ``group`` consecutive rows (a KronSAE head's m + n parents, else 1). Only
    values > 0 count as active: ``a`` may hold raw pre-activations (ReLU not applied).

    Updates ``n_active``, ``total``, the maxima (``vmax_bits``: the int32 view of the
    float32 maxima, which are >= 0) [U] and ``hist`` [U, bins] in place, and ``both``
    [groups * m * n] when ``m`` > 0 (rows ``0..m-1`` of a group are the bases, the rest
    the extensions), and, when ``bound`` [groups, T] is not empty, each head's TopK
    bound ``max(p, 0) * max(q, 0)`` over its bases p and extensions q (for
    :func:`kron_topk`, while the head's rows are in cache). Writes per unit the
    top-contexts candidates (``top_key`` and the chunk context ``top_c`` [U, C],
    ``top_n`` [U] of them) and the best reservoir candidates (``sample_key``,
    ``sample_t`` [U, K], key descending, ``sample_n`` [U] of them).

    The loops are split so that the ones over every value have no branch on the value
    (about half the parents are active, at random: a branch would mispredict half the
    time) and can be vectorised; only the histogram's increments are scattered."""
    U, T = a.shape
    C = T // L
    K = sample_key.shape[1]
    bins = hist.shape[1]
    code_hi = code_lo + bins - 1
    groups = U // group
    n_ext = group - m
    with_bound = bound.shape[0] > 0
    for g in prange(groups):
        local = np.zeros(4 * bins, np.int32)
        codes = np.empty(T, np.int32)
        qmax = np.empty(T if with_bound else 0, np.float32)
        for r in range(group):
            u = g * group + r
            row = a[u]
            brow = bits[u]
            count = 0
            s = 0.0
            mxb = vmax_bits[u]
            tf = top_floor[u]
            nt = 0
            for c in range(C):
                # a slice per context and a loop from 0: numba then vectorises the loop
                # (indexing the row from c * L, it did not)
                seg = row[c * L : (c + 1) * L]
                bseg = brow[c * L : (c + 1) * L]
                cmax = np.int32(0)  # bits of the context's largest positive value (0: none)
                n_c = np.int32(0)
                s_c = np.float32(0.0)
                for t in range(L):
                    v = seg[t]
                    n_c += np.int32(v > 0)
                    s_c += max(v, np.float32(0.0))
                    cmax = max(cmax, bseg[t])
                count += n_c
                s += s_c
                if cmax > 0:
                    mxb = max(mxb, cmax)
                    tk = np.int64(cmax) * TWO32 + (TWO32 - 1 - ctx[c])
                    if tk > tf:
                        top_key[u, nt] = tk
                        top_c[u, nt] = c
                        nt += 1
            # bin codes of every value (a vectorised pass), then the increments, spread
            # over four copies of the bins: zeros and negatives all land in bin 0 and are
            # taken out again below (T - count of them), and with one copy every
            # increment of that bin would wait for the previous one
            for t in range(T):
                codes[t] = min(max(brow[t] >> shift, code_lo), code_hi) - code_lo + (t & 3) * bins
            for t in range(T):
                local[codes[t]] += 1
            local[0] -= T - count
            for i in range(bins):
                hist[u, i] += local[i] + local[bins + i] + local[2 * bins + i] + local[3 * bins + i]
            local[:] = 0
            # reservoir candidates: after the first batches a key rarely beats the floor,
            # so the test on the key comes first
            beat = sample_floor[u]
            ns = 0
            for t in range(T):
                k = keys[t]
                if k > beat and row[t] > 0:
                    # insert into the unit's sorted list (key descending)
                    i = ns if ns < K else K - 1
                    while i > 0 and sample_key[u, i - 1] < k:
                        sample_key[u, i] = sample_key[u, i - 1]
                        sample_t[u, i] = sample_t[u, i - 1]
                        i -= 1
                    sample_key[u, i] = k
                    sample_t[u, i] = t
                    if ns < K:
                        ns += 1
                    if ns == K:
                        beat = sample_key[u, K - 1]
            n_active[u] += count
            total[u] += s
            vmax_bits[u] = mxb
            top_n[u] = nt
            sample_n[u] = ns
        if m > 0:
            base = g * group
            out = g * m * n_ext
            for i in range(m):
                p = a[base + i]
                for j in range(n_ext):
                    q = a[base + m + j]
                    n_both = 0
                    for t in range(T):
                        n_both += (p[t] > 0) & (q[t] > 0)
                    both[out + i * n_ext + j] += n_both
            if with_bound:
                pm = bound[g]
                pm[:] = a[base]
                for i in range(1, m):
                    p = a[base + i]
                    for t in range(T):
                        pm[t] = max(pm[t], p[t])
                qmax[:] = a[base + m]
                for j in range(1, n_ext):
                    q = a[base + m + j]
                    for t in range(T):
                        qmax[t] = max(qmax[t], q[t])
                for t in range(T):
                    pm[t] = max(pm[t], np.float32(0.0)) * max(qmax[t], np.float32(0.0))


@njit(cache=True, nogil=True)
def gather_candidates(
    key: np.ndarray, second: np.ndarray, n: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-unit candidate lists ([U, W] with ``n`` [U] filled) -> flat ``(unit, key,
    second)``, grouped by unit in unit order."""
    U = key.shape[0]
    total = 0
    for u in range(U):
        total += n[u]
    unit = np.empty(total, np.int64)
    k_out = np.empty(total, np.int64)
    s_out = np.empty(total, np.int64)
    e = 0
    for u in range(U):
        for i in range(n[u]):
            unit[e] = u
            k_out[e] = key[u, i]
            s_out[e] = second[u, i]
            e += 1
    return unit, k_out, s_out


@njit(cache=True, nogil=True)
def sparse_pass(
    values: np.ndarray,
    bits: np.ndarray,
    indices: np.ndarray,
    valid: np.ndarray,
    L: int,
    ctx: np.ndarray,
    keys: np.ndarray,
    top_floor: np.ndarray,
    sample_floor: np.ndarray,
    shift: int,
    code_lo: int,
    n_active: np.ndarray,
    total: np.ndarray,
    vmax: np.ndarray,
    hist: np.ndarray,
    ctx_max: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse units: ``values``, ``indices`` [T, k] (float32, its int32 ``bits``; int64),
    ``valid`` [T]. Updates the moments in place like :func:`dense_pass`.

    ``ctx_max`` [F, C] int32 is scratch that must be all zero; it is left all zero.
    Returns the top-contexts candidates ``(unit, key, chunk context)`` in (unit, context)
    order and the
    reservoir candidates ``(unit, t, j)`` (active entries whose key beats the unit's
    floor, in token order)."""
    T, kk = values.shape
    C = T // L
    F = ctx_max.shape[0]
    bins = hist.shape[1]
    code_hi = code_lo + bins - 1
    s_unit = np.empty(T * kk, np.int64)
    s_t = np.empty(T * kk, np.int64)
    s_j = np.empty(T * kk, np.int64)
    ns = 0
    for t in range(T):
        if not valid[t]:
            continue
        c = t // L
        key = keys[t]
        for j in range(kk):
            v = values[t, j]
            if v > 0:
                u = indices[t, j]
                b = bits[t, j]
                n_active[u] += 1
                total[u] += v
                if v > vmax[u]:
                    vmax[u] = v
                code = b >> shift
                if code < code_lo:
                    code = code_lo
                elif code > code_hi:
                    code = code_hi
                hist[u, code - code_lo] += 1
                if b > ctx_max[u, c]:
                    ctx_max[u, c] = b
                if key > sample_floor[u]:
                    s_unit[ns] = u
                    s_t[ns] = t
                    s_j[ns] = j
                    ns += 1
    t_unit = np.empty(F * C, np.int64)
    t_key = np.empty(F * C, np.int64)
    t_c = np.empty(F * C, np.int64)
    nt = 0
    for u in range(F):
        for c in range(C):
            b = ctx_max[u, c]
            if b > 0:
                ctx_max[u, c] = 0
                tk = np.int64(b) * TWO32 + (TWO32 - 1 - ctx[c])
                if tk > top_floor[u]:
                    t_unit[nt] = u
                    t_key[nt] = tk
                    t_c[nt] = c
                    nt += 1
    return t_unit[:nt], t_key[:nt], t_c[:nt], s_unit[:ns], s_t[:ns], s_j[:ns]


@njit(cache=True, nogil=True)
def sparse_rows(
    values: np.ndarray,
    indices: np.ndarray,
    valid: np.ndarray,
    L: int,
    unit: np.ndarray,
    c: np.ndarray,
    n_units: int,
) -> np.ndarray:
    """Per-token values [E, L] of sparse units ``unit`` [E] in chunk contexts ``c`` [E]
    (0 where the unit is not active, or the token not valid): each context's entries are
    read once, whatever the number of rows wanted from it."""
    E = unit.shape[0]
    T, kk = values.shape
    C = T // L
    out = np.zeros((E, L), np.float32)
    # rows wanted per context, as linked lists (first[c], then following next_row)
    first = np.full(C, -1, np.int64)
    next_row = np.empty(E, np.int64)
    for e in range(E - 1, -1, -1):
        next_row[e] = first[c[e]]
        first[c[e]] = e
    row_of = np.full(n_units, -1, np.int64)  # unit -> its row for the current context
    same_as = np.full(E, -1, np.int64)  # a row asked for twice: the first one asked
    for cc in range(C):
        e = first[cc]
        if e < 0:
            continue
        while e >= 0:
            if row_of[unit[e]] >= 0:
                same_as[e] = row_of[unit[e]]
            else:
                row_of[unit[e]] = e
            e = next_row[e]
        for pos in range(L):
            t = cc * L + pos
            if not valid[t]:
                continue
            for j in range(kk):
                v = values[t, j]
                if v > 0:
                    r = row_of[indices[t, j]]
                    if r >= 0:
                        out[r, pos] = v
        e = first[cc]
        while e >= 0:
            row_of[unit[e]] = -1
            e = next_row[e]
    for e in range(E):
        if same_as[e] >= 0:
            out[e] = out[same_as[e]]
    return out


@njit(cache=True, nogil=True, parallel=True)
def keyed_merge(
    keys: np.ndarray,
    ctx: np.ndarray,
    pos: np.ndarray,
    value: np.ndarray,
    slot: np.ndarray,
    unit: np.ndarray,
    key: np.ndarray,
    cand_ctx: np.ndarray,
    cand_pos: np.ndarray,
    cand_value: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`KeyedTop.offer <kronscope.harvest.streaming.KeyedTop.offer>`'s merge of
    candidates ``(unit, key, cand_ctx, cand_pos, cand_value)`` [E] (any order) into the
    rows ``keys, ctx, pos, value, slot`` [U, K], in place, with the same rule: each row
    keeps the K largest keys, an old entry before a candidate of equal key; surviving
    entries keep their slots and new ones take the slots of the dropped ones, dropped
    and new entries both in rank order.

    Returns the new entries as ``(unit, rank, slot, candidate index)``: their per-token
    rows are the caller's to write (and, for top contexts, their position and value)."""
    U, K = keys.shape
    E = unit.shape[0]
    # candidates that beat their unit's floor, grouped by unit (a counting sort)
    count = np.zeros(U + 1, np.int64)
    for e in range(E):
        if key[e] > keys[unit[e], K - 1]:
            count[unit[e] + 1] += 1
    for u in range(U):
        count[u + 1] += count[u]
    n = count[U]
    order = np.empty(n, np.int64)
    fill = count[:U].copy()
    for e in range(E):
        u = unit[e]
        if key[e] > keys[u, K - 1]:
            order[fill[u]] = e
            fill[u] += 1
    # each unit's new entries go to its own range of the candidates' (count[u] on), in
    # parallel over blocks of units; the ranges are closed up at the end
    f_unit = np.empty(n, np.int64)
    f_rank = np.empty(n, np.int64)
    f_slot = np.empty(n, np.int64)
    f_id = np.empty(n, np.int64)
    n_new = np.zeros(U, np.int64)
    per = 512
    for blk in prange((U + per - 1) // per):
        old_key = np.empty(K, np.int64)
        old_ctx = np.empty(K, np.int64)
        old_pos = np.empty(K, np.int32)
        old_value = np.empty(K, np.float32)
        old_slot = np.empty(K, np.int64)
        for u in range(blk * per, min(U, (blk + 1) * per)):
            lo, hi = count[u], count[u + 1]
            if lo == hi:
                continue
            # this unit's candidates, key descending (keys are unique per unit): an insertion
            # sort for the usual few, a real sort for the many of the first batches
            cands = order[lo:hi]
            if hi - lo > 64:
                ck = np.empty(hi - lo, np.int64)
                for i in range(hi - lo):
                    ck[i] = key[cands[i]]
                cands[:] = cands[np.argsort(ck)[::-1]]
            for i in range(1, hi - lo):
                e = cands[i]
                j = i
                while j > 0 and key[cands[j - 1]] < key[e]:
                    cands[j] = cands[j - 1]
                    j -= 1
                cands[j] = e
            # ranks above the first one a candidate takes stay as they are (once a row is
            # full, a new entry usually lands near its end)
            best = key[cands[0]]
            r0 = K - 1
            while r0 > 0 and keys[u, r0 - 1] < best:
                r0 -= 1
            w = K - r0
            for r in range(w):
                old_key[r] = keys[u, r0 + r]
                old_ctx[r] = ctx[u, r0 + r]
                old_pos[r] = pos[u, r0 + r]
                old_value[r] = value[u, r0 + r]
                old_slot[r] = slot[u, r0 + r]
            i = 0  # next old entry (from rank r0)
            j = 0  # next candidate
            fresh = 0
            at = lo
            n_c = hi - lo
            for r in range(r0, K):
                if j < n_c and key[cands[j]] > old_key[i]:
                    e = cands[j]
                    j += 1
                    keys[u, r] = key[e]
                    ctx[u, r] = cand_ctx[e]
                    pos[u, r] = cand_pos[e]
                    value[u, r] = cand_value[e]
                    fresh += 1
                    f_unit[at] = u
                    f_rank[at] = r
                    f_id[at] = e
                    at += 1
                else:
                    keys[u, r] = old_key[i]
                    ctx[u, r] = old_ctx[i]
                    pos[u, r] = old_pos[i]
                    value[u, r] = old_value[i]
                    slot[u, r] = old_slot[i]
                    i += 1
            # the new entries take the dropped entries' slots (the old row's tail, in order)
            d = i
            n_new[u] = fresh
            for f in range(lo, lo + fresh):
                slot[u, f_rank[f]] = old_slot[d]
                f_slot[f] = old_slot[d]
                d += 1
    nf = 0
    for u in range(U):
        lo = count[u]
        for f in range(lo, lo + n_new[u]):
            f_unit[nf] = f_unit[f]
            f_rank[nf] = f_rank[f]
            f_slot[nf] = f_slot[f]
            f_id[nf] = f_id[f]
            nf += 1
    return f_unit[:nf], f_rank[:nf], f_slot[:nf], f_id[:nf]


@njit(cache=True, nogil=True, parallel=True)
def kron_topk(
    a: np.ndarray,
    bound: np.ndarray,
    m: int,
    n: int,
    values: np.ndarray,
    indices: np.ndarray,
) -> None:
    """KronSAE's exact TopK (the k largest latents lie in the k heads with the largest
    bound, see ``KronSAE._topk_from_parents``) from parents ``a`` [h * (m + n), T]
    (raw: ReLU applied here) and the bounds [h, T] from :func:`dense_pass`. Writes the k
    latents of each token, value descending, into ``values`` [T, k] (the pair products:
    mAND's square root is the caller's, in torch, whose float32 ``sqrt`` is not always
    the correctly rounded one) and ``indices`` [T, k].

    Ties, which torch's ``topk`` leaves unordered, go to the lower index: of heads with
    equal bounds the lower head, of equal pairs the one of the lower latent index. A
    block of 16 tokens at a time: the bounds are read a cache line per head, and the
    parents of the chosen heads mostly so too."""
    h, T = bound.shape
    k = values.shape[1]
    kh = min(k, h)
    group = m + n
    mn = m * n
    width = 16
    for blk in prange((T + width - 1) // width):
        t0 = blk * width
        nb = min(width, T - t0)
        hv = np.full((width, kh), np.float32(-1.0))  # bounds are >= 0: the first kh enter
        hi = np.zeros((width, kh), np.int64)
        for g in range(h):
            for j in range(nb):
                b = bound[g, t0 + j]
                if b > hv[j, kh - 1]:
                    r = kh - 1
                    while r > 0 and hv[j, r - 1] < b:
                        hv[j, r] = hv[j, r - 1]
                        hi[j, r] = hi[j, r - 1]
                        r -= 1
                    hv[j, r] = b
                    hi[j, r] = g
        # the chosen heads' parents, all loads first (independent: they overlap), then
        # the pairs from the copy
        par = np.empty((width, kh * group), np.float32)
        for j in range(nb):
            for s in range(kh):
                base = hi[j, s] * group
                for r in range(group):
                    par[j, s * group + r] = a[base + r, t0 + j]
        pv = np.empty(k, np.float32)
        pi = np.empty(k, np.int64)
        for j in range(nb):
            t = t0 + j
            pj = par[j]
            cnt = 0
            for s in range(kh):
                g = hi[j, s]
                at = s * group
                for i in range(m):
                    p = max(pj[at + i], np.float32(0.0))
                    for e in range(n):
                        v = p * max(pj[at + m + e], np.float32(0.0))
                        idx = g * mn + i * n + e
                        if cnt < k:
                            r = cnt
                            cnt += 1
                        elif v > pv[k - 1] or (v == pv[k - 1] and idx < pi[k - 1]):
                            r = k - 1
                        else:
                            continue
                        while r > 0 and (pv[r - 1] < v or (pv[r - 1] == v and pi[r - 1] > idx)):
                            pv[r] = pv[r - 1]
                            pi[r] = pi[r - 1]
                            r -= 1
                        pv[r] = v
                        pi[r] = idx
            for r in range(cnt, k):  # fewer pairs than k (never with k <= d_sae)
                pv[r] = 0.0
                pi[r] = 0
            for r in range(k):
                values[t, r] = pv[r]
                indices[t, r] = pi[r]


F16_MAX_BITS = 0x7BFF  # 65504, the largest finite float16


@njit(cache=True, nogil=True, parallel=True)
def put_rows(
    src: np.ndarray,
    src_row: np.ndarray,
    clamp: bool,
    f_unit: np.ndarray,
    f_rank: np.ndarray,
    f_slot: np.ndarray,
    tokens: np.ndarray,
    pos: np.ndarray,
    value: np.ndarray,
    peak: bool,
) -> None:
    """Write the per-token rows of new top-list entries (from :func:`keyed_merge`):
    entry f's row is ``src[src_row[f]]`` (float32 [L]), with values <= 0 taken as 0
    when ``clamp`` (parents not yet through ReLU), stored as float16 bits into
    ``tokens[f_unit[f], f_slot[f]]`` (uint16 [U, K, L]); with ``peak``, the row's first
    maximum into ``pos`` and ``value`` at ``[f_unit[f], f_rank[f]]``. What ``row_peak``
    and ``row_f16`` compute, without the float32 copies.

    The float16 bits are those of torch's (and numpy's) conversion, round to nearest
    even, clipped to +-65504 as ``codec.pack_f16`` does; computed without branches
    (selects, so that the loops vectorise: with about half the parents inactive, a
    branch would mispredict half the time). Normal results: the exponent rebiased and
    13 mantissa bits rounded off by an addition; subnormal ones: the float addition
    ``|x| + 0.5`` rounds the mantissa where float16 does. Not for NaN."""
    L = src.shape[1]
    E = f_unit.shape[0]
    per = 256
    for blk in prange((E + per - 1) // per):
        vals = np.empty(L, np.float32)
        val_bits = vals.view(np.int32)
        half = np.empty(L, np.float32)
        half_bits = half.view(np.int32)
        for f in range(blk * per, min(E, (blk + 1) * per)):
            row = src[src_row[f]]
            u = f_unit[f]
            for t in range(L):
                v = row[t]
                v = v if (v > 0 or not clamp) else np.float32(0.0)
                vals[t] = v
                half[t] = abs(v) + np.float32(0.5)  # subnormal results: 0.5 + |x|, rounded
            out = tokens[u, f_slot[f]]
            for t in range(L):
                b = val_bits[t]
                f_abs = b & 0x7FFFFFFF
                normal = (f_abs + (-(112 << 23) + 0xFFF) + ((f_abs >> 13) & 1)) >> 13
                sub = half_bits[t] - 0x3F000000
                h = normal if f_abs >= 0x38800000 else sub
                h = min(h, F16_MAX_BITS)  # clip: never inf
                out[t] = np.uint16(h | ((b >> 16) & 0x8000))
            if peak:
                best = np.float32(-np.inf)
                at = 0
                for t in range(L):
                    v = row[t]
                    v = v if (v > 0 or not clamp) else np.float32(0.0)
                    if v > best:
                        best = v
                        at = t
                pos[u, f_rank[f]] = at
                value[u, f_rank[f]] = best
