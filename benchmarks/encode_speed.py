"""KronSAE vs TopK encode at equal dictionary size F: time, FLOP ratio and peak memory.

    python benchmarks/encode_speed.py [--threads N] [--clock cpu|wall] [--repeats R] [--quick]

For d in {384, 768}, F in {2^14, 2^16} and (m, n) in {(2,4), (4,4), (4,8)}, k = 32, a
batch of 2048 random fp32 tokens, under ``torch.inference_mode``:

- TopK = ``TopKSAE.encode`` as shipped (one GEMM with the bias, TopK over F, ReLU).
- Kron = ``KronSAE.encode`` (head-pruned exact TopK, kronsae.md).
- ref  = ``KronSAE.encode_reference`` (all F composed latents, then TopK), for comparison
  (timed once by default: it is the slow one).

Time: warm-up once, then the median of R runs, the encodes interleaved run by run so that
a change of machine load hits all of them alike. The clock is per-process CPU time (user
+ system: page faults of fresh allocations included) by default: on a shared machine it
does not count the time other processes hold the cores, and with the default of one
thread it is the compute time. On a quiet machine ``--threads 2 --clock wall`` measures
wall-clock time instead. Goal (the issue): time ratio Kron/TopK <= 1.15 x the encoder
FLOP ratio (m+n)/(m*n) of kronsae.md (Eq. 7).

Memory: the peak of live tensor bytes allocated by the encode's own aten ops (inputs and
weights excluded), tracked during the warm-up run by a ``TorchDispatchMode`` that counts
each new storage once and releases it when its last tensor dies. Kernel-internal scratch
buffers are not seen. KronSAE's peak is its encoder output, [B, h*(m+n)], so the memory
ratio follows the FLOP ratio; TopK's is its [B, F] pre-activations.

About 4 minutes of CPU time with the defaults (wall time is longer on a busy machine).
Run-to-run spread of the time ratios on a shared machine is about +-10%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from kronscope.sae import KronSAE, SAEConfig, TopKSAE

MiB = 2**20
SLACK = 1.15  # the issue's goal: time ratio <= SLACK * FLOP ratio


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of live storages created by the aten ops run inside the mode."""

    def __init__(self, existing: list[Tensor]) -> None:
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._track(t)
        return out

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.external or storage.nbytes() == 0:
            return
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


def peak_bytes(fn: Callable[[], Any], existing: list[Tensor]) -> int:
    with PeakTensorBytes(existing) as spy:
        out = fn()
        del out
    return spy.peak


def timed(fn: Callable[[], Any], clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return clock() - start


def build_topk(d: int, F: int, k: int) -> TopKSAE:
    sae = TopKSAE(SAEConfig("topk", d_in=d, d_sae=F, k=k))
    sae.init_weights(torch.Generator().manual_seed(0))
    return sae


def build_kron(d: int, F: int, k: int, m: int, n: int) -> KronSAE:
    sae = KronSAE(SAEConfig("kronsae", d_in=d, d_sae=F, k=k, h=F // (m * n), m=m, n=n))
    sae.init_weights(torch.Generator().manual_seed(0))  # paper, appendix A
    return sae


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each encode (median)")
    ap.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the dense reference")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="batch 256, d 384 only: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.repeats = 256, 3
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dims = (384,) if args.quick else (384, 768)
    sizes = (2**14, 2**16)
    shapes = ((2, 4), (4, 4), (4, 8))
    B, k = args.batch, args.k

    print("KronSAE vs TopK encode, equal F")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, inference_mode, "
        f"batch {B} tokens, k = {k}"
    )
    print(
        f"time: {args.clock} clock ({'process CPU time' if args.clock == 'cpu' else 'wall clock'}), "
        f"median of {args.repeats} interleaved runs after a warm-up (ref: {args.ref_repeats}, "
        "no warm-up of its own)"
    )
    print("memory: peak live tensor bytes allocated by the encode's aten ops (TorchDispatchMode)")
    print(f"goal: time ratio Kron/TopK <= {SLACK} x FLOP ratio (m+n)/(m*n)")
    print()
    header = (
        f"{'d':>4} {'F':>6} {'(m,n)':>6} {'h':>5} {'FLOP':>6} {'TopK ms':>8} {'Kron ms':>8} {'ref ms':>8} "
        f"{'time':>6} {'goal':>5} {'TopK MiB':>8} {'Kron MiB':>8} {'mem':>5}"
    )
    print(header)
    print(
        f"{'':>4} {'':>6} {'':>6} {'':>5} {'ratio':>6} {'':>8} {'':>8} {'':>8} {'ratio':>6} {'':>5} {'':>8} {'':>8} {'ratio':>5}"
    )
    print("-" * len(header))
    misses, exact = 0, True
    started, started_cpu = time.perf_counter(), time.process_time()
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for d in dims:
            x = torch.randn(B, d, generator=gen)
            for F in sizes:
                topk = build_topk(d, F, k)
                krons = {mn: build_kron(d, F, k, *mn) for mn in shapes}
                runs: dict[str, Callable[[], Any]] = {"topk": partial(topk.encode, x)}
                for mn, s in krons.items():
                    runs[f"kron{mn}"] = partial(s.encode, x)
                    runs[f"ref{mn}"] = partial(s.encode_reference, x)
                times: dict[str, list[float]] = {name: [] for name in runs}
                # The warm-up run of each encode is the one whose memory is measured.
                mem = {"topk": peak_bytes(runs["topk"], [x, *topk.parameters()])}
                for mn, s in krons.items():
                    mem[f"kron{mn}"] = peak_bytes(runs[f"kron{mn}"], [x, *s.parameters()])
                for r in range(args.repeats):
                    for name, fn in runs.items():
                        if name.startswith("ref") and r >= args.ref_repeats:
                            continue
                        times[name].append(timed(fn, clock))
                med = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
                for s in krons.values():  # what is timed is exact: same values as the dense TopK
                    head = x[:256]
                    exact &= torch.equal(s.encode(head).values, s.encode_reference(head)[0])
                t_mem = mem["topk"]
                for (m, n), s in krons.items():
                    flop = (m + n) / (m * n)
                    ratio = med[f"kron{(m, n)}"] / med["topk"]
                    ok = ratio <= SLACK * flop
                    misses += not ok
                    k_mem = mem[f"kron{(m, n)}"]
                    print(
                        f"{d:>4} {F:>6} {f'{m},{n}':>6} {s.h:>5} {flop:>6.3f} {med['topk']:>8.1f} "
                        f"{med[f'kron{(m, n)}']:>8.1f} {med[f'ref{(m, n)}']:>8.1f} {ratio:>6.3f} "
                        f"{'PASS' if ok else 'MISS':>5} {t_mem / MiB:>8.1f} {k_mem / MiB:>8.1f} "
                        f"{k_mem / t_mem:>5.2f}",
                        flush=True,
                    )
                del topk, krons, runs
    print("-" * len(header))
    total = len(dims) * len(sizes) * len(shapes)
    print(f"goal met for {total - misses} of {total} configurations")
    print(f"KronSAE.encode values == dense reference values (first 256 tokens): {exact}")
    print(
        f"took {time.perf_counter() - started:.0f} s wall, "
        f"{time.process_time() - started_cpu:.0f} s CPU"
    )
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
