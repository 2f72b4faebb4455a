"""Hooks on tiny random GPT-2, Llama and BERT models: values equal the reference hidden
states, every naming of a hook lands on the same module, and later layers never run."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from helpers.module_runs import count_runs
from kronscope.lm import HookError, SubjectModel

TEXTS = [
    "the cat sat on the mat and the dog sat on the log",
    "A sparse autoencoder",
    "def add(a, b):\n    return a + b",
]

# Names of the layer list, of the last norm and of the head in each tiny model.
TAIL_MODULES = {
    "GPT2LMHeadModel": ("transformer.ln_f", "lm_head"),
    "LlamaForCausalLM": ("model.norm", "lm_head"),
    "BertModel": ("pooler",),
}
SHORT_PATHS = {
    "transformer.h": "h",
    "model.layers": "layers",
    "encoder.layer": "bert.encoder.layer",
}


def reference_hidden_states(
    m: SubjectModel, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return m.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("layer", [1, 2])
def test_resid_post_and_module_path_equal_hidden_states(tiny: SubjectModel, layer: int) -> None:
    batch = tiny.tokenize(TEXTS)
    assert batch.attention_mask.min() == 0, "the batch must contain padding"
    hs = reference_hidden_states(tiny, batch.input_ids, batch.attention_mask)
    names = [
        f"{tiny.layers_path}.{layer}",
        f"{SHORT_PATHS[tiny.layers_path]}.{layer}",
        f"blocks.{layer}.hook_resid_post",
    ]
    for name in names:
        acts = tiny.activations(batch.input_ids, batch.attention_mask, name)
        assert acts.shape == (3, batch.input_ids.shape[1], tiny.d_model)
        assert acts.dtype == torch.float32
        assert_close(acts, hs[layer + 1], rtol=1e-5, atol=1e-5, msg=f"hook {name}")
        point = tiny.resolve_hook(name)
        assert (point.module_path, point.kind, point.layer) == (
            f"{tiny.layers_path}.{layer}",
            "output",
            layer,
        )


@pytest.mark.parametrize("layer", [0, 2])
def test_resid_pre_equals_hidden_states(tiny: SubjectModel, layer: int) -> None:
    batch = tiny.tokenize(TEXTS)
    hs = reference_hidden_states(tiny, batch.input_ids, batch.attention_mask)
    acts = tiny.activations(batch.input_ids, batch.attention_mask, f"blocks.{layer}.hook_resid_pre")
    assert_close(acts, hs[layer], rtol=1e-5, atol=1e-5)
    assert tiny.resolve_hook(f"blocks.{layer}.hook_resid_pre").kind == "input"


def test_unpadded_rows_equal_single_runs(tiny: SubjectModel) -> None:
    """Right padding does not change the activations of the real tokens."""
    batch = tiny.tokenize(TEXTS)
    hook = f"blocks.{tiny.n_layers // 2}.hook_resid_post"
    acts = tiny.activations(batch.input_ids, batch.attention_mask, hook)
    for b, text in enumerate(TEXTS):
        one = tiny.tokenize([text])
        alone = tiny.activations(one.input_ids, None, hook)[0]
        n = int(batch.attention_mask[b].sum())
        assert n == alone.shape[0]
        assert_close(acts[b, :n], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hook_kind", ["post", "pre", "path"])
def test_later_layers_never_run(tiny: SubjectModel, hook_kind: str) -> None:
    layer = 1
    hook = {
        "post": f"blocks.{layer}.hook_resid_post",
        "pre": f"blocks.{layer}.hook_resid_pre",
        "path": f"{tiny.layers_path}.{layer}",
    }[hook_kind]
    layer_paths = [f"{tiny.layers_path}.{i}" for i in range(tiny.n_layers)]
    tail = list(TAIL_MODULES[type(tiny.model).__name__])
    batch = tiny.tokenize(TEXTS[:2])
    with count_runs(tiny.model, layer_paths + tail) as counts:
        tiny.activations(batch.input_ids, batch.attention_mask, hook)
    last_run = layer if hook_kind != "pre" else layer - 1
    for i, path in enumerate(layer_paths):
        assert counts[path] == (1 if i <= last_run else 0), f"{path} ran {counts[path]} times"
    for path in tail:
        assert counts[path] == 0, f"{path} ran"
    # the hooks are gone: a full forward pass runs everything once
    with count_runs(tiny.model, layer_paths + tail) as counts, torch.no_grad():
        tiny.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert all(counts[p] == 1 for p in layer_paths + tail)


def test_sub_module_hook(tiny_llama: SubjectModel) -> None:
    batch = tiny_llama.tokenize(TEXTS)
    captured: list[torch.Tensor] = []
    mlp = tiny_llama.model.get_submodule("model.layers.2.mlp")
    handle = mlp.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        with torch.no_grad():
            tiny_llama.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        handle.remove()
    acts = tiny_llama.activations(batch.input_ids, batch.attention_mask, "model.layers.2.mlp")
    assert_close(acts, captured[0])
    assert tiny_llama.resolve_hook("layers.2.mlp").layer == 2


def test_activations_are_ordinary_tensors(tiny_gpt2: SubjectModel) -> None:
    """Usable in autograd (training), not inference-mode tensors."""
    batch = tiny_gpt2.tokenize(TEXTS[:1])
    acts = tiny_gpt2.activations(batch.input_ids, batch.attention_mask, "transformer.h.1")
    assert not acts.is_inference() and not acts.requires_grad
    w = torch.ones(tiny_gpt2.d_model, requires_grad=True)
    (acts @ w).sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize(
    ("hook", "expect"),
    [
        ("transformer.h.9", "does not exist"),
        ("blocks.4.hook_resid_post", "layer 4"),
        ("blocks.1.hook_attn_out", "not a supported TransformerLens name"),
        ("model.layers.1", "does not exist"),
        ("transformer.h", "list of modules"),
        ("", "is empty"),
    ],
)
def test_unknown_hook_is_a_clear_error(tiny_gpt2: SubjectModel, hook: str, expect: str) -> None:
    with pytest.raises(HookError) as info:
        tiny_gpt2.resolve_hook(hook)
    message = str(info.value)
    assert repr(hook) in message and expect in message
    assert "transformer.h" in message and "4 layers" in message
    assert "blocks.2.hook_resid_post" in message  # a valid example


def test_forward_with_splice(tiny_llama: SubjectModel) -> None:
    batch = tiny_llama.tokenize(TEXTS)
    plain = tiny_llama.logits(batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        ref = tiny_llama.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits
    assert_close(plain, ref)
    for hook in ("blocks.1.hook_resid_post", "blocks.1.hook_resid_pre", "model.layers.3"):
        same = tiny_llama.forward_with_splice(
            batch.input_ids, batch.attention_mask, hook, lambda a: a
        )
        assert_close(same, ref, msg=hook)
    seen: list[torch.Tensor] = []

    def zero(a: torch.Tensor) -> torch.Tensor:
        seen.append(a)
        return torch.zeros_like(a)

    changed = tiny_llama.forward_with_splice(
        batch.input_ids, batch.attention_mask, "model.layers.1", zero
    )
    assert changed.shape == (3, batch.input_ids.shape[1], len(tiny_llama.tokenizer))
    assert not torch.allclose(changed, ref)
    assert seen[0].dtype == torch.float32
    expected = tiny_llama.activations(batch.input_ids, batch.attention_mask, "model.layers.1")
    assert_close(seen[0], expected)
    # zeroing the residual after layer 1 makes every position's logits independent of the text
    assert_close(changed[0, 0], changed[1, 0])


def test_splice_and_unembed_need_a_causal_lm(
    tiny_bert: SubjectModel, tiny_gpt2: SubjectModel
) -> None:
    batch = tiny_bert.tokenize(TEXTS[:1])
    with pytest.raises(ValueError, match="not a causal LM"):
        tiny_bert.forward_with_splice(
            batch.input_ids, batch.attention_mask, "encoder.layer.1", lambda a: a
        )
    assert tiny_bert.unembed() is None
    w = tiny_gpt2.unembed()
    assert w is not None and w.shape == (len(tiny_gpt2.tokenizer), tiny_gpt2.d_model)
    assert torch.equal(w, tiny_gpt2.model.lm_head.weight)
