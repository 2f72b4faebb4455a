"""A tiny OpenAI-compatible chat server on 127.0.0.1 for the LLM explainer tests.

``FakeOpenAI.mode`` picks the behaviour of ``POST /v1/chat/completions``:
``ok`` (a proper completion), ``slow`` (sleeps ``delay`` seconds first), ``error`` (HTTP
500), ``garbage`` (200 with HTML), ``wrong_shape`` (JSON without choices), ``empty``
(empty content). ``ok_then`` answers ``ok_count`` requests properly, then behaves as
``then``. Every request body and its Authorization header are recorded.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    def __init__(self) -> None:
        self.mode = "ok"
        self.then = "garbage"
        self.ok_count = 0
        self.delay = 2.0
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake.lock:
                    fake.requests.append(body)
                    fake.auth.append(self.headers.get("Authorization"))
                    n = len(fake.requests)
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                    return
                mode = fake.mode
                if mode == "ok_then":
                    mode = "ok" if n <= fake.ok_count else fake.then
                if mode == "slow":
                    time.sleep(fake.delay)
                    mode = "ok"
                if mode == "error":
                    self._send(500, b'{"error": {"message": "the model is overloaded"}}')
                elif mode == "garbage":
                    self._send(200, b"<html>surprise</html>", "text/html")
                elif mode == "wrong_shape":
                    self._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
                elif mode == "empty":
                    self._send(200, json.dumps(_completion("   ")).encode())
                else:
                    user = body["messages"][-1]["content"]
                    label = user.splitlines()[0].removeprefix("Feature: ").split(" of SAE")[0]
                    text = f'Explanation: "mentions of things near {label}"\nextra line'
                    self._send(200, json.dumps(_completion(text)).encode())

            def _send(self, code: int, data: bytes, ctype: str = "application/json") -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _completion(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }
