"""Readers of every checkpoint layout, each returning native tensors and configuration.

Each reader checks the source's own configuration and tensors (names, dtypes, shapes,
finiteness) under the source's names, so a message points at what is really in the file,
and only then converts. Nothing here builds an SAE or writes a file.

Conventions of the peer libraries, read from their source (for facts only):

- **SAELens v6** is our layout. **SAELens < 6**: ``hook_point`` -> ``hook_name``,
  ``activation_fn: topk`` with ``activation_fn_kwargs.k`` -> ``topk``, boolean
  ``normalize_activations``, no ``architecture`` (inferred: topk from the activation,
  jumprelu if a ``threshold`` tensor exists, else standard), ``apply_b_dec_to_input``
  defaulting to true, model fields at the top level (moved into ``metadata``), and a
  ``scaling_factor`` tensor (folded into ``W_dec``'s rows when
  ``finetuning_scaling_factor`` is set, dropped when all ones).
- **EleutherAI sparsify** (``cfg.json`` + ``sae.safetensors``): ``relu(encoder(x - b_dec))``,
  top-k, ``x_hat = top_acts @ W_dec[top_indices] + b_dec``. ``encoder.weight`` is [F, d]
  (transposed into ``W_enc``); ``W_dec`` is already [F, d]; b_dec is always subtracted.
  ``num_latents == 0`` means ``expansion_factor * d_in``. Transcoders, skip connections
  and ``groupmax`` have no equivalent here and are refused.
- **dictionary_learning** (``config.json`` + ``ae.pt``, a plain state dict):
  ``AutoEncoderTopK``: ``relu(encoder(x - b_dec))``, top-k, ``decoder(f) + b_dec``
  (``decoder.weight`` [d, F]); its scalar ``threshold`` buffer is only used on request,
  so it is kept in ``metadata.source``. ``BatchTopKSAE``: the same tensors, encoded at
  inference with its scalar threshold: ``relu(pre) * (relu(pre) > threshold)``, i.e. a
  JumpReLU. ``AutoEncoder``: ``relu(encoder(x - bias))``, ``decoder(f) + bias``; its
  ``from_pretrained`` rescales the decoder columns to unit norm (and the encoder rows to
  match) by default, and so does this import, so latents agree with what the library
  gives. ``JumpReluAutoEncoder``: SAELens-style ``W_enc``/``W_dec``, no ``b_dec``
  subtraction, ``relu(pre * (pre > threshold))``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .archive import EXTRACT_PREFIX
from .checkpoint import (
    CFG_FILENAME,
    PICKLE_SUFFIXES,
    SPARSITY_FILENAME,
    SPARSITY_TENSOR,
    WEIGHTS_FILENAME,
    Budget,
    check_finite,
    check_info,
    check_tensor,
    describe_dims,
    expected_shapes,
    load_weights_only,
    read_json,
    read_safetensors,
    read_safetensors_header,
    require_tensors,
)
from .config import SAEConfig
from .errors import CheckpointError, ConfigError

SPARSIFY_WEIGHTS = "sae.safetensors"
DL_CONFIG = "config.json"
DL_WEIGHTS = "ae.pt"
KNOWN_FILES = (
    CFG_FILENAME,
    WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    SPARSIFY_WEIGHTS,
    DL_CONFIG,
    DL_WEIGHTS,
)

# SAELens's model fields, at the top level before 6.0 and under `metadata` since.
SAELENS_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
    "hook_name_out",
    "hook_head_index_out",
)
_LEGACY_RENAMES = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}
_LEGACY_MARKERS = (
    "hook_point",
    "activation_fn_str",
    "activation_fn",
    "activation_fn_kwargs",
    "hook_point_layer",
)
_GATED_TENSORS = ("b_gate", "b_mag", "r_mag")
_DL_CLASSES = ("AutoEncoderTopK", "BatchTopKSAE", "AutoEncoder", "JumpReluAutoEncoder")


@dataclass
class Imported:
    """A checkpoint read and validated, in the native layout, not yet built."""

    cfg: SAEConfig
    tensors: dict[str, Tensor]
    """Native names (``W_enc`` ...), CPU, checked; cast to ``cfg.dtype`` when built."""
    source_format: str
    files: dict[str, Path]
    """Every file read, by its name in the folder."""
    warnings: list[str] = field(default_factory=list)
    sparsity: Tensor | None = None


# ---------------------------------------------------------------------------------------
# Finding the checkpoint and its format
# ---------------------------------------------------------------------------------------
def _entries(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"
    )


def find_root(folder: Path, depth: int = 2) -> Path:
    """The checkpoint folder: ``folder`` itself, or the one folder it holds (an archive's root)."""
    if not folder.is_dir():
        raise CheckpointError("is not a folder", file=folder.name)
    entries = _entries(folder)
    if any(p.name in KNOWN_FILES and p.is_file() for p in entries):
        return folder
    dirs = [p for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file()]
    if len(dirs) == 1 and not files and depth > 0:
        return find_root(dirs[0], depth - 1)
    if len(dirs) > 1 and not files:
        names = ", ".join(p.name for p in dirs[:5])
        raise CheckpointError(
            f"holds several folders ({names}); load one checkpoint folder at a time",
            file=_display(folder),
        )
    return folder


def _display(folder: Path) -> str:
    return "the archive" if folder.name.startswith(EXTRACT_PREFIX) else folder.name


def read_folder(root: Path, budget: Budget, *, name_hint: str | None = None) -> Imported:
    """Detect the layout of ``root`` and read it with the matching reader."""
    names = {p.name for p in root.iterdir() if p.is_file()}
    if CFG_FILENAME in names and WEIGHTS_FILENAME in names:
        imported = read_saelens(root, budget)
    elif CFG_FILENAME in names and SPARSIFY_WEIGHTS in names:
        imported = read_sparsify(root, budget, name_hint=name_hint)
    elif DL_CONFIG in names and DL_WEIGHTS in names:
        imported = read_dictionary_learning(root, budget)
    else:
        raise _what_is_missing(root, names)
    for name in sorted(names):
        if name.lower().endswith(PICKLE_SUFFIXES) and name not in imported.files:
            # Refused rather than skipped: whoever sent it may believe it is part of the
            # checkpoint, and nothing that needs an unpickler is ever accepted.
            raise CheckpointError(
                "is a pickle file beside the checkpoint; pickles are never loaded. Remove it "
                "or convert it to safetensors",
                file=name,
            )
    return imported


def _what_is_missing(root: Path, names: set[str]) -> CheckpointError:
    if CFG_FILENAME in names:
        return CheckpointError(
            f"is missing: {CFG_FILENAME} was found, but neither {WEIGHTS_FILENAME} (SAELens / "
            f"KronScope) nor {SPARSIFY_WEIGHTS} (sparsify) is beside it",
            file=WEIGHTS_FILENAME,
        )
    if WEIGHTS_FILENAME in names or SPARSIFY_WEIGHTS in names:
        return CheckpointError(
            "is missing: the tensors need their configuration beside them", file=CFG_FILENAME
        )
    if DL_WEIGHTS in names:
        return CheckpointError(
            f"is missing: dictionary_learning's {DL_WEIGHTS} needs it beside it", file=DL_CONFIG
        )
    if DL_CONFIG in names:
        return CheckpointError(
            f"is missing: {DL_CONFIG} was found but not the weights it describes", file=DL_WEIGHTS
        )
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        return CheckpointError(
            "is a pickle file; pickles are never loaded (except dictionary_learning's ae.pt beside "
            "its config.json, as plain tensors). Convert the checkpoint to safetensors",
            file=pickles[0],
        )
    return CheckpointError(
        f"holds no checkpoint: expected {CFG_FILENAME} + {WEIGHTS_FILENAME} (SAELens / KronScope), "
        f"{CFG_FILENAME} + {SPARSIFY_WEIGHTS} (sparsify) or {DL_CONFIG} + {DL_WEIGHTS} (dictionary_learning)",
        file=_display(root),
    )


# ---------------------------------------------------------------------------------------
# SAELens (v6 = native, and older) and KronScope
# ---------------------------------------------------------------------------------------
def _major(version: Any) -> int | None:
    m = re.match(r"\s*v?(\d+)", str(version))
    return int(m.group(1)) if m else None


def normalise_saelens_cfg(
    data: dict[str, Any], tensor_names: set[str]
) -> tuple[dict[str, Any], str, list[str]]:
    """A SAELens / KronScope ``cfg.json`` dict in the v6 layout, its source format, and notes."""
    meta = data.get("metadata")
    version = data.get("sae_lens_version")
    if version is None and isinstance(meta, dict):
        version = meta.get("sae_lens_version")
    major = _major(version) if version is not None else None
    legacy = (
        "architecture" not in data
        or any(k in data for k in _LEGACY_MARKERS)
        or isinstance(data.get("normalize_activations"), bool)
        or any(k in data for k in SAELENS_METADATA_KEYS)
        or (major is not None and major < 6)
    )
    if not legacy:
        return data, ("saelens" if version is not None else "kronscope"), []

    notes: list[str] = []
    out = {_LEGACY_RENAMES.get(k, k): copy.deepcopy(v) for k, v in data.items()}
    metadata = out.get("metadata")
    if metadata is None:
        metadata = {}
    if isinstance(metadata, dict):  # otherwise SAEConfig reports it
        for key in SAELENS_METADATA_KEYS:
            if key in out:
                metadata.setdefault(key, out.pop(key))
        out["metadata"] = metadata
    norm = out.get("normalize_activations")
    if isinstance(norm, bool):
        out["normalize_activations"] = "expected_average_only_in" if norm else "none"
    elif norm is None:
        out["normalize_activations"] = "none"
    out.setdefault("apply_b_dec_to_input", True)
    act = out.get("activation_fn")
    act_kwargs = out.get("activation_fn_kwargs")
    topk_k = act_kwargs.get("k") if isinstance(act_kwargs, dict) else None
    if act == "topk" and topk_k is not None:
        out["architecture"] = "topk"
        out["k"] = topk_k
    elif "architecture" not in out:
        if "threshold" in tensor_names:
            out["architecture"] = "jumprelu"
        elif any(t in tensor_names for t in _GATED_TENSORS):
            raise ConfigError(
                "is missing, and the tensors (b_gate, b_mag, r_mag) are those of a gated SAE, "
                "which is not supported",
                field="architecture",
                file=CFG_FILENAME,
            )
        elif act in (None, "relu"):
            out["architecture"] = "standard"
        else:
            raise ConfigError(
                f"activation {act!r} is not supported (relu, topk, jumprelu are)",
                field="activation_fn",
                file=CFG_FILENAME,
            )
        notes.append(
            f"{CFG_FILENAME} has no architecture; read as {out['architecture']!r} (SAELens < 6 layout)"
        )
    if (
        out.get("d_sae") is None
        and isinstance(out.get("expansion_factor"), int)
        and isinstance(out.get("d_in"), int)
    ):
        out["d_sae"] = out["d_in"] * out["expansion_factor"]
    return out, "saelens_legacy", notes


def read_saelens(root: Path, budget: Budget) -> Imported:
    """``cfg.json`` + ``sae_weights.safetensors`` [+ ``sparsity.safetensors``]: SAELens or ours."""
    data = read_json(root / CFG_FILENAME, CFG_FILENAME, budget)
    infos = read_safetensors_header(root / WEIGHTS_FILENAME, WEIGHTS_FILENAME, budget)
    data, source_format, notes = normalise_saelens_cfg(data, set(infos))
    cfg = SAEConfig.from_dict(data, file=CFG_FILENAME)
    expected = expected_shapes(cfg)
    extras = require_tensors(infos, WEIGHTS_FILENAME, expected, describe_dims(cfg))
    wanted = list(expected)
    if "scaling_factor" in extras:
        check_info(infos["scaling_factor"], WEIGHTS_FILENAME, (cfg.d_sae,), describe_dims(cfg))
        extras.remove("scaling_factor")
        wanted.append("scaling_factor")
    notes += [
        f"{WEIGHTS_FILENAME}: tensor {name!r} is not used by a {cfg.architecture} SAE; ignored"
        for name in extras
    ]
    tensors = read_safetensors(root / WEIGHTS_FILENAME, WEIGHTS_FILENAME, wanted)
    for name, t in tensors.items():
        check_finite(t, WEIGHTS_FILENAME, name)
    if "scaling_factor" in tensors:
        scale = tensors.pop("scaling_factor")
        if not torch.allclose(scale.float(), torch.ones_like(scale, dtype=torch.float32)):
            if not cfg.extra.get("finetuning_scaling_factor"):
                raise CheckpointError(
                    f"is not all ones, but {CFG_FILENAME}'s finetuning_scaling_factor is not set",
                    file=WEIGHTS_FILENAME,
                    field="scaling_factor",
                )
            tensors["W_dec"] = tensors["W_dec"].float() * scale.float()[:, None]
            notes.append("the finetuning scaling factor was folded into W_dec")
        cfg.extra["finetuning_scaling_factor"] = False
    files = {CFG_FILENAME: root / CFG_FILENAME, WEIGHTS_FILENAME: root / WEIGHTS_FILENAME}
    sparsity = None
    if (root / SPARSITY_FILENAME).is_file():
        sparsity, sparsity_notes = read_sparsity(root / SPARSITY_FILENAME, cfg, budget)
        notes += sparsity_notes
        files[SPARSITY_FILENAME] = root / SPARSITY_FILENAME
    return Imported(cfg, tensors, source_format, files, notes, sparsity)


def read_sparsity(path: Path, cfg: SAEConfig, budget: Budget) -> tuple[Tensor, list[str]]:
    """``sparsity.safetensors``: tensor ``sparsity`` [d_sae], log10 frequencies (-inf allowed)."""
    infos = read_safetensors_header(path, SPARSITY_FILENAME, budget)
    extras = require_tensors(
        infos, SPARSITY_FILENAME, {SPARSITY_TENSOR: (cfg.d_sae,)}, describe_dims(cfg)
    )
    t = read_safetensors(path, SPARSITY_FILENAME, [SPARSITY_TENSOR])[SPARSITY_TENSOR]
    check_finite(t, SPARSITY_FILENAME, SPARSITY_TENSOR, allow_neg_inf=True)
    return t, [f"{SPARSITY_FILENAME}: tensor {name!r} is not used; ignored" for name in extras]


# ---------------------------------------------------------------------------------------
# EleutherAI sparsify
# ---------------------------------------------------------------------------------------
def _whole(data: dict[str, Any], key: str, file: str, default: Any = None) -> int:
    value = data.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"must be a whole number, got {value!r}", field=key, file=file)
    return value


