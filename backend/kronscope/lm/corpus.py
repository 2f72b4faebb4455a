"""Corpora and the fixed-length token windows (contexts) cut from them.

A corpus spec is one of:

- ``builtin`` (alias ``pydoc``): the Python installation's own documentation, about
  1.3 M characters (see :mod:`kronscope.lm.pydoc_corpus`); no download.
- a ``.txt`` file: documents are separated by one or more blank lines (a file without
  blank lines is one document); each document is stripped of surrounding whitespace.
- a ``.md`` file: the whole file is one document (blank lines inside Markdown are not
  document breaks).
- a ``.jsonl`` or ``.jsonl.gz`` file, one JSON object per line; ``path.jsonl:field`` picks
  the text field (default ``text``). Blank lines and empty texts are skipped; a line that is
  not a JSON object with a string in that field is an error naming the file and line.
- a directory: every ``*.txt``, ``*.md``, ``*.jsonl`` and ``*.jsonl.gz`` file below it, in
  sorted path order, each read as above. Symbolic links and hidden (dot) entries are skipped.

Files are read as UTF-8 (a BOM is accepted) and streamed again on every
``iter_documents()``. ``sha256`` hashes the documents in order, each encoded as UTF-8 and
followed by a NUL byte, so it identifies the exact text a harvest saw.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import torch
from torch import Tensor

from .errors import CorpusError

if TYPE_CHECKING:
    from .model import SubjectModel

BUILTIN_NAMES = ("builtin", "pydoc")
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
DEFAULT_FIELD = "text"
TOKENIZE_BATCH = 64
"""Documents tokenised per call of the (fast, batched) tokenizer ..."""
TOKENIZE_BATCH_CHARS = 100_000
"""... or fewer, once they hold this many characters."""

_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n\s*")


@dataclass
class Corpus:
    """A named, hashed sequence of text documents, readable as often as needed."""

    name: str
    description: str
    sha256: str
    """Hash of the documents in order (UTF-8, each followed by a NUL byte)."""
    n_documents: int
    n_chars: int
    _reader: Callable[[], Iterator[str]] = field(repr=False, compare=False)

    def iter_documents(self) -> Iterator[str]:
        """The documents, in their fixed order."""
        return self._reader()


def load_corpus(spec: str | Path) -> Corpus:
    """A :class:`Corpus` from ``builtin``, a file, ``file.jsonl:field`` or a directory."""
    if isinstance(spec, str) and spec.strip().lower() in BUILTIN_NAMES:
        from .pydoc_corpus import TARGET_CHARS, builtin_documents

        docs = builtin_documents()
        return _finish(
            "builtin",
            f"the Python installation's documentation (pydoc topics and standard-library "
            f"docstrings, up to {TARGET_CHARS:,} characters)",
            lambda: iter(docs),
        )
    path, text_field = _split_field(spec)
    if path.is_dir():
        files = _directory_files(path)
        if not files:
            raise CorpusError(
                f"corpus directory {path} has no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files"
            )

        def read_dir() -> Iterator[str]:
            for f in files:
                yield from _read_file(f, text_field)

        return _finish(path.name or str(path), f"{len(files)} files under {path}", read_dir)
    if path.is_file():
        if not path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
            raise CorpusError(
                f"corpus file {path} is not a supported kind "
                f"({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}, a directory, or 'builtin')"
            )
        if path.name.endswith(TEXT_SUFFIXES) and text_field != DEFAULT_FIELD:
            raise CorpusError(f"corpus {spec!s}: a field name only applies to .jsonl files")
        kind = (
            f"JSON lines, field {text_field!r}"
            if path.name.endswith(JSONL_SUFFIXES)
            else "Markdown, one document"
            if path.name.endswith(".md")
            else "text, documents separated by blank lines"
        )
        return _finish(path.name, f"{path} ({kind})", lambda: _read_file(path, text_field))
    raise CorpusError(f"corpus {str(spec)!r}: no such file or directory (nor 'builtin')")


def _split_field(spec: str | Path) -> tuple[Path, str]:
    if isinstance(spec, Path):
        return spec, DEFAULT_FIELD
    raw = spec.strip()
    path = Path(raw).expanduser()
    if path.exists() or ":" not in raw:
        return path, DEFAULT_FIELD
    head, _, name = raw.rpartition(":")
    if not head.endswith(JSONL_SUFFIXES):
        return path, DEFAULT_FIELD
    if not name:
        raise CorpusError(f"corpus {spec!r}: empty field name after ':'")
    return Path(head).expanduser(), name


def _directory_files(root: Path) -> list[Path]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in filenames:
            full = Path(dirpath) / fname
            if fname.startswith(".") or full.is_symlink() or not full.is_file():
                continue
            if fname.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
                found.append((full.relative_to(root).as_posix(), full))
    return [p for _, p in sorted(found)]


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.name.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(path, text_field)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus file {path} is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise CorpusError(f"corpus file {path} cannot be read: {exc.strerror or exc}") from exc
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if path.name.endswith(".md"):
        doc = text.strip()
        if doc:
            yield doc
        return
    for doc in _BLANK_LINES.split(text):
        doc = doc.strip()
        if doc:
            yield doc


def _open_text(path: Path) -> TextIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return path.open(encoding="utf-8-sig")


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    lineno = 0
    try:
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise CorpusError(
                        f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}"
                    )
                if text_field not in record:
                    keys = ", ".join(sorted(map(str, record))[:10]) or "none"
                    raise CorpusError(
                        f"{path}, line {lineno}: no field {text_field!r} (fields: {keys})"
                    )
                value = record[text_field]
                if not isinstance(value, str):
                    raise CorpusError(
                        f"{path}, line {lineno}: field {text_field!r} is {type(value).__name__}, not a string"
                    )
                if value.strip():
                    yield value
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}, line {lineno + 1}: not UTF-8 text") from exc
    except (OSError, EOFError) as exc:  # unreadable, bad or truncated gzip
        raise CorpusError(
            f"corpus file {path} cannot be read (after line {lineno}): {exc}"
        ) from exc


def _finish(name: str, description: str, reader: Callable[[], Iterator[str]]) -> Corpus:
    """Read the documents once for their hash and counts."""
    digest = hashlib.sha256()
    n_docs = n_chars = 0
    for doc in reader():
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")
        n_docs += 1
        n_chars += len(doc)
    if n_docs == 0:
        raise CorpusError(
            f"corpus {name!r} ({description}) is empty: it has no non-blank documents"
        )
    return Corpus(name, description, digest.hexdigest(), n_docs, n_chars, reader)


# -- contexts -------------------------------------------------------------------------------
@dataclass
class Contexts:
    """Fixed-length token windows cut from a corpus for one model."""

    input_ids: Tensor
    """[N, L] int64."""
    attention_mask: Tensor
    """[N, L] int64, all ones (windows are full)."""
    special_mask: Tensor
    """[N, L] bool, True on special tokens (BOS, document separators, CLS/SEP)."""
    ctx_len: int = 0
    seed: int = 0
    corpus_sha256: str = ""
    n_corpus_tokens: int = 0
    """Tokens the corpus gave (with separators) before windows were cut."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        """``(start, input_ids, attention_mask, special_mask)`` for consecutive rows."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            yield (
                start,
                self.input_ids[start:end],
                self.attention_mask[start:end],
                self.special_mask[start:end],
            )


