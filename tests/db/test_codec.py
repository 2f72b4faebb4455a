"""Binary encodings of per-token arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kronscope.db.codec import (
    F16_MAX,
    pack_f16,
    pack_f16_rows,
    pack_i32,
    pack_i64,
    unpack_f16,
    unpack_i32,
    unpack_i64,
)


def test_f16_round_trip_and_size() -> None:
    rng = np.random.default_rng(0)
    values = rng.gamma(1.0, 2.0, size=128).astype(np.float32)
    data = pack_f16(values)
    assert len(data) == 2 * 128
    back = unpack_f16(data)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, values, rtol=1e-3, atol=1e-3)
    assert pack_f16(back) == data  # float16 values survive exactly


def test_f16_is_little_endian_and_clips() -> None:
    assert pack_f16([1.0]) == b"\x00\x3c"
    back = unpack_f16(pack_f16([1e6, -1e6, np.nan, 0.0]))
    assert back[0] == F16_MAX and back[1] == -F16_MAX
    assert np.isnan(back[2]) and back[3] == 0.0


def test_f16_accepts_torch_and_lists() -> None:
    t = torch.tensor([0.5, 1.5, 2.5], dtype=torch.bfloat16)
    assert pack_f16(t) == pack_f16([0.5, 1.5, 2.5])
    assert pack_f16([]) == b""
    assert unpack_f16(b"").shape == (0,)


def test_f16_rows_match_single_rows() -> None:
    rows = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    assert pack_f16_rows(rows) == [pack_f16(r) for r in rows]
    with pytest.raises(ValueError):
        pack_f16_rows(rows[0])


def test_i32_round_trip() -> None:
    ids = np.array([0, 1, 50256, 2**31 - 1, -1], dtype=np.int64)
    data = pack_i32(ids)
    assert len(data) == 4 * len(ids)
    assert data[:4] == b"\x00\x00\x00\x00" and data[4:8] == b"\x01\x00\x00\x00"
    back = unpack_i32(data)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, ids)
    back[0] = 7  # writable copy, not a view of the bytes


def test_i32_rejects_overflow_and_floats() -> None:
    with pytest.raises(ValueError):
        pack_i32([2**31])
    with pytest.raises(TypeError):
        pack_i32([1.5])


def test_i64_round_trip() -> None:
    counts = [0, 3, 2**40, 7]
    np.testing.assert_array_equal(unpack_i64(pack_i64(counts)), counts)
