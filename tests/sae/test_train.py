"""The trainer: recovery of a planted AND structure, exact resume, Ctrl-C, NaN, AuxK,
iso-FLOPs arithmetic and the command line's bad-input errors. CPU, seeded, tiny."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from kronscope.cli import app
from kronscope.sae import SAE, KronSAE, SAEConfig, load
from kronscope.sae.activations import CachedActivations, TensorSource, cache_activations
from kronscope.sae.metrics import MetricAccumulator
from kronscope.sae.train import (
    NonFiniteLossError,
    ResumeMismatchError,
    StepStats,
    TrainConfig,
    Trainer,
    aux_loss,
    flops_kron,
    flops_topk,
    iso_flops_tokens,
    new_sae,
    resume_trainer,
    train_forward,
)

runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and much faster on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers -------------------------------------------------------------------------------


def planted(
    tokens: int, *, d: int = 32, h: int = 4, m: int = 2, n: int = 4, active: int = 2, seed: int = 0
):
    """Activations built from F = h*m*n unit directions with a KronSAE's AND structure: a
    token activates ``active`` heads; in each, one base i AND one extension j switch on
    latent (g, i, j) with a magnitude in [0.5, 1.5]. The dictionary is fixed (seed 123)."""
    g = torch.Generator().manual_seed(123)
    D = torch.randn(h * m * n, d, generator=g)
    D = D / D.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(tokens, h, generator=g).argsort(-1)[:, :active]
    i = torch.randint(0, m, (tokens, active), generator=g)
    j = torch.randint(0, n, (tokens, active), generator=g)
    mag = 0.5 + torch.rand(tokens, active, generator=g)
    x = torch.nn.functional.embedding_bag(
        heads * m * n + i * n + j, D, per_sample_weights=mag, mode="sum"
    )
    return x, D


def kron_cfg(
    d: int = 16, h: int = 8, m: int = 2, n: int = 4, k: int = 4, comp: str = "mand"
) -> SAEConfig:
    return SAEConfig("kronsae", d_in=d, d_sae=h * m * n, k=k, h=h, m=m, n=n, composition=comp)


def topk_cfg(d: int = 16, F: int = 64, k: int = 4) -> SAEConfig:
    return SAEConfig("topk", d_in=d, d_sae=F, k=k, apply_b_dec_to_input=True)


def small_run(cfg: SAEConfig, tokens: int = 4096, **kw) -> tuple[SAE, TensorSource, TrainConfig]:
    x = torch.randn(tokens, cfg.d_in, generator=torch.Generator().manual_seed(5)) * 2 + 0.5
    tc = TrainConfig(tokens=tokens, batch_size=256, lr=3e-3, dead_window=512, k_aux=8, **kw)
    return new_sae(cfg, seed=1), TensorSource(x, seed=2), tc


def same_weights(a: SAE, b: SAE) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def interrupt_at(step: int):
    def cb(trainer: Trainer, stats: StepStats) -> None:
        if stats.step == step:
            raise KeyboardInterrupt

    return cb


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


# -- learning --------------------------------------------------------------------------------


def test_recovers_planted_and_structure() -> None:
    x, D = planted(80_000)
    held_out, _ = planted(4_000, seed=1)
    sae = new_sae(SAEConfig("kronsae", d_in=32, d_sae=64, k=2, h=8, m=2, n=4), seed=0)
    # lr above the paper's 8e-4: 300 steps instead of the paper's thousands
    cfg = TrainConfig(tokens=80_000, batch_size=256, lr=1e-2, dead_window=5_000)
    result = Trainer(sae, TensorSource(x, seed=0), cfg).run()
    assert result.steps == 80_000 // 256 and not result.interrupted
    acc = MetricAccumulator(32, 64)
    with torch.no_grad():
        out = sae(held_out)
    acc.update(held_out, out.x_hat, out.values, out.indices)
    assert acc.result().ev > 0.95
    # every planted direction is (nearly) a decoder row
    assert (D @ sae.W_dec.detach().T).amax(1).min() > 0.9
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)


def test_topk_init_and_b_dec_options() -> None:
    sae = new_sae(topk_cfg(), seed=0)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    for mode in ("mean", "median"):
        sae, src, tc = small_run(kron_cfg(), tokens=512, b_dec_init=mode)
        trainer = Trainer(sae, src, tc)
        trainer.init_b_dec()
        first = src.read(0, 256)
        if mode == "mean":
            torch.testing.assert_close(sae.b_dec.detach(), first.mean(0))
        else:  # the geometric median is no farther in total than the mean
            to_median = (first - sae.b_dec.detach()).norm(dim=-1).sum()
            assert to_median <= (first - first.mean(0)).norm(dim=-1).sum() + 1e-4
    sae, src, tc = small_run(kron_cfg(), tokens=512)
    Trainer(sae, src, tc).init_b_dec()
    assert not sae.b_dec.any()  # the paper: b_dec = 0


def test_same_seed_same_result() -> None:
    a, src_a, tc = small_run(kron_cfg(), tokens=2048)
    b, src_b, _ = small_run(kron_cfg(), tokens=2048)
    Trainer(a, src_a, tc).run()
    Trainer(b, src_b, tc).run()
    same_weights(a, b)


# -- AuxK -------------------------------------------------------------------------------------


def reference_aux(sae: SAE, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Gao et al. by the book, over the dense [B, F] latents."""
    with torch.no_grad():
        fw = train_forward(sae, x)
        e = x - fw.x_hat
    dense = sae._all_latents(x) if isinstance(sae, KronSAE) else torch.relu(sae.pre_acts(x))
    masked = dense.masked_fill(~dead, float("-inf"))
    top = masked.topk(min(k_aux, int(dead.sum())), dim=-1)
    e_hat = torch.einsum("bk,bkd->bd", torch.relu(top.values), sae.W_dec[top.indices])
    return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()