def read_sparsify(root: Path, budget: Budget, *, name_hint: str | None = None) -> Imported:
    """``cfg.json`` + ``sae.safetensors`` written by EleutherAI sparsify: a TopK SAE."""
    data = read_json(root / CFG_FILENAME, CFG_FILENAME, budget)
    d_in = _whole(data, "d_in", CFG_FILENAME)
    if d_in == 0:
        raise ConfigError("must be positive", field="d_in", file=CFG_FILENAME)
    activation = data.get("activation", "topk")
    if activation != "topk":
        raise ConfigError(
            f"{activation!r} is not supported; only sparsify's 'topk' activation is",
            field="activation",
            file=CFG_FILENAME,
        )
    if data.get("transcode"):
        raise ConfigError(
            "is set: this is a transcoder (it predicts another module's output), not an autoencoder; "
            "not supported",
            field="transcode",
            file=CFG_FILENAME,
        )
    if data.get("skip_connection"):
        raise ConfigError(
            "is set: skip connections (W_skip) are not supported",
            field="skip_connection",
            file=CFG_FILENAME,
        )
    num_latents = _whole(data, "num_latents", CFG_FILENAME, 0)
    d_sae = num_latents or d_in * _whole(data, "expansion_factor", CFG_FILENAME, 32)
    k = _whole(data, "k", CFG_FILENAME, 32)

    infos = read_safetensors_header(root / SPARSIFY_WEIGHTS, SPARSIFY_WEIGHTS, budget)
    if "W_skip" in infos:
        raise CheckpointError(
            "skip connections are not supported", file=SPARSIFY_WEIGHTS, field="W_skip"
        )
    why = f"{CFG_FILENAME} (d_in = {d_in}, num_latents = {d_sae})"
    expected = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    extras = require_tensors(infos, SPARSIFY_WEIGHTS, expected, why)
    source: dict[str, Any] = {"format": "sparsify", "cfg": copy.deepcopy(data)}
    if name_hint:
        source["folder"] = name_hint  # sparsify names each SAE's folder after its hookpoint
    cfg = SAEConfig.from_dict(
        {
            "architecture": "topk",
            "d_in": d_in,
            "d_sae": d_sae,
            "k": k,
            "dtype": infos["encoder.weight"].dtype_name,
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "metadata": {"source": source},
        },
        file=CFG_FILENAME,
    )
    src = read_safetensors(root / SPARSIFY_WEIGHTS, SPARSIFY_WEIGHTS, list(expected))
    for name, t in src.items():
        check_finite(t, SPARSIFY_WEIGHTS, name)
    tensors = {
        "W_enc": src["encoder.weight"].T.contiguous(),
        "b_enc": src["encoder.bias"],
        "W_dec": src["W_dec"],
        "b_dec": src["b_dec"],
    }
    notes = [f"{SPARSIFY_WEIGHTS}: tensor {name!r} is not used; ignored" for name in extras]
    files = {CFG_FILENAME: root / CFG_FILENAME, SPARSIFY_WEIGHTS: root / SPARSIFY_WEIGHTS}
    return Imported(cfg, tensors, "sparsify", files, notes)


