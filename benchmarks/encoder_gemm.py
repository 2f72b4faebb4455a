"""The harvest's encoder GEMM: torch's default float32 GEMM against the oneDNN path.

The harvest computes a KronSAE's parents transposed, ``[h*(m+n), T] = W_enc^T @ x^T + b``
(``kronscope.harvest.encoder``). This times, interleaved call by call on the same
inputs, the two ways it can run on CPU:

- ``addmm``: ``torch.addmm`` into a reused output buffer (torch's default float32 GEMM,
  MKL in the x86 wheels);
- ``onednn``: ``TransposedEncoder`` (oneDNN, the bias folded in as a column, a fresh
  output each call: the op makes its own);

and prints the median and best time of each, GFLOP/s, the ratio, and the largest
difference between the two results (float rounding only).

    python benchmarks/encoder_gemm.py                 # SmolLM2 layer-12 shape: d 576, h 2048
    python benchmarks/encoder_gemm.py --d 768 --h 4096 --tokens 4096 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--h", type=int, default=2048)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048, help="tokens a chunk (16 x 128)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args()

    import torch

    from kronscope.harvest.encoder import TransposedEncoder, pre_acts_t
    from kronscope.sae import SAEConfig, build

    if a.threads:
        torch.set_num_threads(a.threads)
    F = a.h * a.m * a.n
    cfg = SAEConfig(architecture="kronsae", d_in=a.d, d_sae=F, k=32, h=a.h, m=a.m, n=a.n)
    sae = build(cfg)
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(a.tokens, a.d, generator=torch.Generator().manual_seed(2))
    width = a.h * (a.m + a.n)
    buf = torch.empty(width, a.tokens)
    enc = TransposedEncoder(sae)
    if not enc.onednn:
        raise SystemExit(
            "oneDNN's linear ops are not usable in this torch build: nothing to compare"
        )

    runs = {
        "addmm": lambda: pre_acts_t(sae, x, buf),
        "onednn": lambda: enc(x),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for f in runs.values():  # warm-up
            f()
        for _ in range(a.repeats):
            for name, f in runs.items():
                t0 = time.perf_counter()
                out = f()
                times[name].append(time.perf_counter() - t0)
                del out
        diff = (enc(x) - pre_acts_t(sae, x)).abs().max().item()
        scale = pre_acts_t(sae, x).abs().max().item()

    flop = 2 * width * a.d * a.tokens
    print(
        f"GEMM [{width} x {a.d}] @ [{a.d} x {a.tokens}] (KronSAE h={a.h} m={a.m} n={a.n}), "
        f"{torch.get_num_threads()} threads, {a.repeats} interleaved repeats"
    )
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(
            f"  {name:7s} median {med[name] * 1e3:7.1f} ms  best {min(ts) * 1e3:7.1f} ms  "
            f"{flop / min(ts) / 1e9:6.0f} GFLOP/s at best"
        )
    print(f"  onednn / addmm median time: {med['onednn'] / med['addmm']:.3f}")
    print(f"  largest |difference|: {diff:.3g} (largest |value| {scale:.3g})")


if __name__ == "__main__":
    main()
