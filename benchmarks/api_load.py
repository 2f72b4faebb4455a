"""Load test of the feature-page API: p50/p99 latency and errors under concurrent clients.

What it does (loopback only, bounded in time):

1. creates a fresh PostgreSQL database (dropped at the end) and a temporary data dir;
2. builds a random KronSAE of F = 16,384 latents (h=64, m=16, n=16, d_in=384, k=32) and
   registers it like an upload (validated, stored natively);
3. fills its pages: by default a real harvest of the packaged ``minilm-l6`` model over a
   small slice of the built-in corpus (``--tokens``); with ``--synthetic`` (or when the
   harvest engine is unavailable) random statistics and examples of the same shape are
   written through the repositories instead. The output says which. ``--explained`` then
   gives every latent and parent an explanation (as ``make demo`` does), so pages carry
   the texts of a latent's parents, siblings and neighbours;
4. starts ``kronscope serve`` as a subprocess on 127.0.0.1 and waits until it is ready;
5. runs ``--clients`` concurrent clients, each on its own keep-alive connection, for
   ``--duration`` seconds, requesting latent pages in a loop: one latent (random index,
   default options) and the latent list (random sort, order and offset, 50 per page).
   Each response is read whole and parsed (orjson). The clients are a minimal HTTP/1.1
   client on asyncio (``HttpConnection``): they share the two cores with the server, and
   the output says how much CPU they took. After the load, a sample of pages of both kinds
   is fetched again and checked for their items;
6. prints p50 / p90 / p99 / max latency per page kind and overall, requests per second
   and the error count. Goal: p99 < 50 ms, zero errors.

Usage: python benchmarks/api_load.py [--pg-url URL] [--duration 20] [--clients 16] [--explained]
       [--workers N] [--keep] [--reuse DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.db import fresh_postgres_database

H, M, N, K, D_IN = 64, 16, 16, 32, 384
F = H * M * N
MODEL, HOOK = "minilm-l6", "encoder.layer.3"
MODEL_SMOL, HOOK_SMOL = "smollm2-135m", "model.layers.12"  # the live inference section


# -- database ----------------------------------------------------------------------------
# -- the SAE and its pages --------------------------------------------------------------------
def make_checkpoint(folder: Path) -> Path:
    import torch

    from kronscope.sae import SAEConfig, build
    from kronscope.sae.checkpoint import save

    cfg = SAEConfig(
        architecture="kronsae",
        d_in=D_IN,
        d_sae=F,
        k=K,
        h=H,
        m=M,
        n=N,
        metadata={"model_name": MODEL, "hook_name": HOOK},
    )
    sae = build(cfg)
    sae.init_weights(torch.Generator().manual_seed(0))  # type: ignore[operator]
    return save(sae, folder)


def register(settings: Any, folder: Path) -> str:
    from kronscope.db import make_engine, make_sessionmaker, upgrade
    from kronscope.services import sae_registry, tx

    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    with make_sessionmaker(engine)() as s:
        sae, _ = sae_registry.register_checkpoint(
            s, settings, folder, sae_registry.UploadOptions(slug="bench-kron-16k", uploader="bench")
        )
        tx.commit(s)
        slug = sae.slug
    engine.dispose()
    return slug


def real_harvest(settings: Any, slug: str, tokens: int, ctx_len: int) -> str:
    """Harvest through the job runner's own handler, in this process."""
    from kronscope.db import make_engine, make_sessionmaker
    from kronscope.services import harvest_jobs, sae_registry, tx
    from kronscope.services.jobs import JobRunner

    engine = make_engine(settings.resolved_database_url)
    factory = make_sessionmaker(engine, begin_immediate=True)
    with factory() as s:
        sae = sae_registry.get_sae(s, slug)
        job = harvest_jobs.start_harvest(
            s,
            settings,
            sae,
            {"corpus": "builtin", "tokens": tokens, "ctx_len": ctx_len, "examples_per_latent": 20},
        )
        tx.commit(s)
        job_id = job.id
    runner = JobRunner(factory, settings)
    t0 = time.perf_counter()
    runner.run_once()
    seconds = time.perf_counter() - t0
    with factory() as s:
        from kronscope.db.repositories import jobs

        done = jobs.get_job(s, job_id)
        assert done is not None
        if done.status != "complete":
            raise RuntimeError(f"the harvest job ended {done.status}: {done.error}")
    analyze(engine)
    engine.dispose()
    return (
        f"real harvest of {MODEL} ({HOOK}) over {tokens:,} tokens of the built-in corpus, "
        f"ctx_len {ctx_len}, in {seconds:.0f} s"
    )


