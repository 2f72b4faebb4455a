"""``kronscope demo`` end to end on a tiny random model, without serving.

The real stages run (trainer, upload service, harvest job, heuristic explainer, keys)
into a temporary data dir; then the database must hold the SAE with a complete harvest
and explanations, and a second run must reuse every stage (no training, no harvest).
"""

from __future__ import annotations

import random
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers.tiny_models import SENTENCES
from kronscope.cli import app as cli_app
from kronscope.config import get_settings

TINY_ARGS = [
    "--model", "tiny-llama",
    "--hook", "model.layers.1",
    "--corpus", "tiny.txt",
    "--d-sae", "64",
    "--k", "4",
    "--ctx-len", "32",
    "--batch-size", "128",
    "--train-tokens", "1024",
    "--eval-tokens", "128",
    "--harvest-tokens", "1024",
    "--harvest-ctx-len", "32",
]  # fmt: skip


@pytest.fixture
def demo_data(
    tmp_path: Path, tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    data = tmp_path / "data"
    corpora = data / "corpora"
    corpora.mkdir(parents=True)
    rng = random.Random(0)
    lines = [rng.choice(SENTENCES) for _ in range(400)]
    (corpora / "tiny.txt").write_text("\n\n".join(lines) + "\n")
    for name in ("DATABASE_URL", "ENVIRONMENT", "SECRET_KEY"):
        monkeypatch.delenv(f"KRONSCOPE_{name}", raising=False)
    monkeypatch.setenv("KRONSCOPE_DATA_DIR", str(data))
    monkeypatch.setenv("KRONSCOPE_MODELS_DIR", str(tiny_models_dir))
    monkeypatch.setenv("KRONSCOPE_DEVICE", "cpu")
    get_settings.cache_clear()
    yield data
    get_settings.cache_clear()


def _demo(*extra: str) -> Any:
    result = CliRunner().invoke(
        cli_app, ["demo", "--no-serve", "--no-progress", *TINY_ARGS, *extra]
    )
    return result


def _db_state(data: Path) -> dict[str, Any]:
    from kronscope.db import make_engine, make_sessionmaker
    from kronscope.db.models import UnitKind
    from kronscope.db.repositories import explanations as expl_repo
    from kronscope.db.repositories import harvests as harvest_repo
    from kronscope.db.repositories import keys as key_repo
    from kronscope.db.repositories import saes as sae_repo

    engine = make_engine(f"sqlite:///{data / 'kronscope.db'}")
    try:
        with make_sessionmaker(engine)() as s:
            saes = sae_repo.list_saes(s).items
            out: dict[str, Any] = {"saes": [x.slug for x in saes], "keys": key_repo.list_keys(s)}
            if saes:
                sae = saes[0]
                out["sae"] = sae
                out["harvests"] = harvest_repo.list_harvests(s, sae.id)
                out["active"] = harvest_repo.get_active_harvest(s, sae.id)
                out["latent_expl"] = expl_repo.explanations_for_units(
                    s, sae.id, int(UnitKind.LATENT), range(sae.d_sae)
                )
                out["parent_expl"] = expl_repo.explanations_for_units(
                    s, sae.id, int(UnitKind.BASE), range((sae.h or 0) * (sae.m or 0))
                )
            return out
    finally:
        engine.dispose()


def test_demo_runs_every_stage_then_reuses_them(demo_data: Path) -> None:
    first = _demo()
    assert first.exit_code == 0, first.output
    out = first.output
    for n in range(1, 6):
        assert f"[{n}/6]" in out
    assert len(re.findall(r"^      done in \d", out, re.M)) == 5, out
    assert "[6/6]" not in out  # --no-serve
    key = re.search(r"API key\s+(ks_\S+)", out)
    assert key, out

    state = _db_state(demo_data)
    assert len(state["saes"]) == 1
    sae = state["sae"]
    assert sae.architecture == "kronsae" and sae.d_sae == 64 and (sae.h, sae.m, sae.n) == (8, 2, 4)
    assert sae.model_name == "tiny-llama" and sae.hook_name == "model.layers.1"
    assert sae.metrics.get("split") == "heldout"
    assert state["active"] is not None and state["active"].status == "complete"
    assert state["active"].tokens_seen >= 1024
    assert state["latent_expl"], "no latent explanations"
    assert state["parent_expl"], "no parent explanations"
    assert all(e.source == "heuristic" for items in state["latent_expl"].values() for e in items)
    keys = state["keys"]
    assert [k.name for k in keys] == ["demo admin"]
    assert key.group(1).startswith(keys[0].prefix)
    checkpoint = next((demo_data / "demo").glob("*/checkpoint"))
    weights_mtime = (checkpoint / "cfg.json").stat().st_mtime_ns

    started = time.perf_counter()
    second = _demo()
    took = time.perf_counter() - started
    assert second.exit_code == 0, second.output
    out2 = second.output
    assert "reusing the finished checkpoint" in out2
    assert "reusing SAE" in out2
    assert "reusing harvest" in out2
    assert "heuristic explanations" in out2 and "reusing" in out2
    assert "earlier demo keys exist" in out2
    assert "training" not in out2.lower().replace("training tokens", "")
    assert (checkpoint / "cfg.json").stat().st_mtime_ns == weights_mtime
    state2 = _db_state(demo_data)
    assert state2["saes"] == state["saes"]
    assert [h.id for h in state2["harvests"]] == [h.id for h in state["harvests"]]
    assert len(state2["keys"]) == 2
    assert took < 30, f"the reusing run took {took:.1f}s"


def test_interrupted_training_resumes(demo_data: Path) -> None:
    from kronscope.services import demo as svc

    cfg = svc.DemoConfig(
        model="tiny-llama", hook="model.layers.1", corpus="tiny.txt", d_sae=64, k=4,
        ctx_len=32, batch_size=128, train_tokens=1024, eval_tokens=0, device="cpu",
    )  # fmt: skip
    settings = get_settings()
    said: list[str] = []

    def stop_after_two(trainer: Any, stats: Any) -> None:
        if stats.step == 2:
            trainer.request_stop()

    with pytest.raises(svc.DemoInterrupted, match="resumes"):
        svc.train_stage(settings, cfg, said.append, progress=False, callbacks=[stop_after_two])
    folder = svc.checkpoint_dir(settings, cfg)
    assert svc.checkpoint_state(folder) == ("partial", 256, 1024)

    outcome = svc.train_stage(settings, cfg, said.append, progress=False)
    assert not outcome.reused and outcome.resumed_from == 256
    assert any("resuming the interrupted run at 256" in line for line in said)
    assert svc.checkpoint_state(folder) == ("finished", 1024, 1024)
    assert svc.train_stage(settings, cfg, said.append, progress=False).reused


def test_demo_refuses_a_busy_port_before_any_work(demo_data: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            cli_app, ["demo", "--port", str(port), "--no-progress", *TINY_ARGS]
        )
    assert result.exit_code == 2
    assert "in use" in result.output
    assert not (demo_data / "demo").exists()
