"""Metrics, the activation stream of a subject model, evaluation on held-out contexts and
the ``train -> checkpoint -> load -> eval`` path through the command line. CPU, tiny."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kronscope.cli import app
from kronscope.sae import SAE, SAEConfig, build, load, save
from kronscope.sae.activations import HELDOUT_FRACTION, LMData, open_lm_data, split_contexts
from kronscope.sae.evaluate import evaluate_activations, evaluate_on_contexts
from kronscope.sae.metrics import MetricAccumulator

runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and much faster on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_corpus(path: Path, docs: int = 120, seed: int = 0) -> Path:
    words = [
        "the",
        "a",
        "sparse",
        "model",
        "reads",
        "latent",
        "head",
        "base",
        "extension",
        "token",
        "layer",
        "python",
        "list",
        "value",
        "and",
        "or",
    ]
    rng = random.Random(seed)
    text = "\n\n".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(15, 40))) + "." for _ in range(docs)
    )
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def gpt2_data(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LMData:
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt")
    return open_lm_data(str(tiny_gpt2_dir), "transformer.h.1", str(corpus), 32, device="cpu")


def identity_topk(d: int) -> SAE:
    """A TopK SAE that reconstructs exactly: latents relu(x) and relu(-x), k = d."""
    sae = build(SAEConfig("topk", d_in=d, d_sae=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_match_their_definitions_whatever_the_batching() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g) * 3 + 1
    x_hat = x + 0.5 * torch.randn(1000, 8, generator=g)
    idx = 1 + torch.rand(1000, 19, generator=g).argsort(-1)[:, :4]  # distinct latents 1..19
    idx[:, 0] = 0  # latent 0 fires everywhere: dense
    vals = torch.rand(1000, 4, generator=g) + 0.1
    vals[:, 3] = 0  # a kept slot with value 0 is not active
    whole = MetricAccumulator(8, 32)
    whole.update(x, x_hat, vals, idx)
    parts = MetricAccumulator(8, 32)
    for s in range(0, 1000, 64):
        parts.update(x[s : s + 64], x_hat[s : s + 64], vals[s : s + 64], idx[s : s + 64])
    a, b = whole.result(), parts.result()
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert a.ev == pytest.approx(float(ev), rel=1e-6) and b.ev == pytest.approx(a.ev, rel=1e-9)
    assert a.fvu == pytest.approx(1 - a.ev)
    assert a.mse == pytest.approx(float((x - x_hat).pow(2).mean()), rel=1e-6)
    assert a.l0 == 3.0
    assert a.dead_fraction == pytest.approx(12 / 32)  # latents 20..31 never appear
    # latent 0 fires on every token; 1..19 on about 3/20 each; the threshold is 10%
    fired = torch.bincount(idx[:, :3].reshape(-1), minlength=32).double() / 1000
    assert a.dense_fraction == pytest.approx(float((fired > 0.1).double().mean()))
    assert a.dense_threshold == 0.1
    # dense latents (no indices) count the same way
    dense = torch.zeros(1000, 32).scatter(1, idx[:, :3], 1.0)
    c = MetricAccumulator(8, 32)
    c.update(x, x_hat, dense, None)
    assert c.result().l0 == 3.0 and c.result().dead_fraction == a.dead_fraction


# -- the split and the activation stream -----------------------------------------------------


def test_split_holds_out_the_last_contexts() -> None:
    train, held = split_contexts(100)
    assert held == list(range(95, 100)) and train == list(range(95)) and HELDOUT_FRACTION == 0.05
    assert split_contexts(2) == ([0], [1])
    with pytest.raises(ValueError, match="at least 2"):
        split_contexts(1)


def test_lm_stream_skips_special_tokens_and_is_addressable(gpt2_data: LMData) -> None:
    data = gpt2_data
    assert not set(data.train_indices) & set(data.heldout_indices)
    src = data.train_source(seed=3, buffer_tokens=500)
    real = int((~data.contexts.special_mask[data.train_indices]).sum())
    assert src.available_tokens == real  # BOS / separators never reach the SAE
    full = src.read(0, 1500)
    again = data.train_source(seed=3, buffer_tokens=500)  # a fresh stream, read from the middle
    assert torch.equal(again.read(1100, 1400), full[1100:1400])
    other = data.train_source(seed=4, buffer_tokens=500).read(0, 1500)
    assert not torch.equal(other, full)
    # the pooled rows are exactly the model's activations at non-special positions
    acts = data.model.activations(
        data.contexts.input_ids[:4], data.contexts.attention_mask[:4], data.hook
    )
    keep = ~data.contexts.special_mask[:4]
    pooled = acts[keep]
    assert pooled.shape[0] == int(keep.sum())


# -- evaluation ------------------------------------------------------------------------------


def test_exact_reconstruction_recovers_all_loss(gpt2_data: LMData) -> None:
    data = gpt2_data
    sae = identity_topk(data.model.d_model)
    result = evaluate_on_contexts(
        sae, data.model, data.contexts, data.hook, data.heldout_contexts(300)
    )
    assert result.metrics.ev == pytest.approx(1.0, abs=1e-6)
    assert result.metrics.tokens >= 300
    lm = result.lm
    assert lm is not None and lm.tokens > 0
    assert lm.spliced == pytest.approx(lm.clean, abs=1e-4)
    assert lm.delta == pytest.approx(0.0, abs=1e-4) and lm.recovered == pytest.approx(1.0, abs=1e-2)
    d = result.as_dict()
    for key in ("ev", "fvu", "mse", "l0", "dead_fraction", "dense_fraction", "lm_loss_clean",
                "lm_loss_spliced", "lm_loss_zero", "delta_lm_loss", "loss_recovered"):  # fmt: skip
        assert key in d
    # the same figures from a cached / in-memory stream of the same rows
    held = data.heldout_source(300)
    streamed = evaluate_activations(sae, held, batch_size=100)
    assert streamed.tokens == held.available_tokens
    assert streamed.ev == pytest.approx(1.0, abs=1e-6)


def test_encoder_models_get_sae_metrics_without_lm_loss(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "c.txt", docs=40)
    data = open_lm_data(str(tiny_bert_dir), "encoder.layer.1", str(corpus), 32, device="cpu")
    result = evaluate_on_contexts(identity_topk(data.model.d_model), data.model, data.contexts, data.hook,
                                  data.heldout_contexts(200))  # fmt: skip
    assert result.lm is None and result.metrics.ev == pytest.approx(1.0, abs=1e-6)


# -- the command line ------------------------------------------------------------------------


def test_cli_train_checkpoint_load_eval(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.txt")
    out = tmp_path / "sae"
    trained = runner.invoke(app, [
        "train", "--model", str(tiny_gpt2_dir), "--hook", "transformer.h.2", "--corpus", str(corpus),
        "--ctx-len", "32", "--tokens", "2048", "--batch-size", "256", "--architecture", "kronsae",
        "--d-sae", "128", "--m", "2", "--n", "4", "--k", "8", "--composition", "relu_product",
        "--eval-tokens", "400", "--checkpoint-every", "1024", "--out", str(out),
    ])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert "trained 2,048 tokens" in trained.stdout
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["h"], cfg["m"], cfg["n"], cfg["composition"]) == (
        "kronsae",
        16,
        2,
        4,
        "relu_product",
    )
    meta = cfg["metadata"]
    assert meta["hook_name"] == "transformer.h.2" and meta["context_size"] == 32
    training, metrics = meta["training"], meta["metrics"]
    assert (
        training["tokens_seen"] == 2048 and training["batch_size"] == 256 and training["lr"] == 8e-4
    )
    assert training["corpus"]["name"] == "c.txt" and len(training["corpus"]["sha256"]) == 64
    assert training["code_version"] and training["seed"] == 0
    assert metrics["split"] == "heldout"
    for key in (
        "ev",
        "fvu",
        "mse",
        "l0",
        "dead_fraction",
        "dense_fraction",
        "delta_lm_loss",
        "loss_recovered",
    ):
        assert metrics[key] is not None, key
    assert metrics["l0"] <= 8
    assert {"trainer_state.json", "trainer_state.safetensors"} <= {p.name for p in out.iterdir()}
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in out.iterdir())  # nothing pickled

    sae = load(out)
    assert sae.cfg.composition == "relu_product"
    evaluated = runner.invoke(app, ["eval", str(out), "--tokens", "400", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    got = json.loads(evaluated.stdout.strip().splitlines()[-1])
    # same held-out contexts, same SAE: the same figures as the training run's final metrics
    for key in ("ev", "l0", "dead_fraction", "lm_loss_clean", "lm_loss_spliced"):
        assert got[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
    shown = runner.invoke(app, ["eval", str(out), "--tokens", "200"])
    assert shown.exit_code == 0, shown.output
    assert "explained variance" in shown.stdout and "fraction of loss recovered" in shown.stdout


def test_cli_eval_imported_checkpoint_and_errors(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.txt")
    sae = identity_topk(32)
    plain = save(sae, tmp_path / "plain")  # no model, hook or training recorded
    res = runner.invoke(app, ["eval", str(plain), "--corpus", str(corpus)])
    assert (
        res.exit_code == 1
        and res.stderr.strip() == "error: the checkpoint names no subject model; pass --model"
    )
    res = runner.invoke(app, ["eval", str(plain), "--model", str(tiny_gpt2_dir), "--hook", "transformer.h.0",
                              "--corpus", str(corpus), "--ctx-len", "32", "--tokens", "200", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["ev"] == pytest.approx(1.0, abs=1e-6) and got["loss_recovered"] == pytest.approx(
        1.0, abs=1e-3
    )
    wide = save(build(SAEConfig("topk", d_in=48, d_sae=96, k=4)), tmp_path / "wide")
    res = runner.invoke(app, ["eval", str(wide), "--model", str(tiny_gpt2_dir), "--hook", "transformer.h.0",
                              "--corpus", str(corpus), "--ctx-len", "32"])  # fmt: skip
    assert res.exit_code == 1 and "d_in = 48" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", str(tmp_path / "missing")])
    assert res.exit_code == 1 and res.stderr.startswith("error:")
