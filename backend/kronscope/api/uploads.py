"""Streaming multipart reception for checkpoint uploads.

The body is parsed as it arrives and each file part is written in chunks to a fresh
temporary folder under ``data_dir/tmp``; the running total is checked on every chunk, so
an upload over the limit is refused (413) as soon as the limit is crossed, and the folder
is removed on any failure. Nothing is buffered whole in memory.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..services.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from ..services.sae_registry import ARCHIVE_SUFFIXES, CHECKPOINT_FILES

FILE_FIELDS = ("files", "file")
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 50
MAX_FILES = 16

# The request body the OpenAPI schema documents for the upload route.
UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "The checkpoint folder's files ("
                            + ", ".join(CHECKPOINT_FILES)
                            + "), or one .zip / .tar.gz of the folder.",
                        },
                        "slug": {
                            "type": "string",
                            "description": "Identifier to use (default: derived).",
                        },
                        "model_name": {
                            "type": "string",
                            "description": "Overrides metadata.model_name.",
                        },
                        "hook_name": {
                            "type": "string",
                            "description": "Overrides metadata.hook_name.",
                        },
                        "harvest": {
                            "type": "boolean",
                            "description": "Start a harvest job afterwards.",
                        },
                        "harvest_corpus": {"type": "string"},
                        "harvest_tokens": {"type": "integer", "minimum": 1},
                        "harvest_ctx_len": {"type": "integer", "minimum": 2},
                        "harvest_examples": {"type": "integer", "minimum": 1},
                    },
                }
            }
        },
    }
}


@dataclass
class ReceivedUpload:
    """Files written under ``folder`` (by their base names) and the text fields."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    size: int = 0

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _safe_name(raw: str) -> str:
    # Browsers send "folder/cfg.json" for folder uploads; keep only the base name.
    name = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    allowed = name in CHECKPOINT_FILES or name.lower().endswith(ARCHIVE_SUFFIXES)
    if not name or name in (".", "..") or not allowed:
        raise Unprocessable(
            f"Unexpected file {raw!r}: upload the checkpoint's files ({', '.join(CHECKPOINT_FILES)}) "
            "or one .zip / .tar.gz archive of the folder.",
            detail={"file": raw},
        )
    return name


class _Receiver:
    def __init__(self, target: ReceivedUpload, limit: int):
        self.target = target
        self.limit = limit
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.field_name = ""
        self.buffer: bytearray | None = None
        self.handle: IO[bytes] | None = None

    # python-multipart callbacks -------------------------------------------------------
    def on_part_begin(self) -> None:
        self.disposition = b""
        self.buffer = None
        self.handle = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = b""
        self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise BadRequest("A multipart part has no name in its Content-Disposition header.")
        self.field_name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self.field_name not in FILE_FIELDS:
                raise Unprocessable(
                    f"Files must be sent in the 'files' field, not {self.field_name!r}.",
                    detail={"field": self.field_name},
                )
            name = _safe_name(options[b"filename"].decode("utf-8", "replace"))
            if name in self.target.files:
                raise Unprocessable(f"The file {name!r} was sent twice.", detail={"file": name})
            if len(self.target.files) >= MAX_FILES:
                raise Unprocessable(f"Too many files; a checkpoint has at most {MAX_FILES}.")
            path = self.target.folder / name
            self.target.files[name] = path
            self.handle = path.open("wb")
        else:
            if len(self.target.fields) >= MAX_FIELDS:
                raise Unprocessable("Too many form fields.")
            self.buffer = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.handle is not None:
            self.handle.write(chunk)
        elif self.buffer is not None:
            if len(self.buffer) + len(chunk) > MAX_FIELD_BYTES:
                raise Unprocessable(f"The form field {self.field_name!r} is too long.")
            self.buffer.extend(chunk)

    def on_part_end(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        elif self.buffer is not None:
            self.target.fields[self.field_name] = self.buffer.decode("utf-8", "replace")
            self.buffer = None

    def close(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The upload is larger than the limit of {limit:,} bytes.", detail={"limit_bytes": limit}
    )


async def receive_upload(request: Request, tmp_root: Path, limit: int) -> ReceivedUpload:
    """Stream a multipart body into a new folder under ``tmp_root``; the caller removes it."""
    content_type = request.headers.get("content-type", "")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise UnsupportedMediaType(
            "Upload a checkpoint as multipart/form-data (the folder's files, or one .zip / .tar.gz)"
            f", not {content_type or 'a body without a Content-Type'}.",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("The multipart Content-Type has no boundary.")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)

    tmp_root.mkdir(parents=True, exist_ok=True)
    target = ReceivedUpload(folder=tmp_root / f"upload-{uuid.uuid4().hex}")
    target.folder.mkdir()
    receiver = _Receiver(target, limit)
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": receiver.on_part_begin,
                "on_part_data": receiver.on_part_data,
                "on_part_end": receiver.on_part_end,
                "on_header_field": receiver.on_header_field,
                "on_header_value": receiver.on_header_value,
                "on_header_end": receiver.on_header_end,
                "on_headers_finished": receiver.on_headers_finished,
            },
        )
        async for chunk in request.stream():
            target.size += len(chunk)
            if target.size > limit:
                raise _too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        receiver.close()
        target.remove()
        raise BadRequest(f"The multipart body could not be read: {exc}.") from exc
    except BaseException:
        receiver.close()
        target.remove()
        raise
    receiver.close()
    if not target.files:
        target.remove()
        raise Unprocessable(
            "No checkpoint files were sent: add the folder's files (or one archive) as 'files' parts."
        )
    return target
