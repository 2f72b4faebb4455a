"""The reliability suite at full size; prints one summary line per suite.

Suites (the code is in ``tests/reliability``; ``pytest -m reliability`` runs them small):

1. ``uploads``: the malformed-upload corpus through a live ``kronscope serve``: every one
   a 4xx in the error shape, nothing stored (rows of every table, files under data_dir);
2. ``schemathesis``: every operation of the seeded app, ``--schema-examples`` each;
3. ``kill9``: kill -9 of the worker during a harvest and of the server during explanation
   edits (``--kills`` times);
4. ``pg-restart``: the server's database connections terminated under load (or, with
   ``--pg-restart`` or ``KRONSCOPE_RELIABILITY_PG_RESTART=1``, the whole local PostgreSQL
   cluster restarted: it interrupts everyone using that server);
5. ``load``: ``--clients`` concurrent clients for ``--seconds`` on pages and live inference.

Everything runs on 127.0.0.1 against scratch databases (dropped at the end) and temporary
folders. Exit status 1 when any suite found a problem.

Usage: python benchmarks/reliability.py [--only uploads,kill9] [--seconds 60] [--clients 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the suites and their helpers

from reliability._support import (  # noqa: E402
    DEFAULT_PG_URL,
    Server,
    SuiteResult,
    ensure_models_dir,
    kronscope_env,
    pg_base_url,
    pg_reachable,
    scratch_database,
)

SUITES = ("uploads", "schemathesis", "kill9", "pg-restart", "load")
PG_RESTART_ENV = "KRONSCOPE_RELIABILITY_PG_RESTART"


def uploads(args: argparse.Namespace, work: Path, models: Path) -> list[SuiteResult]:
    import httpx

    from reliability.uploads import MAX_UPLOAD_BYTES, make_keys, run_upload_suite

    with scratch_database(args.backend, work / "db", args.pg_url) as db_url:
        keys = make_keys(db_url)
        data_dir = work / "data"
        env = kronscope_env(
            db_url, data_dir, models, run_jobs_in_process=False, max_upload_bytes=MAX_UPLOAD_BYTES
        )
        server = Server(env, work / "server.log")
        try:
            server.start_ready()
            with httpx.Client(base_url=server.base_url, timeout=120.0) as client:
                result = run_upload_suite(
                    client,
                    db_url,
                    data_dir,
                    keys,
                    work / "work",
                    server_log=lambda: server.log_tail(10**7),
                )
        finally:
            server.stop()
    result.line += f" [live server, {args.backend}]"
    return [result]


def schemathesis(args: argparse.Namespace, work: Path, models: Path) -> list[SuiteResult]:
    from fastapi.testclient import TestClient

    from kronscope.app import create_app
    from reliability.schema import run_schema_suite, seed_world
    from reliability.uploads import upload_settings

    with scratch_database(args.backend, work / "db", args.pg_url) as db_url:
        settings = upload_settings(db_url, work / "data", models, max_upload_bytes=256 * 1024)
        app = create_app(settings)
        with TestClient(app, raise_server_exceptions=False) as client:
            world = seed_world(client, db_url, work / "ckpts")
            result = run_schema_suite(app, world, args.schema_examples)
    result.line += f" [{args.backend}]"
    return [result]


def kill9(args: argparse.Namespace, work: Path, models: Path) -> list[SuiteResult]:
    from reliability.kill9 import run_kill9_suite

    with scratch_database(args.backend, work / "db", args.pg_url) as db_url:
        result = run_kill9_suite(
            work, models, db_url, kills=args.kills, writers=8, harvest_tokens=args.harvest_tokens
        )
    result.line += f" [{args.backend}]"
    return [result]


def live_suites(
    args: argparse.Namespace, work: Path, models: Path, wanted: set[str]
) -> list[SuiteResult]:
    from reliability.live import live_server, run_load_suite, run_pg_restart_suite

    out = []
    backend = args.backend
    if "pg-restart" in wanted and backend != "postgresql":
        out.append(SuiteResult("pg-restart", "pg-restart: skipped (needs PostgreSQL)"))
        wanted = wanted - {"pg-restart"}
    with (
        scratch_database(backend, work / "db", args.pg_url) as db_url,
        live_server(work, models, db_url) as live,
    ):
        if "pg-restart" in wanted:
            real = args.pg_restart or os.environ.get(PG_RESTART_ENV) == "1"
            result = run_pg_restart_suite(
                live,
                duration=30.0,
                clients=16,
                disruptions=2 if real else 4,
                real_restart=real,
            )
            out.append(result)
        if "load" in wanted:
            result = run_load_suite(live, clients=args.clients, duration=args.seconds)
            result.line += f" [{backend}]"
            out.append(result)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--only", default=",".join(SUITES), help=f"Comma-separated: {', '.join(SUITES)}."
    )
    ap.add_argument(
        "--pg-url",
        default=pg_base_url(DEFAULT_PG_URL),
        help="PostgreSQL server for scratch databases.",
    )
    ap.add_argument("--sqlite", action="store_true", help="Use SQLite instead (no pg-restart).")
    ap.add_argument("--seconds", type=float, default=60.0, help="Load duration.")
    ap.add_argument("--clients", type=int, default=64, help="Concurrent load clients.")
    ap.add_argument("--kills", type=int, default=5, help="Server kills during edits.")
    ap.add_argument("--harvest-tokens", type=int, default=65_536)
    ap.add_argument("--schema-examples", type=int, default=40, help="Cases per operation.")
    ap.add_argument(
        "--pg-restart", action="store_true", help="Restart the PostgreSQL cluster for real."
    )
    ap.add_argument("--keep", action="store_true", help="Keep the work folder (logs).")
    args = ap.parse_args()
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = wanted - set(SUITES)
    if unknown:
        ap.error(f"unknown suites {sorted(unknown)}; use {', '.join(SUITES)}")
    if not 1 <= args.seconds <= 600 or not 1 <= args.clients <= 256 or not 1 <= args.kills <= 50:
        ap.error("--seconds must be 1..600, --clients 1..256, --kills 1..50")
    args.backend = "sqlite" if args.sqlite else "postgresql"
    if args.backend == "postgresql" and not pg_reachable(args.pg_url):
        print(f"PostgreSQL at {args.pg_url} is not reachable; using SQLite (no pg-restart)")
        args.backend = "sqlite"

    work = Path(tempfile.mkdtemp(prefix="kronscope-reliability-"))
    results: list[SuiteResult] = []
    t_all = time.monotonic()
    try:
        models = ensure_models_dir(work / "models")
        runs: list[tuple[str, Callable[[], list[SuiteResult]]]] = []
        if "uploads" in wanted:
            runs.append(("uploads", lambda: uploads(args, work / "uploads", models)))
        if "schemathesis" in wanted:
            runs.append(("schemathesis", lambda: schemathesis(args, work / "schema", models)))
        if "kill9" in wanted:
            runs.append(("kill9", lambda: kill9(args, work / "kill9", models)))
        if wanted & {"pg-restart", "load"}:
            runs.append(("live", lambda: live_suites(args, work / "live", models, wanted)))
        for name, run in runs:
            t0 = time.monotonic()
            print(f"--- {name} ...", flush=True)
            try:
                got = run()
            except Exception as exc:
                traceback.print_exc()
                got = [SuiteResult(name, f"{name}: did not run ({exc!r})"[:300], [repr(exc)])]
            for result in got:
                print(result.report(), flush=True)
            print(f"--- {name}: {time.monotonic() - t0:.0f} s", flush=True)
            results += got
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nreliability summaries ({time.monotonic() - t_all:.0f} s, CPU count {os.cpu_count()}):"
    )
    for result in results:
        print(result.line + ("" if result.ok else f"   <- {len(result.problems)} problems"))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