def make_contexts(
    corpus: Corpus,
    model: SubjectModel,
    ctx_len: int,
    *,
    seed: int = 0,
    max_contexts: int | None = None,
    prepend_bos: bool = True,
    shuffle: bool = True,
) -> Contexts:
    """Tokenise the corpus, join documents with a separator, cut windows of ``ctx_len``.

    Causal LMs: separator EOS (else BOS, else none); each window is ``[BOS] + ctx_len-1``
    tokens when ``prepend_bos`` and the tokenizer has a BOS, else ``ctx_len`` tokens.
    Encoders: separator ``[SEP]``, windows ``[CLS] + ctx_len-2 tokens + [SEP]``. The ragged
    tail is dropped; with ``shuffle`` the windows are permuted by a generator seeded with
    ``seed``; then at most ``max_contexts`` are kept."""
    if ctx_len > model.max_length:
        raise CorpusError(
            f"ctx_len {ctx_len} is longer than model {model.name!r} allows ({model.max_length} positions)"
        )
    tok = model.tokenizer
    head: list[int] = []
    tail: list[int] = []
    if model.encoder_style:
        head, tail = [tok.cls_token_id], [tok.sep_token_id]
        separator: int | None = tok.sep_token_id
    else:
        if prepend_bos and model.bos_token_id is not None:
            head = [model.bos_token_id]
        separator = model.eos_token_id if model.eos_token_id is not None else model.bos_token_id
    body = ctx_len - len(head) - len(tail)
    if body < 1:
        raise CorpusError(
            f"ctx_len {ctx_len} leaves no room for text after {len(head) + len(tail)} special tokens"
        )
    if max_contexts is not None and max_contexts < 1:
        raise CorpusError(f"max_contexts must be at least 1, got {max_contexts}")

    stream = array("q")
    enough = None if shuffle or max_contexts is None else max_contexts * body
    batch: list[str] = []

    def flush() -> None:
        enc = tok(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in enc:
            if not ids:
                continue
            if stream and separator is not None:
                stream.append(separator)
            stream.extend(ids)
        batch.clear()

    chars = 0
    for doc in corpus.iter_documents():
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= TOKENIZE_BATCH or chars >= TOKENIZE_BATCH_CHARS:
            chars = 0
            flush()
            if enough is not None and len(stream) >= enough:
                break
    if batch:
        flush()
    n = len(stream) // body
    if n == 0:
        raise CorpusError(
            f"corpus {corpus.name!r} gives {len(stream)} tokens with model {model.name!r}, "
            f"fewer than one context of {body} text tokens (ctx_len {ctx_len})"
        )
    windows = torch.from_numpy(np.frombuffer(stream, dtype=np.int64)[: n * body].copy()).view(
        n, body
    )
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        windows = windows[torch.randperm(n, generator=generator)]
    if max_contexts is not None:
        windows = windows[:max_contexts]
    parts = [windows]
    if head:
        parts.insert(0, torch.tensor(head, dtype=torch.long).expand(len(windows), len(head)))
    if tail:
        parts.append(torch.tensor(tail, dtype=torch.long).expand(len(windows), len(tail)))
    input_ids = torch.cat(parts, dim=1).contiguous()
    attention_mask = torch.ones_like(input_ids)
    return Contexts(
        input_ids,
        attention_mask,
        model.special_mask(input_ids),
        ctx_len=ctx_len,
        seed=seed,
        corpus_sha256=corpus.sha256,
        n_corpus_tokens=len(stream),
    )
