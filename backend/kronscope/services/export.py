"""Export an SAE as Neuronpedia-compatible JSONL batches, and import such batches back.

**Format (decided here).** Neuronpedia's own exporter writes, per model and source (SAE),
``<modelId>/<source>/{features,explanations,activations}/batch-N.jsonl[.gz]`` with 1,024
features a batch, one JSON object a line:

- features: ``modelId``, ``layer`` (the source id), ``index`` (a string), ``maxActApprox``,
  ``frac_nonzero`` (density), ``freq_hist_data_bar_heights`` / ``_values``, ``pos_str`` /
  ``pos_values`` and ``neg_str`` / ``neg_values`` (logit effects), ``topkCosSimIndices`` /
  ``Values`` (neighbours), ``hookName``;
- activations: ``id``, ``modelId``, ``layer``, ``index``, ``tokens``, ``values``,
  ``maxValue``, ``minValue``, ``maxValueTokenIndex``, ``dataSource``, ``binMin`` / ``binMax``;
- explanations: ``id``, ``modelId``, ``layer``, ``index``, ``authorId``, ``description``,
  ``typeName``, ``explanationModelName``.

``GET /saes/{sae}/export`` streams a **zip** (default) in exactly that layout, with
``<model>/<slug>/`` as the folder, plus ``kronscope.json`` (a manifest: slug, model, hook,
architecture, d_sae, h/m/n, harvest) and, for KronSAEs, the parents' records under
``kronscope-parents/{base,extension}/{features,explanations,activations}/`` (Neuronpedia has
no parents; its importer ignores the extra folders). ``?format=jsonl`` streams the same
records as one JSON-lines file instead, each line with a ``type`` field (``sae`` first,
then ``feature``, ``explanation``, ``activation``). Every record may carry a ``kronscope``
object with what Neuronpedia has no field for (unit kind, coordinates, source, author,
score, history, exact histogram, example kind and rank), so an import restores exactly.

**Import** (``kronscope import FILE --sae SLUG``) reads our zip or JSONL, a Neuronpedia
export folder (or a zip of one), or single batch files (``.jsonl`` / ``.jsonl.gz``; the
record kind is taken from the folder name or the fields). It runs in two passes: the first
validates every record (JSON, types, ``index`` within the target's d_sae, one source only,
and that model, hook and d_sae match the target SAE: a manifest's or each record's
``modelId`` / ``hookName``); only then does the second write everything in ONE
transaction. Any problem is an ``ImportFailed`` naming file and line, and nothing is
written. Explanations become explanations (a duplicate of a live one is skipped; our
history is replayed as revisions). Features and activations, if present, become a new
harvest that is made active when the import commits: contexts keep the token strings
with ids private to that harvest (``params.synthetic_token_ids``), top activations are
ranked by their maximum within each batch file.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from .. import __version__
from ..db.codec import unpack_i64
from ..db.models import ExampleKind, Sae, UnitKind, UnitStats
from ..db.repositories import examples as example_repo
from ..db.repositories import explanations as expl_repo
from ..db.repositories import harvests as harvest_repo
from ..db.repositories import saes as sae_repo
from ..db.repositories import stats as stats_repo
from ..db.repositories.examples import ExampleView
from . import tx
from .errors import Unprocessable

BATCH = 1024
"""Units per batch file, as Neuronpedia's exporter."""
FORMAT = "kronscope-export"
FORMAT_VERSION = 1
MANIFEST = "kronscope.json"
PARENTS_DIR = "kronscope-parents"
SECTIONS = ("features", "explanations", "activations")
Section = Literal["features", "explanations", "activations"]
_TYPE_OF = {"features": "feature", "explanations": "explanation", "activations": "activation"}
_SECTION_OF = {v: k for k, v in _TYPE_OF.items()}
_KIND_NAMES = {UnitKind.LATENT: "latent", UnitKind.BASE: "base", UnitKind.EXTENSION: "extension"}
_KINDS = {v: k for k, v in _KIND_NAMES.items()}
MAX_LINE_BYTES = 64 * 1024**2
MAX_IMPORT_BYTES = 16 * 1024**3
"""Uncompressed bytes an import reads at most (a zip or gzip bomb stops here)."""


class ImportFailed(Unprocessable):
    """A file that cannot be imported into this SAE; nothing was written."""


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def model_id(sae: Sae) -> str:
    return sae.model_name or "unknown-model"


def manifest(session: Session, sae: Sae) -> dict[str, Any]:
    harvest = (
        harvest_repo.get_harvest(session, sae.active_harvest_id) if sae.active_harvest_id else None
    )
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kronscope_version": __version__,
        "exported_at": datetime.now(UTC).isoformat(),
        "sae": sae.slug,
        "model_id": model_id(sae),
        "layer": sae.slug,
        "hook_name": sae.hook_name,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "h": sae.h,
        "m": sae.m,
        "n": sae.n,
        "composition": sae.composition,
        "harvest": None
        if harvest is None
        else {
            "corpus": harvest.corpus_name,
            "tokens_seen": harvest.tokens_seen,
            "ctx_len": harvest.ctx_len,
        },
    }


