"""Browser-test fixtures: Debian Chromium (driven by Playwright) against a real uvicorn
server on 127.0.0.1, with the tiny subject models, in-process jobs and an API key.

- ``server`` (session): a fresh data dir and SQLite database, the app served by uvicorn in a
  thread on a free port; ``server.key`` has every scope.
- ``browser`` (session): headless Chromium, never downloaded (``shutil.which("chromium")``);
  without it every browser test is skipped with the reason.
- ``page``: a new page (1280 x 900) that records dialogs and script errors; the test fails
  if any script error happened.
- ``shoot(page, name)``: screenshots at 1280 and 390 px wide into
  ``test-artifacts/screenshots/`` (git-ignored).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy.orm import sessionmaker

from kronscope.app import create_app
from kronscope.config import Settings
from kronscope.db import make_engine, upgrade
from kronscope.db.repositories import keys
from kronscope.sae import SAEConfig, build
from kronscope.sae.checkpoint import save

try:
    from playwright import sync_api as playwright_api
except ImportError:  # pragma: no cover - a dev install has it
    playwright_api = None  # type: ignore[assignment]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
WIDTHS = (1280, 390)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODEL = "tiny-gpt2"
HOOK = "transformer.h.1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is a ``browser`` test; without Chromium (or Playwright) it is skipped,
    with the reason."""
    here = Path(__file__).parent
    reason = None
    if playwright_api is None:
        reason = "Playwright is not installed (pip install -e '.[dev]')"
    elif CHROMIUM is None:
        reason = "Chromium is not installed (apt-get install chromium)"
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


# -- the server --------------------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    key: str
    settings: Settings
    factory: sessionmaker[Any]
    data_dir: Path


def make_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny KronSAE (h=8, m=2, n=4, F=64, k=8) for ``tiny-gpt2`` at ``transformer.h.1``,
    with encoder weights large enough that plenty of latents fire on the tiny model."""
    import torch

    cfg = SAEConfig(
        architecture="kronsae", d_in=32, d_sae=64, k=8, h=8, m=2, n=4,
        metadata={"model_name": MODEL, "hook_name": HOOK},
    )  # fmt: skip
    sae = build(cfg)
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.W_enc.mul_(8.0)
    return save(sae, folder)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("browser")
    settings = Settings(
        environment="test",
        data_dir=root / "data",
        database_url=f"sqlite:///{root / 'kronscope.db'}",
        models_dir=tiny_models_dir,
        device="cpu",
        run_jobs_in_process=True,
        job_poll_seconds=0.5,
        job_heartbeat_seconds=0.5,
    )
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with factory() as s:
        _, plain = keys.create_key(s, "browser", ["upload", "delete", "jobs", "explanations"])
        s.commit()

    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), log_level="warning", access_log=False, lifespan="on"
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(
        target=uv.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield Server(f"http://127.0.0.1:{port}", plain, settings, factory, root / "data")
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
        engine.dispose()


# -- the browser ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or playwright_api is None:
        pytest.skip("Chromium or Playwright is not installed")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Watch:
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def watch() -> Watch:
    return Watch()


@pytest.fixture
def page(browser: Any, watch: Watch) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    context.set_default_timeout(20_000)
    tab = context.new_page()

    def on_dialog(dialog: Any) -> None:
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    tab.on("dialog", on_dialog)
    tab.on("pageerror", lambda exc: watch.errors.append(str(exc)))
    yield tab
    context.close()
    assert watch.errors == [], f"script errors on the page: {watch.errors}"


@pytest.fixture(scope="session")
def shoot() -> Callable[[Any, str], None]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def _shoot(tab: Any, name: str) -> None:
        size = tab.viewport_size
        for width in WIDTHS:
            tab.set_viewport_size({"width": width, "height": 900 if width > 600 else 844})
            tab.wait_for_timeout(50)  # let the layout settle
            tab.screenshot(path=str(SCREENSHOTS / f"{name}-{width}.png"), full_page=True)
        tab.set_viewport_size(size)

    return _shoot


def sign_in(tab: Any, server: Server) -> None:
    tab.goto(f"{server.url}/key")
    tab.get_by_label("API key").fill(server.key)
    tab.get_by_role("button", name="Use this key").click()
    tab.wait_for_url(f"{server.url}/")
