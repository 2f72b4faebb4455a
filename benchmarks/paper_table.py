"""TopK vs KronSAE on SmolLM2-135M, iso-tokens and iso-FLOPs: one table (kronsae.md, Table 1
and Eq. 7), measured here and printed as it comes out (nothing is tuned toward the paper).

What it does:

1. loads the packaged ``smollm2-135m`` and cuts the built-in corpus into contexts of
   ``--ctx-len`` tokens; the last 5% are held out (``kronscope.sae.activations``);
2. runs the model once up to ``model.layers.12`` over as many training tokens as the
   longest run needs and caches them to disk (safetensors shards); every SAE then reads the
   same stream from its start, so runs differ only in architecture and length. Data is
   never repeated: if the corpus cannot supply the tokens, the script stops and says so;
3. trains, at F = 4096 and k = 32, a TopK SAE on T tokens and KronSAEs with (m, n) = (2, 4)
   and (4, 4) (h = F / (m n)) in each composition (mand, relu_product, product), each on
   T tokens (iso-tokens) and on ``T * FLOPs_TopK / FLOPs_Kron`` tokens (iso-FLOPs, Eq. 7);
4. measures on held-out tokens EV, L0 and the dead fraction (latents that never fire
   there), and the LM loss with each SAE spliced in vs clean (delta LM loss) on the first
   ``--lm-eval-contexts`` held-out contexts;
5. prints one table, and saves the KronSAE (mand, (2, 4), iso-tokens) to ``--out``.

Recipe: ``kronscope.sae.train`` defaults (appendix A: AdamW lr 8e-4, 10% warm-up, cosine
to 1e-6, AuxK 1/32 with k_aux = d/2, decoder rows unit norm, b_dec = 0), except two
things scaled to a CPU-sized run, both printed: the batch (default 1,024 tokens, not
8,192: the built-in corpus gives about 320k training tokens, so 8,192-token batches would
leave the TopK SAE fewer than 20 steps), and the dead-latent window (10M of the paper's
125M tokens, i.e. 8% of T, so AuxK can act at all in a run of T tokens).

Usage: python benchmarks/paper_table.py [--tokens 160000] [--batch-size 1024] [--out DIR]
       python benchmarks/paper_table.py --quick      # tiny T, end to end in a few minutes
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kronscope.sae import SAEConfig
from kronscope.sae.activations import (
    CachedActivations,
    TensorSource,
    cache_activations,
    open_lm_data,
)
from kronscope.sae.evaluate import (
    context_batches,
    evaluate_activations,
    lm_losses,
    sae_splice,
    zero_splice,
)
from kronscope.sae.train import TrainConfig, Trainer, iso_flops_tokens, new_sae, sae_flops

MODEL, HOOK = "smollm2-135m", "model.layers.12"
F, K = 4096, 32
SHAPES = ((2, 4), (4, 4))
COMPOSITIONS = ("mand", "relu_product", "product")
PAPER_DEAD_RATIO = 10_000_000 / 125_000_000  # dead window / run length in the paper's runs


@dataclass
class Run:
    arch: str
    mn: tuple[int, int] | None
    composition: str | None
    budget: str
    tokens: int

    def config(self, d: int, meta: dict[str, Any]) -> SAEConfig:
        if self.arch == "topk":
            return SAEConfig("topk", d_in=d, d_sae=F, k=K, apply_b_dec_to_input=True, metadata=meta)
        assert self.mn is not None and self.composition is not None
        m, n = self.mn
        return SAEConfig(
            "kronsae", d_in=d, d_sae=F, k=K, h=F // (m * n), m=m, n=n,
            composition=self.composition, metadata=meta,
        )  # fmt: skip


def plan(T: int, d: int) -> list[Run]:
    runs = [Run("topk", None, None, "iso-tokens", T)]
    for m, n in SHAPES:
        for comp in COMPOSITIONS:
            runs.append(Run("kronsae", (m, n), comp, "iso-tokens", T))
        for comp in COMPOSITIONS:
            runs.append(
                Run(
                    "kronsae",
                    (m, n),
                    comp,
                    "iso-FLOPs",
                    iso_flops_tokens(T, d, F // (m * n), m, n, K),
                )
            )
    return runs


def reusable(path: Path, describe: dict[str, Any], tokens: int) -> bool:
    """A cache from an earlier run of the same stream with enough tokens."""
    try:
        cached = CachedActivations(path)
    except ValueError:
        return False
    return cached.manifest.get("source") == describe and cached.available_tokens >= tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tokens", type=int, default=None, help="T, the TopK budget (default 160000; --quick 4096)"
    )
    ap.add_argument(
        "--batch-size", type=int, default=None, help="tokens per step (default 1024; --quick 512)"
    )
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help="held-out tokens for EV/L0/dead (default: all)",
    )
    ap.add_argument(
        "--lm-eval-contexts",
        type=int,
        default=None,
        help="held-out contexts for LM loss (default 32)",
    )
    ap.add_argument(
        "--dead-window",
        type=int,
        default=None,
        help="tokens (default: 8%% of T, the paper's ratio)",
    )
    ap.add_argument(
        "--b-dec-init",
        default="zero",
        choices=("zero", "mean", "median"),
        help="default: the paper's 0",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--cache", type=Path, default=None, help="activation cache folder (default: temporary)"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="save the KronSAE (mand, (2,4), iso-tokens) here"
    )
    ap.add_argument("--quick", action="store_true", help="tiny T: prove the pipeline end to end")
    args = ap.parse_args(argv)

    T = args.tokens or (4096 if args.quick else 160_000)
    batch = args.batch_size or (512 if args.quick else 1024)
    lm_contexts = args.lm_eval_contexts or (2 if args.quick else 32)
    eval_tokens = args.eval_tokens or (1024 if args.quick else None)
    dead_window = args.dead_window or max(batch, int(T * PAPER_DEAD_RATIO))
    if args.threads:
        torch.set_num_threads(args.threads)
    if (
        args.out is not None
        and args.out.exists()
        and any(args.out.iterdir())
        and not (args.out / "cfg.json").exists()
    ):
        print(f"error: --out {args.out} exists and is not a checkpoint folder", file=sys.stderr)
        return 1

    t_start = time.perf_counter()
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:
        pass
    data = open_lm_data(MODEL, HOOK, "builtin", args.ctx_len, device=args.device)
    d = data.model.d_model
    runs = plan(T, d)
    longest = max(r.tokens for r in runs)
    source = data.train_source(args.seed, tokens=longest)
    if longest > source.available_tokens:
        print(
            f"error: the longest run needs {longest:,} training tokens but the built-in corpus gives "
            f"{source.available_tokens:,} at ctx_len {args.ctx_len}; lower --tokens (data is never repeated)",
            file=sys.stderr,
        )
        return 1
    t_loaded = time.perf_counter()
    print(f"# {MODEL} at {HOOK}: d = {d}, {len(data.contexts):,} contexts of {args.ctx_len} tokens, "
          f"{source.available_tokens:,} training tokens, {len(data.heldout_indices)} held-out contexts; "
          f"loaded in {t_loaded - t_start:.0f}s")  # fmt: skip
    note = "" if batch == 8192 else " (not the paper's 8,192: see the docstring)"
    print(f"# T = {T:,} tokens, batch {batch:,}{note}; dead window {dead_window:,} tokens; "
          f"b_dec init {args.b_dec_init}; threads {torch.get_num_threads()}; device {args.device}")  # fmt: skip

    tmp = None
    cache_dir = args.cache
    if cache_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="kronscope-paper-table-"))
        cache_dir = tmp / "train"
    try:
        t0 = time.perf_counter()
        if reusable(cache_dir, source.describe(), longest):
            print(f"# reusing the activation cache in {cache_dir}")
        else:
            cache_activations(source, cache_dir, longest, progress=True)
        held = data.heldout_source(eval_tokens)
        held_x = held.read(0, held.available_tokens)
        t_cached = time.perf_counter()
        print(
            f"# cached {longest:,} training + {held_x.shape[0]:,} held-out activations in {t_cached - t0:.0f}s"
        )
        stream = CachedActivations(cache_dir)
        held_src = TensorSource(held_x, shuffle=False, name="heldout")

        lm_batches = context_batches(data.contexts, data.heldout_indices[:lm_contexts], 8)
        base, lm_tokens = lm_losses(
            data.model, lm_batches, HOOK, {"clean": None, "zero": zero_splice}
        )
        print(
            f"# LM loss on {lm_tokens:,} held-out tokens: clean {base['clean']:.4f}, zero-ablated {base['zero']:.4f}"
        )

        meta = {
            "model_name": MODEL,
            "hook_name": HOOK,
            "context_size": args.ctx_len,
            "prepend_bos": True,
        }
        rows = []
        for run in runs:
            sae = new_sae(run.config(d, dict(meta)), seed=args.seed, device=args.device)
            cfg = TrainConfig(
                tokens=run.tokens,
                batch_size=batch,
                dead_window=dead_window,
                b_dec_init=args.b_dec_init,
                seed=args.seed,
                device=args.device,
            )
            trainer = Trainer(
                sae,
                stream,
                cfg,
                data_info={**data.info(), "benchmark": "paper_table", "budget": run.budget},
            )
            result = trainer.run()
            metrics = evaluate_activations(sae, held_src)
            spliced, _ = lm_losses(data.model, lm_batches, HOOK, {"spliced": sae_splice(sae)})
            delta = spliced["spliced"] - base["clean"]
            rows.append(
                (run, sae_flops(sae.cfg), metrics, delta, result.seconds, result.tokens_seen)
            )
            print(f"  done {run.arch} {run.mn or ''} {run.composition or ''} {run.budget}: "
                  f"EV {metrics.ev:.4f} in {result.seconds:.0f}s", flush=True)  # fmt: skip
            if args.out is not None and run.arch == "kronsae" and run.mn == (2, 4) and run.composition == "mand" \
                    and run.budget == "iso-tokens":  # fmt: skip
                held_metrics = {**metrics.as_dict(), "delta_lm_loss": delta, "lm_loss_clean": base["clean"],
                                "lm_loss_spliced": spliced["spliced"], "split": "heldout"}  # fmt: skip
                trainer.save_checkpoint(held_metrics, out=args.out)
        total = time.perf_counter() - t_start
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    header = f"{'arch':<8} {'(m,n)':<6} {'composition':<13} {'budget':<10} {'EV':>7} {'L0':>6} {'dead':>6} " \
             f"{'dLM loss':>9} {'FLOPs/tok':>10} {'wall s':>7} {'tokens':>9}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for run, flops, m, delta, secs, seen in rows:
        mn = f"{run.mn[0]},{run.mn[1]}" if run.mn else "-"
        print(f"{run.arch:<8} {mn:<6} {run.composition or '-':<13} {run.budget:<10} {m.ev:7.4f} {m.l0:6.1f} "
              f"{m.dead_fraction:6.3f} {delta:9.4f} {flops:10,} {secs:7.1f} {seen:9,}")  # fmt: skip
    print()
    print(f"# F = {F}, k = {K}; EV, L0, dead fraction on {held_x.shape[0]:,} held-out tokens; dLM loss = spliced - "
          f"clean on {lm_tokens:,} held-out tokens; FLOPs/tok = Eq. 7 (encoder + k*d decoder); wall s = training only")  # fmt: skip
    print(
        f"# total {total:.0f}s (model and corpus {t_loaded - t_start:.0f}s, activation cache {t_cached - t0:.0f}s)"
    )
    if args.out is not None:
        print(f"# saved KronSAE (mand, (2,4), iso-tokens) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
