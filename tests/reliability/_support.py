"""What the reliability suites share: results, live ``kronscope`` processes on loopback,
scratch databases, tiny checkpoints, seeded pages and memory sampling.

Everything here talks only to 127.0.0.1 and is bounded in time: every wait has a deadline
and every process started is stopped (by its own pid) when the suite ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PG_ENV = "KRONSCOPE_TEST_POSTGRES_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MODEL = "tiny-gpt2"
HOOK = "transformer.h.1"
D_IN = 32  # the tiny models' width
LOCAL = "127.0.0.1"


# -- results ---------------------------------------------------------------------------------
@dataclass
class SuiteResult:
    """One suite's outcome: the summary line, and every problem found (empty: passed)."""

    name: str
    line: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self, limit: int = 15) -> str:
        out = [self.line]
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  PROBLEM: {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            out.append(f"  ... and {len(self.problems) - limit} more problems")
        return "\n".join(out)


# -- databases -----------------------------------------------------------------------------------
def pg_base_url(default: str | None = None) -> str | None:
    """The PostgreSQL server to make scratch databases on (``KRONSCOPE_TEST_POSTGRES_URL``)."""
    return os.environ.get(PG_ENV) or default


def pg_reachable(url: str, timeout: float = 3.0) -> bool:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    try:
        with socket.create_connection((u.host or LOCAL, u.port or 5432), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def scratch_database(backend: str, tmp_dir: Path, pg_url: str | None = None) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file in ``tmp_dir`` or a new PostgreSQL
    database next to ``pg_url`` (dropped, WITH FORCE, at the end)."""
    if backend == "sqlite":
        tmp_dir.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{tmp_dir / f'reliability-{secrets.token_hex(4)}.db'}"
        return
    if not pg_url:
        raise RuntimeError(f"no PostgreSQL server: set {PG_ENV}")
    from helpers.db import fresh_postgres_database

    with fresh_postgres_database(pg_url) as url:
        yield url


def database_name(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).database or ""


def terminate_backends(url: str) -> int:
    """``pg_terminate_backend`` every connection to ``url``'s database (not our own);
    returns how many were terminated. Simulates a PostgreSQL restart for one database."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    u = make_url(url)
    admin = sa.create_engine(
        u.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    try:
        with admin.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": u.database},
            ).all()
        return sum(1 for (ok,) in rows if ok)
    finally:
        admin.dispose()


def restart_postgres(timeout: float = 60.0) -> float:
    """Restart the local PostgreSQL cluster (opt-in only: it affects everyone's tests);
    returns how long the restart command took."""
    versions = sorted(os.listdir("/etc/postgresql"))
    if not versions:
        raise RuntimeError("no PostgreSQL cluster under /etc/postgresql")
    t0 = time.monotonic()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"],
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    return time.monotonic() - t0


def count_rows(url: str) -> dict[str, int]:
    """Rows of every table of the schema."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    from kronscope.db import make_engine
    from kronscope.db.base import Base

    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return {
                t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar() or 0)
                for t in Base.metadata.sorted_tables
            }
    finally:
        engine.dispose()


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under ``root``: relative path -> (kind, size). Symlinks are not followed."""
    out: dict[str, tuple[str, int]] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
        out[str(p.relative_to(root))] = (kind, st.st_size if kind == "file" else 0)
    return out


# -- subject model and checkpoints ---------------------------------------------------------------
def ensure_models_dir(root: Path) -> Path:
    """A models folder holding ``tiny-gpt2`` (built once; reused when present)."""
    from helpers.tiny_models import make_tiny_model

    target = root / MODEL
    if not (target / "config.json").is_file():
        make_tiny_model("gpt2", target)
    return root


def make_checkpoint(
    folder: Path,
    *,
    architecture: str = "kronsae",
    seed: int = 0,
    h: int = 2,
    m: int = 2,
    n: int = 4,
    k: int = 2,
    d_sae: int = 16,
    d_in: int = D_IN,
    model: str | None = MODEL,
    hook: str | None = HOOK,
) -> Path:
    """A seeded random SAE saved natively (different seeds give different hashes)."""
    import torch

    from kronscope.sae import SAEConfig, build
    from kronscope.sae.checkpoint import save

    metadata: dict[str, Any] = {}
    if model:
        metadata["model_name"] = model
    if hook:
        metadata["hook_name"] = hook
    if architecture == "kronsae":
        cfg = SAEConfig(
            architecture="kronsae", d_in=d_in, d_sae=h * m * n, k=k, h=h, m=m, n=n,
            metadata=metadata,
        )  # fmt: skip
    else:
        cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, k=k, metadata=metadata)
    sae = build(cfg)
    sae.init_weights(torch.Generator().manual_seed(seed))  # type: ignore[operator]
    with torch.no_grad():  # larger encoder weights: plenty of active latents on tiny models
        sae.W_enc.mul_(8.0)
    return save(sae, folder)


def folder_parts(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("files", (p.name, p.read_bytes(), "application/octet-stream"))
        for p in sorted(folder.iterdir())
        if p.is_file()
    ]


def seed_pages(db_url: str, slug: str, seed: int = 0) -> int:
    """A small complete harvest for ``slug`` written through the repositories (the fake
    one of ``helpers.db``), made active; returns its id."""
    from helpers.db import write_fake_harvest
    from kronscope.db import make_engine, make_sessionmaker
    from kronscope.db.repositories import saes

    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine, begin_immediate=True)() as s:
            row = saes.get_sae_by_slug(s, slug)
            assert row is not None, slug
            harvest_id = write_fake_harvest(s, row, seed=seed, n_contexts=32)
            s.commit()
        return harvest_id
    finally:
        engine.dispose()