def _unit_ext(sae: Sae, kind: UnitKind, index: int) -> dict[str, Any]:
    out: dict[str, Any] = {"unit": _KIND_NAMES[kind]}
    if sae.is_kronsae:
        assert sae.m and sae.n
        if kind == UnitKind.LATENT:
            g, rest = divmod(index, sae.m * sae.n)
            out.update(head=g, base=rest // sae.n, extension=rest % sae.n)
        else:
            size = sae.m if kind == UnitKind.BASE else sae.n
            out.update(head=index // size, index_in_head=index % size)
    return out


def feature_record(sae: Sae, kind: UnitKind, s: UnitStats) -> dict[str, Any]:
    heights: list[float] = []
    centers: list[float] = []
    counts: list[int] | None = None
    edges = s.histogram_edges
    if s.histogram is not None and edges:
        counts = [int(c) for c in unpack_i64(s.histogram)]
        if len(edges) == len(counts) + 1:
            heights = [float(c) for c in counts]
            centers = [(float(edges[i]) + float(edges[i + 1])) / 2 for i in range(len(counts))]
    logits = s.logit_effects if isinstance(s.logit_effects, dict) else {}

    def pairs(key: str) -> tuple[list[str], list[float]]:
        items = [p for p in logits.get(key) or [] if isinstance(p, list | tuple) and len(p) == 2]
        return [str(p[0]) for p in items], [_num(p[1]) or 0.0 for p in items]

    pos_str, pos_values = pairs("top")
    neg_str, neg_values = pairs("bottom")
    neigh = [p for p in s.neighbours or [] if isinstance(p, list | tuple) and len(p) == 2]
    return {
        "modelId": model_id(sae),
        "layer": sae.slug,
        "index": str(s.unit_index),
        "maxActApprox": _num(s.max_value) or 0.0,
        "frac_nonzero": _num(s.frequency) or 0.0,
        "freq_hist_data_bar_heights": heights,
        "freq_hist_data_bar_values": centers,
        "pos_str": pos_str,
        "pos_values": pos_values,
        "neg_str": neg_str,
        "neg_values": neg_values,
        "topkCosSimIndices": [int(p[0]) for p in neigh],
        "topkCosSimValues": [_num(p[1]) or 0.0 for p in neigh],
        "hookName": sae.hook_name,
        "kronscope": {
            **_unit_ext(sae, kind, s.unit_index),
            "n_active": int(s.n_active),
            "mean_value": _num(s.mean_value),
            "histogram_counts": counts,
            "histogram_edges": [float(e) for e in edges] if edges else None,
            "both_parents_active": s.both_parents_active,
            "kept_count": s.kept_count,
        },
    }


def explanation_record(session: Session, sae: Sae, e: Any) -> dict[str, Any]:
    source = e.source or "human"
    history = expl_repo.explanation_history(session, e.id)
    return {
        "id": str(e.id),
        "modelId": model_id(sae),
        "layer": sae.slug,
        "index": str(e.unit_index),
        "authorId": e.author,
        "description": e.text,
        "typeName": "kronscope-" + source.split(":", 1)[0],
        "explanationModelName": source[4:] if source.startswith("llm:") else None,
        "kronscope": {
            **_unit_ext(sae, UnitKind(e.unit_kind), e.unit_index),
            "source": source,
            "author": e.author,
            "score": _num(e.score),
            "created_at": e.created_at.isoformat() if e.created_at else None,
            "history": [{"text": r.text, "author": r.author, "source": r.source} for r in history],
        },
    }


def activation_record(sae: Sae, kind: UnitKind, ex: ExampleView, corpus: str) -> dict[str, Any]:
    values = [
        float(v) if math.isfinite(float(v)) else 0.0
        for v in np.asarray(ex.values, dtype=np.float32)
    ]
    sampled = ex.kind == ExampleKind.SAMPLE
    return {
        "id": f"{sae.slug}:{_KIND_NAMES[kind]}:{ex.unit_index}:{'s' if sampled else 't'}{ex.rank}",
        "modelId": model_id(sae),
        "layer": sae.slug,
        "index": str(ex.unit_index),
        "tokens": list(ex.tokens),
        "values": values,
        "maxValue": max(values) if values else 0.0,
        "minValue": min(values) if values else 0.0,
        "maxValueTokenIndex": int(ex.max_pos),
        "dataSource": corpus,
        "binMin": _num(ex.sample_value) if sampled else None,
        "binMax": _num(ex.sample_value) if sampled else None,
        "kronscope": {
            **_unit_ext(sae, kind, ex.unit_index),
            "example": "sample" if sampled else "top",
            "rank": ex.rank,
            "sample_pos": ex.sample_pos,
            "sample_value": _num(ex.sample_value),
            "context_position": ex.position,
        },
    }


@dataclass(frozen=True)
class Batch:
    """One batch file: ``path`` inside the export folder and its records."""

    path: str
    section: Section
    kind: UnitKind
    records: list[dict[str, Any]]


def _unit_count(sae: Sae, kind: UnitKind) -> int:
    if kind == UnitKind.LATENT:
        return sae.d_sae
    assert sae.h and sae.m and sae.n
    return sae.h * (sae.m if kind == UnitKind.BASE else sae.n)


def iter_batches(
    session_factory: sessionmaker[Session],
    sae_id: int,
    *,
    sections: Iterable[str] = SECTIONS,
    parents: bool = True,
) -> Iterator[Batch]:
    """Every batch of the export, a fresh short session per batch."""
    with session_factory() as s:
        sae = sae_repo.get_sae(s, sae_id)
        if sae is None:
            return
        kinds = [UnitKind.LATENT]
        if parents and sae.is_kronsae:
            kinds += [UnitKind.BASE, UnitKind.EXTENSION]
        counts = {k: _unit_count(sae, k) for k in kinds}
    wanted = [sec for sec in SECTIONS if sec in set(sections)]
    for kind in kinds:
        folder = "" if kind == UnitKind.LATENT else f"{PARENTS_DIR}/{_KIND_NAMES[kind]}/"
        for section in wanted:
            for n, start in enumerate(range(0, counts[kind], BATCH)):
                indices = range(start, min(start + BATCH, counts[kind]))
                with session_factory() as s:
                    sae = sae_repo.get_sae(s, sae_id)
                    if sae is None:
                        return
                    records = _section_records(s, sae, section, kind, indices)  # type: ignore[arg-type]
                    s.rollback()
                if records:
                    yield Batch(f"{folder}{section}/batch-{n}.jsonl", section, kind, records)  # type: ignore[arg-type]


def _section_records(
    s: Session, sae: Sae, section: Section, kind: UnitKind, indices: range
) -> list[dict[str, Any]]:
    if section == "explanations":
        found = expl_repo.explanations_for_units(s, sae.id, int(kind), indices)
        return [explanation_record(s, sae, e) for i in indices for e in found.get(i, [])]
    if sae.active_harvest_id is None:
        return []
    if section == "features":
        stats = stats_repo.stats_for_units(s, sae, int(kind), indices)
        return [feature_record(sae, kind, stats[i]) for i in indices if i in stats]
    harvest = harvest_repo.get_harvest(s, sae.active_harvest_id)
    corpus = harvest.corpus_name if harvest else ""
    out = []
    for i in indices:
        for ex in example_repo.top_examples(s, sae, int(kind), i):
            out.append(activation_record(sae, kind, ex, corpus))
        for ex in example_repo.sampled_examples(s, sae, int(kind), i):
            out.append(activation_record(sae, kind, ex, corpus))
    return out


def _jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records
    ).encode("utf-8")


class _Sink(io.RawIOBase):
    """An unseekable file that collects what ``zipfile`` writes, to be streamed out."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.offset = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.buffer += data
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def take(self) -> bytes:
        out = bytes(self.buffer)
        self.buffer.clear()
        return out


def export_zip(session_factory: sessionmaker[Session], sae_id: int, **opts: Any) -> Iterator[bytes]:
    """The export as a zip, produced piece by piece (one batch in memory at a time)."""
    with session_factory() as s:
        sae = sae_repo.get_sae(s, sae_id)
        if sae is None:
            return
        meta = manifest(s, sae)
    root = f"{_safe(meta['model_id'])}/{_safe(meta['layer'])}/"
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=5) as zf:
        zf.writestr(root + MANIFEST, json.dumps(meta, indent=2, ensure_ascii=False))
        zf.writestr(root + "model.jsonl", _jsonl([{"id": meta["model_id"]}]))
        zf.writestr(
            root + "source.jsonl",
            _jsonl(
                [{"id": meta["layer"], "modelId": meta["model_id"], "hookName": meta["hook_name"]}]
            ),
        )
        yield sink.take()
        for batch in iter_batches(session_factory, sae_id, **opts):
            with zf.open(root + batch.path, "w", force_zip64=True) as f:
                f.write(_jsonl(batch.records))
            yield sink.take()
    yield sink.take()


def export_jsonl(
    session_factory: sessionmaker[Session], sae_id: int, **opts: Any
) -> Iterator[bytes]:
    """The export as JSON lines with a ``type`` field (``sae`` first)."""
    with session_factory() as s:
        sae = sae_repo.get_sae(s, sae_id)
        if sae is None:
            return
        meta = manifest(s, sae)
    yield _jsonl([{"type": "sae", **meta}])
    for batch in iter_batches(session_factory, sae_id, **opts):
        yield _jsonl({"type": _TYPE_OF[batch.section], **r} for r in batch.records)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "x"


# ---------------------------------------------------------------------------------------------
# Import: reading
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    section: Section
    kind: UnitKind
    data: dict[str, Any]
    where: str
    """``file:line`` for messages."""
    group: str
    """The batch file it came from (activations are ranked within one)."""


_BATCH_RE = re.compile(r"(?:^|/)(features|explanations|activations)/[^/]*\.jsonl(?:\.gz)?$")
_PARENT_RE = re.compile(rf"(?:^|/){PARENTS_DIR}/(base|extension)/")


class _Budget:
    def __init__(self) -> None:
        self.used = 0

    def take(self, n: int, where: str) -> None:
        self.used += n
        if self.used > MAX_IMPORT_BYTES:
            raise ImportFailed(
                f"{where}: the import is larger than {MAX_IMPORT_BYTES:,} bytes uncompressed."
            )


def _lines(raw: IO[bytes], name: str, budget: _Budget) -> Iterator[tuple[int, bytes]]:
    stream: IO[bytes] = raw
    if name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
    n = 0
    try:
        while True:
            line = stream.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            n += 1
            budget.take(len(line), f"{name}:{n}")
            if len(line) > MAX_LINE_BYTES:
                raise ImportFailed(f"{name}:{n}: a line longer than {MAX_LINE_BYTES:,} bytes.")
            if line.strip():
                yield n, line
    except (OSError, EOFError, zlib.error) as exc:
        raise ImportFailed(f"{name}: cannot be read ({exc}).") from exc


def _parse(line: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ImportFailed(f"{where}: not UTF-8 text.") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise ImportFailed(f"{where}: not valid JSON ({exc}).") from None
    if not isinstance(obj, dict):
        raise ImportFailed(f"{where}: each line must be a JSON object.")
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _infer_section(obj: dict[str, Any], where: str, hint: str | None) -> Section | None:
    t = obj.get("type")
    if isinstance(t, str):
        if t == "sae":
            return None
        if t not in _SECTION_OF:
            raise ImportFailed(f"{where}: unknown record type {t!r}.")
        return _SECTION_OF[t]  # type: ignore[return-value]
    if hint:
        return hint  # type: ignore[return-value]
    if "description" in obj:
        return "explanations"
    if "tokens" in obj and "values" in obj:
        return "activations"
    if "maxActApprox" in obj or "frac_nonzero" in obj:
        return "features"
    raise ImportFailed(
        f"{where}: cannot tell whether this is a feature, an activation or an explanation."
    )


def _kind_of(obj: dict[str, Any], path_kind: UnitKind, where: str) -> UnitKind:
    ext = obj.get("kronscope")
    if isinstance(ext, dict) and "unit" in ext:
        unit = ext["unit"]
        if unit not in _KINDS:
            raise ImportFailed(f"{where}: unknown kronscope.unit {unit!r}.")
        return _KINDS[unit]
    return path_kind


def _manifest_first(name: str | Path) -> tuple[bool, str]:
    text = name.as_posix() if isinstance(name, Path) else name
    return (text.rsplit("/", 1)[-1] != MANIFEST, text)


@dataclass
class Source:
    """Something to import: a file or folder, read as many times as needed."""

    path: Path

    def files(self) -> Iterator[tuple[str, Callable[[], IO[bytes]]]]:
        """``(name, opener)`` of every JSON(L) member, in a stable order."""
        p = self.path
        if p.is_dir():
            for f in sorted((q for q in p.rglob("*") if q.is_file()), key=_manifest_first):
                yield f.relative_to(p).as_posix(), (lambda f=f: f.open("rb"))  # type: ignore[misc]
            return
        if zipfile.is_zipfile(p):
            try:
                zf = zipfile.ZipFile(p)
            except zipfile.BadZipFile as exc:
                raise ImportFailed(f"{p.name}: a damaged zip file ({exc}).") from exc
            with zf:
                for info in sorted(zf.infolist(), key=lambda i: _manifest_first(i.filename)):
                    if not info.is_dir():
                        yield info.filename, (lambda i=info: zf.open(i))  # type: ignore[misc]
            return
        yield p.name, (lambda: p.open("rb"))


@dataclass
class Scan:
    """What the validating pass found."""

    manifest: dict[str, Any] | None = None
    counts: Counter[str] = field(default_factory=Counter)
    layers: set[str] = field(default_factory=set)
    max_tokens: int = 0
    format: str = "neuronpedia"
    features_seen: set[tuple[int, int]] = field(default_factory=set)


def read_records(source: Source, scan: Scan | None = None) -> Iterator[Record]:
    """Every record of ``source``; the manifest (ours) goes into ``scan``."""
    budget = _Budget()
    found_any = False
    for name, opener in source.files():
        base = name.rsplit("/", 1)[-1]
        if base == MANIFEST:
            with opener() as f:
                raw = f.read(16 * 1024**2 + 1)
            meta = _parse(raw, name)
            if meta.get("format") != FORMAT:
                raise ImportFailed(f"{name}: not a KronScope export manifest.")
            if scan is not None:
                scan.manifest = meta
                scan.format = "kronscope"
            continue
        m = _BATCH_RE.search(name)
        if m is None and not re.search(r"\.(jsonl|ndjson)(\.gz)?$", base):
            continue  # model.jsonl, source.jsonl, READMEs...
        if base in ("model.jsonl", "source.jsonl", "release.jsonl", "sourceset.jsonl"):
            continue
        hint = m.group(1) if m else None
        pm = _PARENT_RE.search(name)
        path_kind = _KINDS[pm.group(1)] if pm else UnitKind.LATENT
        found_any = True
        with opener() as f:
            for n, line in _lines(f, name, budget):
                where = f"{name}:{n}"
                obj = _parse(line, where)
                section = _infer_section(obj, where, hint)
                if section is None:  # our JSONL's first line: the manifest
                    if scan is not None:
                        scan.manifest = {k: v for k, v in obj.items() if k != "type"}
                        scan.format = "kronscope"
                    continue
                yield Record(section, _kind_of(obj, path_kind, where), obj, where, name)
    if not found_any:
        raise ImportFailed(
            f"{source.path.name}: no features, explanations or activations batches found "
            "(expected a KronScope export, a Neuronpedia export folder or .jsonl batch files)."
        )


# ---------------------------------------------------------------------------------------------
# Import: validating
# ---------------------------------------------------------------------------------------------
def _index(obj: dict[str, Any], where: str) -> int:
    raw = obj.get("index")
    if isinstance(raw, bool):
        raise ImportFailed(f"{where}: 'index' must be a whole number.")
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw.strip())
    if isinstance(raw, int) and raw >= 0:
        return raw
    raise ImportFailed(f"{where}: 'index' must be a whole number, got {raw!r}.")


def _number(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> float | None:
    v = obj.get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise ImportFailed(f"{where}: {key!r} must be a finite number, got {v!r}.")
    return float(v)


def _check(rec: Record, sae: Sae, scan: Scan, allow_mismatch: bool) -> None:
    obj, where = rec.data, rec.where
    index = _index(obj, where)
    if rec.kind != UnitKind.LATENT and not sae.is_kronsae:
        raise ImportFailed(
            f"{where}: a KronSAE parent record, but {sae.slug} is a {sae.architecture} SAE."
        )
    count = _unit_count(sae, rec.kind)
    if index >= count:
        what = "latents" if rec.kind == UnitKind.LATENT else f"{_KIND_NAMES[rec.kind]} parents"
        raise ImportFailed(
            f"{where}: index {index} is out of range: {sae.slug} has {count} {what} "
            "(this file is for another SAE)."
        )
    layer = obj.get("layer")
    if isinstance(layer, str):
        scan.layers.add(layer)
        if len(scan.layers) > 1:
            raise ImportFailed(
                f"{where}: the file holds records of several sources ({', '.join(sorted(scan.layers))}); "
                "import one SAE at a time."
            )
    if not allow_mismatch:
        mid = obj.get("modelId")
        if isinstance(mid, str) and sae.model_name and mid != sae.model_name:
            raise ImportFailed(
                f"{where}: the records are for model {mid!r}, but {sae.slug} reads {sae.model_name!r} "
                "(pass --allow-mismatch if the names differ but the model is the same)."
            )
        hook = obj.get("hookName")
        if isinstance(hook, str) and hook and sae.hook_name and hook != sae.hook_name:
            raise ImportFailed(
                f"{where}: the records are for hook {hook!r}, but {sae.slug} reads {sae.hook_name!r} "
                "(pass --allow-mismatch if they are the same place)."
            )
    if rec.section == "explanations":
        text = obj.get("description")
        if not isinstance(text, str) or not text.strip():
            raise ImportFailed(f"{where}: an explanation needs a non-empty 'description'.")
        if "\x00" in text:
            raise ImportFailed(f"{where}: the description contains a NUL character.")
    elif rec.section == "activations":
        tokens, values = obj.get("tokens"), obj.get("values")
        if (
            not isinstance(tokens, list)
            or not all(isinstance(t, str) for t in tokens)
            or not tokens
        ):
            raise ImportFailed(f"{where}: 'tokens' must be a non-empty list of strings.")
        if any("\x00" in t for t in tokens):
            raise ImportFailed(f"{where}: a token contains a NUL character.")
        if not isinstance(values, list) or len(values) != len(tokens):
            raise ImportFailed(
                f"{where}: 'values' must be a list as long as 'tokens' ({len(tokens)})."
            )
        if not all(
            not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)
            for v in values
        ):
            raise ImportFailed(f"{where}: 'values' must be finite numbers.")
        if len(tokens) > 32_767:
            raise ImportFailed(f"{where}: {len(tokens)} tokens is more than one context may hold.")
        scan.max_tokens = max(scan.max_tokens, len(tokens))
    else:
        if (int(rec.kind), index) in scan.features_seen:
            raise ImportFailed(f"{where}: a second feature record for index {index}.")
        scan.features_seen.add((int(rec.kind), index))
        _number(obj, "maxActApprox", where, required=False)
        freq = _number(obj, "frac_nonzero", where, required=False)
        if freq is not None and not 0 <= freq <= 1:
            raise ImportFailed(f"{where}: 'frac_nonzero' must be between 0 and 1, got {freq}.")
    scan.counts[rec.section] += 1


def _check_manifest(meta: dict[str, Any], sae: Sae, allow_mismatch: bool) -> None:
    if meta.get("d_sae") != sae.d_sae:
        raise ImportFailed(
            f"The export is of an SAE with d_sae = {meta.get('d_sae')}, but {sae.slug} has "
            f"d_sae = {sae.d_sae}: it is for another SAE."
        )
    if meta.get("architecture") == "kronsae" and sae.is_kronsae:
        theirs = (meta.get("h"), meta.get("m"), meta.get("n"))
        if theirs != (sae.h, sae.m, sae.n):
            raise ImportFailed(
                f"The export's KronSAE has (h, m, n) = {theirs}, but {sae.slug} has "
                f"{(sae.h, sae.m, sae.n)}: it is for another SAE."
            )
    if allow_mismatch:
        return
    for key, ours, what in (
        ("model_id", sae.model_name, "model"),
        ("hook_name", sae.hook_name, "hook"),
    ):
        named = meta.get(key)
        if named and ours and named != ours:
            raise ImportFailed(
                f"The export is for {what} {named!r}, but {sae.slug} reads {ours!r} "
                "(pass --allow-mismatch if they are the same)."
            )


# ---------------------------------------------------------------------------------------------
# Import: writing
# ---------------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    explanations: int = 0
    explanations_skipped: int = 0
    features: int = 0
    activations: int = 0
    harvest_id: int | None = None
    format: str = "neuronpedia"
    dry_run: bool = False

    def message(self) -> str:
        what = "would import" if self.dry_run else "imported"
        text = (
            f"{what} {self.explanations} explanations ({self.explanations_skipped} duplicates "
            f"skipped), {self.features} features, {self.activations} activations"
        )
        if self.harvest_id is not None:
            text += f" into harvest {self.harvest_id} (now active)"
        return text


def _ext(obj: dict[str, Any]) -> dict[str, Any]:
    """The record's ``kronscope`` object (ours), or an empty one."""
    ext = obj.get("kronscope")
    return ext if isinstance(ext, dict) else {}


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _source_of(obj: dict[str, Any]) -> str:
    ext = _ext(obj)
    if ext:
        try:
            return expl_repo.validate_source(str(ext.get("source") or ""))
        except ValueError:
            pass
    name = obj.get("explanationModelName")
    if isinstance(name, str) and name.strip():
        return f"llm:{name.strip()}"[:128]
    return "human"


def import_file(
    session_factory: sessionmaker[Session],
    sae_slug: str,
    path: str | Path,
    *,
    author: str = "import",
    allow_mismatch: bool = False,
    harvest: bool = True,
    dry_run: bool = False,
) -> ImportResult:
    """Validate everything, then write everything in one transaction (see the module doc)."""
    source = Source(Path(path))
    if not source.path.exists():
        raise ImportFailed(f"{source.path} does not exist.")
    with session_factory() as s:
        sae = sae_repo.get_sae_by_slug(s, sae_slug)
        if sae is None:
            raise ImportFailed(f"There is no SAE named {sae_slug!r}.")
        scan = Scan()
        checked = False
        for rec in read_records(source, scan):
            if scan.manifest is not None and not checked:  # the manifest comes first
                _check_manifest(scan.manifest, sae, allow_mismatch)
                checked = True
            _check(rec, sae, scan, allow_mismatch)
        if scan.manifest is not None and not checked:
            _check_manifest(scan.manifest, sae, allow_mismatch)
        sae_id = sae.id
        s.rollback()
    result = ImportResult(format=scan.format, dry_run=dry_run)
    if dry_run:
        result.explanations = scan.counts["explanations"]
        result.features = scan.counts["features"] if harvest else 0
        result.activations = scan.counts["activations"] if harvest else 0
        return result
    with session_factory() as s:
        try:
            sae = sae_repo.get_sae(s, sae_id)
            if sae is None:
                raise ImportFailed(f"{sae_slug} was deleted during the import.")
            writer = (
                _HarvestWriter(s, sae, source.path.name, scan)
                if harvest and (scan.counts["features"] or scan.counts["activations"])
                else None
            )
            for rec in read_records(source):
                if rec.section == "explanations":
                    if _write_explanation(s, sae, rec, author):
                        result.explanations += 1
                    else:
                        result.explanations_skipped += 1
                elif writer is not None:
                    writer.add(rec)
            if writer is not None:
                result.features, result.activations = writer.finish()
                result.harvest_id = writer.harvest_id
            tx.commit(s)
        except BaseException:
            tx.rollback(s)
            raise
    return result


def _write_explanation(s: Session, sae: Sae, rec: Record, author: str) -> bool:
    obj = rec.data
    index = _index(obj, rec.where)
    text = str(obj["description"]).strip()
    ext = _ext(obj)
    source = _source_of(obj)
    live = expl_repo.explanations_for_units(s, sae.id, int(rec.kind), [index]).get(index, [])
    if any(e.text == text for e in live):
        return False
    who = ext.get("author") if isinstance(ext.get("author"), str) else author
    score = ext.get("score") if isinstance(ext.get("score"), int | float) else None
    history = [
        h
        for h in ext.get("history") or []
        if isinstance(h, dict) and isinstance(h.get("text"), str)
    ]
    if len(history) < 2:
        expl_repo.create_explanation(
            s, sae.id, int(rec.kind), index, text, source=source, author=who, score=score
        )
        return True
    first, *rest = history

    def src(h: dict[str, Any]) -> str:
        try:
            return expl_repo.validate_source(str(h.get("source") or source))
        except ValueError:
            return source

    e = expl_repo.create_explanation(
        s,
        sae.id,
        int(rec.kind),
        index,
        first["text"],
        source=src(first),
        author=first.get("author"),
        score=score,
    )
    for h in rest:
        expl_repo.update_explanation(s, e.id, h["text"], author=h.get("author"), source=src(h))
    if e.text != text or e.source != source:
        expl_repo.update_explanation(s, e.id, text, author=who, source=source)
    return True


class _HarvestWriter:
    """Features and activations -> a new harvest, made active by ``finish``."""

    def __init__(self, s: Session, sae: Sae, name: str, scan: Scan):
        self.s = s
        self.sae = sae
        meta = scan.manifest or {}
        info = _ext({"kronscope": meta.get("harvest")})
        self.tokens_seen = _int(info.get("tokens_seen")) or 0
        corpus = f" of corpus {info['corpus']!r}" if info.get("corpus") else ""
        h = harvest_repo.create_harvest(
            s,
            sae.id,
            corpus_name=f"import: {name}"[:512],
            corpus_description=f"imported from {name} ({scan.format} export{corpus})",
            n_tokens=self.tokens_seen,
            ctx_len=max(scan.max_tokens, 1),
            params={"imported_from": name, "format": scan.format, "synthetic_token_ids": True},
        )
        harvest_repo.mark_running(s, h.id)
        self.harvest_id = h.id
        self.vocab: dict[str, int] = {}
        self.position = 0
        self.ranks: Counter[tuple[int, int, int]] = Counter()
        self.features = 0
        self.activations = 0
        self.pending: list[Record] = []
        self.group: str | None = None
        self.stat_rows: list[dict[str, Any]] = []

    def add(self, rec: Record) -> None:
        if rec.section == "features":
            self._feature(rec)
            return
        if self.group is not None and rec.group != self.group:
            self._flush()
        self.group = rec.group
        self.pending.append(rec)
        if len(self.pending) >= 20_000:
            self._flush()

    def _feature(self, rec: Record) -> None:
        obj, where = rec.data, rec.where
        ext = _ext(obj)
        edges, counts = ext.get("histogram_edges"), ext.get("histogram_counts")
        if not (
            isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1
        ):
            edges, counts = _hist_from_bars(obj)
        pos = list(zip(obj.get("pos_str") or [], obj.get("pos_values") or [], strict=False))
        neg = list(zip(obj.get("neg_str") or [], obj.get("neg_values") or [], strict=False))
        neigh = list(
            zip(obj.get("topkCosSimIndices") or [], obj.get("topkCosSimValues") or [], strict=False)
        )
        freq = _number(obj, "frac_nonzero", where, required=False) or 0.0
        n_active = ext.get("n_active")
        row = {
            "unit_kind": int(rec.kind),
            "unit_index": _index(obj, where),
            "n_active": n_active if isinstance(n_active, int) else round(freq * self.tokens_seen),
            "frequency": freq,
            "mean_value": ext.get("mean_value")
            if isinstance(ext.get("mean_value"), int | float)
            else None,
            "max_value": _number(obj, "maxActApprox", where, required=False) or 0.0,
            "histogram": [int(c) for c in counts] if counts else None,
            "histogram_edges": [float(e) for e in edges] if edges else None,
            "both_parents_active": ext.get("both_parents_active")
            if isinstance(ext.get("both_parents_active"), int)
            else None,
            "kept_count": ext.get("kept_count") if isinstance(ext.get("kept_count"), int) else None,
            "logit_effects": {
                "top": [[str(t), float(v)] for t, v in pos],
                "bottom": [[str(t), float(v)] for t, v in neg],
            }
            if pos or neg
            else None,
            "neighbours": [
                [int(i), float(c)]
                for i, c in neigh
                if isinstance(i, int | str) and str(i).isdigit()
            ]
            or None,
        }
        self.stat_rows.append(row)
        self.features += 1
        if len(self.stat_rows) >= 5_000:
            stats_repo.add_stats(self.s, self.harvest_id, self.stat_rows)
            self.stat_rows = []

    def _flush(self) -> None:
        if not self.pending:
            return
        recs = self.pending
        self.pending = []

        # top activations ranked by their maximum within the batch file; ours keep their rank
        def key(r: Record) -> tuple[int, int, int, float]:
            ext = _ext(r.data)
            rank = _int(ext.get("rank")) or 0
            return (int(r.kind), _index(r.data, r.where), rank, -float(max(r.data["values"])))

        recs.sort(key=key)
        contexts = []
        for r in recs:
            ids = []
            for t in r.data["tokens"]:
                if t not in self.vocab:
                    self.vocab[t] = len(self.vocab)
                ids.append(self.vocab[t])
            contexts.append((self.position, ids))
            self.position += 1
        cids = example_repo.add_contexts(self.s, self.harvest_id, contexts)
        rows = []
        for (pos, _), r in zip(contexts, recs, strict=True):
            obj = r.data
            ext = _ext(obj)
            sampled = ext.get("example") == "sample" if ext else (
                isinstance(obj.get("binMin"), int | float) and obj["binMin"] >= 0
            )  # fmt: skip
            kind = ExampleKind.SAMPLE if sampled else ExampleKind.TOP
            index = _index(obj, r.where)
            rk = (int(r.kind), index, int(kind))
            rank = self.ranks[rk]
            self.ranks[rk] += 1
            values = np.asarray(obj["values"], dtype=np.float32)
            max_pos = int(np.argmax(values))
            sample_pos = _int(ext.get("sample_pos"))
            if sample_pos is None:
                sample_pos = max_pos
            sample_pos = sample_pos if 0 <= sample_pos < len(values) else max_pos
            exact = ext.get("sample_value")  # ours: the value before float16 rounding
            sample_value = (
                float(exact) if isinstance(exact, int | float) else float(values[sample_pos])
            )
            rows.append(
                example_repo.ExampleRow(
                    unit_kind=int(r.kind),
                    unit_index=index,
                    kind=int(kind),
                    rank=rank,
                    context_id=cids[pos],
                    values=values,
                    max_value=float(values[max_pos]),
                    max_pos=max_pos,
                    sample_pos=sample_pos if sampled else None,
                    sample_value=sample_value if sampled else None,
                )
            )
        example_repo.add_examples(self.s, self.harvest_id, rows)
        self.activations += len(rows)

    def finish(self) -> tuple[int, int]:
        self._flush()
        if self.stat_rows:
            stats_repo.add_stats(self.s, self.harvest_id, self.stat_rows)
            self.stat_rows = []
        example_repo.add_tokens(self.s, self.harvest_id, {i: t for t, i in self.vocab.items()})
        harvest_repo.mark_complete(self.s, self.harvest_id, tokens_seen=self.tokens_seen)
        return self.features, self.activations


def _hist_from_bars(obj: dict[str, Any]) -> tuple[list[float] | None, list[int] | None]:
    """Neuronpedia bars (centres and heights) -> edges and counts, when evenly spaced."""
    heights, centers = obj.get("freq_hist_data_bar_heights"), obj.get("freq_hist_data_bar_values")
    if not (isinstance(heights, list) and isinstance(centers, list)) or len(heights) != len(
        centers
    ):
        return None, None
    if len(centers) < 2 or not all(isinstance(v, int | float) for v in centers + heights):
        return None, None
    width = (centers[-1] - centers[0]) / (len(centers) - 1)
    if width <= 0:
        return None, None
    edges = [centers[0] - width / 2 + i * width for i in range(len(centers) + 1)]
    return edges, [max(0, round(h)) for h in heights]
