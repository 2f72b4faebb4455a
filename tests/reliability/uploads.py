"""Suite 1: a generated corpus of malformed uploads sent to ``POST /api/v1/saes``.

Every upload must be refused with a 4xx (never a 5xx) in the one error shape, with a
message in plain words, and must store NOTHING: the rows of every table and the entries
under ``data_dir`` are compared before and after each one, and no file may appear outside
it (zip-slip, absolute paths) nor any pickle payload run.

The corpus is the 56 library-level cases of ``tests/sae/test_bad_checkpoints.py`` (its
builders, imported, sent as files or archives), plus cases that only exist at the HTTP
level or that it lacks: truncated and hostile safetensors headers, inconsistent cfg.json
values, pickles under other names, nested and empty archives, bombs, links, wrong content
types, bad multipart bodies, oversized bodies (413), bad form fields, unknown models and
missing or weak keys.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import os
import pickle
import stat
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ._support import (
    HOOK,
    MODEL,
    SuiteResult,
    count_rows,
    error_shape_problem,
    make_checkpoint,
    tree_state,
)

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
OCTET = "application/octet-stream"
MAX_UPLOAD_BYTES = 128 * 1024
"""The app's upload limit during this suite (small: oversized bodies are cheap to send).
How far the server lets an archive expand is its own choice (a multiple of this with a
floor); the bombs below expand to ``BOMB_BYTES``, far beyond any sensible floor."""
BOMB_BYTES = 100 * 1024**2
"""What the bombs expand to: 100 MiB of zeros, about 100 KiB compressed."""
DEFAULT_MAX_BYTES = 8 * 1024**3
EVIL_ABSOLUTE = "/tmp/kronscope-reliability-evil"

Part = tuple[str, tuple[str, bytes, str]]


@dataclass
class Upload:
    """One malformed upload."""

    name: str
    group: str
    parts: list[Part] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    content: bytes | Callable[[], Iterator[bytes]] | None = None
    """A raw body instead of multipart (bytes, or a generator factory: chunked, no length)."""
    content_type: str | None = None
    key: str = "upload"
    """Which key to send: upload, none, invalid, noscope, basic."""
    status: int | tuple[int, ...] | None = None
    """The expected status; None: any 4xx."""
    expect: list[str] = field(default_factory=list)
    """Substrings the error message must contain."""
    setup: Callable[[Any, dict[str, str]], None] | None = None
    """Runs before the 'before' snapshot (e.g. uploads the original of a duplicate)."""


# -- the library's cases ---------------------------------------------------------------------------
def load_library_cases() -> ModuleType:
    """``tests/sae/test_bad_checkpoints.py``, imported under a private name."""
    path = Path(__file__).resolve().parents[1] / "sae" / "test_bad_checkpoints.py"
    name = "_reliability_bad_checkpoints"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def path_parts(path: Path) -> list[Part]:
    if path.is_dir():
        return [
            ("files", (p.name, p.read_bytes(), OCTET))
            for p in sorted(path.iterdir())
            if p.is_file()
        ]
    return [("files", (path.name, path.read_bytes(), OCTET))]


def library_uploads(work: Path) -> list[Upload]:
    from kronscope.services.sae_registry import ARCHIVE_SUFFIXES, CHECKPOINT_FILES

    module = load_library_cases()
    out = []
    for i, (name, case) in enumerate(module.CASES.items()):
        if case.max_bytes < 1024**2:
            continue  # a limit far below anything the server would use
        path = case.build(work / f"lib-{i:02d}")
        parts = path_parts(path)
        names = [p[1][0] for p in parts]
        odd = [
            n
            for n in names
            if n not in CHECKPOINT_FILES and not n.lower().endswith(ARCHIVE_SUFFIXES)
        ]
        # A file the API refuses by its name is refused before the library sees it.
        expect = [odd[0]] if odd else list(case.expect)
        if case.max_bytes != DEFAULT_MAX_BYTES:
            # Written for a lower size limit than the server's: refused, maybe for another reason.
            expect = []
        out.append(Upload(f"library: {name}", "library", parts, expect=expect))
    return out


# -- building blocks -----------------------------------------------------------------------------
class Payload:
    """Unpickling this calls ``fn(*args)``."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