def explain_everything(settings: Any, slug: str) -> str:
    """One explanation on every latent and parent, as ``make demo``'s heuristic explainer
    leaves (pages then carry a latent's, its parents', siblings' and neighbours' texts)."""
    import sqlalchemy as sa

    from kronscope.db import make_engine

    engine = make_engine(settings.resolved_database_url)
    units = [(0, F), (1, H * M), (2, H * N)]
    with engine.begin() as conn:
        sae_id = conn.execute(sa.text("SELECT id FROM sae WHERE slug = :s"), {"s": slug}).scalar()
        for kind, count in units:
            conn.execute(
                sa.text(
                    "INSERT INTO explanation (sae_id, unit_kind, unit_index, text, source, "
                    "author, score, created_at, updated_at) "
                    "SELECT :sae, :kind, i, 'fires on tokens like ' || i || ' and nearby words', "
                    "'heuristic', 'bench', 0.5, now(), now() FROM generate_series(0, :last) AS i"
                ),
                {"sae": sae_id, "kind": kind, "last": count - 1},
            )
    analyze(engine)
    engine.dispose()
    return f"; one explanation on each of the {F + H * (M + N):,} latents and parents"


def analyze(engine: Any) -> None:
    """Vacuum and refresh the planner's statistics after the bulk load, as autovacuum does
    within a minute or so: the load should measure the steady state, not autovacuum's
    first pass over the new rows competing with the server for the two cores."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE)")


def synthetic_harvest(settings: Any, slug: str, ctx_len: int, examples: int, samples: int) -> str:
    """Random stats and examples of the shape a harvest writes, through the repositories."""
    import numpy as np

    from kronscope.db import make_engine, make_sessionmaker
    from kronscope.db.models import ExampleKind, UnitKind
    from kronscope.db.repositories import examples as ex
    from kronscope.db.repositories import harvests, saes, stats
    from kronscope.services import tx

    rng = np.random.default_rng(0)
    engine = make_engine(settings.resolved_database_url)
    factory = make_sessionmaker(engine)
    n_ctx = 4096
    with factory() as s:
        sae = saes.get_sae_by_slug(s, slug)
        assert sae is not None
        h = harvests.create_harvest(
            s, sae.id, corpus_name="synthetic", n_tokens=n_ctx * ctx_len, ctx_len=ctx_len
        )
        harvests.mark_running(s, h.id)
        ex.add_tokens(s, h.id, {i: f"tok{i}" for i in range(2000)})
        ctx_ids = ex.add_contexts(
            s, h.id, ((p, rng.integers(0, 2000, ctx_len)) for p in range(n_ctx))
        )
        contexts = np.array(sorted(ctx_ids.values()))
        units = [(UnitKind.LATENT, F), (UnitKind.BASE, H * M), (UnitKind.EXTENSION, H * N)]
        edges = [0.0] + [2.0**e for e in range(-8, 8)]
        for kind, count in units:
            stat_rows = []
            rows = []
            for index in range(count):
                n_active = int(rng.integers(0, 5000))
                top = np.sort(rng.random(examples) * 10)[::-1]
                stat_rows.append(
                    {
                        "unit_kind": int(kind),
                        "unit_index": index,
                        "n_active": n_active,
                        "frequency": n_active / (n_ctx * ctx_len),
                        "mean_value": float(top.mean()),
                        "max_value": float(top[0]),
                        "histogram": rng.integers(0, 100, len(edges) - 1),
                        "histogram_edges": edges,
                        "neighbours": [
                            [int(j), float(rng.random())] for j in rng.integers(0, F, 10)
                        ]
                        if kind == UnitKind.LATENT
                        else None,
                    }
                )
                for rank in range(examples):
                    values = (rng.random(ctx_len) * top[rank]).astype(np.float32)
                    rows.append(
                        ex.ExampleRow(
                            int(kind),
                            index,
                            int(ExampleKind.TOP),
                            rank,
                            int(rng.choice(contexts)),
                            values,
                        )
                    )
                for rank in range(samples):
                    values = (rng.random(ctx_len) * top[0]).astype(np.float32)
                    rows.append(
                        ex.ExampleRow(
                            int(kind),
                            index,
                            int(ExampleKind.SAMPLE),
                            rank,
                            int(rng.choice(contexts)),
                            values,
                            sample_pos=3,
                            sample_value=float(values[3]),
                        )
                    )
                if len(rows) > 50_000:
                    ex.add_examples(s, h.id, rows)
                    rows = []
            ex.add_examples(s, h.id, rows)
            stats.add_stats(s, h.id, stat_rows)
        harvests.mark_complete(s, h.id, tokens_seen=n_ctx * ctx_len)
        tx.commit(s)
    analyze(engine)
    engine.dispose()
    return (
        f"SYNTHETIC pages (random stats and examples written through the repositories; "
        f"{examples} top + {samples} sampled examples per unit, contexts of {ctx_len} tokens)"
    )


# -- the server --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(env: dict[str, str], port: int, workers: int) -> Iterator[str]:
    cmd = [
        sys.executable,
        "-m",
        "kronscope.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-jobs",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kronscope serve exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/api/v1/health/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("kronscope serve did not become ready in 120 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the load ----------------------------------------------------------------------------------
SORTS = ("index", "density", "max_activation")
ORDERS = ("asc", "desc")


def latent_path(rng: random.Random, slug: str) -> str:
    return f"/api/v1/saes/{slug}/latents/{rng.randrange(F)}"


def list_path(rng: random.Random, slug: str) -> str:
    sort, order, offset = rng.choice(SORTS), rng.choice(ORDERS), rng.randrange(0, F - 50)
    return f"/api/v1/saes/{slug}/latents?sort={sort}&order={order}&offset={offset}&limit=50"


def request_for(rng: random.Random, slug: str) -> tuple[str, str]:
    if rng.random() < 0.5:
        return "latent", latent_path(rng, slug)
    return "list", list_path(rng, slug)


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends a GET and reads its whole response
    (status line, headers, ``Content-Length`` bytes of body). The load's clients share the
    two cores with the server and PostgreSQL, so they are kept as lean as this: a general
    client library took about a third of a core at these rates (aiohttp, measured here)."""

    def __init__(self, host: str) -> None:
        self.host = host.encode()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body_at = self.body_end = -1
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        if self.body_end < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
            length = {k.strip().lower(): v.strip() for k, v in fields.items()}.get("content-length")
            if length is None:
                self.waiter.set_exception(ValueError("a response without Content-Length"))
                return
            self.body_at, self.body_end = end + 4, end + 4 + int(length)
        if len(self.buffer) >= self.body_end:
            body = bytes(self.buffer[self.body_at : self.body_end])
            del self.buffer[: self.body_end]
            self.body_at = self.body_end = -1
            self.waiter.set_result((self.status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    async def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), self.host))
        return await asyncio.wait_for(self.waiter, timeout)


