"""Tiny random subject models, built offline in milliseconds, for tests.

``make_tiny_model(kind, path)`` writes a transformers folder (``config.json``, safetensors
weights, a fast tokenizer trained on a few sentences) that ``kronscope.lm.load_model``
loads like any local model:

- ``gpt2``: ``GPT2LMHeadModel``, byte-level BPE (any text tokenises), BOS = EOS = PAD =
  ``<|endoftext|>`` as in GPT-2 (layers at ``transformer.h``).
- ``llama``: ``LlamaForCausalLM``, SentencePiece-style (Metaspace) BPE with ``<s>``,
  ``</s>``, ``<pad>``, ``<unk>`` (layers at ``model.layers``).
- ``bert``: ``BertModel``, WordPiece with ``[CLS] ... [SEP]`` framing (``encoder.layer``).

Every model has d_model 32, 4 layers, 64 positions; weights are seeded, so a folder is the
same on every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

TinyKind = Literal["gpt2", "llama", "bert"]
KINDS: tuple[TinyKind, ...] = ("gpt2", "llama", "bert")

D_MODEL = 32
N_LAYERS = 4
MAX_POSITIONS = 64

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A sparse autoencoder reads the residual stream of a language model.",
    "KronSAE composes base and extension pre-latents with mAND.",
    "def add(a, b):\n    return a + b",
    "Python lists, tuples and dictionaries are built-in types.",
    "Numbers like 3.14, 42 and 1e-5 appear in text too!",
    "Tokenizers split words into pieces; some pieces are rare.",
    "the cat sat on the mat and the dog sat on the log",
]


def _train_tokenizer(kind: TinyKind):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(SENTENCES, trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            model_max_length=MAX_POSITIONS,
        )
    if kind == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False
        )
        tok.train_from_iterator(SENTENCES, trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            model_max_length=MAX_POSITIONS,
        )
    if kind == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=200,
            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            show_progress=False,
        )
        tok.train_from_iterator(SENTENCES, trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            cls_token="[CLS]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            unk_token="[UNK]",
            mask_token="[MASK]",
            model_max_length=MAX_POSITIONS,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}; use one of {', '.join(KINDS)}")


def make_tiny_model(kind: TinyKind, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``kind`` model (``gpt2``, ``llama`` or ``bert``) into ``path``."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    path = Path(path)
    tokenizer = _train_tokenizer(kind)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    model: torch.nn.Module
    if kind == "gpt2":
        eos = tokenizer.eos_token_id
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_positions=MAX_POSITIONS,
                n_embd=D_MODEL,
                n_layer=N_LAYERS,
                n_head=4,
                bos_token_id=eos,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        )
    elif kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=D_MODEL,
                intermediate_size=64,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=MAX_POSITIONS,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    else:
        model = BertModel(
            BertConfig(
                vocab_size=vocab,
                hidden_size=D_MODEL,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=MAX_POSITIONS,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)  # type: ignore[operator]
    tokenizer.save_pretrained(path)
    return path


def make_tiny_models_dir(root: str | Path, seed: int = 0) -> Path:
    """A models folder with ``tiny-gpt2``, ``tiny-llama`` and ``tiny-bert`` sub-folders (use it
    as ``KRONSCOPE_MODELS_DIR``)."""
    root = Path(root)
    for kind in KINDS:
        make_tiny_model(kind, root / f"tiny-{kind}", seed=seed)
    return root
