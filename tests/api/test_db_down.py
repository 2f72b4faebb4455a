"""Database outages: 503 with Retry-After while PostgreSQL cannot be reached, and recovery
without a restart once it is back. A small TCP proxy stands between the app and the
server, so the test can cut the connection (refuse new ones, drop open ones) and restore it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from kronscope.app import create_app

from .test_app import assert_error


class Proxy:
    def __init__(self, target: tuple[str, int]):
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._conns.clear()


@pytest.fixture
def proxied_url(api_db: tuple[str, Any]) -> Iterator[tuple[str, Proxy]]:
    url = make_url(api_db[0])
    if url.get_backend_name() != "postgresql":
        pytest.skip("the outage test needs PostgreSQL (a server that can go away)")
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    try:
        yield (
            url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
            proxy,
        )
    finally:
        proxy.stop()


def test_database_down_is_503_then_recovers(
    proxied_url: tuple[str, Proxy], make_settings: Any, seeded: Any, auth: dict[str, str]
) -> None:
    url, proxy = proxied_url
    with TestClient(
        create_app(make_settings(database_url=url)), raise_server_exceptions=False
    ) as c:
        assert c.get(f"/api/v1/saes/{seeded.kron}/latents/5").status_code == 200

        proxy.stop()  # the server is gone: open connections drop, new ones are refused
        for path in (
            "/api/v1/saes",
            f"/api/v1/saes/{seeded.kron}/latents/5",
            f"/api/v1/saes/{seeded.kron}/heads/0",
        ):
            r = c.get(path)
            err = assert_error(r, 503, "database_unavailable")
            assert r.headers["Retry-After"].isdigit()
            assert "try again" in err["message"]
        r = c.post(f"/api/v1/saes/{seeded.kron}/harvests", json={}, headers=auth)
        assert_error(r, 503)
        health = c.get("/api/v1/health")
        assert health.status_code == 200 and health.json()["ready"] is False
        assert health.json()["status"] == "degraded"
        assert_error(c.get("/api/v1/health/ready"), 503)

        proxy.start()  # back: the pool's pre-ping replaces dead connections, no restart
        assert c.get(f"/api/v1/saes/{seeded.kron}/latents/5").status_code == 200
        assert c.get("/api/v1/saes").status_code == 200
        assert c.get("/api/v1/health").json()["ready"] is True


def test_app_starts_while_database_is_down(
    proxied_url: tuple[str, Proxy], make_settings: Any, seeded: Any
) -> None:
    url, proxy = proxied_url
    proxy.stop()
    settings = make_settings(database_url=url, run_jobs_in_process=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.get("/api/v1/saes")
        assert_error(r, 503)
        assert r.headers["Retry-After"]
        assert c.get("/api/v1/health").json()["jobs"]["alive"] is False
        proxy.start()
        assert c.get("/api/v1/saes").status_code == 200  # migrates and starts the job runner
        assert c.get("/api/v1/health").json()["jobs"]["alive"] is True
