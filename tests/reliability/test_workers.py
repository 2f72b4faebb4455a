"""``kronscope serve --workers 2`` (``kronscope.serving``): connections that arrive together
are spread over the workers (one listening socket each), a worker killed with SIGKILL is
replaced while the other serves, SIGTERM stops them all, and a port in use is refused in
plain words."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kronscope import serving

from ._support import LOCAL, Server, cli_command, free_port, kronscope_env, scratch_database

pytestmark = [pytest.mark.reliability, pytest.mark.postgres, pytest.mark.timeout(300)]

if not serving.supported():  # pragma: no cover - Linux only
    pytest.skip("SO_REUSEPORT workers are Linux's", allow_module_level=True)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            out += [int(p) for p in fh.read().split()]
    return out


def _workers(pid: int) -> list[int]:
    """The parent's uvicorn workers (multiprocessing's resource tracker is a child too)."""
    found = []
    for child in _children(pid):
        with open(f"/proc/{child}/cmdline", "rb") as fh:
            if b"spawn_main" in fh.read():
                found.append(child)
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _established_on(port: int) -> set[str]:
    """Inodes of the server side of established TCP connections on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


@pytest.fixture
def server(rel_pg_url: str, rel_models_dir: Path, tmp_path: Path) -> Iterator[Server]:
    with scratch_database("postgresql", tmp_path, rel_pg_url) as db_url:
        env = kronscope_env(db_url, tmp_path / "data", rel_models_dir)
        srv = Server(env, tmp_path / "serve.log")
        srv.args += ["--workers", "2"]
        srv.start_ready(120)
        try:
            yield srv
        finally:
            srv.stop()


def _wait(condition: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_connections_spread_and_a_dead_worker_is_replaced(server: Server) -> None:
    assert server.pid is not None
    _wait(lambda: len(_workers(server.pid)) == 2)  # type: ignore[arg-type]
    # 24 keep-alive connections opened together, each answered once and kept open.
    conns = [socket.create_connection((LOCAL, server.port)) for _ in range(24)]
    try:
        for c in conns:
            c.sendall(f"GET /api/v1/health HTTP/1.1\r\nHost: {LOCAL}\r\n\r\n".encode())
        for c in conns:
            assert c.recv(65536).startswith(b"HTTP/1.1 200")
        served = _established_on(server.port)
        per_worker = [
            len(_socket_inodes(w) & served)
            for w in _workers(server.pid)  # type: ignore[arg-type]
        ]
        assert sum(per_worker) == 24 and min(per_worker) > 0, per_worker
    finally:
        for c in conns:
            c.close()

    first, second = _workers(server.pid)  # type: ignore[arg-type]
    os.kill(first, signal.SIGKILL)
    # A connection the kernel queued on the dying worker's own socket before the kill took
    # effect is reset with it (the crash's own loss); once it is reaped, the other answers.
    # Not sooner: a zombie leader's other threads may still hold its files, socket included.
    _wait(lambda: not os.path.exists(f"/proc/{first}"))
    for _ in range(20):  # the other worker answers meanwhile (or the replacement)
        assert httpx.get(f"{server.base_url}/api/v1/health", timeout=10).status_code == 200
    _wait(lambda: len(_workers(server.pid)) == 2 and first not in _workers(server.pid))  # type: ignore[arg-type]
    assert second in _workers(server.pid)  # type: ignore[arg-type]
    server.wait_ready(60)

    workers = _workers(server.pid)  # type: ignore[arg-type]
    server.stop(60)
    assert server.proc is not None and server.proc.returncode == 0, server.log_tail()
    for w in workers:
        assert _exited(w)


def _exited(pid: int) -> bool:
    """Gone or a zombie: its files, sockets included, are closed."""
    try:
        return _is_zombie(pid)
    except FileNotFoundError:
        return True


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_port_in_use_is_refused_in_plain_words(rel_pg_url: str, tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind((LOCAL, port))
        taken.listen()
        env = kronscope_env(rel_pg_url, tmp_path / "data", tmp_path)
        args = ["serve", "--host", LOCAL, "--port", str(port), "--workers", "2", "--no-jobs"]
        done = subprocess.run(
            [*cli_command(), *args], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on {LOCAL}:{port}" in done.stderr
    assert "Traceback" not in done.stderr
