"""Hook names -> modules, and running a model only up to the hooked module.

A hook is either a module path of the Hugging Face model (``model.layers.14``,
``transformer.h.6``, ``encoder.layer.3``; the top prefix may be left out or added when
that is unambiguous) or a TransformerLens residual name: ``blocks.L.hook_resid_post`` is
the output of layer L, ``blocks.L.hook_resid_pre`` its input.

The prefix trick: a forward hook (pre-hook for ``input``) stores the tensor and raises
``_StopForward``; the caller catches it, so no later module ever runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from .errors import HookError

HookKind = Literal["output", "input"]

# Where the decoder/encoder layer list lives in common architectures, tried first.
KNOWN_LAYER_LISTS = (
    "model.layers",  # Llama, Qwen2, Gemma2, Mistral (…ForCausalLM)
    "layers",  # bare LlamaModel / Qwen2Model
    "transformer.h",  # GPT-2, GPT-J
    "h",  # bare GPT2Model
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "encoder.layer",  # BertModel
    "bert.encoder.layer",  # BertFor…
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # Gemma3 and other multimodal wrappers
)

_TL_NAME = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook: which module, its output or input, and the layer it belongs to."""

    module_path: str
    """Full path in ``model.named_modules()``."""
    kind: HookKind
    """``output`` (forward hook) or ``input`` (forward pre-hook, first positional input)."""
    layer: int | None
    """Index in the layer list when the module is (inside) a layer, else None."""


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass right after the hooked module."""


def config_layer_count(config: Any) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    text = getattr(config, "text_config", None)
    return config_layer_count(text) if text is not None and text is not config else None


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and ModuleList of the model's transformer layers."""
    modules = dict(model.named_modules())
    n = config_layer_count(getattr(model, "config", None))
    for path in KNOWN_LAYER_LISTS:
        m = modules.get(path)
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n):
            return path, m
    # Fallback: the ModuleList of the expected length holding the most parameters.
    best: tuple[int, int, str] | None = None
    for path, m in modules.items():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n):
            size = sum(p.numel() for p in m.parameters())
            cand = (size, -len(path), path)
            if best is None or cand > best:
                best = cand
    if best is None:
        raise HookError(f"cannot find the list of transformer layers in {type(model).__name__}")
    path = best[2]
    layers = modules[path]
    assert isinstance(layers, nn.ModuleList)
    return path, layers


def resolve_hook(model: nn.Module, hook_name: str, layers_path: str, n_layers: int) -> HookPoint:
    """Map a hook name to a :class:`HookPoint` or raise :class:`HookError`."""
    name = hook_name.strip() if isinstance(hook_name, str) else ""
    modules = dict(model.named_modules())

    def fail(reason: str) -> HookError:
        mid = n_layers // 2
        return HookError(
            f"hook {hook_name!r} {reason} in {type(model).__name__}; its layers are "
            f"{layers_path}.0 … {layers_path}.{n_layers - 1} ({n_layers} layers). Valid examples: "
            f"'{layers_path}.{mid}', 'blocks.{mid}.hook_resid_post', 'blocks.{mid}.hook_resid_pre'"
        )

    if not name:
        raise fail("is empty")
    tl = _TL_NAME.match(name)
    if tl:
        index = int(tl.group(1))
        if index >= n_layers:
            raise fail(f"names layer {index}, which does not exist")
        kind: HookKind = "output" if tl.group(2) == "post" else "input"
        return HookPoint(f"{layers_path}.{index}", kind, index)
    if name.startswith("blocks.") or ".hook_" in name:
        raise fail("is not a supported TransformerLens name (only blocks.L.hook_resid_pre/post)")

    path = _match_module_path(name, model, modules)
    if path is None:
        raise fail("does not exist")
    if path == "":
        raise fail("names the whole model")
    if isinstance(modules[path], nn.ModuleList | nn.ModuleDict):
        raise fail("names a list of modules, which never runs itself")
    layer: int | None = None
    prefix = layers_path + "."
    if path.startswith(prefix):
        head = path[len(prefix) :].split(".", 1)[0]
        if head.isdigit():
            layer = int(head)
    return HookPoint(path, "output", layer)


def _match_module_path(name: str, model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """Exact path; else with the base-model prefix added or removed (``layers.3`` <->
    ``model.layers.3``, ``transformer.h.6`` on a bare ``GPT2Model``)."""
    candidates = [name]
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        candidates.append(f"{prefix}.{name}")
        if name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
    for candidate in candidates:
        if candidate in modules:
            return candidate
    return None


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    out = getattr(value, "last_hidden_state", None)
    if isinstance(out, Tensor):
        return out
    raise HookError(f"the hooked module returned {type(value).__name__}, not a tensor")


def _pre_hook_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, Tensor):
        return value
    raise HookError("the hooked module was called without a hidden-state tensor input")


def capture(model: nn.Module, point: HookPoint, run: Callable[[], Any]) -> Tensor:
    """Run ``run()`` until ``point`` and return the tensor there; later modules never run."""
    module = model.get_submodule(point.module_path)
    store: list[Tensor] = []

    def on_output(_m: nn.Module, _args: Any, output: Any) -> None:
        store.append(_first_tensor(output))
        raise _StopForward

    def on_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        store.append(_pre_hook_input(args, kwargs))
        raise _StopForward

    if point.kind == "output":
        handle = module.register_forward_hook(on_output)
    else:
        handle = module.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        run()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not store:
        raise HookError(f"module {point.module_path!r} did not run during the forward pass")
    return store[0]


@contextmanager
def splice(model: nn.Module, point: HookPoint, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, the tensor at ``point`` is replaced by ``fn(tensor)``."""
    module = model.get_submodule(point.module_path)

    def replace(t: Tensor) -> Tensor:
        new = fn(t)
        if new.shape != t.shape:
            raise ValueError(
                f"splice function changed the shape {list(t.shape)} -> {list(new.shape)}"
            )
        return new.to(dtype=t.dtype, device=t.device)

    def on_output(_m: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return replace(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (replace(output[0]), *output[1:])
        raise HookError(
            f"cannot splice into the output of {point.module_path!r} ({type(output).__name__})"
        )

    def on_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args and isinstance(args[0], Tensor):
            return (replace(args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), Tensor):
            return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}
        raise HookError(f"cannot splice into the input of {point.module_path!r}")

    if point.kind == "output":
        handle = module.register_forward_hook(on_output)
    else:
        handle = module.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["KNOWN_LAYER_LISTS", "HookPoint", "capture", "find_layer_list", "resolve_hook", "splice"]
