"""Safe extraction (and writing) of checkpoint archives: ``.zip``, ``.tar.gz`` / ``.tgz``.

An uploaded archive is untrusted. Before a byte is written, every member is checked: no
absolute paths or ``..`` components, only regular files and folders (no symlinks, hard
links, devices, FIFOs or sparse files), at most ``max_members`` members, declared sizes
within ``max_bytes`` and no member compressed more than ``max_ratio`` times. Extraction then
counts the bytes it actually writes, because a zip's declared sizes can lie. Everything goes
into a fresh temporary folder that is removed again on any error (``extracted`` removes it
on exit too). The kind of archive is read from its first bytes, not its name, since an
upload may be stored under any name.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from .errors import CheckpointError

DEFAULT_MAX_BYTES = 8 * 1024**3
"""Total uncompressed size an archive (or a checkpoint's files) may have: 8 GiB."""
DEFAULT_MAX_MEMBERS = 256
"""A checkpoint has a handful of files; a few hundred members is already suspicious."""
DEFAULT_MAX_RATIO = 1000
"""Largest compression ratio accepted for a member bigger than ``RATIO_FLOOR``."""
RATIO_FLOOR = 1024**2
"""Members below 1 MiB may compress as well as they like (JSON of zeros, tiny tensors)."""
_CHUNK = 1024**2
EXTRACT_PREFIX = "kronscope-extract-"
_IGNORED_TOP = ("__MACOSX",)  # resource forks added by macOS's Archive Utility
_DRIVE = re.compile(r"^[A-Za-z]:")

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")


def archive_kind(path: str | Path) -> str | None:
    """``"zip"``, ``"tar"`` (gzip-compressed or plain) or None, from the file's first bytes."""
    p = Path(path)
    if not p.is_file():
        return None
    with open(p, "rb") as f:
        head = f.read(265)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        return "tar"
    return None


def split_archive_name(name: str) -> tuple[str, str | None]:
    """``"a.tar.gz"`` -> ``("a", "tar.gz")``; ``"a.zip"`` -> ``("a", "zip")``; else ``(name, None)``."""
    lower = name.lower()
    for suffix, kind in ((".tar.gz", "tar.gz"), (".tgz", "tar.gz"), (".zip", "zip")):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], kind
    return name, None


def member_path(name: str, archive: str) -> PurePosixPath | None:
    """The safe relative path of a member, None for a member to skip, or CheckpointError."""
    if "\x00" in name:
        raise CheckpointError(f"member {name!r} has a NUL character in its name", file=archive)
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise CheckpointError(f"member {name!r} has an absolute path; refused", file=archive)
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise CheckpointError(
            f"member {name!r} has a '..' component that would escape the folder; refused",
            file=archive,
        )
    if not parts or parts[0] in _IGNORED_TOP:
        return None
    return PurePosixPath(*parts)


def _check_sizes(
    archive: str,
    member: str,
    size: int,
    packed: int | None,
    total: int,
    max_bytes: int,
    max_ratio: int,
) -> None:
    if total > max_bytes:
        raise CheckpointError(
            f"member {member!r} takes the uncompressed contents to {total} bytes, over the "
            f"limit of {max_bytes} bytes; refused",
            file=archive,
        )
    if packed is not None and size > RATIO_FLOOR and size > max_ratio * max(packed, 1):
        raise CheckpointError(
            f"member {member!r} expands from {packed} to {size} bytes (ratio over {max_ratio}); "
            "looks like a compression bomb, refused",
            file=archive,
        )


def _open_new(dest: Path, rel: PurePosixPath, archive: str, member: str):
    target = dest.joinpath(*rel.parts)
    # Belt and braces: the checks above already exclude every way out of `dest`.
    if os.path.commonpath([dest.resolve(), target.parent.resolve()]) != str(dest.resolve()):
        raise CheckpointError(
            f"member {member!r} would be written outside the folder", file=archive
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(
            target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644
        )
    except FileExistsError:
        raise CheckpointError(f"member {member!r} appears twice", file=archive) from None
    except OSError as e:
        raise CheckpointError(
            f"member {member!r} cannot be written: {e.strerror}", file=archive
        ) from None
    return os.fdopen(fd, "wb")


def _copy_counted(
    src, out, archive: str, member: str, declared: int, written: int, max_bytes: int
) -> int:
    """Copy ``src`` to ``out`` counting bytes; refuse more than declared or over the limit."""
    count = 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return count
        count += len(chunk)
        if count > declared:
            raise CheckpointError(
                f"member {member!r} holds more bytes than the {declared} it declares; refused",
                file=archive,
            )
        if written + count > max_bytes:
            raise CheckpointError(
                f"member {member!r} takes the uncompressed contents over the limit of "
                f"{max_bytes} bytes; refused",
                file=archive,
            )
        out.write(chunk)


def _extract_zip(
    path: Path, dest: Path, name: str, max_bytes: int, max_members: int, max_ratio: int
) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"is not a readable zip archive ({e})", file=name) from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise CheckpointError(
                f"has {len(infos)} members; at most {max_members} are accepted", file=name
            )
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        seen: set[PurePosixPath] = set()
        total = 0
        for info in infos:
            member = info.filename
            rel = member_path(member, name)
            mode = info.external_attr >> 16
            ftype = stat.S_IFMT(mode)  # 0 when the writer recorded permissions only
            if stat.S_ISLNK(mode):
                raise CheckpointError(f"member {member!r} is a symbolic link; refused", file=name)
            if info.is_dir() or stat.S_ISDIR(mode):
                continue  # folders come from the files' paths
            if ftype and not stat.S_ISREG(mode):
                raise CheckpointError(
                    f"member {member!r} is not a regular file or folder; refused", file=name
                )
            if info.flag_bits & 0x1:
                raise CheckpointError(f"member {member!r} is encrypted; refused", file=name)
            total += info.file_size
            _check_sizes(
                name, member, info.file_size, info.compress_size, total, max_bytes, max_ratio
            )
            if rel is None:
                continue
            if rel in seen:
                raise CheckpointError(f"member {member!r} appears twice", file=name)
            seen.add(rel)
            plan.append((info, rel))
        written = 0
        for info, rel in plan:
            try:
                with zf.open(info) as src, _open_new(dest, rel, name, info.filename) as out:
                    written += _copy_counted(
                        src, out, name, info.filename, info.file_size, written, max_bytes
                    )
            except (
                zipfile.BadZipFile,
                zlib.error,
                EOFError,
                NotImplementedError,
                RuntimeError,
            ) as e:
                raise CheckpointError(
                    f"member {info.filename!r} cannot be read: corrupt or forged ({e})", file=name
                ) from None


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    if member.issparse():
        return "a sparse file"
    return "not a regular file or folder"