# ---------------------------------------------------------------------------------------
# dictionary_learning
# ---------------------------------------------------------------------------------------
_HOOK_PATTERN = re.compile(r"(resid_post|resid_pre|resid_mid|mlp_out|attn_out)_layer_(\d+)")
_MODULE_PATH = re.compile(r"[A-Za-z_]\w*(\.\w+)+")


def guess_hook_name(trainer: dict[str, Any]) -> tuple[str | None, str | None]:
    """(hook name, note) from dictionary_learning's ``submodule_name`` / ``layer``, best effort."""
    sub, layer = trainer.get("submodule_name"), trainer.get("layer")
    if isinstance(sub, str):
        m = _HOOK_PATTERN.fullmatch(sub)
        if m:
            hook = f"blocks.{m.group(2)}.hook_{m.group(1)}"
            return (
                hook,
                f"metadata.hook_name {hook!r} was derived from trainer.submodule_name {sub!r}",
            )
        if _MODULE_PATH.fullmatch(sub):
            return (
                sub,
                f"metadata.hook_name {sub!r} is trainer.submodule_name taken as a module path",
            )
        return (
            None,
            f"trainer.submodule_name {sub!r} is not a hook name; set metadata.hook_name by hand",
        )
    if isinstance(layer, int) and not isinstance(layer, bool):
        # dictionary_learning's examples hook the output of layer L: the residual stream after it.
        hook = f"blocks.{layer}.hook_resid_post"
        return hook, f"metadata.hook_name {hook!r} was guessed from trainer.layer {layer}; check it"
    return None, "config.json names no layer; set metadata.hook_name by hand"