@pytest.mark.parametrize(
    "cfg", [kron_cfg(), kron_cfg(comp="relu_product"), kron_cfg(comp="product"), topk_cfg()]
)
def test_aux_loss_matches_reference_and_reaches_dead_latents(cfg: SAEConfig) -> None:
    sae = new_sae(cfg, seed=3)
    x = torch.randn(64, cfg.d_in, generator=torch.Generator().manual_seed(4))
    dead = torch.zeros(cfg.d_sae, dtype=torch.bool)
    dead[::3] = True
    fw = train_forward(sae, x)
    aux = aux_loss(sae, (x - fw.x_hat).detach(), fw.pre, dead, k_aux=8)
    torch.testing.assert_close(aux, reference_aux(sae, x, dead, 8))
    assert aux > 0
    aux.backward()
    assert sae.W_dec.grad is not None
    grad_rows = sae.W_dec.grad.abs().sum(-1) > 0
    assert grad_rows[dead].any() and not grad_rows[~dead].any()  # only dead latents are decoded
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


def test_aux_loss_is_zero_without_dead_latents() -> None:
    sae = new_sae(kron_cfg(), seed=3)
    x = torch.randn(32, 16)
    fw = train_forward(sae, x)
    aux = aux_loss(sae, (x - fw.x_hat).detach(), fw.pre, torch.zeros(64, dtype=torch.bool), k_aux=8)
    assert aux.item() == 0.0 and not torch.isnan(aux)
    # constant residual (zero variance) is NaN-safe too
    dead = torch.ones(64, dtype=torch.bool)
    aux = aux_loss(sae, torch.zeros(32, 16), fw.pre, dead, k_aux=8)
    assert aux.item() == 0.0


def test_training_marks_and_revives_dead_latents() -> None:
    sae, src, tc = small_run(kron_cfg(h=16), tokens=4096)
    trainer = Trainer(sae, src, tc, history=True)
    result = trainer.run()
    assert any(s.dead_fraction > 0 and s.aux_loss > 0 for s in result.history)
    assert all(s.aux_loss == 0 for s in result.history if s.dead_fraction == 0)


# -- checkpoints, resume, interrupts, NaN ------------------------------------------------------


@pytest.mark.parametrize("cfg", [kron_cfg(), topk_cfg()], ids=["kronsae", "topk"])
def test_resume_gives_identical_weights(cfg: SAEConfig, tmp_path: Path) -> None:
    sae, src, tc = small_run(cfg, tokens=4096, b_dec_init="median")
    straight = Trainer(sae, src, tc, out=tmp_path / "straight").run()

    sae2, src2, _ = small_run(cfg, tokens=4096, b_dec_init="median")
    half = Trainer(sae2, src2, tc, out=tmp_path / "run", callbacks=[interrupt_at(8)]).run()
    assert half.interrupted and half.tokens_seen == 8 * 256
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["tokens_seen"] == 2048

    _, src3, _ = small_run(cfg, tokens=4096)
    resumed = resume_trainer(tmp_path / "run", src3, tc, out=tmp_path / "run").run()
    assert resumed.steps == 16 and not resumed.interrupted
    same_weights(straight.sae, resumed.sae)
    same_weights(load(tmp_path / "straight"), load(tmp_path / "run"))
    meta = json.loads((tmp_path / "run" / "cfg.json").read_text())["metadata"]
    assert meta["training"]["tokens_seen"] == 4096 and meta["training"]["seed"] == 0
    assert {"ev", "fvu", "mse", "l0", "dead_fraction"} <= set(meta["metrics"])


