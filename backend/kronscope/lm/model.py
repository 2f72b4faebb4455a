"""Subject models: load once, hook by name, run only the prefix up to the hook.

Design decisions:

- transformers Auto classes only, always ``trust_remote_code=False``. Causal LMs load with
  ``AutoModelForCausalLM``, encoders (BERT) with ``AutoModel``; the choice comes from
  ``config.architectures``, else ``is_decoder``, else the model type.
- A GGUF file is dequantised to float32 by transformers (about 25 s for SmolLM2-135M), so
  the result is saved once as safetensors under ``<cache_dir>/models/<name>-<hash>`` (the
  hash covers the file's path, size and mtime), written to a temporary folder and renamed
  into place, and read from there afterwards.
- Loaded models are kept in a small in-process LRU keyed by name, what the name resolved to,
  device and dtype, so tests and the server do not reload.
- ``activations`` runs under ``torch.inference_mode`` and stops the forward pass right
  after the hooked module; the returned tensor is an ordinary (cloned) float32 tensor, so
  training code may use it in autograd. Hook-using calls of one model are serialised by a
  lock: two threads' hooks on one module would see each other's forward passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..config import Settings, get_settings, resolve_device
from .errors import HookError, ModelNotFoundError
from .hooks import HookPoint, capture, find_layer_list, resolve_hook, splice
from .resolve import ModelSource, resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODEL_CACHE_SIZE = 4
"""Loaded models kept in memory per process."""

CACHE_MARKER = "kronscope-source.json"
"""Written last into a GGUF cache folder; a folder without it is incomplete."""


@dataclass
class TokenBatch:
    """Texts tokenised for a subject model, padded on the right."""

    input_ids: Tensor
    """[B, T] int64."""
    attention_mask: Tensor
    """[B, T] int64, 0 on padding."""
    special_mask: Tensor
    """[B, T] bool: True on special tokens (BOS/EOS/CLS/SEP/PAD/MASK, not UNK) and padding."""
    tokens: list[list[str]]
    """Readable string of each real token: ``tokens[b]`` has ``attention_mask[b].sum()``
    entries (padding left out), e.g. ``" the"`` rather than ``"Ġthe"``."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# -- readable token strings ------------------------------------------------------------------