def st_header(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_bytes(header: dict[str, Any], data: bytes, length: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def zip_bytes(
    members: list[tuple[str, bytes, int | None]], method: int = zipfile.ZIP_DEFLATED
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def tinfo(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def zeros_gz_stream(total: int) -> bytes:
    """A gzip stream of ``total`` zero bytes, compressed in pieces (bounded memory)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        chunk = b"\x00" * (1024**2)
        for _ in range(total // len(chunk)):
            gz.write(chunk)
    return buf.getvalue()


def tar_bomb(total: int) -> bytes:
    """A tar.gz whose one member (cfg.json) is ``total`` zeros, compressed in pieces."""
    header = tinfo("sae/cfg.json")
    header.size = total
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz:
        gz.write(header.tobuf(format=tarfile.GNU_FORMAT))
        chunk = b"\x00" * (1024**2)
        for _ in range(total // len(chunk)):
            gz.write(chunk)
        gz.write(b"\x00" * 1024)  # end-of-archive blocks
    return raw.getvalue()


def zip_bomb(total: int) -> bytes:
    """A zip whose one member is ``total`` zeros, written in pieces."""
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open("sae/cfg.json", "w", force_zip64=True) as member,
    ):
        chunk = b"\x00" * (1024**2)
        for _ in range(total // len(chunk)):
            member.write(chunk)
    return buf.getvalue()


# -- the HTTP-level corpus ---------------------------------------------------------------------------
def http_uploads(work: Path, markers: Path) -> list[Upload]:
    import torch
    from safetensors.torch import load_file, save_file

    seeds = iter(range(1000, 100000))
    base = work / "http"

    def good(**kw: Any) -> Path:
        return make_checkpoint(base / f"good-{next(seeds)}", seed=next(seeds), **kw)

    def files_of(folder: Path, **replace: bytes | None) -> list[Part]:
        out: list[Part] = []
        for p in sorted(folder.iterdir()):
            data = replace[p.name] if p.name in replace else p.read_bytes()
            if data is not None:
                out.append(("files", (p.name, data, OCTET)))
        return out

    def cfg_of(folder: Path) -> dict[str, Any]:
        return json.loads((folder / CFG).read_text())

    def with_cfg(
        name: str, arch: str = "kronsae", drop: tuple[str, ...] = (), **changes: Any
    ) -> Upload:
        folder = good(architecture=arch) if arch != "kronsae" else good()
        cfg = cfg_of(folder)
        for key in drop:
            cfg.pop(key, None)
        cfg.update(changes)
        return Upload(f"cfg: {name}", "cfg", files_of(folder, **{CFG: json.dumps(cfg).encode()}))

    def raw_cfg(name: str, raw: bytes) -> Upload:
        return Upload(f"cfg: {name}", "cfg", files_of(good(), **{CFG: raw}))

    def weights(name: str, fn: Callable[[dict[str, Any]], object], arch: str = "kronsae") -> Upload:
        folder = good(architecture=arch) if arch != "kronsae" else good()
        tensors = load_file(folder / WEIGHTS)
        fn(tensors)
        target = base / f"w-{next(seeds)}.safetensors"
        save_file(tensors, target)
        return Upload(
            f"tensors: {name}", "tensors", files_of(folder, **{WEIGHTS: target.read_bytes()})
        )

    def header(name: str, fn: Callable[[dict[str, Any], bytes], bytes]) -> Upload:
        folder = good()
        h, data = st_header((folder / WEIGHTS).read_bytes())
        return Upload(
            f"safetensors: {name}", "safetensors", files_of(folder, **{WEIGHTS: fn(h, data)})
        )

    def raw_weights(name: str, fn: Callable[[bytes], bytes]) -> Upload:
        folder = good()
        return Upload(
            f"safetensors: {name}", "safetensors",
            files_of(folder, **{WEIGHTS: fn((folder / WEIGHTS).read_bytes())}),
        )  # fmt: skip

    def members(folder: Path, prefix: str = "sae/") -> list[tuple[str, bytes, int | None]]:
        return [(f"{prefix}{p.name}", p.read_bytes(), None) for p in sorted(folder.iterdir())]

    def archive(name: str, filename: str, data: bytes, **kw: Any) -> Upload:
        return Upload(f"archive: {name}", "archive", [("files", (filename, data, OCTET))], **kw)

    def set_(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
        def fn(t: dict[str, Any]) -> None:
            t[key] = value

        return fn

    def poke(key: str, index: tuple[int, ...], value: float) -> Callable[[dict[str, Any]], None]:
        def fn(t: dict[str, Any]) -> None:
            t[key][index] = value

        return fn

    def shape(key: str, new: list[int]) -> Callable[[dict[str, Any], bytes], bytes]:
        def fn(h: dict[str, Any], data: bytes) -> bytes:
            h[key]["shape"] = new
            return st_bytes(h, data)

        return fn

    def offsets(key: str, new: list[int]) -> Callable[[dict[str, Any], bytes], bytes]:
        def fn(h: dict[str, Any], data: bytes) -> bytes:
            h[key]["data_offsets"] = new
            return st_bytes(h, data)

        return fn

    cases: list[Upload] = []
    add = cases.append

    # -- safetensors structure
    add(raw_weights("truncated in the middle of the data", lambda b: b[: len(b) // 2]))
    add(raw_weights("truncated to the last byte", lambda b: b[:-1]))
    add(raw_weights("empty file", lambda b: b""))
    add(raw_weights("shorter than the length field", lambda b: b[:5]))
    add(raw_weights("header length 2**64-1", lambda b: struct.pack("<Q", 2**64 - 1) + b[8:]))
    add(raw_weights("header length 0", lambda b: struct.pack("<Q", 0) + b[8:]))
    add(raw_weights("header length just past EOF", lambda b: struct.pack("<Q", len(b)) + b[8:]))
    add(raw_weights("oversized header length (1 GB)", lambda b: struct.pack("<Q", 10**9) + b[8:]))
    add(
        raw_weights(
            "header is not JSON", lambda b: struct.pack("<Q", 14) + b"\xff\xfe garbage!!\x00\x01"
        )
    )
    add(raw_weights("header is a JSON array", lambda b: st_bytes([1, 2, 3], b"")))  # type: ignore[arg-type]
    add(raw_weights("random bytes", lambda b: os.urandom(len(b))))
    add(header("negative data offsets", offsets("b_dec", [-64, 64])))
    add(header("offsets reversed", offsets("W_enc", [4096, 0])))
    add(header("huge shape (overflowing)", shape("W_dec", [2**40, 2**40])))
    add(header("negative shape", shape("b_dec", [-32])))
    add(header("shape not a list", shape("b_dec", "32")))  # type: ignore[arg-type]
    add(header("dtype not a string", lambda h, d: (h["b_enc"].update(dtype=7), st_bytes(h, d))[1]))
    add(header("tensor entry not an object", lambda h, d: (h.update(b_enc=[1]), st_bytes(h, d))[1]))

    # -- tensors vs cfg
    add(weights("W_enc of a TopK (d_in x F) in a KronSAE", set_("W_enc", torch.zeros(32, 16))))
    add(weights("b_enc one too short", set_("b_enc", torch.zeros(11))))
    add(weights("W_dec transposed", lambda t: t.update(W_dec=t["W_dec"].T.contiguous())))
    add(weights("extra dimension", set_("b_dec", torch.zeros(32, 1))))
    add(weights("scalar tensor", set_("b_dec", torch.tensor(1.0))))
    add(weights("bool tensor", set_("b_dec", torch.zeros(32, dtype=torch.bool))))
    add(weights("int8 tensor", set_("b_dec", torch.zeros(32, dtype=torch.int8))))
    add(weights("int64 tensor", set_("W_dec", torch.zeros(16, 32, dtype=torch.int64))))
    add(weights("every tensor float64", lambda t: t.update({k: v.double() for k, v in t.items()})))
    add(weights("NaN in W_dec", poke("W_dec", (3, 4), float("nan"))))
    add(weights("-Inf in b_enc", poke("b_enc", (0,), float("-inf"))))
    add(weights("+Inf in W_enc", poke("W_enc", (31, 11), float("inf"))))
    add(
        weights(
            "all NaN",
            lambda t: t.update({k: torch.full_like(v, float("nan")) for k, v in t.items()}),
        )
    )
    add(weights("NaN in a TopK", poke("W_enc", (0, 0), float("nan")), arch="topk"))
    add(weights("no tensors at all", lambda t: t.clear()))

    # -- cfg.json values
    add(with_cfg("d_in disagrees with the tensors", d_in=64))
    add(with_cfg("F != h*m*n", h=4))
    add(with_cfg("m > n", m=4, n=2))
    add(with_cfg("k > F", k=17))
    add(with_cfg("k = 0", k=0))
    add(with_cfg("k < 0", k=-3))
    add(with_cfg("k is text", k="2"))
    add(with_cfg("k is fractional", k=2.5))
    add(with_cfg("k is a boolean", k=True))
    add(with_cfg("d_in missing", drop=("d_in",)))
    add(with_cfg("d_sae missing", drop=("d_sae",)))
    add(with_cfg("architecture missing", drop=("architecture",)))
    add(with_cfg("h missing (KronSAE)", drop=("h",)))
    add(with_cfg("d_in is text", d_in="32"))
    add(with_cfg("d_in is null", d_in=None))
    add(with_cfg("d_in negative", d_in=-32))
    add(with_cfg("huge d_sae (1e30)", d_sae=10**30))
    add(with_cfg("huge h (2**62)", h=2**62))
    add(with_cfg("huge d_in (2**63)", d_in=2**63))
    add(with_cfg("unknown composition", composition="xor"))
    add(with_cfg("unknown architecture", architecture="transcoder"))
    add(with_cfg("dtype float64", dtype="float64"))
    add(with_cfg("normalize without a factor", normalize_activations="expected_average_only_in"))
    add(
        with_cfg(
            "negative norm factor",
            normalize_activations="expected_average_only_in",
            norm_scaling_factor=-1.0,
        )
    )
    add(with_cfg("unknown normalize_activations", normalize_activations="sometimes"))
    add(with_cfg("metadata not an object", metadata="tiny-gpt2"))
    add(with_cfg("model_name a number", metadata={"model_name": 123, "hook_name": HOOK}))
    add(raw_cfg("empty file", b""))
    add(raw_cfg("null", b"null"))
    add(raw_cfg("a JSON string", b'"kronsae"'))
    add(raw_cfg("a JSON array", b'[{"architecture": "kronsae"}]'))
    add(raw_cfg("truncated JSON", b'{"architecture": "kronsae", "d_in": 3'))
    add(raw_cfg("Infinity in JSON", b'{"architecture": "kronsae", "d_in": Infinity}'))
    add(raw_cfg("nested 25,000 deep", b"[" * 25_000 + b"]" * 25_000))
    add(raw_cfg("not UTF-8", b'{"architecture": "\xff\xfe\xfd"}'))
    add(raw_cfg("UTF-16", json.dumps({"architecture": "kronsae"}).encode("utf-16")))

    # -- subject model and hook
    add(Upload("model: unknown model name", "model", files_of(good(model="no-such-model"))))
    add(
        Upload(
            "model: hub id without hub access", "model", files_of(good(model="gpt2-org/gpt2-xl"))
        )
    )
    add(
        Upload(
            "model: path in model_name", "model", files_of(good()), {"model_name": "../../../etc"}
        )
    )
    add(
        Upload(
            "model: absolute path in model_name", "model", files_of(good()), {"model_name": "/work"}
        )
    )
    add(
        Upload(
            "model: model_name 600 characters", "model", files_of(good()), {"model_name": "m" * 600}
        )
    )
    add(Upload("model: no model name", "model", files_of(good(model=None))))
    add(Upload("model: no hook name", "model", files_of(good(hook=None))))

    # -- form fields (with a valid, never-uploaded checkpoint)
    add(Upload("form: slug with a path", "form", files_of(good()), {"slug": "../evil"}, status=422))
    add(Upload("form: slug in capitals", "form", files_of(good()), {"slug": "UPPER"}, status=422))
    add(
        Upload(
            "form: slug 200 characters", "form", files_of(good()), {"slug": "s" * 200}, status=422
        )
    )
    add(Upload("form: harvest=maybe", "form", files_of(good()), {"harvest": "maybe"}, status=422))
    add(
        Upload(
            "form: harvest_tokens negative",
            "form",
            files_of(good()),
            {"harvest": "true", "harvest_tokens": "-5"},
            status=422,
        )
    )
    add(
        Upload(
            "form: harvest_tokens not a number",
            "form",
            files_of(good()),
            {"harvest_tokens": "lots"},
            status=422,
        )
    )
    add(
        Upload(
            "form: harvest_ctx_len 1",
            "form",
            files_of(good()),
            {"harvest_ctx_len": "1"},
            status=422,
        )
    )
    add(
        Upload(
            "form: harvest_corpus a path",
            "form",
            files_of(good()),
            {"harvest": "true", "harvest_corpus": "../../etc/passwd"},
            status=422,
        )
    )
    add(Upload("form: field over 64 KiB", "form", files_of(good()), {"slug": "x" * (65 * 1024)}))
    add(Upload("form: 60 form fields", "form", files_of(good()), {f"f{i}": "x" for i in range(60)}))

    taken = good()
    twin = good()

    def upload_taken(client: Any, headers: dict[str, str]) -> None:
        r = client.post(
            "/api/v1/saes", files=files_of(taken), data={"slug": "taken-slug"}, headers=headers
        )
        assert r.status_code == 201, r.text

    add(
        Upload(
            "form: slug taken (409)",
            "form",
            files_of(twin),
            {"slug": "taken-slug"},
            status=409,
            setup=upload_taken,
        )
    )
    add(
        Upload(
            "form: same checkpoint again (409)",
            "form",
            files_of(taken),
            status=409,
            expect=["already uploaded"],
        )
    )

    # -- pickles
    def pickle_case(
        name: str, filename: str, payload: Any, extra: list[Part] | None = None
    ) -> Upload:
        return Upload(
            f"pickle: {name}", "pickle",
            [("files", (filename, payload, OCTET)), *(extra or [])],
        )  # fmt: skip

    dl_config = (
        Path(__file__).resolve().parents[1]
        / "fixtures"
        / "peers"
        / "dictionary_learning_topk"
        / "config.json"
    ).read_bytes()
    cfg_part: Part = ("files", ("config.json", dl_config, OCTET))

    def marker(tag: str) -> str:
        return str(markers / f"PWNED-{tag}")

    def torch_payload(obj: Any) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    add(
        pickle_case(
            "ae.pt raw pickle, os.system",
            "ae.pt",
            pickle.dumps({"encoder.weight": Payload(os.system, f"touch {marker('system')}")}),
            [cfg_part],
        )
    )
    add(
        pickle_case(
            "ae.pt raw pickle, eval",
            "ae.pt",
            pickle.dumps(Payload(eval, f"open({marker('eval')!r}, 'w')"), protocol=0),
            [cfg_part],
        )
    )
    add(
        pickle_case(
            "ae.pt torch.save, subprocess",
            "ae.pt",
            torch_payload({"b_dec": Payload(subprocess.call, ["touch", marker("subprocess")])}),
            [cfg_part],
        )
    )
    add(
        pickle_case(
            "ae.pt torch.save, exec",
            "ae.pt",
            torch_payload({"b_dec": Payload(exec, f"open({marker('exec')!r}, 'w')")}),
            [cfg_part],
        )
    )
    add(pickle_case("ae.pt without config.json", "ae.pt", torch_payload({"b_dec": torch.zeros(2)})))
    for fname in ("sae.pt", "model.pkl", "pytorch_model.bin", "model.ckpt", "weights.pth"):
        add(
            pickle_case(
                f"{fname} beside a valid folder",
                fname,
                pickle.dumps(Payload(os.mkdir, marker(fname))),
                files_of(good()),
            )
        )
    inner = zip_bytes(
        [
            *members(good()),
            ("sae/model.pkl", pickle.dumps(Payload(os.mkdir, marker("zip-pkl"))), None),
        ]
    )
    add(archive("pickle inside a zip", "ckpt.zip", inner))
    dl_zip = zip_bytes(
        [
            ("dl/config.json", dl_config, None),
            ("dl/ae.pt", pickle.dumps(Payload(os.mkdir, marker("dl-zip"))), None),
        ]
    )
    add(archive("dictionary_learning ae.pt payload in a zip", "dl.zip", dl_zip))

    # -- archives
    folder = good()
    ok_zip = zip_bytes(members(folder))
    ok_tar = tar_bytes([(tinfo(n), d) for n, d, _ in members(folder)])
    add(archive("empty zip", "empty.zip", zip_bytes([])))
    add(archive("empty tar.gz", "empty.tar.gz", tar_bytes([])))
    add(
        archive(
            "tar.gz with only a folder",
            "dir.tar.gz",
            tar_bytes([(tinfo("sae", tarfile.DIRTYPE), None)]),
        )
    )
    add(archive("zip of a zip", "outer.zip", zip_bytes([("inner.zip", ok_zip, None)])))
    add(archive("tar.gz of a zip", "outer.tar.gz", tar_bytes([(tinfo("inner.zip"), ok_zip)])))
    add(archive("zip of a tar.gz", "outer.zip", zip_bytes([("sae/inner.tar.gz", ok_tar, None)])))
    add(archive("corrupt zip (random bytes)", "random.zip", b"PK\x03\x04" + os.urandom(2000)))
    add(archive("truncated zip", "half.zip", ok_zip[: len(ok_zip) // 2]))
    add(archive("truncated tar.gz", "half.tar.gz", ok_tar[: len(ok_tar) // 2]))
    add(archive("gzip that is not a tar", "plain.tar.gz", gzip.compress(b"just text " * 100)))
    add(
        archive(
            "a .zip that is a tar.gz with a link",
            "liar.zip",
            tar_bytes(
                [
                    *[(tinfo(n), d) for n, d, _ in members(folder)],
                    (tinfo("sae/link", tarfile.SYMTYPE, "/etc/passwd"), None),
                ]
            ),
        )
    )
    add(archive("text named .zip", "notes.zip", b"this is not an archive\n" * 10))
    add(archive("zip bomb, 100 MiB of zeros", "bomb.zip", zip_bomb(BOMB_BYTES)))
    add(archive("tar.gz bomb, 100 MiB of zeros", "bomb.tar.gz", tar_bomb(BOMB_BYTES)))
    add(archive("gzip bomb named .tgz", "bomb.tgz", zeros_gz_stream(BOMB_BYTES)))
    add(
        archive(
            "nested bomb (zip of a zip bomb)",
            "nested.zip",
            zip_bytes([("sae/bomb.zip", zip_bomb(16 * 1024**2), None)], method=zipfile.ZIP_STORED),
        )
    )
    add(
        archive(
            "zip slip with backslashes",
            "slip.zip",
            zip_bytes([*members(folder), ("..\\..\\evil", b"x", None)]),
        )
    )
    add(
        archive(
            "zip slip deep",
            "slip.zip",
            zip_bytes([*members(folder), ("sae/../../../../tmp/evil", b"x", None)]),
        )
    )
    add(
        archive(
            "zip absolute path",
            "abs.zip",
            zip_bytes([*members(folder), (EVIL_ABSOLUTE, b"x", None)]),
        )
    )
    add(
        archive(
            "zip drive letter", "drive.zip", zip_bytes([*members(folder), ("C:/evil", b"x", None)])
        )
    )
    add(
        archive(
            "tar slip",
            "slip.tar.gz",
            tar_bytes(
                [*[(tinfo(n), d) for n, d, _ in members(folder)], (tinfo("../../evil"), b"x")]
            ),
        )
    )
    add(
        archive(
            "tar absolute path",
            "abs.tar.gz",
            tar_bytes(
                [(tinfo(EVIL_ABSOLUTE), b"x"), *[(tinfo(n), d) for n, d, _ in members(folder)]]
            ),
        )
    )
    add(
        archive(
            "zip: cfg.json is a symlink",
            "link.zip",
            zip_bytes(
                [
                    *[m for m in members(folder) if not m[0].endswith(CFG)],
                    ("sae/cfg.json", b"/etc/passwd", stat.S_IFLNK | 0o777),
                ]
            ),
        )
    )
    add(
        archive(
            "tar: cfg.json is a symlink",
            "link.tar.gz",
            tar_bytes(
                [
                    *[(tinfo(n), d) for n, d, _ in members(folder) if not n.endswith(CFG)],
                    (tinfo("sae/cfg.json", tarfile.SYMTYPE, "/etc/passwd"), None),
                ]
            ),
        )
    )
    add(
        archive(
            "tar: weights a hard link",
            "hard.tar.gz",
            tar_bytes(
                [
                    *[(tinfo(n), d) for n, d, _ in members(folder) if not n.endswith(WEIGHTS)],
                    (tinfo("sae/" + WEIGHTS, tarfile.LNKTYPE, "/etc/shadow"), None),
                ]
            ),
        )
    )
    add(
        archive(
            "tar: symlinked folder",
            "dirlink.tar.gz",
            tar_bytes([(tinfo("sae", tarfile.SYMTYPE, "/etc"), None)]),
        )
    )
    lying = tinfo("sae/cfg.json")
    lying_buf = io.BytesIO()
    with gzip.GzipFile(fileobj=lying_buf, mode="wb") as gz:
        lying.size = 10**12
        gz.write(lying.tobuf(format=tarfile.GNU_FORMAT) + b"{}")
    add(archive("tar member declaring 1 TB", "huge.tar.gz", lying_buf.getvalue()))
    add(
        archive(
            "zip with two checkpoint folders",
            "two.zip",
            zip_bytes([*members(folder, "a/"), *members(good(), "b/")]),
        )
    )
    add(
        Upload(
            "archive: two archives",
            "archive",
            [("files", ("a.zip", ok_zip, OCTET)), ("files", ("b.tar.gz", ok_tar, OCTET))],
            status=422,
        )
    )
    add(
        Upload(
            "archive: an archive and files",
            "archive",
            [("files", ("a.zip", ok_zip, OCTET)), *files_of(good())],
            status=422,
        )
    )

    # -- the request itself
    def chunked(total: int) -> Callable[[], Iterator[bytes]]:
        def gen() -> Iterator[bytes]:
            boundary = b"reliabilityboundary"
            yield (
                b"--"
                + boundary
                + b'\r\nContent-Disposition: form-data; name="files"; filename="sae.zip"\r\n\r\n'
            )
            sent = 0
            while sent < total:
                yield b"\x00" * 65536
                sent += 65536
            yield b"\r\n--" + boundary + b"--\r\n"

        return gen

    big = os.urandom(MAX_UPLOAD_BYTES + 4096)
    add(
        Upload(
            "size: body over the limit (413)",
            "size",
            [("files", ("sae.zip", big, OCTET))],
            status=413,
        )
    )
    add(
        Upload(
            "size: several parts over the limit (413)",
            "size",
            [*files_of(good()), ("files", ("sparsity.safetensors", big, OCTET))],
            status=413,
        )
    )
    add(
        Upload(
            "size: chunked body over the limit (413)",
            "size",
            content=chunked(MAX_UPLOAD_BYTES * 2),
            content_type="multipart/form-data; boundary=reliabilityboundary",
            status=413,
        )
    )
    add(
        Upload(
            "request: JSON body",
            "request",
            content=json.dumps({"files": ["cfg.json"]}).encode(),
            content_type="application/json",
            status=415,
        )
    )
    add(
        Upload(
            "request: text/plain body",
            "request",
            content=b"cfg.json",
            content_type="text/plain",
            status=415,
        )
    )
    add(
        Upload(
            "request: no Content-Type",
            "request",
            content=b"\x00" * 100,
            content_type="",
            status=415,
        )
    )
    add(
        Upload(
            "request: urlencoded form",
            "request",
            content=b"files=cfg.json",
            content_type="application/x-www-form-urlencoded",
            status=415,
        )
    )
    add(
        Upload(
            "request: multipart without boundary",
            "request",
            content=b"--x\r\n",
            content_type="multipart/form-data",
            status=400,
        )
    )
    add(
        Upload(
            "request: multipart garbage",
            "request",
            content=os.urandom(3000),
            content_type="multipart/form-data; boundary=zzz",
            status=(400, 422),
        )
    )
    add(
        Upload(
            "request: multipart with no parts",
            "request",
            content=b"--zzz--\r\n",
            content_type="multipart/form-data; boundary=zzz",
            status=(400, 422),
        )
    )
    add(
        Upload(
            "request: multipart part without a name",
            "request",
            content=b'--zzz\r\nContent-Disposition: form-data; filename="cfg.json"\r\n\r\n{}\r\n--zzz--\r\n',
            content_type="multipart/form-data; boundary=zzz",
            status=400,
        )
    )
    add(
        Upload(
            "request: truncated multipart",
            "request",
            content=b'--zzz\r\nContent-Disposition: form-data; name="files"; filename="cfg.json"\r\n\r\n{"archi',
            content_type="multipart/form-data; boundary=zzz",
            status=(400, 422),
        )
    )
    add(Upload("request: no files, only fields", "request", fields={"slug": "lonely"}, status=422))
    add(
        Upload(
            "request: empty multipart body",
            "request",
            content=b"",
            content_type="multipart/form-data; boundary=zzz",
            status=(400, 422),
        )
    )
    add(
        Upload(
            "request: files in another field",
            "request",
            [("upload", (CFG, b"{}", OCTET))],
            status=422,
        )
    )
    add(
        Upload(
            "request: unexpected file name",
            "request",
            [("files", ("evil.py", b"import os", OCTET))],
            status=422,
        )
    )
    add(
        Upload(
            "request: empty file name",
            "request",
            [("files", ("", b"{}", OCTET))],
            status=(400, 422),
        )
    )
    add(
        Upload(
            "request: a path as file name",
            "request",
            [("files", ("../../../" + CFG, b"{}", OCTET))],
            status=422,
        )
    )
    add(
        Upload(
            "request: the same file twice",
            "request",
            [*files_of(good()), ("files", (CFG, b"{}", OCTET))],
            status=422,
        )
    )
    add(
        Upload(
            "request: 20 file parts",
            "request",
            [("files", (f"a{i}.zip", b"PK", OCTET)) for i in range(20)],
            status=422,
        )
    )

    # -- keys
    add(Upload("auth: no key", "auth", files_of(good()), key="none", status=401))
    add(Upload("auth: unknown key", "auth", files_of(good()), key="invalid", status=401))
    add(
        Upload(
            "auth: key without the upload scope",
            "auth",
            files_of(good()),
            key="noscope",
            status=403,
        )
    )
    add(Upload("auth: Basic authorization", "auth", files_of(good()), key="basic", status=401))
    return cases


def build_corpus(work: Path, markers: Path) -> list[Upload]:
    """Every malformed upload of the suite (names are unique)."""
    corpus = library_uploads(work / "library") + http_uploads(work, markers)
    names = [c.name for c in corpus]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"duplicate case names: {dupes}"
    return corpus


# -- running ---------------------------------------------------------------------------------------
def auth_headers(case: Upload, keys: dict[str, str]) -> dict[str, str]:
    if case.key == "none":
        return {}
    if case.key == "invalid":
        return {"Authorization": "Bearer ks_not_a_real_key_0123456789"}
    if case.key == "basic":
        return {"Authorization": "Basic dXNlcjpwYXNz"}
    return {"Authorization": f"Bearer {keys[case.key]}"}


def send(client: Any, case: Upload, headers: dict[str, str]) -> Any:
    if case.content is not None:
        body = case.content() if callable(case.content) else case.content
        h = dict(headers)
        if case.content_type:
            h["Content-Type"] = case.content_type
        return client.post("/api/v1/saes", content=body, headers=h)
    if case.parts:
        return client.post("/api/v1/saes", files=case.parts, data=case.fields, headers=headers)
    # fields only: still multipart
    boundary = "reliabilityfields"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in case.fields.items()
        )
        + f"--{boundary}--\r\n".encode()
    )
    return client.post(
        "/api/v1/saes",
        content=body,
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )


class _Tee(io.TextIOBase):
    """Keeps what is printed (a pickle payload calling print) and passes it on."""

    def __init__(self, target: Any):
        self.target = target
        self.seen = io.StringIO()

    def write(self, s: str) -> int:
        self.seen.write(s)
        return self.target.write(s) if self.target is not None else len(s)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()


def run_upload_suite(
    client: Any,
    db_url: str,
    data_dir: Path,
    keys: dict[str, str],
    work: Path,
    *,
    server_log: Callable[[], str] | None = None,
) -> SuiteResult:
    """Send the whole corpus through ``client`` (a TestClient or an httpx.Client on a live
    server whose database is ``db_url`` and data folder ``data_dir``); ``keys`` maps
    ``upload`` and ``noscope`` to plain keys. ``server_log`` reads a live server's output
    (to look for pickle payload output there)."""
    result = SuiteResult("uploads")
    markers = work / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(work / "corpus", markers)
    outside = [
        Path(EVIL_ABSOLUTE),
        Path("/tmp/evil"),
        work.parent / "evil",
        data_dir.parent / "evil",
    ]
    for p in outside:
        if p.exists():
            result.notes.append(f"{p} existed before the suite; ignored")
    outside = [p for p in outside if not p.exists()]

    rejected = server_errors = stored = 0
    statuses: dict[int, int] = {}
    # The first upload creates data_dir/tmp (where uploads are received): prime it.
    send(
        client,
        Upload("prime", "prime", [("files", ("prime.txt", b"x", OCTET))]),
        auth_headers(Upload("", ""), keys),
    )
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):  # type: ignore[type-var]
        for case in corpus:
            headers = auth_headers(case, keys)
            if case.setup is not None:
                case.setup(client, auth_headers(Upload("", "", key="upload"), keys))
            rows_before, files_before = count_rows(db_url), tree_state(data_dir)
            try:
                r = send(client, case, headers)
            except Exception as exc:  # a dropped connection is a failure too
                server_errors += 1
                result.problems.append(f"{case.name}: no response ({exc!r})")
                continue
            rows_after, files_after = count_rows(db_url), tree_state(data_dir)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                server_errors += 1
                result.problems.append(f"{case.name}: {r.status_code} {r.text[:300]}")
            elif 400 <= r.status_code < 500:
                rejected += 1
            else:
                result.problems.append(f"{case.name}: accepted with {r.status_code} {r.text[:200]}")
            if r.status_code >= 400:
                shape = error_shape_problem(r)
                if shape:
                    result.problems.append(f"{case.name}: {shape}")
                else:
                    message = r.json()["error"]["message"]
                    missing = [s for s in case.expect if s not in message]
                    if missing:
                        result.problems.append(
                            f"{case.name}: message lacks {missing}: {message[:300]}"
                        )
            wanted = case.status
            if wanted is not None and r.status_code not in (
                wanted if isinstance(wanted, tuple) else (wanted,)
            ):
                result.problems.append(
                    f"{case.name}: status {r.status_code}, expected {wanted}: {r.text[:200]}"
                )
            changed_rows = {
                t: (rows_before[t], rows_after[t])
                for t in rows_before
                if rows_before[t] != rows_after.get(t)
            }
            new_files = sorted(set(files_after) - set(files_before))
            gone_files = sorted(set(files_before) - set(files_after))
            if changed_rows or new_files or gone_files:
                stored += 1
                result.problems.append(
                    f"{case.name}: stored something: rows {changed_rows} new {new_files[:5]} removed {gone_files[:5]}"
                )
    escaped = [str(p) for p in outside if p.exists()]
    if escaped:
        result.problems.append(f"files written outside data_dir: {escaped}")
    ran = sorted(p.name for p in markers.iterdir())
    if ran:
        result.problems.append(f"pickle payloads ran: {ran}")
    printed = tee.seen.getvalue() + (server_log() if server_log else "")
    if "PWNED" in printed:
        result.problems.append("a pickle payload printed output")
    tried = len(corpus)
    result.figures = {
        "tried": tried,
        "rejected": rejected,
        "server_errors": server_errors,
        "stored": stored,
        "statuses": statuses,
    }
    groups: dict[str, int] = {}
    for c in corpus:
        groups[c.group] = groups.get(c.group, 0) + 1
    result.notes.append(
        "cases by group: " + ", ".join(f"{g} {n}" for g, n in sorted(groups.items()))
    )
    result.notes.append("statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    result.line = f"uploads: tried {tried}, rejected {rejected} (4xx), server errors {server_errors}, stored {stored}"
    return result


def upload_settings(db_url: str, data_dir: Path, models_dir: Path, **overrides: Any) -> Any:
    from kronscope.config import Settings

    values: dict[str, Any] = {
        "environment": "test",
        "database_url": db_url,
        "data_dir": data_dir,
        "models_dir": models_dir,
        "device": "cpu",
        "run_jobs_in_process": False,
        "max_upload_bytes": MAX_UPLOAD_BYTES,
    }
    values.update(overrides)
    return Settings(**values)


def make_keys(db_url: str) -> dict[str, str]:
    """``upload`` (every scope) and ``noscope`` (explanations only) keys."""
    from kronscope.db import make_engine, make_sessionmaker, upgrade
    from kronscope.services import keys as key_service

    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with make_sessionmaker(engine)() as s:
            _, upload = key_service.create_key(
                s, "reliability", ["upload", "delete", "jobs", "explanations"]
            )
            _, noscope = key_service.create_key(s, "reliability-reader", ["explanations"])
            s.commit()
    finally:
        engine.dispose()
    return {"upload": upload, "noscope": noscope}


__all__ = ["MODEL", "Upload", "build_corpus", "make_keys", "run_upload_suite", "upload_settings"]
