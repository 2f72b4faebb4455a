"""Bytes per example on PostgreSQL: our schema against a one-row-per-example layout.

One harvest (SmolLM2-135M, a random KronSAE, ctx_len 128 by default) is stored twice in a
scratch PostgreSQL database (created and dropped here):

- ours: ``example`` rows with float16 values (2 bytes a token) pointing at ``context``
  rows stored once (int32 token ids) and a per-harvest ``token`` table of display strings;
- the Neuronpedia layout: one ``np_activation`` row per example carrying its context's
  token strings (``text[]``) and its values (``double precision[]``), with a text id and
  model / layer / feature columns and their index, the shape of Neuronpedia's
  ``Activation`` table.

Sizes are ``pg_total_relation_size`` (heap + TOAST + indexes). Goal: ours at most a
quarter of the other.

    python benchmarks/storage.py                   # 16k tokens, F = 1024
    python benchmarks/storage.py --tokens 4096     # quicker
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.db


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="model.layers.12")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--h", type=int, default=128)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument(
        "--pg-url",
        default=os.environ.get(
            "KRONSCOPE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    return p.parse_args()


NP_TABLE = """
CREATE TABLE np_activation (
    id text PRIMARY KEY,
    tokens text[] NOT NULL,
    "dataIndex" text,
    "index" text NOT NULL,
    layer text NOT NULL,
    "modelId" text NOT NULL,
    "maxValue" double precision NOT NULL,
    "maxValueTokenIndex" integer NOT NULL,
    "minValue" double precision NOT NULL,
    "values" double precision[] NOT NULL,
    "creatorId" text NOT NULL,
    "createdAt" timestamp NOT NULL DEFAULT now()
);
CREATE INDEX np_activation_model_layer_index ON np_activation ("modelId", layer, "index");
"""


def main() -> None:
    a = parse()
    import sqlalchemy as sa
    import torch

    from helpers.db import bench_harvest_row, fresh_postgres_database
    from kronscope.db import make_engine, make_sessionmaker, upgrade
    from kronscope.db.repositories import harvests
    from kronscope.harvest import Harvester, HarvestParams, iter_batches
    from kronscope.harvest.result import build_result
    from kronscope.harvest.writer import write_result
    from kronscope.lm import load_corpus, load_model, make_contexts
    from kronscope.sae import SAEConfig, build

    t0 = time.perf_counter()
    model = load_model(a.model, device="cpu")
    cfg = SAEConfig(
        architecture="kronsae",
        d_in=model.d_model,
        d_sae=a.h * a.m * a.n,
        k=a.k,
        h=a.h,
        m=a.m,
        n=a.n,
        metadata={"model_name": a.model, "hook_name": a.hook},
    )
    sae = build(cfg)
    sae.init_weights(torch.Generator().manual_seed(0))
    contexts = make_contexts(
        load_corpus(a.corpus), model, a.ctx_len, seed=0, max_contexts=a.tokens // a.ctx_len
    )
    params = HarvestParams()
    harvester = Harvester(sae, model, params, ctx_len=a.ctx_len)
    state = harvester.new_state()
    for batch in iter_batches(contexts, params.batch_size, torch.arange(len(contexts))):
        harvester.process(state, batch)
    result = build_result(state, sae, params, model.unembed())
    n_examples = sum(len(s) for _, s in result.examples)
    print(
        f"harvest: {len(contexts) * a.ctx_len:,} tokens of {a.corpus}, ctx_len {a.ctx_len}, "
        f"KronSAE F={sae.d_sae} + {a.h * (a.m + a.n)} parents, {n_examples:,} examples "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    with fresh_postgres_database(a.pg_url) as url:
        engine = make_engine(url)
        try:
            upgrade(engine)
            factory = make_sessionmaker(engine)
            with factory() as s:
                n_tokens = len(contexts) * a.ctx_len
                hid = bench_harvest_row(
                    s, sae, corpus=a.corpus, n_tokens=n_tokens, ctx_len=a.ctx_len
                )
                counts = write_result(s, hid, result, contexts.input_ids, model.token_strings)
                harvests.mark_complete(s, hid)
                s.commit()

            # The same examples, one row each with token strings and float8[] values.
            strings = {
                int(c): model.token_strings(contexts.input_ids[int(c)].tolist())
                for c in result.context_indices()
            }
            with engine.begin() as conn:
                conn.exec_driver_sql(NP_TABLE)
                dbapi: Any = conn.connection.dbapi_connection
                copy_sql = (
                    'COPY np_activation (id, tokens, "dataIndex", "index", layer, "modelId", '
                    '"maxValue", "maxValueTokenIndex", "minValue", "values", "creatorId") FROM STDIN'
                )
                kinds = {0: "", 1: "-base", 2: "-ext"}
                with dbapi.cursor() as cur, cur.copy(copy_sql) as copy:
                    n = 0
                    for _, ex in result.examples:
                        values = ex.values.astype("float32")
                        for i in range(len(ex)):
                            v = values[i]
                            n += 1
                            copy.write_row(
                                (
                                    "c" + secrets.token_hex(12),  # cuid-like, 25 characters
                                    strings[int(ex.ctx[i])],
                                    str(int(ex.ctx[i])),
                                    str(int(ex.unit_index[i])),
                                    f"12-kronsae{kinds[int(ex.unit_kind[i])]}",
                                    a.model,
                                    float(v.max()),
                                    int(v.argmax()),
                                    float(v.min()),
                                    [float(x) for x in v],
                                    "bench",
                                )
                            )
                assert n == n_examples
            with engine.connect() as conn:

                def size(table: str) -> int:
                    return int(
                        conn.execute(sa.text(f"SELECT pg_total_relation_size('{table}')")).scalar()
                    )

                sizes = {
                    t: size(t)
                    for t in ("example", "context", "token", "unit_stats", "np_activation")
                }
        finally:
            engine.dispose()

    ours = sizes["example"] + sizes["context"] + sizes["token"]
    theirs = sizes["np_activation"]
    print(
        f"ours:       example {sizes['example']:>12,} B + context {sizes['context']:>10,} B "
        f"({counts.contexts:,} rows) + token {sizes['token']:>9,} B ({counts.tokens:,} rows)"
    )
    print(
        f"            = {ours:,} B for {n_examples:,} examples = {ours / n_examples:,.1f} B/example"
    )
    print(
        f"one row per example (text[] tokens + float8[] values): {theirs:,} B = {theirs / n_examples:,.1f} B/example"
    )
    print(f"ours / theirs = {ours / theirs:.3f} (goal <= 0.25)")
    print(f"(unit stats, not counted above: {sizes['unit_stats']:,} B for {counts.stats:,} units)")


if __name__ == "__main__":
    main()
