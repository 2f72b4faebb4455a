"""Harvest speed and memory: the bare model prefix against the full harvest, in one run.

SmolLM2-135M (``smollm2-135m``, hook ``model.layers.12``) and a random KronSAE of
F = 16,384 (d = 576, h = 2048, m = 2, n = 4, k = 32) by default. For each ``--tokens``
value a fresh child process (so its peak RSS is its own) runs the batches twice, the bare
prefix (``model.activations``) and the full harvest update (prefix + SAE + streaming
state), interleaved batch by batch so that load from other processes hits both alike,
and prints tokens/s of both, their ratio and the peak RSS. The first child also writes
the result to a scratch PostgreSQL database and prints rows/s.

The harvest's bookkeeping runs in the fused numba kernels when numba is installed (the
default) or in torch ops (``--torch-path``); each line says which. The kernels are compiled
(or loaded from numba's cache) before the timed pass, and that time is printed apart.

Goals: harvest within 1.2x of the bare prefix time; the same peak memory at 100k and
400k tokens (the state does not grow with the corpus).

    python benchmarks/harvest_speed.py                      # 100k and 400k tokens
    python benchmarks/harvest_speed.py --tokens 8192 16384  # a quick run
    python benchmarks/harvest_speed.py --torch-path         # the torch ops, for comparison
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.db


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, nargs="+", default=[100_000, 400_000])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="model.layers.12")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--h", type=int, default=2048)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--torch-path",
        action="store_true",
        help="run the bookkeeping in torch ops, not the fused numba kernels",
    )
    p.add_argument(
        "--pg-url",
        default=os.environ.get(
            "KRONSCOPE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
        help="server for the write test (a scratch database is created and dropped)",
    )
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(a: argparse.Namespace) -> dict:
    import torch

    from kronscope.harvest import Harvester, HarvestParams, iter_batches
    from kronscope.lm import load_corpus, load_model, make_contexts
    from kronscope.sae import SAEConfig, build

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = load_model(a.model, device="cpu")
    F = a.h * a.m * a.n
    cfg = SAEConfig(
        architecture="kronsae",
        d_in=model.d_model,
        d_sae=F,
        k=a.k,
        h=a.h,
        m=a.m,
        n=a.n,
        metadata={"model_name": a.model, "hook_name": a.hook},
    )
    sae = build(cfg)
    sae.init_weights(torch.Generator().manual_seed(0))
    n_ctx = a.child // a.ctx_len
    contexts = make_contexts(load_corpus(a.corpus), model, a.ctx_len, seed=0, max_contexts=n_ctx)
    if len(contexts) < n_ctx:  # a small corpus: repeat its windows (speed and memory only)
        reps = -(-n_ctx // len(contexts))
        for name in ("input_ids", "attention_mask", "special_mask"):
            setattr(contexts, name, getattr(contexts, name).repeat(reps, 1)[:n_ctx].contiguous())
    params = HarvestParams(batch_size=a.batch_size)
    harvester = Harvester(
        sae, model, params, ctx_len=a.ctx_len, fused=False if a.torch_path else None
    )
    harvester.check(contexts)
    prepare_s = harvester.prepare()  # JIT compile (or cache load): not part of the timed pass
    state = harvester.new_state()
    rss_before = rss_mb()
    t_prefix = t_harvest = 0.0
    tokens = 0
    for batch in iter_batches(contexts, a.batch_size, torch.arange(len(contexts))):
        t0 = time.perf_counter()
        model.activations(batch.input_ids, batch.attention_mask, a.hook)
        t1 = time.perf_counter()
        harvester.process(state, batch)
        state.contexts_done += len(batch.index)
        t2 = time.perf_counter()
        t_prefix += t1 - t0
        t_harvest += t2 - t1
        tokens += batch.input_ids.numel()
    out = {
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "path": "fused (numba)" if harvester.fused else "torch",
        "prepare_s": prepare_s,
        "compiled": kernel_compiles(harvester.fused),
        "prefix_tok_s": tokens / t_prefix,
        "harvest_tok_s": tokens / t_harvest,
        "ratio": t_harvest / t_prefix,
        "rss_loaded_mb": rss_before,
        "rss_peak_mb": rss_mb(),
        "state_mb": sum(t.numel() * t.element_size() for t in state.tensors().values()) / 2**20,
    }
    if a.write:
        out.update(write_test(a, sae, model, contexts, state, params))
    return out


def kernel_compiles(fused: bool) -> dict[str, int]:
    """How many fused kernels ``prepare`` compiled, and how many numba loaded from its cache."""
    if not fused:
        return {}
    import kronscope.harvest.fused as kernels

    out = {"compiled": 0, "cached": 0}
    for name in (
        "dense_pass",
        "kron_topk",
        "gather_candidates",
        "sparse_pass",
        "sparse_rows",
        "keyed_merge",
        "put_rows",
    ):
        stats = getattr(kernels, name).stats
        out["compiled"] += sum(stats.cache_misses.values())
        out["cached"] += sum(stats.cache_hits.values())
    return out


def write_test(a, sae, model, contexts, state, params) -> dict:  # type: ignore[no-untyped-def]
    from helpers.db import bench_harvest_row, fresh_postgres_database
    from kronscope.db import make_engine, make_sessionmaker, upgrade
    from kronscope.db.repositories import harvests
    from kronscope.harvest.result import build_result
    from kronscope.harvest.writer import write_result

    t0 = time.perf_counter()
    result = build_result(state, sae, params, model.unembed())
    t_post = time.perf_counter() - t0
    with fresh_postgres_database(a.pg_url) as url:
        engine = make_engine(url)
        try:
            upgrade(engine)
            factory = make_sessionmaker(engine)
            with factory() as s:
                hid = bench_harvest_row(s, sae, corpus=a.corpus, n_tokens=1, ctx_len=a.ctx_len)
                s.commit()
            t0 = time.perf_counter()
            with factory() as s:
                counts = write_result(s, hid, result, contexts.input_ids, model.token_strings)
                harvests.mark_complete(s, hid)
                s.commit()
            t_write = time.perf_counter() - t0
        finally:
            engine.dispose()
    return {
        "post_s": t_post,
        "rows": counts.rows,
        "examples": counts.examples,
        "write_s": t_write,
        "rows_per_s": counts.rows / t_write,
    }


def main() -> None:
    a = parse()
    if a.child is not None:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    passthrough = [
        "--model",
        a.model,
        "--hook",
        a.hook,
        "--corpus",
        a.corpus,
        "--ctx-len",
        str(a.ctx_len),
        "--batch-size",
        str(a.batch_size),
        "--h",
        str(a.h),
        "--m",
        str(a.m),
        "--n",
        str(a.n),
        "--k",
        str(a.k),
        "--pg-url",
        a.pg_url,
    ] + (["--threads", str(a.threads)] if a.threads else [])
    passthrough += ["--torch-path"] if a.torch_path else []
    print(
        f"model {a.model} hook {a.hook}; KronSAE F={a.h * a.m * a.n} (h={a.h}, m={a.m}, n={a.n}, "
        f"k={a.k}); ctx_len {a.ctx_len}, batch {a.batch_size} contexts; corpus {a.corpus}"
    )
    results = []
    for i, tokens in enumerate(a.tokens):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(tokens), *passthrough]
        if i == 0 and not a.no_write:
            cmd.append("--write")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"child for {tokens} tokens failed ({proc.returncode})")
        r = json.loads(line[len("RESULT ") :])
        results.append(r)
        c = r["compiled"]
        jit = (
            f"kernels ready in {r['prepare_s']:.2f} s before the timed pass ({c['compiled']} "
            f"compiled, {c['cached']} from numba's cache)"
            if c
            else "no kernels"
        )
        print(f"{r['tokens']:>9,} tokens: bookkeeping path {r['path']}; {jit}", flush=True)
        print(
            f"{r['tokens']:>9,} tokens ({r['threads']} threads): prefix {r['prefix_tok_s']:7.1f} tok/s, "
            f"harvest {r['harvest_tok_s']:7.1f} tok/s, harvest/prefix time {r['ratio']:.3f}x (goal <= 1.2x); "
            f"peak RSS {r['rss_peak_mb']:,.0f} MB (model loaded {r['rss_loaded_mb']:,.0f} MB, "
            f"state {r['state_mb']:,.0f} MB)",
            flush=True,
        )
        if "rows_per_s" in r:
            print(
                f"           write to PostgreSQL: {r['rows']:,} rows ({r['examples']:,} examples) in "
                f"{r['write_s']:.1f} s = {r['rows_per_s']:,.0f} rows/s; logit effects + neighbours "
                f"{r['post_s']:.1f} s",
                flush=True,
            )
    if len(results) > 1:
        peaks = [r["rss_peak_mb"] for r in results]
        print(
            f"peak RSS from {results[0]['tokens']:,} to {results[-1]['tokens']:,} tokens: "
            f"{peaks[0]:,.0f} -> {peaks[-1]:,.0f} MB ({peaks[-1] - peaks[0]:+,.0f} MB; goal: the same)"
        )


if __name__ == "__main__":
    main()