# -- processes ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def kronscope_env(db_url: str, data_dir: Path, models_dir: Path, **settings: Any) -> dict[str, str]:
    """The environment of a ``kronscope`` process: this one's, without any other
    ``KRONSCOPE_*`` setting, plus the given ones (``job_poll_seconds=0.2`` ->
    ``KRONSCOPE_JOB_POLL_SECONDS=0.2``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONSCOPE_")}
    env.update(
        KRONSCOPE_ENVIRONMENT="test",
        KRONSCOPE_DATABASE_URL=db_url,
        KRONSCOPE_DATA_DIR=str(data_dir),
        KRONSCOPE_MODELS_DIR=str(models_dir),
        KRONSCOPE_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    for key, value in settings.items():
        env[f"KRONSCOPE_{key.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


def cli_command() -> list[str]:
    return [sys.executable, "-m", "kronscope.cli"]


def run_cli(env: dict[str, str], *args: str, timeout: float = 180.0) -> str:
    """Run ``kronscope <args>``; its stdout (raises with stderr on failure)."""
    done = subprocess.run(
        [*cli_command(), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"kronscope {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def create_key(env: dict[str, str], name: str, scopes: str) -> str:
    """A key made with ``kronscope keys create`` (printed once on stdout)."""
    out = run_cli(env, "keys", "create", "--name", name, "--scopes", scopes)
    return out.strip().splitlines()[-1].strip()


class Process:
    """A ``kronscope`` sub-command in its own process group, output to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        log.write(f"\n=== start {self.starts + 1}: kronscope {' '.join(self.args)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [*cli_command(), *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.starts += 1

    def kill9(self) -> None:
        """SIGKILL, no warning, then reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Server(Process):
    """``kronscope serve`` on a free loopback port."""

    def __init__(self, env: dict[str, str], log_path: Path, *, no_jobs: bool = True):
        self.port = free_port()
        args = ["serve", "--host", LOCAL, "--port", str(self.port), "--no-access-log"]
        args += ["--log-level", "warning"]
        if no_jobs:
            args.append("--no-jobs")
        super().__init__(args, env, log_path)
        self.base_url = f"http://{LOCAL}:{self.port}"

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Until ``/api/v1/health/ready`` answers 200; returns the seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"kronscope serve exited early:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{self.base_url}/api/v1/health/ready", timeout=5.0)
                if r.status_code == 200:
                    return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"kronscope serve not ready in {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def start_ready(self, timeout: float = 180.0) -> float:
        self.start()
        return self.wait_ready(timeout)


# -- memory ----------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (Linux ``/proc``), None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append((time.monotonic() - t0, value))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def start_mb(self) -> float:
        return self.samples[0][1] if self.samples else float("nan")

    @property
    def peak_mb(self) -> float:
        return max((v for _, v in self.samples), default=float("nan"))

    @property
    def end_mb(self) -> float:
        return self.samples[-1][1] if self.samples else float("nan")


# -- HTTP helpers --------------------------------------------------------------------------------
def error_shape_problem(response: httpx.Response | Any) -> str | None:
    """None when the body is ``{"error": {"code", "message", "detail"}}`` with a message in
    plain words, else what is wrong with it."""
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        return f"body is not JSON: {response.text[:200]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return f"no 'error' object: {str(body)[:200]}"
    if not isinstance(err.get("code"), str) or not err["code"]:
        return f"no error code: {err}"
    message = err.get("message")
    if not isinstance(message, str) or len(message.strip()) < 10:
        return f"no message in plain words: {err}"
    if "Traceback" in message or err["code"] == "internal_error":
        return f"an internal error leaked: {message[:200]}"
    if not isinstance(err.get("detail"), dict):
        return f"'detail' is not an object: {err}"
    return None


def run_async(coro: Any) -> Any:
    """``asyncio.run(coro)`` in a thread of its own: the calling thread may already run
    an event loop (Playwright's sync API leaves one in the main thread for the session)."""
    import asyncio
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
        return pool.submit(asyncio.run, coro).result()
