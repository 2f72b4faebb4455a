"""Every kind of bad checkpoint is refused before anything is built or written, with a
message naming the file and the field (or the archive member) at fault."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kronscope.sae import CheckpointError, ConfigError, SAEConfig, build, save
from kronscope.sae.archive import extract_archive, extracted
from kronscope.sae.checkpoint import load_checkpoint

PEERS = Path(__file__).resolve().parent.parent / "fixtures" / "peers"
CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"


# -- building blocks ----------------------------------------------------------------------
def good_sae(arch: str = "topk"):
    if arch == "kronsae":
        cfg = SAEConfig(architecture="kronsae", d_in=8, d_sae=32, k=4, h=2, m=2, n=8)
    else:
        cfg = SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4)
    sae = build(cfg)
    sae.init_weights(torch.Generator().manual_seed(0))
    return sae


def native(root: Path, arch: str = "topk") -> Path:
    return save(good_sae(arch), root / "sae")


def edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / CFG).read_text())
    cfg.update(changes)
    (folder / CFG).write_text(json.dumps(cfg))


def edit_weights(folder: Path, fn: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(folder / WEIGHTS)
    fn(tensors)
    save_file(tensors, folder / WEIGHTS)


def raw_safetensors(path: Path, header: dict, data: bytes, length: int | None = None) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def weights_header(folder: Path) -> tuple[dict, bytes]:
    raw = (folder / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def zip_with(path: Path, members: list[tuple[str, bytes, int | None]]) -> Path:
    """members: (name, data, unix mode or None)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def tar_with(
    path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None
) -> Path:
    data = data or {}
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
    return path


def tar_info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def good_files(root: Path) -> list[tuple[str, bytes, int | None]]:
    folder = native(root / "src")
    return [(f"sae/{p.name}", p.read_bytes(), None) for p in sorted(folder.iterdir())]