async def client_loop(
    cid: int,
    host: str,
    port: int,
    slug: str,
    start: float,
    until: float,
    results: dict[str, list[float]],
    errors: list[str],
) -> None:
    """One client on one keep-alive connection: requests until ``until``, measuring those
    sent from ``start`` on (before it: warm-up, on the same connection)."""
    import orjson

    rng = random.Random(cid)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: HttpConnection(host), host, port)
    try:
        while (t0 := time.perf_counter()) < until:
            kind, path = request_for(rng, slug)
            measured = t0 >= start
            try:
                status, body = await conn.get(path)
                if status == 200:
                    orjson.loads(body)  # a whole, well-formed page
                    if measured:
                        results.setdefault(kind, []).append((time.perf_counter() - t0) * 1000)
                elif measured:
                    errors.append(f"{path}: HTTP {status} {body[:200]!r}")
            except (TimeoutError, ConnectionError, ValueError) as exc:
                if measured:
                    errors.append(f"{path}: {exc!r}")
                conn.transport and conn.transport.close()  # type: ignore[func-returns-value]
                _, conn = await loop.create_connection(lambda: HttpConnection(host), host, port)
    finally:
        if conn.transport is not None:
            conn.transport.close()


WARM_UP_S = 3.0


async def run_load(
    base: str, slug: str, clients: int, seconds: float
) -> tuple[dict[str, list[float]], list[str], float]:
    """``clients`` loops, each on its own keep-alive connection for the whole run, each
    request a random page kind; the first ``WARM_UP_S`` seconds are not measured (the
    server's caches fill)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    results: dict[str, list[float]] = {}
    errors: list[str] = []
    start = time.perf_counter() + WARM_UP_S
    until = start + seconds
    await asyncio.gather(
        *(
            client_loop(c, host, int(port), slug, start, until, results, errors)
            for c in range(clients)
        )
    )
    return results, errors, time.perf_counter() - start


def run_event_loop(main: Any) -> Any:
    """``asyncio.run``, on uvloop where it is installed (as the server runs): the clients'
    share of the machine is then smaller still."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def check_pages(base: str, slug: str, n: int = 20) -> list[str]:
    """Fetch ``n`` pages of each kind and parse them: whole JSON pages with their items."""
    rng = random.Random(7)
    problems = []
    with httpx.Client(base_url=base, timeout=30) as http:
        for _ in range(n):
            for kind, path in (("latent", latent_path(rng, slug)), ("list", list_path(rng, slug))):
                r = http.get(path)
                try:
                    body = r.json()
                    ok = r.status_code == 200 and (
                        "items" in body if kind == "list" else "stats" in body
                    )
                except ValueError:
                    ok = False
                if not ok:
                    problems.append(f"{path}: HTTP {r.status_code} {r.text[:200]}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--pg-url",
        default=os.environ.get(
            "KRONSCOPE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="Seconds of load (after 3 s of warm-up on the same connections).",
    )
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="Server processes (default: one per core, as a PostgreSQL deployment runs).",
    )
    ap.add_argument(
        "--synthetic", action="store_true", help="Write random pages instead of harvesting."
    )
    ap.add_argument("--tokens", type=int, default=16_384, help="Tokens of a real harvest.")
    ap.add_argument(
        "--explained",
        action="store_true",
        help="Give every latent and parent an explanation first (as make demo does).",
    )
    ap.add_argument("--ctx-len", type=int, default=64)
    ap.add_argument(
        "--keep",
        action="store_true",
        help="Keep the database and data dir (and print how to --reuse them).",
    )
    ap.add_argument(
        "--reuse", default=None, help="The work dir of a --keep run: load it again, no set-up."
    )
    args = ap.parse_args()
    if not 1 <= args.duration <= 300 or not 1 <= args.clients <= 256:
        ap.error("--duration must be 1..300 s and --clients 1..256")

    from kronscope.config import Settings

    work = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="kronscope-bench-"))
    keep = args.keep or bool(args.reuse)
    try:
        with contextlib.ExitStack() as stack:
            if args.reuse:
                saved = json.loads((work / "reuse.json").read_text())
                url, slug = saved["url"], saved["slug"]
                print(f"reusing {work}: {saved['pages']}")
            else:
                url = stack.enter_context(fresh_postgres_database(args.pg_url, keep=keep))
            settings = Settings(
                data_dir=work / "data", database_url=url, device="cpu", run_jobs_in_process=False
            )
            if not args.reuse:
                t0 = time.perf_counter()
                slug = register(settings, make_checkpoint(work / "ckpt"))
                print(
                    f"SAE: KronSAE F={F:,} (h={H}, m={M}, n={N}, k={K}, d_in={D_IN}), "
                    f"random weights, slug {slug}"
                )
                pages = None
                if not args.synthetic:
                    try:
                        pages = real_harvest(settings, slug, args.tokens, args.ctx_len)
                    except (ImportError, RuntimeError) as exc:
                        print(f"real harvest unavailable ({exc}); writing synthetic pages instead")
                if pages is None:
                    pages = synthetic_harvest(settings, slug, args.ctx_len, examples=20, samples=20)
                if args.explained:
                    pages += explain_everything(settings, slug)
                print(f"pages: {pages}; set-up {time.perf_counter() - t0:.0f} s")
                if keep:
                    (work / "reuse.json").write_text(
                        json.dumps({"url": url, "slug": slug, "pages": pages})
                    )
                    print(f"kept: run again with --reuse {work}")

            env = {
                **os.environ,
                "KRONSCOPE_DATABASE_URL": url,
                "KRONSCOPE_DATA_DIR": str(settings.data_dir),
                "KRONSCOPE_DEVICE": "cpu",
            }
            port = free_port()
            with server(env, port, args.workers) as base:
                cpu0 = time.process_time()
                results, errors, elapsed = run_event_loop(
                    run_load(base, slug, args.clients, args.duration)
                )
                client_cpu = time.process_time() - cpu0
                errors += check_pages(base, slug)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    total = sum(len(v) for v in results.values())
    print(
        f"\nload: {args.clients} concurrent clients for {elapsed:.1f} s against kronscope serve "
        f"(uvicorn, {args.workers} worker(s), PostgreSQL, loopback), CPU count {os.cpu_count()}"
    )
    print(f"{'page':<10}{'requests':>10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    rows = dict(sorted(results.items()))
    if results:
        rows["all"] = [x for v in results.values() for x in v]
    for kind, v in rows.items():
        print(
            f"{kind:<10}{len(v):>10}{pct(v, 50):>10.1f}{pct(v, 90):>10.1f}{pct(v, 99):>10.1f}"
            f"{max(v):>10.1f}"
        )
    print(f"throughput {total / elapsed:.0f} requests/s, errors {len(errors)}")
    print(
        f"the clients' own CPU on the same machine: {client_cpu:.1f} s "
        f"({client_cpu / elapsed:.0%} of one core; warm-up included)"
    )
    for e in errors[:5]:
        print("  ", e)
    p99 = pct(rows["all"], 99) if results else float("inf")
    print(f"goal p99 < 50 ms and zero errors: {'met' if p99 < 50 and not errors else 'NOT met'}")
    return 0 if not errors else 1


# =============================================================================================
# Live inference throughput (issue 6; its own section, run with the ``inference`` argument)
# =============================================================================================
INFERENCE_DOC = """Live inference throughput: 16 concurrent clients vs one request at a time.

Serves ``POST /api/v1/saes/{sae}/activations`` with ``kronscope serve`` on 127.0.0.1 (SQLite
in a temporary data dir) for a KronSAE on the packaged SmolLM2-135M at model.layers.12
(d = 576). No trained checkpoint ships with KronScope, so unless ``--checkpoint`` names
one, a random KronSAE (F = 4,096 = 128 heads x 4 x 8, k = 32) is used; the output says
which. Each request is one distinct text of about ``--words`` words with top_k_per_token = 5.
Prints requests per second one at a time and with N concurrent clients, their ratio
(goal: batched >= 3x) and the engine's batch counters.

Usage: python benchmarks/api_load.py inference [--clients 16] [--requests 160]
       [--sequential 40] [--rounds 2] [--words 24] [--torch-threads N] [--checkpoint DIR]
       [--data-dir DIR]
"""

INFERENCE_SENTENCE = (
    "the model reads a sentence and writes one token at a time while the sparse "
    "autoencoder splits each activation into base and extension parents whose product "
    "lights up a latent only where both agree about numbers names places verbs colours "
    "cities rivers functions lists errors tests proofs"
)
INFERENCE_WORDS = INFERENCE_SENTENCE.split()


def inference_texts(n: int, n_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(INFERENCE_WORDS) for _ in range(rng.randint(n_words - 3, n_words + 3))]
        out.append(f"Example {i}: " + " ".join(words).capitalize() + ".")
    return out


def inference_checkpoint(folder: Path, source: str | None) -> tuple[Path, str]:
    if source:
        return Path(source), f"the checkpoint at {source}"
    import torch

    from kronscope.sae import SAEConfig, build
    from kronscope.sae.checkpoint import save

    h, m, n = 128, 4, 8
    cfg = SAEConfig(
        architecture="kronsae", d_in=576, d_sae=h * m * n, k=32, h=h, m=m, n=n,
        metadata={"model_name": "smollm2-135m", "hook_name": "model.layers.12"},
    )  # fmt: skip
    sae = build(cfg)
    sae.init_weights(torch.Generator().manual_seed(0))
    return save(sae, folder), "a random (untrained) KronSAE, F = 4,096 (no trained one exists)"


async def inference_load(base: str, slug: str, texts: list[str], clients: int) -> tuple[float, int]:
    """Send ``texts`` with ``clients`` concurrent clients; (seconds, errors)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for t in texts:
        queue.put_nowait(t)
    errors = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while True:
            try:
                text = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            r = await http.post(
                f"{base}/api/v1/saes/{slug}/activations", json={"text": text, "top_k_per_token": 5}
            )
            if r.status_code != 200:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, errors


CEILING_REPEATS = 5


def compute_times(folder: Path, texts: list[str], threads: int | None) -> tuple[float, float]:
    """Milliseconds of the engine's compute alone (model prefix to the hook, the SAE's top
    latents and parents) for one text, and for all ``texts`` padded into one batch: what
    batching gains the compute on this machine, whatever the server does (beyond that, only
    per-request costs shared by a batch)."""
    import torch

    from kronscope.lm import load_model
    from kronscope.sae import load as load_sae

    if threads:
        torch.set_num_threads(threads)
    model = load_model(MODEL_SMOL, device="cpu")
    sae = load_sae(folder)
    rows = [model.tokenizer(t)["input_ids"] for t in texts]

    def run(batch: list[list[int]]) -> None:
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), model.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        with torch.inference_mode():
            x = model.activations(ids, mask, HOOK_SMOL)[mask.bool()]
            sae.top_latents(x, 5)
            sae.parents(x)

    def timed(batches: list[list[list[int]]]) -> float:
        run(batches[0])  # warm-up
        t0 = time.perf_counter()
        for batch in batches:
            run(batch)
        return (time.perf_counter() - t0) * 1000 / len(batches)

    single = timed([[rows[i % len(rows)]] for i in range(CEILING_REPEATS)])
    together = timed([rows] * CEILING_REPEATS)
    return single, together


def inference_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        description=INFERENCE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=160, help="Requests of the concurrent run.")
    ap.add_argument("--sequential", type=int, default=40, help="Requests of the one-at-a-time run.")
    ap.add_argument(
        "--torch-threads", type=int, default=None,
        help="OMP_NUM_THREADS of the server (default: torch's own choice).",
    )  # fmt: skip
    ap.add_argument("--words", type=int, default=24, help="Words per text (about 1.2 tokens each).")
    ap.add_argument("--rounds", type=int, default=2, help="Alternating rounds of both modes.")
    ap.add_argument(
        "--checkpoint", default=None, help="A trained KronSAE for smollm2-135m (folder)."
    )
    ap.add_argument(
        "--data-dir", default=None, help="Keep the data dir (and the model cache) here."
    )
    args = ap.parse_args(argv)

    from kronscope.config import Settings
    from kronscope.db import make_engine, make_sessionmaker, upgrade
    from kronscope.services import sae_registry
    from kronscope.services.errors import Conflict

    work = (
        Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="kronscope-infer-"))
    )
    work.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{work / 'bench.db'}"
    folder, what = inference_checkpoint(work / f"ckpt-{secrets.token_hex(3)}", args.checkpoint)
    settings = Settings(database_url=url, data_dir=work)
    engine = make_engine(url)
    upgrade(engine)
    with make_sessionmaker(engine, begin_immediate=True)() as s:
        slug = f"smol-kron-{secrets.token_hex(3)}"
        try:
            sae_registry.register_checkpoint(
                s, settings, folder, sae_registry.UploadOptions(slug=slug)
            )
            s.commit()
        except Conflict as exc:  # the same checkpoint, registered by an earlier run (--data-dir)
            slug = exc.detail["existing_slug"]
    engine.dispose()
    env = {**os.environ, "KRONSCOPE_DATABASE_URL": url, "KRONSCOPE_DATA_DIR": str(work)}
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.torch_threads)
    port = free_port()
    texts = inference_texts(args.sequential + args.requests + 4, args.words)
    ceiling_texts = texts[4 : 4 + args.clients]
    try:
        with server(env, port, 1) as base:
            t0 = time.perf_counter()
            asyncio.run(inference_load(base, slug, texts[:2], 1))  # loads the model
            print(f"warm-up (model load and first requests): {time.perf_counter() - t0:.1f} s")
            asyncio.run(inference_load(base, slug, texts[2:4], 2))
            # Alternate the two modes in rounds, so that a change in machine load (shared
            # CPUs) affects both alike; the totals are compared.
            seq_s = par_s = 0.0
            seq_err = par_err = 0
            seq_n = par_n = 0
            rest = texts[4:]
            for r in range(args.rounds):
                seq_texts = rest[: args.sequential // args.rounds]
                rest = rest[len(seq_texts) :]
                par_texts = rest[: args.requests // args.rounds]
                rest = rest[len(par_texts) :]
                s_s, s_e = asyncio.run(inference_load(base, slug, seq_texts, 1))
                p_s, p_e = asyncio.run(inference_load(base, slug, par_texts, args.clients))
                print(
                    f"round {r + 1}: one at a time {len(seq_texts) / s_s:6.1f} requests/s, "
                    f"{args.clients} clients {len(par_texts) / p_s:6.1f} requests/s"
                )
                seq_s, seq_err, seq_n = seq_s + s_s, seq_err + s_e, seq_n + len(seq_texts)
                par_s, par_err, par_n = par_s + p_s, par_err + p_e, par_n + len(par_texts)
            status = httpx.get(f"{base}/api/v1/inference/status", timeout=10).json()
        # the server has stopped: the bare compute runs alone, in this process
        single_ms, batch_ms = compute_times(folder, ceiling_texts, args.torch_threads)
    finally:
        if not args.data_dir:
            shutil.rmtree(work, ignore_errors=True)
    one = seq_n / seq_s
    many = par_n / par_s
    counters = status["counters"]
    print(f"\nlive inference on smollm2-135m @ model.layers.12 with {what}")
    threads = args.torch_threads or "default"
    print(
        f"device {status['device']}, CPU count {os.cpu_count()}, server torch threads {threads}, "
        f"load average {os.getloadavg()[0]:.1f}, texts of ~{args.words} words, top_k_per_token 5"
    )
    print(f"one at a time:        {one:7.1f} requests/s  ({seq_n} requests, errors {seq_err})")
    print(
        f"{args.clients:>2} concurrent clients: {many:7.1f} requests/s  "
        f"({par_n} requests, errors {par_err})"
    )
    goal = "met" if many / one >= 3 else "NOT met"
    print(f"ratio batched / one at a time: {many / one:.2f}x  (goal >= 3x: {goal})")
    n = len(ceiling_texts)
    print(
        f"bare compute, no server (model prefix + SAE top latents and parents, mean of "
        f"{CEILING_REPEATS}): one text {single_ms:.1f} ms, {n} texts together {batch_ms:.1f} ms "
        f"({batch_ms / n:.1f} ms each): batching gains the compute itself "
        f"{single_ms * n / batch_ms:.2f}x here (the rest of the gain is per-request overhead shared)"
    )
    print(
        f"engine: {counters['batches']} batches for {counters['requests']} requests, "
        f"mean {counters['mean_requests_per_batch']:.2f} and max {counters['max_requests_in_batch']} "
        f"requests per batch; batch sizes {counters['batch_sizes']}"
    )
    return 0 if not (seq_err or par_err) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["inference"]:  # the live inference section above
        raise SystemExit(inference_main(sys.argv[2:]))
    raise SystemExit(main())