def test_periodic_checkpoints_and_cached_stream(tmp_path: Path) -> None:
    sae, src, tc = small_run(kron_cfg(), tokens=2048, checkpoint_every=1000)
    seen: list[int | None] = []
    Trainer(
        sae,
        src,
        tc,
        out=tmp_path / "ck",
        callbacks=[lambda t, s: seen.append(t.last_checkpoint_tokens)],
    ).run()
    assert seen[3] is None and seen[4] == 1024  # written after step 4 (crossing 1,000 tokens)
    meta = json.loads((tmp_path / "ck" / "cfg.json").read_text())["metadata"]
    assert meta["training"]["tokens_seen"] == 2048
    # a stream cached to disk reads back identically, so training on it is identical
    cache = cache_activations(src, tmp_path / "cache", 2048, shard_tokens=300)
    cached = CachedActivations(cache)
    assert torch.equal(cached.read(0, 2048), src.read(0, 2048))
    assert torch.equal(CachedActivations(cache, offset=1000).read(0, 5), src.read(1000, 1005))


def test_sigint_checkpoints_and_stops(tmp_path: Path) -> None:
    sae, src, tc = small_run(kron_cfg(), tokens=4096)

    def send_sigint(trainer: Trainer, stats: StepStats) -> None:
        if stats.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal: handled at the step boundary

    result = Trainer(sae, src, tc, out=tmp_path / "run", callbacks=[send_sigint]).run()
    assert result.interrupted and result.steps == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _, src2, _ = small_run(kron_cfg(), tokens=4096)
    assert resume_trainer(tmp_path / "run", src2, tc, out=tmp_path / "run").tokens_seen == 3 * 256


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    x = torch.randn(4096, 16)
    x[1500] = float("nan")  # inside step 6 (tokens 1280..1536)
    sae = new_sae(kron_cfg(), seed=0)
    tc = TrainConfig(tokens=4096, batch_size=256, checkpoint_every=512)
    trainer = Trainer(sae, TensorSource(x, shuffle=False), tc, out=tmp_path / "run")
    with pytest.raises(
        NonFiniteLossError,
        match=r"loss became nan at step 6 .*NaN.*last good checkpoint \(1,024 tokens\)",
    ):
        trainer.run()
    kept = load(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in kept.parameters())
    assert (
        json.loads((tmp_path / "run" / "cfg.json").read_text())["metadata"]["training"][
            "tokens_seen"
        ]
        == 1024
    )

    def poison(trainer: Trainer, stats: StepStats) -> None:  # weights blown up, input fine
        if stats.step == 2:
            with torch.no_grad():
                trainer.sae.W_dec.fill_(float("inf"))

    sae, src, tc = small_run(kron_cfg(), tokens=2048)
    with pytest.raises(NonFiniteLossError, match="lower learning rate"):
        Trainer(sae, src, tc, callbacks=[poison]).run()


def test_resume_with_other_configuration_names_the_field(tmp_path: Path) -> None:
    sae, src, tc = small_run(kron_cfg(), tokens=2048)
    Trainer(sae, src, tc, out=tmp_path / "run", callbacks=[interrupt_at(2)]).run()
    _, src2, tc2 = small_run(kron_cfg(), tokens=2048)
    tc2.lr = 1e-3
    with pytest.raises(ResumeMismatchError, match="'lr' differs") as err:
        resume_trainer(tmp_path / "run", src2, tc2)
    assert err.value.field == "lr"
    _, src3, tc3 = small_run(kron_cfg(), tokens=2048)
    with pytest.raises(ResumeMismatchError, match=r"'data\.seed' differs"):
        resume_trainer(tmp_path / "run", TensorSource(src3.read(0, 2048), seed=9), tc3)


def test_refuses_more_tokens_than_the_source_has() -> None:
    sae, src, _ = small_run(kron_cfg(), tokens=1024)
    with pytest.raises(
        ValueError,
        match="4,096 training tokens were asked for but the activation source has only 1,024",
    ):
        Trainer(sae, src, TrainConfig(tokens=4096, batch_size=256))
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(sae, src, TrainConfig(tokens=100, batch_size=256))


# -- iso-FLOPs (Eq. 7) -----------------------------------------------------------------------


def test_iso_flops_arithmetic_by_hand() -> None:
    d, F, k = 576, 4096, 32
    assert flops_topk(d, F, k) == 576 * 4096 + 32 * 576 == 2_377_728
    # (m, n) = (2, 4): h = 512; d*h*(m+n) + m*n*h + k*d
    assert flops_kron(d, 512, 2, 4, k) == 576 * 512 * 6 + 8 * 512 + 32 * 576 == 1_792_000
    assert iso_flops_tokens(1_000_000, d, 512, 2, 4, k) == 1_326_857  # 1e6 * 2377728 / 1792000
    # (4, 4): h = 256
    assert flops_kron(d, 256, 4, 4, k) == 1_202_176
    assert (
        iso_flops_tokens(1_000_000, d, 256, 4, 4, k) == 1_977_853
    )  # 1e6 * 2377728 / 1202176 = 1977853.4