def _extract_tar(
    path: Path, dest: Path, name: str, max_bytes: int, max_members: int, max_ratio: int
) -> None:
    packed = max(path.stat().st_size, 1)
    try:
        tf = tarfile.open(path, mode="r:*")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise CheckpointError(f"is not a readable tar archive ({e})", file=name) from None
    with tf:
        plan: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
        seen: set[PurePosixPath] = set()
        total = count = 0
        try:
            # Iterate lazily: the member count is checked before the whole index is read.
            for member in tf:
                count += 1
                if count > max_members:
                    raise CheckpointError(
                        f"has more than {max_members} members; refused", file=name
                    )
                rel = member_path(member.name, name)
                if member.isdir():
                    continue
                if not member.isreg() or member.issparse():
                    raise CheckpointError(
                        f"member {member.name!r} is {_tar_kind(member)}; only regular files and "
                        "folders are accepted",
                        file=name,
                    )
                total += member.size
                _check_sizes(name, member.name, member.size, None, total, max_bytes, max_ratio)
                if total > RATIO_FLOOR and total > max_ratio * packed:
                    raise CheckpointError(
                        f"member {member.name!r}: the archive expands from {packed} to over {total} "
                        f"bytes (ratio over {max_ratio}); looks like a compression bomb, refused",
                        file=name,
                    )
                if rel is None:
                    continue
                if rel in seen:
                    raise CheckpointError(f"member {member.name!r} appears twice", file=name)
                seen.add(rel)
                plan.append((member, rel))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise CheckpointError(f"is not a readable tar archive ({e})", file=name) from None
        # Nothing is written before every member passed; folders come from the files' paths.
        written = 0
        for member, rel in plan:
            try:
                src = tf.extractfile(member)
                if src is None:
                    raise CheckpointError(f"member {member.name!r} cannot be read", file=name)
                with src, _open_new(dest, rel, name, member.name) as out:
                    written += _copy_counted(
                        src, out, name, member.name, member.size, written, max_bytes
                    )
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise CheckpointError(
                    f"member {member.name!r} cannot be read ({e})", file=name
                ) from None


def extract_archive(
    path: str | Path,
    dest: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_ratio: int = DEFAULT_MAX_RATIO,
) -> None:
    """Extract ``path`` into the existing, empty folder ``dest`` after checking every member.

    On error ``dest`` may hold part of the contents: use ``extracted`` to get a temporary
    folder that is always removed."""
    path, dest = Path(path), Path(dest)
    name = path.name
    size = path.stat().st_size
    kind = archive_kind(path)
    if kind is None:
        raise CheckpointError("is not a zip or tar.gz archive", file=name)
    if size > max_bytes:
        raise CheckpointError(f"is {size} bytes, over the limit of {max_bytes} bytes", file=name)
    if kind == "zip":
        _extract_zip(path, dest, name, max_bytes, max_members, max_ratio)
    else:
        _extract_tar(path, dest, name, max_bytes, max_members, max_ratio)


@contextmanager
def extracted(
    path: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_ratio: int = DEFAULT_MAX_RATIO,
    tmp_dir: str | Path | None = None,
) -> Iterator[Path]:
    """Extract ``path`` into a fresh temporary folder (under ``tmp_dir``), yield it, remove it."""
    work = Path(tempfile.mkdtemp(prefix=EXTRACT_PREFIX, dir=tmp_dir))
    try:
        extract_archive(
            path, work, max_bytes=max_bytes, max_members=max_members, max_ratio=max_ratio
        )
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_archive(folder: str | Path, target: str | Path, kind: str) -> None:
    """Write ``folder`` (and its files, one level) as ``target``, an archive of one folder.

    Members are ``<folder name>/<file>``, regular files only, with neutral owners and modes."""
    folder, target = Path(folder), Path(target)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    root = folder.name
    if kind == "zip":
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, f"{root}/{p.name}")
    elif kind == "tar.gz":
        with tarfile.open(target, "w:gz") as tf:

            def neutral(info: tarfile.TarInfo) -> tarfile.TarInfo:
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o755 if info.isdir() else 0o644
                return info

            for p in files:
                tf.add(p, arcname=f"{root}/{p.name}", recursive=False, filter=neutral)
    else:
        raise ValueError(f"unknown archive kind {kind!r}; use 'zip' or 'tar.gz'")
