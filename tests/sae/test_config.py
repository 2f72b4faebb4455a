"""SAEConfig: the cfg.json round trip and every validation error naming its field."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from kronscope.sae import ConfigError, SAEConfig


def kron_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "architecture": "kronsae",
        "d_in": 16,
        "d_sae": 64,
        "k": 4,
        "h": 4,
        "m": 2,
        "n": 8,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "composition": "mand",
        "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"},
    }
    d.update(over)
    return d


def topk_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"architecture": "topk", "d_in": 16, "d_sae": 64, "k": 4}
    d.update(over)
    return d


# -- round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        kron_dict(),
        kron_dict(
            composition="product",
            normalize_activations="expected_average_only_in",
            norm_scaling_factor=2.5,
        ),
        topk_dict(rescale_acts_by_decoder_norm=False, apply_b_dec_to_input=True),
        {
            "architecture": "jumprelu",
            "d_in": 8,
            "d_sae": 32,
            "dtype": "bfloat16",
            "apply_b_dec_to_input": True,
        },
        {"architecture": "standard", "d_in": 8, "d_sae": 32, "apply_b_dec_to_input": False},
    ],
    ids=["kronsae", "kronsae-scaled", "topk", "jumprelu", "standard"],
)
def test_round_trip_keeps_unknown_keys(data: dict[str, Any]) -> None:
    data = dict(data)
    data["sae_lens_version"] = "6.3.0"
    data["neuronpedia_id"] = {"nested": [1, 2, {"deep": True}]}
    data["metadata"] = {**data.get("metadata", {}), "training": {"lr": 8e-4}, "unknown_meta": 7}
    cfg = SAEConfig.from_dict(data)
    assert cfg.extra == {
        "sae_lens_version": "6.3.0",
        "neuronpedia_id": {"nested": [1, 2, {"deep": True}]},
    }
    out = cfg.to_dict()
    # Every key given comes back with its value; the result is valid JSON and reads back equal.
    for key, value in data.items():
        assert out[key] == value, key
    again = SAEConfig.from_dict(json.loads(json.dumps(out)))
    assert again == cfg
    assert again.to_dict() == out


def test_from_dict_does_not_alias_the_input() -> None:
    data = kron_dict(extra_obj={"a": [1]})
    cfg = SAEConfig.from_dict(data)
    data["extra_obj"]["a"].append(2)
    data["metadata"]["model_name"] = "changed"
    assert cfg.extra["extra_obj"] == {"a": [1]}
    assert cfg.model_name == "tiny"


def test_dtype_prefix_and_defaults() -> None:
    cfg = SAEConfig.from_dict(kron_dict(dtype="torch.bfloat16"))
    assert cfg.dtype == "bfloat16" and cfg.torch_dtype is torch.bfloat16
    assert cfg.encoder_width == 4 * (2 + 8)
    # SAELens's default subtracts b_dec; the KronSAE paper does not.
    assert SAEConfig.from_dict(
        {"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2}
    ).apply_b_dec_to_input
    bare = kron_dict()
    del bare["apply_b_dec_to_input"]
    assert not SAEConfig.from_dict(bare).apply_b_dec_to_input
    assert SAEConfig.from_dict(topk_dict(d_in=16.0)).d_in == 16


# -- validation: each error names its field ---------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (kron_dict(architecture="gated"), "architecture", "unknown architecture"),
        (kron_dict(architecture=3), "architecture", "string"),
        (kron_dict(d_sae=65), "d_sae", "h*m*n"),
        (kron_dict(h=8), "d_sae", "does not equal"),
        (kron_dict(m=8, n=2), "m", "must not exceed"),
        (kron_dict(k=65), "k", "larger than the dictionary"),
        (kron_dict(k=0), "k", "positive"),
        (kron_dict(k=-3), "k", "positive"),
        (kron_dict(k=2.5), "k", "whole number"),
        (topk_dict(k=None), "k", "positive"),
        (topk_dict(k=100), "k", "larger than the dictionary"),
        (kron_dict(h=0, d_sae=0), "d_sae", "positive"),
        (kron_dict(h=True), "h", "whole number"),
        (kron_dict(dtype="float64"), "dtype", "unsupported dtype"),
        (kron_dict(dtype="int8"), "dtype", "unsupported dtype"),
        (kron_dict(normalize_activations="layer_norm"), "normalize_activations", "must be one of"),
        (
            kron_dict(normalize_activations="expected_average_only_in"),
            "norm_scaling_factor",
            "required",
        ),
        (
            kron_dict(normalize_activations="expected_average_only_in", norm_scaling_factor=-1.0),
            "norm_scaling_factor",
            "positive",
        ),
        (
            kron_dict(
                normalize_activations="expected_average_only_in", norm_scaling_factor=float("nan")
            ),
            "norm_scaling_factor",
            "finite",
        ),
        (kron_dict(composition="max"), "composition", "unknown composition"),
        (kron_dict(metadata=[1, 2]), "metadata", "object"),
        ({"d_in": 4, "d_sae": 8}, "architecture", "missing"),
        ({"architecture": "topk", "d_sae": 8, "k": 2}, "d_in", "missing"),
        ({"architecture": "topk", "d_in": 4, "k": 2}, "d_sae", "missing"),
        (topk_dict(d_in="16"), "d_in", "whole number"),
    ],
)
def test_validation_names_the_field(data: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        SAEConfig.from_dict(data, file="cfg.json")
    err = info.value
    assert err.field == field
    assert err.file == "cfg.json"
    assert f"field '{field}'" in str(err)
    assert str(err).startswith("cfg.json: ")
    assert words in str(err)


def test_constructor_validates_too() -> None:
    with pytest.raises(ConfigError, match="field 'd_sae'"):
        SAEConfig("kronsae", d_in=8, d_sae=100, k=4, h=4, m=2, n=8)
    with pytest.raises(ConfigError, match="field 'm'"):
        SAEConfig("kronsae", d_in=8, d_sae=64, k=4, h=4, m=8, n=2)
    with pytest.raises(ConfigError, match="field 'k'"):
        SAEConfig("topk", d_in=8, d_sae=64, k=0)
    with pytest.raises(ConfigError, match="field 'dtype'"):
        SAEConfig("standard", d_in=8, d_sae=64, dtype="float64")


def test_not_a_dict() -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        SAEConfig.from_dict([1, 2])  # type: ignore[arg-type]