# -- the command line: bad input -------------------------------------------------------------


def cli(*args: str) -> Result:
    return runner.invoke(app, ["train", *args])


def one_line_error(result: Result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    err = errors[0]
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--d-sae", "100", "--m", "2", "--n", "4"], ["not a multiple of m*n"]),
        (["--d-sae", "4096", "--h", "100", "--m", "2", "--n", "4"], ["h*m*n", "d_sae = 4096"]),
        (["--h", "64", "--m", "8", "--n", "4"], ["m = 8 must not exceed extension size n = 4"]),
        (
            ["--d-sae", "64", "--k", "65", "--m", "2", "--n", "4"],
            ["k = 65 is larger than the dictionary"],
        ),
        (["--architecture", "topk", "--d-sae", "64", "--k", "100"], ["k = 100"]),
        (["--composition", "nand"], ["unknown composition"]),
        (["--iso-flops-of", "relu:1M"], ["topk:TOKENS"]),
        (["--tokens", "lots"], ["cannot read 'lots'"]),
    ],
)
def test_bad_shapes_fail_before_loading_any_model(
    args: list[str], needles: list[str], tmp_path: Path
) -> None:
    # the model does not exist: the shape error must come first
    one_line_error(
        cli(
            "--model",
            "no-such-model",
            "--hook",
            "x",
            "--tokens",
            "1000",
            "--out",
            str(tmp_path / "o"),
            *args,
        ),
        *needles,
    )


def test_cli_data_errors(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.txt", docs=3)
    base = [
        "--model",
        str(tiny_gpt2_dir),
        "--corpus",
        str(corpus),
        "--ctx-len",
        "16",
        "--d-sae",
        "64",
        "--k",
        "4",
        "--no-progress",
    ]
    one_line_error(
        cli(
            *base,
            "--hook",
            "transformer.h.9",
            "--tokens",
            "1000",
            "--batch-size",
            "64",
            "--out",
            str(tmp_path / "a"),
        ),
        "transformer.h.9",
    )
    result = cli(
        *base, "--hook", "transformer.h.1", "--tokens", "10000", "--out", str(tmp_path / "b")
    )
    one_line_error(result, "training tokens", "fewer than one batch of 8,192")
    result = cli(
        *base,
        "--hook",
        "transformer.h.1",
        "--tokens",
        "100k",
        "--batch-size",
        "64",
        "--out",
        str(tmp_path / "c"),
    )
    one_line_error(result, "100,000 training tokens were asked for")
    missing = cli(
        "--model",
        str(tiny_gpt2_dir),
        "--hook",
        "transformer.h.1",
        "--tokens",
        "1000",
        "--out",
        str(tmp_path / "d"),
        "--resume",
        str(tmp_path / "nowhere"),
    )
    one_line_error(missing, "not a resumable checkpoint")


# -- the command line: train, Ctrl-C, resume ------------------------------------------------------


def test_cli_interrupt_exit_130_and_exact_resume(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = write_corpus(tmp_path / "c.txt")
    args = ["--model", str(tiny_gpt2_dir), "--hook", "transformer.h.1", "--corpus", str(corpus), "--ctx-len", "32",
            "--tokens", "3072", "--batch-size", "256", "--d-sae", "64", "--k", "4", "--dead-window", "512",
            "--buffer-tokens", "1000", "--eval-tokens", "0", "--no-progress"]  # fmt: skip
    straight = cli(*args, "--out", str(tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output

    original = Trainer._step

    def step_then_sigint(self: Trainer, x: torch.Tensor) -> StepStats:
        stats = original(self, x)
        if stats.step == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return stats

    monkeypatch.setattr(Trainer, "_step", step_then_sigint)
    cut = cli(*args, "--out", str(tmp_path / "run"))
    assert cut.exit_code == 130, cut.output
    assert "interrupted at 1,280 tokens" in cut.stderr and "--resume" in cut.stderr
    monkeypatch.setattr(Trainer, "_step", original)

    clash = cli("--resume", str(tmp_path / "run"), "--lr", "0.01")
    one_line_error(clash, "--lr is 0.01 but the checkpoint was trained with 0.0008")
    resumed = cli("--resume", str(tmp_path / "run"), "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    same_weights(load(tmp_path / "straight"), load(tmp_path / "run"))
