"""Checkpoints: save the native format, load it and every format ``importers`` converts.

The native format is the SAELens v6 inference format plus ``kronsae`` (see
``shared/spec/checkpoint.md``): a folder with ``cfg.json``, ``sae_weights.safetensors`` and
optionally ``sparsity.safetensors``, or a ``.zip`` / ``.tar.gz`` of one such folder.

Design decisions:

- **Validate first.** Uploads are untrusted. A safetensors header is parsed here (length,
  JSON, dtypes, shapes, byte ranges) before the safetensors library sees the file; names,
  shapes and dtypes are checked against the configuration before tensor data is read;
  values are checked for NaN/Inf before an SAE is built. Each failure is a
  ``CheckpointError`` or ``ConfigError`` naming the file and the field.
- **No pickles**, except dictionary_learning's ``ae.pt`` through
  ``torch.load(weights_only=True)`` (``load_weights_only``). Anything needing a full
  unpickler is refused.
- **Atomic saves.** Files are written into a temporary folder beside the destination and
  renamed into place, so a crash never leaves a half-written checkpoint under its name.
- **Content hash.** ``checkpoint_hash`` digests the canonical configuration and tensors
  (not the file bytes), so the same checkpoint uploaded as a folder, a zip or a tar.gz,
  or saved again natively, is recognised.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import pickletools
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from . import REGISTRY, build
from .archive import (
    DEFAULT_MAX_BYTES,
    EXTRACT_PREFIX,
    archive_kind,
    extracted,
    split_archive_name,
    write_archive,
)
from .base import SAE
from .config import DTYPES, SAEConfig, normalise_dtype
from .errors import CheckpointError, ConfigError

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SPARSITY_TENSOR = "sparsity"
MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header accepted (the safetensors library's own limit, 100 MB)."""
MAX_JSON_BYTES = 16 * 1024**2
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
SOURCE_FORMATS = ("kronscope", "saelens", "saelens_legacy", "sparsify", "dictionary_learning")

