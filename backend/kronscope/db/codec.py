"""Compact binary encodings of per-token arrays stored in BLOB/bytea columns.

All little endian, whatever the machine:
- ``pack_f16``: an example's values, one float16 per token (2 bytes). Values beyond the
  float16 range (|x| > 65504) are clipped to it rather than stored as infinity; NaN stays NaN.
- ``pack_i32``: a context's token ids (4 bytes a token).
- ``pack_i64``: histogram counts (exact for any corpus size).
"""

from __future__ import annotations

from typing import Any

import numpy as np

F16_MAX = float(np.finfo(np.float16).max)  # 65504.0


def _as_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu()
        if values.is_floating_point():  # bfloat16 has no numpy dtype
            values = values.float()
        values = values.numpy()
    return np.asarray(values)


def to_float32(values: Any) -> np.ndarray:
    """Any 1-D float values (list, numpy, torch of any float dtype) as a float32 array."""
    return _as_numpy(values).astype(np.float32, copy=False).reshape(-1)


def pack_f16(values: Any) -> bytes:
    """1-D float values -> float16 little-endian bytes."""
    arr = to_float32(values)
    arr = np.clip(arr, -F16_MAX, F16_MAX)
    return arr.astype("<f2").tobytes()


def pack_f16_rows(values: Any) -> list[bytes]:
    """A ``[rows, tokens]`` array -> one float16 blob per row (one conversion for all rows)."""
    arr = _as_numpy(values).astype(np.float32, copy=False)
    if arr.ndim != 2:
        raise ValueError(f"a 2-D array is expected, got shape {arr.shape}")
    data = np.clip(arr, -F16_MAX, F16_MAX).astype("<f2").tobytes()
    width = 2 * arr.shape[1]
    return [data[i * width : (i + 1) * width] for i in range(arr.shape[0])]


def unpack_f16(data: bytes | memoryview, dtype: Any = np.float32) -> np.ndarray:
    """float16 little-endian bytes -> a writable 1-D array (``float32`` unless asked)."""
    return np.frombuffer(data, dtype="<f2").astype(dtype)


def _pack_int(values: Any, code: str) -> bytes:
    arr = _as_numpy(values).reshape(-1)
    if arr.size and arr.dtype.kind not in "iub":
        raise TypeError(f"integer values expected, got {arr.dtype}")
    info = np.iinfo(np.dtype(code))
    if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
        raise ValueError(f"values outside the {np.dtype(code).name} range")
    return arr.astype(code).tobytes()


def pack_i32(values: Any) -> bytes:
    """1-D integers (token ids) -> int32 little-endian bytes; out-of-range values raise."""
    return _pack_int(values, "<i4")


def unpack_i32(data: bytes | memoryview) -> np.ndarray:
    return np.frombuffer(data, dtype="<i4").astype(np.int32)


def pack_i64(values: Any) -> bytes:
    """1-D integers (histogram counts) -> int64 little-endian bytes."""
    return _pack_int(values, "<i8")


def unpack_i64(data: bytes | memoryview) -> np.ndarray:
    return np.frombuffer(data, dtype="<i8").astype(np.int64)