def _dims(
    trainer: dict[str, Any], state: dict[str, Any], weight: str, transposed: bool
) -> tuple[int, int, str]:
    """(d_in, d_sae, why) from the trainer config, else from the weight's shape."""
    d = trainer.get("activation_dim")
    f = trainer.get("dict_size")
    if (
        isinstance(d, int)
        and isinstance(f, int)
        and not isinstance(d, bool)
        and not isinstance(f, bool)
    ):
        return d, f, f"{DL_CONFIG} (activation_dim = {d}, dict_size = {f})"
    w = state.get(weight)
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise CheckpointError("tensor is missing or not a matrix", file=DL_WEIGHTS, field=weight)
    f, d = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
    return int(d), int(f), f"{weight}'s shape"


def _scalar(state: dict[str, Any], key: str) -> float | None:
    v = state.get(key)
    if v is None:
        return None
    if not isinstance(v, Tensor) or v.numel() != 1:
        raise CheckpointError("must be a single number", file=DL_WEIGHTS, field=key)
    x = float(v.item())
    if x != x or abs(x) == float("inf"):
        raise CheckpointError("is NaN or infinite", file=DL_WEIGHTS, field=key)
    return x


def read_dictionary_learning(root: Path, budget: Budget) -> Imported:
    """``config.json`` + ``ae.pt`` written by dictionary_learning's ``trainSAE``."""
    data = read_json(root / DL_CONFIG, DL_CONFIG, budget)
    trainer = data.get("trainer")
    if not isinstance(trainer, dict):
        raise ConfigError("is missing or not an object", field="trainer", file=DL_CONFIG)
    dict_class = trainer.get("dict_class")
    if dict_class not in _DL_CLASSES:
        raise ConfigError(
            f"{dict_class!r} is not supported; supported: {', '.join(_DL_CLASSES)}",
            field="trainer.dict_class",
            file=DL_CONFIG,
        )
    state = load_weights_only(root / DL_WEIGHTS, DL_WEIGHTS, budget)
    if "ae" in state or "optimizer" in state:
        raise CheckpointError(
            "is a training backup (it holds the optimizer state); load the final ae.pt",
            file=DL_WEIGHTS,
        )
    notes: list[str] = []
    source: dict[str, Any] = {"format": "dictionary_learning", "config": copy.deepcopy(data)}
    arch_fields: dict[str, Any]
    if dict_class == "JumpReluAutoEncoder":
        d, f, why = _dims(trainer, state, "W_enc", transposed=True)
        expected = {
            "W_enc": (d, f),
            "b_enc": (f,),
            "W_dec": (f, d),
            "b_dec": (d,),
            "threshold": (f,),
        }
        src = _checked(state, expected, why)
        tensors = dict(src)
        arch_fields = {"architecture": "jumprelu", "apply_b_dec_to_input": False}
    else:
        d, f, why = _dims(trainer, state, "encoder.weight", transposed=False)
        bias = "bias" if dict_class == "AutoEncoder" else "b_dec"
        expected = {
            "encoder.weight": (f, d),
            "encoder.bias": (f,),
            "decoder.weight": (d, f),
            bias: (d,),
        }
        src = _checked(state, expected, why)
        w_enc, b_enc, w_dec = src["encoder.weight"].T, src["encoder.bias"], src["decoder.weight"].T
        if dict_class == "AutoEncoder":
            w_enc, b_enc, w_dec, folded = _unit_decoder(w_enc, b_enc, w_dec)
            if folded:
                notes.append(
                    "decoder rows were rescaled to unit norm (and the encoder to match), as "
                    "dictionary_learning's AutoEncoder.from_pretrained does; reconstructions are unchanged"
                )
            arch_fields = {"architecture": "standard"}
        else:
            k = _k(state, trainer)
            threshold = _scalar(state, "threshold")
            if dict_class == "AutoEncoderTopK":
                arch_fields = {"architecture": "topk", "k": k}
                if threshold is not None and threshold >= 0:
                    source["threshold"] = threshold  # only used by encode(use_threshold=True)
            else:  # BatchTopKSAE: inference uses the threshold, not the batch top-k
                if threshold is None or threshold < 0:
                    raise CheckpointError(
                        "BatchTopKSAE has no inference threshold recorded (training did not reach "
                        "the step that sets it)",
                        file=DL_WEIGHTS,
                        field="threshold",
                    )
                arch_fields = {"architecture": "jumprelu"}
                source["k"] = k
                notes.append("BatchTopKSAE is read as a JumpReLU with its inference threshold")
        tensors = {
            "W_enc": w_enc.contiguous(),
            "b_enc": b_enc,
            "W_dec": w_dec.contiguous(),
            "b_dec": src[bias],
        }
        if dict_class == "BatchTopKSAE":
            assert threshold is not None
            tensors["threshold"] = torch.full((f,), threshold, dtype=b_enc.dtype)
        arch_fields.setdefault("apply_b_dec_to_input", True)
    ignored = [k for k in state if k not in expected and k not in ("k", "threshold")]
    notes += [f"{DL_WEIGHTS}: tensor {name!r} is not used; ignored" for name in ignored]

    metadata: dict[str, Any] = {}
    if isinstance(trainer.get("lm_name"), str):
        metadata["model_name"] = trainer["lm_name"]
    hook, note = guess_hook_name(trainer)
    if hook:
        metadata["hook_name"] = hook
    if note:
        notes.append(note)
    buffer = data.get("buffer")
    if isinstance(buffer, dict) and isinstance(buffer.get("ctx_len"), int):
        metadata["context_size"] = buffer["ctx_len"]
    metadata["source"] = source
    first = next(iter(src.values()))
    cfg = SAEConfig.from_dict(
        {
            **arch_fields,
            "d_in": d,
            "d_sae": f,
            "dtype": str(first.dtype).removeprefix("torch."),
            "normalize_activations": "none",
            "metadata": metadata,
        },
        file=DL_CONFIG,
    )
    files = {DL_CONFIG: root / DL_CONFIG, DL_WEIGHTS: root / DL_WEIGHTS}
    return Imported(cfg, tensors, "dictionary_learning", files, notes)