# safetensors dtype codes: bytes per element, and the name used in messages.
_ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_ST_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ST_NAMES = {
    **_ST_FLOATS,
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64", "F64": "float64",
    "C64": "complex64", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip
_ACCEPTED = "float32, float16 or bfloat16"
_HASH_VERSION = b"kronscope-checkpoint-v1\x00"


# ---------------------------------------------------------------------------------------
# The result of a load
# ---------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` returns (the web upload stores all of it)."""

    sae: SAE
    """The SAE, on the requested device and dtype."""
    cfg: SAEConfig
    """Its configuration (``sae.cfg``), in the native layout."""
    source_format: str
    """``kronscope``, ``saelens``, ``saelens_legacy``, ``sparsify`` or ``dictionary_learning``."""
    files: dict[str, str]
    """Every file read, by its name in the checkpoint folder -> sha256 of its bytes."""
    sparsity: Tensor | None = None
    """[d_sae] log10 firing frequencies from ``sparsity.safetensors``, if present."""
    warnings: list[str] = field(default_factory=list)
    """Things worth telling the person who uploaded it (ignored tensors, guessed fields)."""
    sha256: str = ""
    """Content hash of the canonical configuration and tensors (``checkpoint_hash``)."""


# ---------------------------------------------------------------------------------------
# Reading files safely
# ---------------------------------------------------------------------------------------
class Budget:
    """Bytes of checkpoint files read so far, against ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, path: Path, name: str) -> int:
        size = path.stat().st_size
        if self.used + size > self.max_bytes:
            raise CheckpointError(
                f"is {size} bytes; with the files before it that exceeds the limit of "
                f"{self.max_bytes} bytes",
                file=name,
            )
        self.used += size
        return size


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json(path: Path, name: str, budget: Budget) -> dict[str, Any]:
    """A JSON object from ``path``; malformed JSON, NaN/Infinity or a non-object is refused."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(
            f"is {size} bytes; a configuration may have at most {MAX_JSON_BYTES}", file=name
        )
    budget.take(path, name)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise CheckpointError("is not UTF-8 text, so not valid JSON", file=name) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}", file=name
        ) from None
    except ValueError as e:
        raise CheckpointError(f"is not valid JSON: {e}", file=name) from None
    if not isinstance(data, dict):
        raise ConfigError(f"must hold a JSON object, not {type(data).__name__}", file=name)
    return data


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header, checked for consistency with the file."""

    name: str
    dtype: str
    """safetensors code: ``F32``, ``BF16``, ``I64``, ..."""
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype_name(self) -> str:
        return _ST_NAMES.get(self.dtype, self.dtype)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: Path, name: str, budget: Budget) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header ourselves, before the library sees the file.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data. Each
    tensor's ``data_offsets`` are relative to the data; together they must tile it exactly.
    """
    size = budget.take(path, name)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"is truncated: {len(head)} bytes, shorter than the 8-byte header length",
                file=name,
                field="header",
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"declares a header of {n} bytes, over the limit of {MAX_HEADER_BYTES} bytes (100 MB)",
                file=name,
                field="header length",
            )
        if 8 + n > size:
            raise CheckpointError(
                f"declares a header of {n} bytes but only {size - 8} bytes follow: the file is "
                "truncated or corrupt",
                file=name,
                field="header length",
            )
        raw = f.read(n)
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constants
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"is not valid JSON ({e})", file=name, field="header") from None
    if not isinstance(header, dict):
        raise CheckpointError("must be a JSON object", file=name, field="header")
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError("must map names to strings", file=name, field="__metadata__")
            continue
        if not isinstance(entry, dict):
            raise CheckpointError("header entry is not an object", file=name, field=key)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
            raise CheckpointError(f"has an unknown dtype {dtype!r}", file=name, field=key)
        if not isinstance(shape, list) or not all(_whole(s) for s in shape):
            raise CheckpointError(f"has an invalid shape {shape!r}", file=name, field=key)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_whole(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(f"has invalid data offsets {offsets!r}", file=name, field=key)
        begin, end = offsets
        if end > data_len:
            raise CheckpointError(
                f"data offsets [{begin}, {end}] run past the end of the file (it holds "
                f"{data_len} data bytes): truncated or corrupt",
                file=name,
                field=key,
            )
        nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if end - begin != nbytes:
            raise CheckpointError(
                f"byte range [{begin}, {end}) holds {end - begin} bytes, but a "
                f"{_ST_NAMES.get(dtype, dtype)} tensor of shape {shape} needs {nbytes}",
                file=name,
                field=key,
            )
        infos[key] = TensorInfo(key, dtype, tuple(shape), begin, end)
    pos = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != pos:
            what = "overlaps another tensor" if info.begin < pos else "leaves a gap before it"
            raise CheckpointError(
                f"byte range [{info.begin}, {info.end}) {what}: the tensor byte ranges are inconsistent",
                file=name,
                field=info.name,
            )
        pos = info.end
    if pos != data_len:
        raise CheckpointError(
            f"{data_len - pos} bytes after the last tensor belong to no tensor: the tensor "
            "byte ranges are inconsistent",
            file=name,
            field="data_offsets",
        )
    return infos


def read_safetensors(path: Path, name: str, names: Iterable[str]) -> dict[str, Tensor]:
    """The named tensors of a file whose header ``read_safetensors_header`` accepted."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {n: f.get_tensor(n) for n in names}
    except Exception as e:  # the library's errors have no common base class
        raise CheckpointError(f"cannot be read: {e}", file=name) from None


def check_info(info: TensorInfo, file: str, expected: tuple[int, ...], why: str) -> None:
    """Dtype and shape of a header entry against what the configuration needs."""
    if info.dtype not in _ST_FLOATS:
        raise CheckpointError(
            f"has dtype {info.dtype_name}; only {_ACCEPTED} tensors are accepted",
            file=file,
            field=info.name,
        )
    if info.shape != tuple(expected):
        raise CheckpointError(
            f"has shape {list(info.shape)}, but {why} needs {list(expected)}",
            file=file,
            field=info.name,
        )


def check_tensor(
    t: Any, file: str, name: str, expected: tuple[int, ...] | None, why: str
) -> Tensor:
    """Type, dtype, shape and finiteness of a tensor from a state dict."""
    if not isinstance(t, Tensor):
        raise CheckpointError(f"is a {type(t).__name__}, not a tensor", file=file, field=name)
    if t.dtype not in DTYPES.values():
        raise CheckpointError(
            f"has dtype {str(t.dtype).removeprefix('torch.')}; only {_ACCEPTED} tensors are accepted",
            file=file,
            field=name,
        )
    if expected is not None and tuple(t.shape) != tuple(expected):
        raise CheckpointError(
            f"has shape {list(t.shape)}, but {why} needs {list(expected)}", file=file, field=name
        )
    check_finite(t, file, name)
    return t


def check_finite(t: Tensor, file: str, name: str, *, allow_neg_inf: bool = False) -> None:
    """No NaN and no infinity (``-inf`` allowed for log10 frequencies of dead latents)."""
    nan = int(torch.isnan(t).sum())
    inf = int((t == math.inf).sum()) + (0 if allow_neg_inf else int((t == -math.inf).sum()))
    if nan or inf:
        what = " and ".join(
            part for part, n in ((f"{nan} NaN", nan), (f"{inf} infinite", inf)) if n
        )
        raise CheckpointError(f"contains {what} value(s)", file=file, field=name)


def require_tensors(
    infos: dict[str, TensorInfo], file: str, expected: dict[str, tuple[int, ...]], why: str
) -> list[str]:
    """Check presence, dtype and shape of every expected tensor; return the unknown extras."""
    missing = [k for k in expected if k not in infos]
    if missing:
        raise CheckpointError(
            f"tensor is missing (this checkpoint needs {', '.join(expected)})",
            file=file,
            field=missing[0],
        )
    for key, shape in expected.items():
        check_info(infos[key], file, shape, why)
    return [k for k in infos if k not in expected]


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of ``cfg``'s architecture, without allocating any memory."""
    return REGISTRY[cfg.architecture](cfg, device="meta").tensor_shapes()


def describe_dims(cfg: SAEConfig, file: str = CFG_FILENAME) -> str:
    """``cfg.json (d_in = 16, d_sae = 64)``: the sizes a shape message refers to."""
    dims = f"d_in = {cfg.d_in}, d_sae = {cfg.d_sae}"
    if cfg.architecture == "kronsae":
        dims += f", h = {cfg.h}, m = {cfg.m}, n = {cfg.n}"
    return f"{file} ({dims})"


# ---------------------------------------------------------------------------------------
# Pickles: dictionary_learning's ae.pt only, as plain tensors
# ---------------------------------------------------------------------------------------
_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode")


def _pickle_globals(path: Path) -> list[str]:
    """Best effort, for the error message only: the globals a pickle refers to."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next(n for n in zf.namelist() if n.endswith("data.pkl"))
                data = zf.read(member)
        else:
            data = path.read_bytes()
        found: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
        return [g for g in dict.fromkeys(found) if not g.startswith(_SAFE_GLOBAL_PREFIXES)]
    except Exception:
        return []


def load_weights_only(path: Path, name: str, budget: Budget) -> dict[str, Any]:
    """A PyTorch state dict through ``torch.load(weights_only=True)``; nothing else is unpickled."""
    size = budget.take(path, name)
    if zipfile.is_zipfile(path):  # torch's own format is a zip: refuse bombs inside it
        try:
            with zipfile.ZipFile(path) as zf:
                declared = sum(i.file_size for i in zf.infolist())
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"cannot be read ({e})", file=name) from None
        if declared > budget.max_bytes or declared > 1000 * max(size, 1) + 1024**2:
            raise CheckpointError(f"expands to {declared} bytes; refused", file=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        found = _pickle_globals(path)
        detail = f" (it refers to {', '.join(found[:3])})" if found else ""
        raise CheckpointError(
            f"needs a full Python unpickler to load{detail}. Unpickling can run arbitrary code, "
            "so only plain state dicts of tensors are read; this file is refused",
            file=name,
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"cannot be read as a PyTorch state dict ({type(e).__name__}: {e})", file=name
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(
            "does not hold a state dict (a mapping of names to tensors)", file=name
        )
    return obj


# ---------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------
def _tensor_bytes(t: Tensor) -> memoryview:
    """The tensor's bytes (native little-endian order), without a copy when already on CPU."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


def _digest(cfg: SAEConfig, tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256(_HASH_VERSION)
    h.update(
        json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    )
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\x00{name}\x00{t.dtype!s}\x00{list(t.shape)}\x00".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def checkpoint_hash(source: SAE | LoadedCheckpoint | str | Path) -> str:
    """sha256 of an SAE's canonical configuration (``cfg.to_dict()``) and tensors.

    Independent of the file layout and container: the same checkpoint as a folder, a zip,
    a tar.gz or re-saved natively hashes the same. The sparsity statistics are not part of
    it. For a path the checkpoint is loaded first."""
    if isinstance(source, LoadedCheckpoint):
        return source.sha256
    if isinstance(source, str | Path):
        return load_checkpoint(source).sha256
    return _digest(source.cfg, source.state_tensors())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024**2), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
def load(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> SAE:
    """Load any supported checkpoint (folder, .zip, .tar.gz) as an SAE. See ``load_checkpoint``."""
    return load_checkpoint(path, device=device, dtype=dtype, max_bytes=max_bytes).sae


def load_checkpoint(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    tmp_dir: str | Path | None = None,
) -> LoadedCheckpoint:
    """Read, validate and convert a checkpoint in any supported format.

    ``path``: a checkpoint folder (native / SAELens v6 or older, sparsify,
    dictionary_learning), a folder holding exactly one such folder, one of the checkpoint's
    files, or a .zip / .tar.gz / .tgz of either (detected from its bytes). ``dtype``
    overrides the checkpoint's dtype. ``max_bytes`` bounds the files read and an archive's
    extracted contents. Archives are extracted into a temporary folder under ``tmp_dir``
    that is removed before this returns.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError("does not exist", file=str(path))
    if path.is_file():
        if path.name in _known_files():
            return _load_folder(path.parent, device, dtype, max_bytes)
        if path.suffix.lower() in PICKLE_SUFFIXES:  # torch.save files are zips too
            raise CheckpointError(
                "is a pickle file; pickles are never loaded (except dictionary_learning's ae.pt "
                "beside its config.json, as plain tensors)",
                file=path.name,
            )
        if archive_kind(path) is not None:
            with extracted(path, max_bytes=max_bytes, tmp_dir=tmp_dir) as root:
                return _load_folder(root, device, dtype, max_bytes, temp_root=True)
        raise CheckpointError(
            "is neither a checkpoint folder nor a .zip / .tar.gz archive", file=path.name
        )
    return _load_folder(path, device, dtype, max_bytes)


def _known_files() -> tuple[str, ...]:
    from .importers import KNOWN_FILES

    return KNOWN_FILES


def _cast(tensors: dict[str, Tensor], cfg: SAEConfig, file: str | None) -> dict[str, Tensor]:
    """Tensors in ``cfg.dtype``; a value that overflows the narrower dtype is an error."""
    out = {}
    for name, t in tensors.items():
        cast = t.to(cfg.torch_dtype)
        if cast.dtype != t.dtype and not bool(torch.isfinite(cast).all()):
            raise CheckpointError(
                f"has values too large for {cfg.dtype}; load it with a wider dtype",
                file=file,
                field=name,
            )
        out[name] = cast
    return out


def _load_folder(
    folder: Path,
    device: torch.device | str,
    dtype: str | torch.dtype | None,
    max_bytes: int,
    *,
    temp_root: bool = False,
) -> LoadedCheckpoint:
    from .importers import find_root, read_folder

    root = find_root(folder)
    hint = None if temp_root and root == folder else root.name
    if hint is not None and hint.startswith(EXTRACT_PREFIX):
        hint = None
    imported = read_folder(root, Budget(max_bytes), name_hint=hint)
    weights = next((n for n in imported.files if not n.endswith(".json")), None)
    cfg = imported.cfg
    canonical = _cast(imported.tensors, cfg, weights)
    sha = _digest(cfg, canonical)
    files = {name: file_sha256(p) for name, p in imported.files.items()}
    if dtype is not None and normalise_dtype(str(dtype)) != cfg.dtype:
        cfg = copy.deepcopy(cfg)
        cfg.dtype = normalise_dtype(str(dtype))
        canonical = _cast(imported.tensors, cfg, weights)
    sae = build(cfg, device=device)
    sae.load_tensors(canonical)
    return LoadedCheckpoint(
        sae=sae,
        cfg=sae.cfg,
        source_format=imported.source_format,
        files=files,
        sparsity=imported.sparsity,
        warnings=imported.warnings,
        sha256=sha,
    )


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------
def _archive_target(path: Path, archive: str | None) -> tuple[Path, str | None, str]:
    """(final path, archive kind or None, name of the folder inside)."""
    stem, kind = split_archive_name(path.name)
    if archive is None:
        return path, kind, stem
    if archive not in ("zip", "tar.gz"):
        raise ValueError(f"archive must be 'zip' or 'tar.gz', not {archive!r}")
    if kind is not None and kind != archive:
        raise ValueError(f"{path.name} does not end in .{archive}")
    if kind is None:
        path = path.with_name(f"{path.name}.{archive}")
    return path, archive, stem


def _fsync_folder(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def save(
    sae: SAE,
    path: str | Path,
    *,
    sparsity: Tensor | None = None,
    archive: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``sae`` in the native format and return the path written.

    A folder (``cfg.json``, ``sae_weights.safetensors`` [+ ``sparsity.safetensors``]), or,
    with ``archive="zip"`` / ``"tar.gz"`` or a path ending in .zip / .tar.gz / .tgz, an
    archive of one such folder. Everything is validated and written into a temporary folder
    beside ``path`` first, then renamed into place. An existing ``path`` is replaced only
    with ``overwrite=True``.
    """
    target, kind, stem = _archive_target(Path(path), archive)
    cfg_dict, tensors, sparse = _prepare(sae, sparsity)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        folder = work / stem if kind else work / "checkpoint"
        folder.mkdir()
        (folder / CFG_FILENAME).write_text(json.dumps(cfg_dict, indent=2, allow_nan=False) + "\n")
        save_file(tensors, str(folder / WEIGHTS_FILENAME), metadata={"format": "pt"})
        if sparse is not None:
            save_file(
                {SPARSITY_TENSOR: sparse},
                str(folder / SPARSITY_FILENAME),
                metadata={"format": "pt"},
            )
        _fsync_folder(folder)
        if kind:
            packed = work / f"archive.{kind}"
            write_archive(folder, packed, kind)
            os.replace(packed, target)
        elif target.exists():
            # overwrite: move the old one aside, the new one in; the old goes with `work`
            old = work / "old"
            os.rename(target, old)
            os.rename(folder, target)
        else:
            os.rename(folder, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


save_checkpoint = save


def _prepare(
    sae: SAE, sparsity: Tensor | None
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """Validate and serialise everything in memory before a byte is written."""
    cfg = sae.cfg
    cfg.validate(CFG_FILENAME)
    cfg_dict = cfg.to_dict()
    actual = str(sae.dtype).removeprefix("torch.")
    if actual not in DTYPES:
        raise CheckpointError(
            f"the SAE's parameters are {actual}; save it as {_ACCEPTED}", field="dtype"
        )
    cfg_dict["dtype"] = actual  # the file describes the tensors as they are
    try:
        json.dumps(cfg_dict, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot be written as JSON: {e}", file=CFG_FILENAME) from None
    expected = expected_shapes(cfg)
    state = sae.state_tensors()
    tensors: dict[str, Tensor] = {}
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(
                "tensor is missing from the SAE", file=WEIGHTS_FILENAME, field=name
            )
        t = check_tensor(state[name], WEIGHTS_FILENAME, name, shape, describe_dims(cfg))
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    sparse = None
    if sparsity is not None:
        if not isinstance(sparsity, Tensor) or sparsity.dtype not in DTYPES.values():
            raise CheckpointError(
                f"must be a {_ACCEPTED} tensor", file=SPARSITY_FILENAME, field=SPARSITY_TENSOR
            )
        if tuple(sparsity.shape) != (cfg.d_sae,):
            raise CheckpointError(
                f"has shape {list(sparsity.shape)}, but d_sae = {cfg.d_sae} needs [{cfg.d_sae}]",
                file=SPARSITY_FILENAME,
                field=SPARSITY_TENSOR,
            )
        check_finite(sparsity, SPARSITY_FILENAME, SPARSITY_TENSOR, allow_neg_inf=True)
        sparse = sparsity.detach().to("cpu").contiguous().clone()
    return cfg_dict, tensors, sparse
