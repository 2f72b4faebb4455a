"""Native checkpoints: save -> load round trips, atomic saves, archives, content hashes."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kronscope.sae import SAE, SAEConfig, build, load, save
from kronscope.sae import checkpoint as ckpt
from kronscope.sae.checkpoint import checkpoint_hash, load_checkpoint

D_IN = 16

ARCHS = {
    "kronsae-mand": dict(architecture="kronsae", d_sae=64, k=6, h=4, m=2, n=8, composition="mand"),
    "kronsae-relu_product": dict(
        architecture="kronsae", d_sae=64, k=6, h=4, m=2, n=8, composition="relu_product"
    ),
    "kronsae-product": dict(
        architecture="kronsae", d_sae=64, k=6, h=4, m=2, n=8, composition="product"
    ),
    "topk": dict(architecture="topk", d_sae=64, k=6),
    "jumprelu": dict(architecture="jumprelu", d_sae=64),
    "standard": dict(architecture="standard", d_sae=64),
}


def make_sae(name: str, dtype: str = "float32", seed: int = 0, **overrides) -> SAE:
    cfg = SAEConfig(d_in=D_IN, dtype=dtype, **{**ARCHS[name], **overrides})
    sae = build(cfg)
    g = torch.Generator().manual_seed(seed)
    sae.init_weights(g)
    with torch.no_grad():
        # Non-zero biases so that every term of the forward pass is exercised.
        sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g) * 0.1)
        if cfg.architecture == "jumprelu":
            sae.get_parameter("threshold").copy_(torch.rand(cfg.d_sae, generator=g) * 0.05)
    return sae


def inputs(n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def assert_same_sae(a: SAE, b: SAE) -> None:
    assert a.cfg.to_dict() == b.cfg.to_dict()
    sa, sb = a.state_tensors(), b.state_tensors()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(a.encode_dense(x), b.encode_dense(x), rtol=0, atol=0)
        torch.testing.assert_close(a(x).x_hat, b(x).x_hat, rtol=0, atol=0)


def target_for(tmp_path: Path, container: str) -> Path:
    return tmp_path / {"folder": "sae", "zip": "sae.zip", "tar.gz": "sae.tar.gz"}[container]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("container", ["folder", "zip", "tar.gz"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip(arch: str, container: str, dtype: str, tmp_path: Path) -> None:
    sae = make_sae(arch, dtype)
    path = save(sae, target_for(tmp_path, container))
    assert path == target_for(tmp_path, container)
    loaded = load_checkpoint(path)
    assert loaded.source_format == "kronscope"
    assert loaded.sae.dtype == getattr(torch, dtype)
    assert loaded.warnings == []
    assert loaded.sparsity is None
    assert_same_sae(sae, loaded.sae)
    assert loaded.sha256 == checkpoint_hash(sae) == checkpoint_hash(loaded.sae)
    # Nothing but the checkpoint is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_expected_average_only_in_scales_input_and_output(arch: str, tmp_path: Path) -> None:
    factor = 2.5
    sae = make_sae(
        arch, normalize_activations="expected_average_only_in", norm_scaling_factor=factor
    )
    loaded = load(save(sae, tmp_path / "sae"))
    assert loaded.cfg.normalize_activations == "expected_average_only_in"
    assert loaded.cfg.norm_scaling_factor == factor
    # The same weights without scaling, fed x*factor, must give the same latents, and
    # x_hat*factor.
    plain = build(SAEConfig.from_dict({**sae.cfg.to_dict(), "normalize_activations": "none"}))
    plain.load_tensors(sae.state_tensors())
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_dense(x), plain.encode_dense(x * factor))
        torch.testing.assert_close(loaded(x).x_hat, plain(x * factor).x_hat / factor)
        torch.testing.assert_close(
            loaded.decode_dense(loaded.encode_dense(x)), plain(x * factor).x_hat / factor
        )


def test_unknown_cfg_keys_and_metadata_are_preserved(tmp_path: Path) -> None:
    sae = make_sae("kronsae-mand")
    sae.cfg.extra["my_tool"] = {"version": 3, "notes": ["a", "b"]}
    sae.cfg.metadata.update(
        model_name="HuggingFaceTB/SmolLM2-135M",
        hook_name="model.layers.14",
        context_size=256,
        prepend_bos=False,
        training={"tokens": 1000, "lr": 8e-4, "seed": 0},
        metrics={"ev": 0.8, "l0": 6.0},
        anything_else="kept",
    )
    path = save(sae, tmp_path / "sae.zip")
    loaded = load_checkpoint(path)
    assert loaded.cfg.extra["my_tool"] == {"version": 3, "notes": ["a", "b"]}
    assert loaded.cfg.metadata == sae.cfg.metadata
    assert loaded.cfg.to_dict() == sae.cfg.to_dict()
    assert_same_sae(sae, loaded.sae)


def test_sparsity_file_round_trip(tmp_path: Path) -> None:
    sae = make_sae("topk")
    sparsity = torch.linspace(-6, 0, sae.d_sae)
    sparsity[3] = float("-inf")  # a dead latent: log10(0)
    path = save(sae, tmp_path / "sae", sparsity=sparsity)
    assert (path / "sparsity.safetensors").is_file()
    assert load_file(path / "sparsity.safetensors").keys() == {"sparsity"}
    loaded = load_checkpoint(path)
    assert loaded.sparsity is not None
    assert torch.equal(loaded.sparsity, sparsity)
    assert "sparsity.safetensors" in loaded.files
    # Sparsity statistics are not part of the content hash.
    assert loaded.sha256 == checkpoint_hash(sae)


def test_native_files_are_saelens_v6_layout(tmp_path: Path) -> None:
    sae = make_sae("topk")
    path = save(sae, tmp_path / "sae")
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((path / "cfg.json").read_text())
    for key in (
        "architecture",
        "d_in",
        "d_sae",
        "dtype",
        "apply_b_dec_to_input",
        "normalize_activations",
        "k",
        "rescale_acts_by_decoder_norm",
        "metadata",
    ):
        assert key in cfg
    tensors = load_file(path / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "W_enc": (D_IN, 64),
        "b_enc": (64,),
        "W_dec": (64, D_IN),
        "b_dec": (D_IN,),
    }


def test_kronsae_layout(tmp_path: Path) -> None:
    sae = make_sae("kronsae-mand")
    path = save(sae, tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    assert (cfg["h"], cfg["m"], cfg["n"], cfg["composition"], cfg["k"]) == (4, 2, 8, "mand", 6)
    tensors = load_file(path / "sae_weights.safetensors")
    assert tuple(tensors["W_enc"].shape) == (D_IN, 4 * (2 + 8))
    assert tuple(tensors["W_dec"].shape) == (64, D_IN)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_holds_one_folder(kind: str, tmp_path: Path) -> None:
    sae = make_sae("jumprelu")
    path = save(sae, tmp_path / "my_sae", archive=kind)
    assert path.name == f"my_sae.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            names = sorted(zf.namelist())
    else:
        with tarfile.open(path) as tf:
            names = sorted(m.name for m in tf.getmembers())
            assert all(m.isreg() for m in tf.getmembers())
    assert names == ["my_sae/cfg.json", "my_sae/sae_weights.safetensors"]


def test_archive_of_top_level_files_loads(tmp_path: Path) -> None:
    sae = make_sae("standard")
    folder = save(sae, tmp_path / "sae")
    packed = tmp_path / "flat.zip"
    with zipfile.ZipFile(packed, "w") as zf:
        for p in folder.iterdir():
            zf.write(p, p.name)
    assert_same_sae(sae, load(packed))


def test_archive_kind_is_read_from_bytes_not_name(tmp_path: Path) -> None:
    sae = make_sae("topk")
    packed = save(sae, tmp_path / "sae.tar.gz")
    upload = packed.rename(tmp_path / "upload-1234")  # how a web upload may be stored
    assert_same_sae(sae, load(upload))


def test_folder_holding_one_folder_and_file_paths_load(tmp_path: Path) -> None:
    sae = make_sae("topk")
    path = save(sae, tmp_path / "outer" / "sae")
    assert_same_sae(sae, load(tmp_path / "outer"))
    assert_same_sae(sae, load(path / "cfg.json"))


def test_extraction_folder_is_removed(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    path = save(make_sae("topk"), tmp_path / "sae.zip")
    load_checkpoint(path, tmp_dir=work)
    assert list(work.iterdir()) == []


def test_dtype_override(tmp_path: Path) -> None:
    sae = make_sae("topk")
    path = save(sae, tmp_path / "sae")
    loaded = load_checkpoint(path, dtype=torch.bfloat16)
    assert loaded.sae.dtype == torch.bfloat16
    assert loaded.cfg.dtype == "bfloat16"
    assert torch.equal(loaded.sae.W_enc, sae.W_enc.to(torch.bfloat16))
    # sha256 identifies the checkpoint as stored, whatever dtype it was loaded in.
    assert loaded.sha256 == checkpoint_hash(sae)


def test_hash_follows_content_not_container(tmp_path: Path) -> None:
    sae = make_sae("kronsae-mand")
    hashes = {
        checkpoint_hash(save(sae, tmp_path / "a")),
        checkpoint_hash(save(sae, tmp_path / "b.zip")),
        checkpoint_hash(save(sae, tmp_path / "c.tar.gz")),
        checkpoint_hash(sae),
    }
    assert len(hashes) == 1
    with torch.no_grad():
        sae.W_dec[0, 0] += 1
    assert checkpoint_hash(sae) not in hashes
    other = make_sae("kronsae-mand")
    other.cfg.metadata["model_name"] = "gpt2"
    assert checkpoint_hash(other) not in hashes


def test_files_are_hashed(tmp_path: Path) -> None:
    import hashlib

    path = save(make_sae("topk"), tmp_path / "sae")
    loaded = load_checkpoint(path)
    assert loaded.files == {
        name: hashlib.sha256((path / name).read_bytes()).hexdigest()
        for name in ("cfg.json", "sae_weights.safetensors")
    }


def test_save_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    first, second = make_sae("topk", seed=0), make_sae("topk", seed=1)
    path = save(first, tmp_path / "sae")
    with pytest.raises(FileExistsError):
        save(second, path)
    assert_same_sae(first, load(path))
    save(second, path, overwrite=True)
    assert_same_sae(second, load(path))
    zipped = save(first, tmp_path / "sae.zip")
    with pytest.raises(FileExistsError):
        save(second, zipped)
    save(second, zipped, overwrite=True)
    assert_same_sae(second, load(zipped))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae", "sae.zip"]


@pytest.mark.parametrize("container", ["folder", "zip"])
def test_save_failing_midway_leaves_nothing(
    container: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def exploding_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", exploding_save_file)
    with pytest.raises(OSError, match="disk full"):
        save(make_sae("topk"), target_for(tmp_path, container))
    assert calls
    assert list(tmp_path.iterdir()) == []


def test_save_dtype_follows_the_parameters(tmp_path: Path) -> None:
    sae = make_sae("topk").to(torch.bfloat16)  # cfg still says float32
    path = save(sae, tmp_path / "sae")
    assert json.loads((path / "cfg.json").read_text())["dtype"] == "bfloat16"
    assert load(path).dtype == torch.bfloat16


def test_dtype_override_that_overflows_is_refused(tmp_path: Path) -> None:
    sae = make_sae("topk")
    with torch.no_grad():
        sae.W_enc[0, 0] = 1e6  # beyond float16's range
    path = save(sae, tmp_path / "sae")
    with pytest.raises(ckpt.CheckpointError, match=r"sae_weights\.safetensors: 'W_enc'.*float16"):
        load(path, dtype="float16")
    assert load(path, dtype="bfloat16").dtype == torch.bfloat16
