"""``kronscope serve --workers N`` on Linux: N uvicorn processes, each with its own
listening socket on the same address (``SO_REUSEPORT``), kept alive by this parent.

Why not uvicorn's own workers: they share one listening socket, and the worker that wakes
first accepts every connection waiting. Keep-alive clients that connect together (a page
load, a load test, a proxy's upstream pool) then all land on one worker, which serves
them alone while the others idle: ``benchmarks/api_load.py`` saw half the throughput
and twice the latency in such runs. With one socket each, the kernel spreads the
connections over the workers as they arrive, whichever worker is awake.

The parent binds the address first without listening (so a port in use is refused at
once, and port 0 is chosen here for all workers), starts the workers (spawned, so each
builds its own app), restarts one that dies, and stops them all on SIGINT or SIGTERM.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from typing import Any

log = logging.getLogger("kronscope.serve")

RESTART_WINDOW_S = 60.0
"""A worker that dies more than ``MAX_RESTARTS`` times within this window stops the server."""
MAX_RESTARTS = 5
STOP_TIMEOUT_S = 30.0
BACKLOG = 2048


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _address(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, address


def _socket(host: str, port: int) -> socket.socket:
    family, address = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _worker(host: str, port: int, options: dict[str, Any]) -> None:
    import uvicorn

    sock = _socket(host, port)
    sock.listen(BACKLOG)
    config = uvicorn.Config("kronscope.app:create_app", factory=True, **options)
    uvicorn.Server(config).run(sockets=[sock])


def serve(workers: int, host: str, port: int, options: dict[str, Any]) -> int:
    """Run ``workers`` processes on ``host:port`` until SIGINT or SIGTERM; the exit code."""
    try:
        holder = _socket(host, port)  # bound, never listening: it only holds the port
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    port = holder.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def start() -> Any:
        process = ctx.Process(target=_worker, args=(host, port, options), daemon=False)
        process.start()
        return process

    print(
        f"kronscope: {workers} workers on http://{host}:{port} (parent {os.getpid()})",
        file=sys.stderr,
        flush=True,
    )
    processes = [start() for _ in range(workers)]
    deaths: list[float] = []
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)
            for n, process in enumerate(processes):
                if process.is_alive() or stopping:
                    continue
                now = time.monotonic()
                deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
                print(
                    f"kronscope: worker {process.pid} exited with {process.exitcode}; "
                    "starting another",
                    file=sys.stderr,
                    flush=True,
                )
                if len(deaths) > MAX_RESTARTS:
                    print(
                        f"kronscope: workers died {len(deaths)} times within "
                        f"{RESTART_WINDOW_S:.0f} s; stopping",
                        file=sys.stderr,
                        flush=True,
                    )
                    stopping, code = True, 1
                    break
                processes[n] = start()
    finally:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)  # uvicorn's graceful shutdown
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        holder.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