@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _transformers_dtype_kw() -> str:
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _is_causal(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if getattr(config, "is_decoder", False):
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", None)
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class SubjectModel:
    """A loaded language model with its tokenizer, hookable by name."""

    def __init__(
        self,
        name: str,
        model: PreTrainedModel,
        tokenizer: Any,
        device: torch.device,
        *,
        source: ModelSource | None = None,
        loaded_from: Path | str | None = None,
    ):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        self.loaded_from = loaded_from
        """The folder (or hub id) the weights were actually read from (the GGUF cache folder
        for GGUF models)."""
        config = model.config
        self.is_causal_lm: bool = model.get_output_embeddings() is not None and _is_causal(config)
        self.layers_path, layers = find_layer_list(model)
        self.n_layers: int = len(layers)
        d = _config_int(config, "hidden_size", "n_embd", "d_model")
        if d is None:
            weight = model.get_input_embeddings().weight
            assert isinstance(weight, Tensor)
            d = int(weight.shape[1])
        self.d_model: int = d
        max_len = _config_int(config, "max_position_embeddings", "n_positions", "n_ctx")
        if max_len is None:
            tml = getattr(tokenizer, "model_max_length", None)
            max_len = tml if isinstance(tml, int) and 0 < tml < 10_000_000 else 2048
        self.max_length: int = max_len
        # BERT-style tokenizers frame a text as [CLS] ... [SEP]; decoders get an optional BOS.
        self.encoder_style: bool = (
            not self.is_causal_lm
            and getattr(tokenizer, "cls_token_id", None) is not None
            and getattr(tokenizer, "sep_token_id", None) is not None
        )
        self.bos_token_id: int | None = getattr(tokenizer, "bos_token_id", None)
        self.eos_token_id: int | None = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_id or 0)
        # UNK stands for real text, so it is not masked like BOS/EOS/CLS/SEP/PAD are.
        unk = getattr(tokenizer, "unk_token_id", None)
        specials = set(getattr(tokenizer, "all_special_ids", []) or []) - {unk}
        self.special_ids: list[int] = sorted(i for i in specials if i is not None)
        self._special_ids_t = torch.tensor(self.special_ids, dtype=torch.long)
        self._hooks: dict[str, HookPoint] = {}
        self._token_cache: dict[int, str] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"SubjectModel({self.name!r}, {type(self.model).__name__}, d_model={self.d_model}, "
            f"n_layers={self.n_layers}, device={self.device})"
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- hooks --------------------------------------------------------------------------
    def resolve_hook(self, hook_name: str) -> HookPoint:
        """A module path or ``blocks.L.hook_resid_post`` / ``_pre`` -> :class:`HookPoint`."""
        point = self._hooks.get(hook_name)
        if point is None:
            point = resolve_hook(self.model, hook_name, self.layers_path, self.n_layers)
            self._hooks[hook_name] = point
        return point

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> dict[str, Any]:
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}"
            )
        if input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"{input_ids.shape[1]} tokens is more than model {self.name!r} allows ({self.max_length})"
            )
        ids = input_ids.to(self.device, torch.long)
        mask = (
            torch.ones_like(ids)
            if attention_mask is None
            else attention_mask.to(self.device, torch.long)
        )
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.is_causal_lm:
            kwargs["use_cache"] = False
        return kwargs

    def activations(
        self, input_ids: Tensor, attention_mask: Tensor | None, hook_name: str
    ) -> Tensor:
        """[B, T] token ids -> [B, T, d] float32 activations at the hook.

        Only the modules before the hook run: the capture hook stops the forward pass."""
        point = self.resolve_hook(hook_name)
        kwargs = self._inputs(input_ids, attention_mask)
        with self._lock, torch.inference_mode():
            out = capture(self.model, point, lambda: self.model(**kwargs))
            out = out.to(torch.float32)
        return out.clone()  # an ordinary tensor, usable outside inference mode

    def forward_with_splice(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        hook_name: str,
        fn: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """Full forward pass with the activation at the hook replaced by ``fn(act)``.

        ``fn`` receives and returns [B, T, d] float32; returns logits [B, T, V] float32."""
        if not self.is_causal_lm:
            raise ValueError(
                f"model {self.name!r} is not a causal LM: splicing needs next-token logits"
            )
        point = self.resolve_hook(hook_name)
        kwargs = self._inputs(input_ids, attention_mask)
        with (
            self._lock,
            torch.no_grad(),
            splice(self.model, point, lambda t: fn(t.to(torch.float32))),
        ):
            out = self.model(**kwargs)
        return out.logits.to(torch.float32)

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Plain full forward pass: logits [B, T, V] float32 (causal LMs only)."""
        if not self.is_causal_lm:
            raise ValueError(f"model {self.name!r} is not a causal LM")
        kwargs = self._inputs(input_ids, attention_mask)
        with self._lock, torch.no_grad():
            out = self.model(**kwargs)
        return out.logits.to(torch.float32)

    def unembed(self) -> Tensor | None:
        """[vocab, d_model] output embedding of a causal LM (for logit effects), else None."""
        if not self.is_causal_lm:
            return None
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        return weight.detach() if isinstance(weight, Tensor) else None

    # -- tokens -------------------------------------------------------------------------
    def tokenize(
        self, texts: Sequence[str] | str, *, max_length: int | None = None, prepend_bos: bool = True
    ) -> TokenBatch:
        """Tokenise texts as the model expects them, truncated to ``max_length`` (default and
        upper bound: the model's ``max_length``), padded on the right.

        Causal LMs: the tokenizer's own special tokens are not added; the BOS is prepended when
        ``prepend_bos`` and the tokenizer has one. Encoders: ``[CLS] ... [SEP]`` always."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        limit = min(max_length or self.max_length, self.max_length)
        if limit < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        if not texts:
            rows: list[list[int]] = []
        elif self.encoder_style:
            enc = self.tokenizer(
                texts, add_special_tokens=True, truncation=True, max_length=limit, verbose=False
            )
            rows = [list(r) for r in enc["input_ids"]]
        else:
            enc = self.tokenizer(texts, add_special_tokens=False, verbose=False)
            bos = [self.bos_token_id] if prepend_bos and self.bos_token_id is not None else []
            rows = [(bos + list(r))[:limit] for r in enc["input_ids"]]
        return self.batch_from_ids(rows)

    def batch_from_ids(self, rows: Sequence[Sequence[int]]) -> TokenBatch:
        """Pad lists of token ids into a :class:`TokenBatch`."""
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            if row:
                ids[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
                mask[b, : len(row)] = 1
        return TokenBatch(
            ids, mask, self.special_mask(ids, mask), [self.token_strings(list(r)) for r in rows]
        )

    def special_mask(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """[B, T] bool: special tokens (BOS/EOS/CLS/SEP/PAD/...) and padding."""
        special = torch.isin(input_ids, self._special_ids_t.to(input_ids.device))
        if attention_mask is not None:
            special = special | (attention_mask == 0)
        return special

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Readable string of each token id, decoded one by one (``"Ġthe"`` -> ``" the"``;
        an incomplete UTF-8 byte shows as ``\\xe2``)."""
        out = []
        for i in ids:
            i = int(i)
            s = self._token_cache.get(i)
            if s is None:
                s = self._token_string(i)
                self._token_cache[i] = s
            out.append(s)
        return out

    def _token_string(self, i: int) -> str:
        tok = self.tokenizer
        try:
            s = tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        except Exception:  # an id outside the tokenizer's vocabulary
            return f"<{i}>"
        piece = tok.convert_ids_to_tokens(i)
        if not isinstance(piece, str) or not piece:
            return s
        if "\ufffd" in s:
            dec = _byte_decoder()
            if all(c in dec for c in piece):  # a byte-level piece that is not whole UTF-8
                return bytes(dec[c] for c in piece).decode("utf-8", errors="backslashreplace")
        if piece.startswith("▁") and not s.startswith(" "):  # SentencePiece drops the space
            s = " " + s
        return s


# -- loading ------------------------------------------------------------------------------
_models: OrderedDict[tuple[Any, ...], SubjectModel] = OrderedDict()
_models_lock = threading.RLock()


def clear_model_cache() -> None:
    """Forget the in-process loaded models."""
    with _models_lock:
        _models.clear()


def load_model(
    name: str,
    *,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    settings: Settings | None = None,
    allow_paths: bool = False,
) -> SubjectModel:
    """Resolve ``name`` (see :func:`resolve_model`) and load it, or reuse it when loaded.

    ``device="auto"`` follows ``settings.device`` (itself ``auto``: CUDA when present)."""
    settings = settings or get_settings()
    source = resolve_model(name, settings, allow_paths=allow_paths)
    dev = torch.device(resolve_device(settings.device if device == "auto" else device))
    key = (name, source.key, str(dev), dtype)  # the source too: models_dir may change
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        subject = _load(source, dev, dtype, settings)
        _models[key] = subject
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
        return subject


def _load(
    source: ModelSource, device: torch.device, dtype: torch.dtype, settings: Settings
) -> SubjectModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if source.kind == "gguf":
        where: str | Path = gguf_cache_folder(source, settings)
    elif source.kind == "folder":
        assert source.path is not None
        where = source.path
    else:
        assert source.hub_id is not None
        where = source.hub_id
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
        cls = AutoModelForCausalLM if _is_causal(config) else AutoModel
        model = cls.from_pretrained(
            where, trust_remote_code=False, **{_transformers_dtype_kw(): dtype}
        )
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except OSError as exc:
        raise ModelNotFoundError(
            f"model {source.name!r} could not be loaded from {where}: {exc}"
        ) from exc
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    try:
        return SubjectModel(source.name, model, tokenizer, device, source=source, loaded_from=where)
    except HookError as exc:
        raise ModelNotFoundError(f"model {source.name!r} at {where}: {exc}") from exc


def gguf_cache_folder(source: ModelSource, settings: Settings | None = None) -> Path:
    """The dequantised float32 copy of a GGUF model, written on first use."""
    settings = settings or get_settings()
    assert source.kind == "gguf" and source.path is not None and source.gguf_file is not None
    final = gguf_cache_path(source, settings)
    if (final / CACHE_MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _write_gguf_cache(source, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / CACHE_MARKER).is_file():  # not a concurrent writer that won
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def gguf_cache_path(source: ModelSource, settings: Settings) -> Path:
    assert source.path is not None and source.gguf_file is not None
    gguf = (source.path / source.gguf_file).resolve()
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", source.name).strip("-.") or "model"
    return settings.cache_dir / "models" / f"{safe}-{digest}"


def _write_gguf_cache(source: ModelSource, folder: Path) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    assert source.path is not None and source.gguf_file is not None
    gguf = source.path / source.gguf_file
    kw: dict[str, Any] = {"gguf_file": source.gguf_file, "trust_remote_code": False}
    config = AutoConfig.from_pretrained(source.path, **kw)
    cls = AutoModelForCausalLM if _is_causal(config) else AutoModel
    model = cls.from_pretrained(source.path, **kw, **{_transformers_dtype_kw(): torch.float32})
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kw)
    _drop_gguf_quantizer(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    st = gguf.stat()
    marker = {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    (folder / CACHE_MARKER).write_text(json.dumps(marker, indent=2))


def _drop_gguf_quantizer(model: Any) -> None:
    """transformers marks a model loaded from GGUF as quantised and refuses to save it, even
    when every weight was unpacked into plain float tensors. Unpack what is still packed,
    then drop the mark."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if any(type(m).__name__.lower().startswith("gguf") for m in model.modules()):
        model.dequantize()
        return
    quantizer.remove_quantization_config(model)