def _checked(
    state: dict[str, Any], expected: dict[str, tuple[int, ...]], why: str
) -> dict[str, Tensor]:
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"tensor is missing (this checkpoint needs {', '.join(expected)})",
            file=DL_WEIGHTS,
            field=missing[0],
        )
    return {k: check_tensor(state[k], DL_WEIGHTS, k, shape, why) for k, shape in expected.items()}


def _k(state: dict[str, Any], trainer: dict[str, Any]) -> int:
    k_buf = state.get("k")
    k_cfg = trainer.get("k")
    k: int | None = None
    if k_buf is not None:
        if not isinstance(k_buf, Tensor) or k_buf.numel() != 1 or k_buf.is_floating_point():
            raise CheckpointError("must be a single whole number", file=DL_WEIGHTS, field="k")
        k = int(k_buf.item())
    if isinstance(k_cfg, int) and not isinstance(k_cfg, bool):
        if k is not None and k != k_cfg:
            raise CheckpointError(
                f"is {k}, but {DL_CONFIG} gives trainer.k = {k_cfg}", file=DL_WEIGHTS, field="k"
            )
        k = k_cfg
    if k is None:
        raise CheckpointError(
            "is missing (neither the k buffer nor trainer.k is present)", file=DL_WEIGHTS, field="k"
        )
    return k


def _unit_decoder(
    w_enc: Tensor, b_enc: Tensor, w_dec: Tensor
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Rescale decoder rows to unit norm and the encoder to match (zero rows stay as they are)."""
    dtype = w_dec.dtype
    norms = w_dec.float().norm(dim=1)
    if torch.allclose(norms, torch.ones_like(norms)):
        return w_enc, b_enc, w_dec, False
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return (
        (w_enc.float() * norms).to(dtype),
        (b_enc.float() * norms).to(dtype),
        (w_dec.float() / norms[:, None]).to(dtype),
        True,
    )