class Payload:
    """Unpickling this would call ``fn(*args)``: the code execution pickles allow."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def dl_folder(
    root: Path, ae_pt: Callable[[Path], object], dict_class: str = "AutoEncoderTopK"
) -> Path:
    folder = root / "dl"
    folder.mkdir(parents=True)
    config = json.loads((PEERS / "dictionary_learning_topk" / "config.json").read_text())
    config["trainer"]["dict_class"] = dict_class
    (folder / "config.json").write_text(json.dumps(config))
    ae_pt(folder / "ae.pt")
    return folder


def dl_state() -> dict:
    return torch.load(PEERS / "dictionary_learning_topk" / "ae.pt", weights_only=True)


# -- the cases ----------------------------------------------------------------------------
@dataclass
class Case:
    build: Callable[[Path], Path]
    """Writes the bad input under the given folder and returns the path to load."""
    expect: list[str]
    """Substrings the message must contain: the file and the field or member."""
    max_bytes: int = 8 * 1024**3
    error: type[Exception] = CheckpointError
    after: Callable[[Path], None] | None = None
    marks: list = field(default_factory=list)


def _set(name: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        t[name] = value

    return fn


def weights_case(fn: Callable[[dict[str, torch.Tensor]], object], arch: str = "topk") -> Callable:
    def build_(root: Path) -> Path:
        folder = native(root, arch)
        edit_weights(folder, fn)
        return folder

    return build_


def cfg_case(arch: str = "topk", raw: str | None = None, **changes) -> Callable:
    def build_(root: Path) -> Path:
        folder = native(root, arch)
        if raw is not None:
            (folder / CFG).write_text(raw)
        else:
            edit_cfg(folder, **changes)
        return folder

    return build_


def header_case(fn: Callable[[Path, dict, bytes], None]) -> Callable:
    def build_(root: Path) -> Path:
        folder = native(root)
        header, data = weights_header(folder)
        fn(folder / WEIGHTS, header, data)
        return folder

    return build_


def _with_nan(t: dict[str, torch.Tensor]) -> None:
    t["W_enc"][0, 0] = float("nan")


def _with_inf(t: dict[str, torch.Tensor]) -> None:
    t["b_dec"][1] = float("inf")


def _overlap(path: Path, header: dict, data: bytes) -> None:
    header["b_dec"]["data_offsets"] = header["b_enc"]["data_offsets"]
    header["b_dec"]["shape"] = header["b_enc"]["shape"]
    raw_safetensors(path, header, data)


def _offsets_past_eof(path: Path, header: dict, data: bytes) -> None:
    raw_safetensors(path, header, data[:-64])


def _size_mismatch(path: Path, header: dict, data: bytes) -> None:
    header["b_dec"]["shape"] = [4]
    raw_safetensors(path, header, data)


def _duplicate_key(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob = blob[:-1] + b', "b_dec": ' + json.dumps(header["b_dec"]).encode() + b"}"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _unknown_dtype(path: Path, header: dict, data: bytes) -> None:
    header["b_dec"]["dtype"] = "F33"
    raw_safetensors(path, header, data)


def _truncated(root: Path) -> Path:
    folder = native(root)
    (folder / WEIGHTS).write_bytes(b"\x10\x00\x00")
    return folder


def _oversized_header(root: Path) -> Path:
    folder = native(root)
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    return folder


def _header_past_eof(root: Path) -> Path:
    folder = native(root)
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 5000) + b'{"W_enc": ')
    return folder


def _missing_weights(root: Path) -> Path:
    folder = native(root)
    (folder / WEIGHTS).unlink()
    return folder


def _pickle_only(root: Path) -> Path:
    folder = root / "pt"
    folder.mkdir(parents=True)
    torch.save({"W_enc": torch.zeros(2)}, folder / "model.bin")
    return folder


def _pickle_file(root: Path) -> Path:
    root.mkdir(parents=True)
    torch.save({"W_enc": torch.zeros(2)}, root / "sae.pt")
    return root / "sae.pt"


def _sparsity_wrong_shape(root: Path) -> Path:
    folder = native(root)
    save_file({"sparsity": torch.zeros(31)}, folder / "sparsity.safetensors")
    return folder


def _sparsity_nan(root: Path) -> Path:
    folder = native(root)
    save_file({"sparsity": torch.full((32,), float("nan"))}, folder / "sparsity.safetensors")
    return folder


def _legacy_gated(root: Path) -> Path:
    folder = root / "gated"
    folder.mkdir(parents=True)
    tensors = load_file(PEERS / "saelens_standard" / "sae_weights.safetensors")
    tensors.update(b_gate=torch.zeros(64), b_mag=torch.zeros(64), r_mag=torch.zeros(64))
    save_file(tensors, folder / WEIGHTS)
    (folder / CFG).write_text(json.dumps({"d_in": 16, "d_sae": 64, "hook_point": "x"}))
    return folder


def _sparsify_cfg(**changes) -> Callable:
    def build_(root: Path) -> Path:
        folder = shutil.copytree(PEERS / "sparsify_topk", root / "sp")
        (folder / "expected.safetensors").unlink()
        edit_cfg(folder, **changes)
        return folder

    return build_


def _sparsify_wrong_shape(root: Path) -> Path:
    folder = shutil.copytree(PEERS / "sparsify_topk", root / "sp")
    tensors = load_file(folder / "sae.safetensors")
    tensors["W_dec"] = tensors["W_dec"].T.contiguous()  # SAELens's converter's mistake
    save_file(tensors, folder / "sae.safetensors")
    return folder


def _dl_int_tensor(root: Path) -> Path:
    state = dl_state()
    state["encoder.weight"] = state["encoder.weight"].to(torch.int32)
    return dl_folder(root, lambda p: torch.save(state, p))


def _dl_missing(root: Path) -> Path:
    state = dl_state()
    del state["b_dec"]
    return dl_folder(root, lambda p: torch.save(state, p))


def _dl_class(root: Path) -> Path:
    return dl_folder(root, lambda p: torch.save(dl_state(), p), dict_class="GatedAutoEncoder")


def _dl_backup(root: Path) -> Path:
    backup = {"step": 10, "ae": dl_state(), "optimizer": {"state": {}, "param_groups": []}}
    return dl_folder(root, lambda p: torch.save(backup, p))


# Pickle payloads whose side effect the test checks did not happen.
def _print_payload(protocol: int) -> Callable:
    import builtins

    def build_(root: Path) -> Path:
        payload = {"encoder.weight": Payload(builtins.print, "PWNED-BY-PICKLE")}
        return dl_folder(root, lambda p: p.write_bytes(pickle.dumps(payload, protocol=protocol)))

    return build_


def _mkdir_payload(root: Path) -> Path:
    state = dict(dl_state())
    state["b_dec"] = Payload(os.mkdir, str(root / "PWNED"))
    return dl_folder(root, lambda p: torch.save(state, p))


def _no_pwned_dir(root: Path) -> None:
    assert not (root / "PWNED").exists()


def _archive(build_members: Callable[[Path], Path]) -> Callable:
    return build_members


def _zip_slip(root: Path) -> Path:
    root.mkdir(parents=True)
    return zip_with(root / "bad.zip", [*good_files(root), ("../evil", b"x", None)])


def _zip_absolute(root: Path) -> Path:
    root.mkdir(parents=True)
    return zip_with(root / "bad.zip", [("/tmp/kronscope-evil", b"x", None), *good_files(root)])


def _zip_symlink(root: Path) -> Path:
    root.mkdir(parents=True)
    return zip_with(
        root / "bad.zip", [*good_files(root), ("sae/link", b"/etc/passwd", stat.S_IFLNK | 0o777)]
    )


def _zip_fifo(root: Path) -> Path:
    root.mkdir(parents=True)
    return zip_with(root / "bad.zip", [*good_files(root), ("sae/pipe", b"", stat.S_IFIFO | 0o644)])


def _zip_bomb(root: Path) -> Path:
    root.mkdir(parents=True)
    return zip_with(root / "bomb.zip", [("sae/cfg.json", b"\x00" * (3 * 1024**2), None)])


def _zip_liar(root: Path) -> Path:
    """A zip whose headers declare 100 bytes for a member that inflates to 3 MB."""
    root.mkdir(parents=True)
    path = zip_with(root / "liar.zip", [("sae/cfg.json", b" " * (3 * 1024**2), None)])
    raw = bytearray(path.read_bytes())
    local = raw.find(b"PK\x03\x04")
    struct.pack_into("<I", raw, local + 22, 100)  # uncompressed size, local header
    central = raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 100)  # uncompressed size, central directory
    path.write_bytes(bytes(raw))
    return path


def _zip_many(root: Path) -> Path:
    root.mkdir(parents=True)
    return zip_with(root / "many.zip", [(f"sae/f{i}.txt", b"x", None) for i in range(300)])


def _tar_member(kind: bytes, name: str = "sae/special", linkname: str = "") -> Callable:
    def build_(root: Path) -> Path:
        root.mkdir(parents=True)
        members = [tar_info(name, kind, linkname)]
        files = {f: d for f, d, _ in good_files(root)}
        infos = [tar_info(f) for f in files]
        return tar_with(root / "bad.tar.gz", [*infos, *members], files)

    return build_


def _tar_slip(root: Path) -> Path:
    root.mkdir(parents=True)
    files = {f: d for f, d, _ in good_files(root)} | {"sae/../../evil": b"x"}
    return tar_with(root / "bad.tgz", [tar_info(f) for f in files], files)


def _tar_absolute(root: Path) -> Path:
    root.mkdir(parents=True)
    files = {"/tmp/kronscope-evil": b"x"}
    return tar_with(root / "bad.tar.gz", [tar_info(f) for f in files], files)


def _tar_too_big(root: Path) -> Path:
    root.mkdir(parents=True)
    files = {"sae/cfg.json": b"\x00" * (3 * 1024**2)}
    return tar_with(root / "big.tar.gz", [tar_info(f) for f in files], files)


def _too_big_files(root: Path) -> Path:
    return native(root)


CASES: dict[str, Case] = {
    # tensors vs configuration
    "wrong shape": Case(
        weights_case(_set("W_dec", torch.zeros(32, 7))), [WEIGHTS, "'W_dec'", "[32, 7]", CFG]
    ),
    "NaN": Case(weights_case(_with_nan), [WEIGHTS, "'W_enc'", "NaN"]),
    "Inf": Case(weights_case(_with_inf), [WEIGHTS, "'b_dec'", "infinite"]),
    "cfg disagrees with tensors": Case(cfg_case(d_sae=64), [WEIGHTS, "'W_enc'", "d_sae = 64", CFG]),
    "kronsae cfg disagrees with tensors": Case(
        cfg_case("kronsae", h=1, m=4, n=8), [WEIGHTS, "'W_enc'", "h = 1", CFG]
    ),
    "unknown architecture": Case(
        cfg_case(architecture="gated"), [CFG, "'architecture'", "gated"], error=ConfigError
    ),
    "F != h*m*n": Case(cfg_case("kronsae", h=3), [CFG, "'d_sae'", "h*m*n"], error=ConfigError),
    "m > n": Case(cfg_case("kronsae", m=8, n=2), [CFG, "'m'"], error=ConfigError),
    "k > F": Case(cfg_case(k=33), [CFG, "'k'", "33"], error=ConfigError),
    "missing tensor": Case(weights_case(lambda t: t.pop("b_enc")), [WEIGHTS, "'b_enc'", "missing"]),
    "int tensor": Case(
        weights_case(_set("W_enc", torch.zeros(8, 32, dtype=torch.int32))),
        [WEIGHTS, "'W_enc'", "int32"],
    ),
    "float64 tensor": Case(
        weights_case(_set("b_enc", torch.zeros(32, dtype=torch.float64))),
        [WEIGHTS, "'b_enc'", "float64"],
    ),
    "missing weights file": Case(_missing_weights, [WEIGHTS, "missing"]),
    "malformed JSON": Case(cfg_case(raw='{"architecture": "topk",, }'), [CFG, "JSON", "line 1"]),
    "NaN in JSON": Case(cfg_case(raw='{"architecture": NaN}'), [CFG, "JSON", "NaN"]),
    "JSON not an object": Case(cfg_case(raw="[1, 2]"), [CFG, "object"], error=ConfigError),
    "bad dtype in cfg": Case(cfg_case(dtype="int8"), [CFG, "'dtype'", "int8"], error=ConfigError),
    "legacy gated": Case(_legacy_gated, [CFG, "'architecture'", "gated"], error=ConfigError),
    "sparsity wrong shape": Case(_sparsity_wrong_shape, ["sparsity.safetensors", "'sparsity'"]),
    "sparsity NaN": Case(_sparsity_nan, ["sparsity.safetensors", "'sparsity'", "NaN"]),
    # safetensors structure
    "truncated header": Case(_truncated, [WEIGHTS, "header", "truncated"]),
    "oversized header length": Case(_oversized_header, [WEIGHTS, "header length", "100 MB"]),
    "header length past EOF": Case(_header_past_eof, [WEIGHTS, "header length", "truncated"]),
    "data offsets past EOF": Case(header_case(_offsets_past_eof), [WEIGHTS, "past the end"]),
    "overlapping byte ranges": Case(header_case(_overlap), [WEIGHTS, "byte range"]),
    "byte range vs shape": Case(header_case(_size_mismatch), [WEIGHTS, "'b_dec'", "needs"]),
    "duplicate header key": Case(header_case(_duplicate_key), [WEIGHTS, "'header'", "twice"]),
    "unknown dtype": Case(header_case(_unknown_dtype), [WEIGHTS, "'b_dec'", "F33"]),
    "files over max_bytes": Case(_too_big_files, [WEIGHTS, "limit"], max_bytes=2000),
    # other formats
    "sparsify groupmax": Case(
        _sparsify_cfg(activation="groupmax"), [CFG, "'activation'", "groupmax"], error=ConfigError
    ),
    "sparsify k > F": Case(_sparsify_cfg(k=65), [CFG, "'k'"], error=ConfigError),
    "sparsify W_dec transposed": Case(_sparsify_wrong_shape, ["sae.safetensors", "'W_dec'"]),
    "dictionary_learning int tensor": Case(_dl_int_tensor, ["ae.pt", "'encoder.weight'", "int32"]),
    "dictionary_learning missing tensor": Case(_dl_missing, ["ae.pt", "'b_dec'", "missing"]),
    "dictionary_learning unknown class": Case(
        _dl_class, ["config.json", "'trainer.dict_class'", "GatedAutoEncoder"], error=ConfigError
    ),
    "dictionary_learning training backup": Case(_dl_backup, ["ae.pt", "backup"]),
    # pickles
    "pickle payload (raw pickle, protocol 2)": Case(_print_payload(2), ["ae.pt", "unpickler"]),
    "pickle payload (raw pickle, protocol 4)": Case(_print_payload(4), ["ae.pt", "unpickler"]),
    "pickle payload (torch.save, os.mkdir)": Case(
        _mkdir_payload, ["ae.pt", "unpickler", "mkdir"], after=_no_pwned_dir
    ),
    "other pickle file in folder": Case(_pickle_only, ["model.bin", "pickle"]),
    "pickle file given directly": Case(_pickle_file, ["sae.pt", "pickle"]),
    # archives
    "zip slip": Case(_zip_slip, ["bad.zip", "'../evil'", ".."]),
    "zip absolute path": Case(_zip_absolute, ["bad.zip", "'/tmp/kronscope-evil'", "absolute"]),
    "zip symlink": Case(_zip_symlink, ["bad.zip", "'sae/link'", "symbolic link"]),
    "zip fifo": Case(_zip_fifo, ["bad.zip", "'sae/pipe'", "not a regular file"]),
    "zip bomb (declared size)": Case(
        _zip_bomb, ["bomb.zip", "'sae/cfg.json'", "limit"], max_bytes=1024**2
    ),
    "zip bomb (lying sizes)": Case(_zip_liar, ["liar.zip", "'sae/cfg.json'"], max_bytes=1024**2),
    "zip with too many members": Case(_zip_many, ["many.zip", "300 members"]),
    "tar slip": Case(_tar_slip, ["bad.tgz", "'sae/../../evil'", ".."]),
    "tar absolute path": Case(_tar_absolute, ["bad.tar.gz", "'/tmp/kronscope-evil'", "absolute"]),
    "tar symlink": Case(
        _tar_member(tarfile.SYMTYPE, linkname="/etc/passwd"),
        ["bad.tar.gz", "'sae/special'", "symbolic link"],
    ),
    "tar hard link": Case(
        _tar_member(tarfile.LNKTYPE, linkname="sae/cfg.json"),
        ["bad.tar.gz", "'sae/special'", "hard link"],
    ),
    "tar fifo": Case(_tar_member(tarfile.FIFOTYPE), ["bad.tar.gz", "'sae/special'", "FIFO"]),
    "tar char device": Case(
        _tar_member(tarfile.CHRTYPE), ["bad.tar.gz", "'sae/special'", "device"]
    ),
    "tar block device": Case(
        _tar_member(tarfile.BLKTYPE), ["bad.tar.gz", "'sae/special'", "device"]
    ),
    "tar over max_bytes": Case(
        _tar_too_big, ["big.tar.gz", "'sae/cfg.json'", "limit"], max_bytes=1024**2
    ),
}


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("name", list(CASES))
def test_bad_checkpoint_is_refused(name: str, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    case = CASES[name]
    inputs, work = tmp_path / "in", tmp_path / "work"
    work.mkdir()
    path = case.build(inputs)
    before = tree(tmp_path)
    capfd.readouterr()
    with pytest.raises(case.error) as caught:
        load_checkpoint(path, max_bytes=case.max_bytes, tmp_dir=work)
    message = str(caught.value)
    for part in case.expect:
        assert part in message, f"{part!r} not in {message!r}"
    # Nothing was executed, written or left behind.
    assert "PWNED" not in capfd.readouterr().out
    assert list(work.iterdir()) == []
    assert tree(tmp_path) == before
    assert not (tmp_path / "evil").exists() and not Path("/tmp/kronscope-evil").exists()
    if case.after:
        case.after(inputs)


def test_checkpoint_errors_carry_file_and_field(tmp_path: Path) -> None:
    path = weights_case(_with_nan)(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert (caught.value.file, caught.value.field) == (WEIGHTS, "W_enc")


def test_ratio_bomb_is_refused(tmp_path: Path) -> None:
    # 2 MiB of zeros deflate to about 2 KiB: a ratio far beyond 100.
    path = zip_with(tmp_path / "ratio.zip", [("sae/cfg.json", b"\x00" * (2 * 1024**2), None)])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(CheckpointError, match=r"ratio\.zip.*'sae/cfg\.json'.*bomb"):
        extract_archive(path, dest, max_ratio=100)
    assert list(dest.iterdir()) == []  # refused before anything was written


def test_extracted_removes_its_folder_on_error(tmp_path: Path) -> None:
    path = _zip_liar(tmp_path / "in")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CheckpointError), extracted(path, max_bytes=1024**2, tmp_dir=work):
        pass
    assert list(work.iterdir()) == []


# -- saving refuses bad SAEs before writing -----------------------------------------------
def _nan_sae():
    sae = good_sae()
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    return sae, None


def _bad_sparsity():
    return good_sae(), torch.zeros(31)


def _unserialisable_metadata():
    sae = good_sae()
    sae.cfg.metadata["when"] = {1, 2}  # a set is not JSON
    return sae, None


def _k_too_large():
    sae = good_sae()
    sae.cfg.k = 99
    return sae, None


SAVE_CASES = {
    "NaN weight": (_nan_sae, [WEIGHTS, "'W_dec'", "NaN"]),
    "sparsity shape": (_bad_sparsity, ["sparsity.safetensors", "'sparsity'", "[31]"]),
    "metadata not JSON": (_unserialisable_metadata, [CFG, "JSON"]),
    "cfg invalid": (_k_too_large, [CFG, "'k'"]),
}


@pytest.mark.parametrize("container", ["sae", "sae.zip", "sae.tar.gz"])
@pytest.mark.parametrize("name", list(SAVE_CASES))
def test_bad_save_writes_nothing(name: str, container: str, tmp_path: Path) -> None:
    make, expect = SAVE_CASES[name]
    sae, sparsity = make()
    with pytest.raises((CheckpointError, ConfigError)) as caught:
        save(sae, tmp_path / container, sparsity=sparsity)
    for part in expect:
        assert part in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field_name", ["d_in", "d_sae"])
def test_absurd_dimension_is_refused_before_allocating(tmp_path: Path, field_name: str) -> None:
    folder = native(tmp_path)
    edit_cfg(folder, **{field_name: 2**63})
    with pytest.raises(
        ConfigError, match=rf"'{field_name}'.*larger than the largest supported size"
    ):
        load_checkpoint(folder)
