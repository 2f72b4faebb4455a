"""``torchrun --nproc-per-node 2 kronscope harvest ...`` (gloo, CPU) stores exactly what a
single process stores: same contexts, examples (values to the bit) and statistics."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harvest_ref import assert_same_data, stored_rows, tiny_sae

from kronscope.config import Settings
from kronscope.db import make_engine, make_sessionmaker, upgrade
from kronscope.harvest import HarvestParams
from kronscope.harvest.runner import run_harvest
from kronscope.lm import load_corpus, load_model, make_contexts
from kronscope.sae import load
from kronscope.sae.checkpoint import save

ARGS = [
    "--tokens",
    "800",
    "--ctx-len",
    "16",
    "--examples",
    "4",
    "--samples",
    "5",
    "--batch-size",
    "4",
    "--seed",
    "2",
]


def cli(args: list[str], env: dict[str, str], nproc: int = 1) -> tuple[int, str]:
    """Run ``kronscope harvest`` (under torchrun when nproc > 1); returns (code, output).
    Its own process group, killed whole on a timeout (no stray workers)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    if nproc > 1:
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(nproc), "-m", "kronscope.cli"]
    else:
        cmd = [sys.executable, "-m", "kronscope.cli"]
    proc = subprocess.Popen(
        [*cmd, "harvest", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"kronscope harvest timed out:\n{out[-3000:]}")
    return proc.returncode, out


@pytest.mark.slow
def test_two_processes_equal_one(tiny_models_dir, corpus_file, tmp_path):
    checkpoint = save(tiny_sae("kronsae"), tmp_path / "ckpt")
    db = tmp_path / "k.db"
    env = {
        **os.environ,
        "KRONSCOPE_MODELS_DIR": str(tiny_models_dir),
        "KRONSCOPE_DATA_DIR": str(tmp_path / "data"),
        "KRONSCOPE_DEVICE": "cpu",
    }
    args = [
        "--sae",
        str(checkpoint),
        "--corpus",
        str(corpus_file),
        *ARGS,
        "--db-url",
        f"sqlite:///{db}",
    ]
    code, out = cli(args, env, nproc=2)
    assert code == 0, out[-3000:]
    assert "2 processes" in out and "complete" in out

    # The single-process run, in this process, on the same checkpoint and contexts.
    engine = make_engine(f"sqlite:///{tmp_path / 'one.db'}")
    upgrade(engine)
    factory = make_sessionmaker(engine)
    settings = Settings(models_dir=tiny_models_dir, data_dir=tmp_path / "one", device="cpu")
    model = load_model("tiny-gpt2", settings=settings)
    contexts = make_contexts(load_corpus(corpus_file), model, 16, seed=2, max_contexts=50)
    sae = load(checkpoint)
    from test_harvest_db import add_sae_row

    slug = add_sae_row(factory, sae)
    params = HarvestParams(examples=4, samples=5, batch_size=4, seed=2)
    hid = run_harvest(factory, slug, sae, model, contexts, params, work_dir=tmp_path / "w")

    assert_same_data(stored_rows(engine, hid), stored_rows(make_engine(f"sqlite:///{db}"), 1))
    assert not list((tmp_path / "data" / "harvests").glob("*/state-*"))  # states cleaned up
