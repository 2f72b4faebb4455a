"""Explanations: write (every version kept), soft delete, list with history, search, and the
``explain`` job that generates them.

Units are addressed as ``(kind, index)``: ``latent`` (0..F-1), or for KronSAEs a ``base``
(head g, index i) or ``extension`` (head g, index j) parent, stored flat (``g*m + i`` /
``g*n + j``). Texts are stripped, at most ``MAX_TEXT`` characters, never NUL (PostgreSQL
cannot store it; 422), and lone surrogates become U+FFFD.

Generation jobs (kind ``explain``):

- **Nothing half-written.** A job reads the evidence and generates every text first (in
  memory, reporting progress), then writes all of them in ONE transaction at the end. A
  job that fails (LLM timeout, HTTP error, garbage answer), is cancelled or whose worker
  dies writes nothing; a requeued job simply starts over. Jobs are bounded by ``limit``
  (and F), so the texts always fit in memory.
- **What is written.** Each explanation records its source (``heuristic`` or
  ``llm:<model>``) and author (the name of the API key that started the job, or the CLI's
  ``--author``). With ``overwrite: false`` units that already have a live explanation are
  skipped; with ``overwrite: true`` units explained only by generators are explained
  again: the explanation from the job's source gets a new revision (history kept; none if
  the text is unchanged), or a new one is added. Units a person explained are always
  skipped, and human explanations are never changed by a job. Both checks are made again
  at write time, so an edit made while the job ran wins.
- **Order.** ``units: all`` explains parents before latents, so a KronSAE latent's text can
  quote what its base and extension parents fire on ("base: X; extension: Y; fires when
  both"), including parents explained by the same job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.orm import Session, sessionmaker

from ..config import Settings
from ..db import errors as db_errors
from ..db.models import Explanation, ExplanationRevision, JobKind, JobStatus, Sae, UnitKind
from ..db.repositories import examples as example_repo
from ..db.repositories import explanations as expl_repo
from ..db.repositories import jobs as job_repo
from ..db.repositories import saes as sae_repo
from ..db.repositories.examples import ExampleView
from . import tx
from .errors import Conflict, NotFound, Unprocessable
from .explainers import Evidence, Explainer, ExplainerError, Snippet

log = logging.getLogger(__name__)

MAX_TEXT = 2000
KINDS: dict[str, UnitKind] = {
    "latent": UnitKind.LATENT,
    "base": UnitKind.BASE,
    "extension": UnitKind.EXTENSION,
}
KIND_NAMES = {v: k for k, v in KINDS.items()}
UnitName = Literal["latent", "base", "extension"]
Backend = Literal["heuristic", "llm"]
UnitsChoice = Literal["latents", "parents", "all"]
READ_CHUNK = 256


# -- units ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    kind: UnitName
    index: int
    """Flat index (parents: ``g*m + i`` / ``g*n + j``)."""

    @property
    def unit_kind(self) -> int:
        return int(KINDS[self.kind])


def latent_unit(sae: Sae, index: int) -> Unit:
    if not 0 <= index < sae.d_sae:
        raise NotFound(
            f"Latent {index} is out of range: {sae.slug} has latents 0 to {sae.d_sae - 1}.",
            detail={"index": index, "d_sae": sae.d_sae},
        )
    return Unit("latent", index)


def parent_unit(sae: Sae, kind: str, head: int, index: int) -> Unit:
    if kind not in ("base", "extension"):
        raise NotFound(f"A parent is 'base' or 'extension', not {kind!r}.")
    if not sae.is_kronsae:
        raise NotFound(f"{sae.slug} is a {sae.architecture} SAE: only KronSAEs have parents.")
    assert sae.h and sae.m and sae.n
    if not 0 <= head < sae.h:
        raise NotFound(f"Head {head} is out of range: {sae.slug} has heads 0 to {sae.h - 1}.")
    size = sae.m if kind == "base" else sae.n
    if not 0 <= index < size:
        raise NotFound(
            f"{kind.capitalize()} parent {index} is out of range: each head has 0 to {size - 1}."
        )
    return Unit(kind, head * size + index)  # type: ignore[arg-type]


def unit_dict(sae: Sae, kind: int | str, index: int) -> dict[str, Any]:
    name = kind if isinstance(kind, str) else KIND_NAMES[UnitKind(kind)]
    out: dict[str, Any] = {"kind": name, "index": index}
    if sae.is_kronsae:
        assert sae.m and sae.n
        if name == "latent":
            g, rest = divmod(index, sae.m * sae.n)
            out.update(head=g, base=rest // sae.n, extension=rest % sae.n)
        else:
            size = sae.m if name == "base" else sae.n
            out.update(head=index // size, index_in_head=index % size)
    return out


def unit_label(sae: Sae, unit: Unit) -> str:
    d = unit_dict(sae, unit.kind, unit.index)
    if unit.kind == "latent":
        if "head" in d:
            return f"latent {unit.index} (head {d['head']}, base {d['base']}, extension {d['extension']})"
        return f"latent {unit.index}"
    letter = "b" if unit.kind == "base" else "e"
    return f"{unit.kind} h{d['head']}/{letter}{d['index_in_head']}"


# -- texts ---------------------------------------------------------------------------------------
def clean_text(text: str, field: str = "text") -> str:
    if "\x00" in text:
        raise Unprocessable(
            f"The {field} contains a NUL character (U+0000); remove it.", detail={"field": field}
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    text = text.strip()
    if not text:
        raise Unprocessable(f"The {field} is empty; write something.", detail={"field": field})
    if len(text) > MAX_TEXT:
        raise Unprocessable(
            f"The {field} has {len(text)} characters; an explanation may have at most {MAX_TEXT}.",
            detail={"field": field, "limit": MAX_TEXT},
        )
    return text


def revision_dict(r: ExplanationRevision) -> dict[str, Any]:
    return {"text": r.text, "author": r.author, "source": r.source, "created_at": r.created_at}


def explanation_dict(
    session: Session, sae: Sae, e: Explanation, *, history: bool = True
) -> dict[str, Any]:
    out = {
        "id": e.id,
        "sae": sae.slug,
        "unit": unit_dict(sae, e.unit_kind, e.unit_index),
        "text": e.text,
        "source": e.source,
        "author": e.author,
        "score": e.score,
        "created_at": e.created_at,
        "updated_at": e.updated_at,
        "deleted": e.deleted_at is not None,
    }
    if history:
        out["history"] = [revision_dict(r) for r in expl_repo.explanation_history(session, e.id)]
    return out


def _own(
    session: Session, sae: Sae, unit: Unit, explanation_id: int, *, include_deleted: bool = False
) -> Explanation:
    e = expl_repo.get_explanation(session, explanation_id, include_deleted=include_deleted)
    if (
        e is None
        or e.sae_id != sae.id
        or e.unit_kind != unit.unit_kind
        or e.unit_index != unit.index
    ):
        raise NotFound(
            f"There is no explanation {explanation_id} of {unit.kind} {unit.index} of {sae.slug}.",
            detail={"explanation": explanation_id},
        )
    return e


# -- writes from people --------------------------------------------------------------------------
def create(
    session: Session, sae: Sae, unit: Unit, text: str, *, author: str, score: float | None = None
) -> dict[str, Any]:
    e = expl_repo.create_explanation(
        session,
        sae.id,
        unit.unit_kind,
        unit.index,
        clean_text(text),
        source="human",
        author=author,
        score=score,
    )
    return explanation_dict(session, sae, e)


def update(
    session: Session, sae: Sae, unit: Unit, explanation_id: int, text: str, *, author: str
) -> dict[str, Any]:
    """A new version by ``author`` (source ``human``); every earlier version stays in the history."""
    _own(session, sae, unit, explanation_id)
    e = expl_repo.update_explanation(
        session, explanation_id, clean_text(text), author=author, source="human"
    )
    return explanation_dict(session, sae, e)


def delete(session: Session, sae: Sae, unit: Unit, explanation_id: int) -> None:
    _own(session, sae, unit, explanation_id)
    expl_repo.delete_explanation(session, explanation_id)


def get_one(session: Session, sae: Sae, unit: Unit, explanation_id: int) -> dict[str, Any]:
    return explanation_dict(
        session, sae, _own(session, sae, unit, explanation_id, include_deleted=True)
    )


def list_for_unit(
    session: Session, sae: Sae, unit: Unit, *, include_deleted: bool = False
) -> dict[str, Any]:
    """The unit's explanations (best first), each with its full history."""
    live = expl_repo.explanations_for_units(session, sae.id, unit.unit_kind, [unit.index]).get(
        unit.index, []
    )
    items = list(live)
    if include_deleted:
        import sqlalchemy as sa

        items += list(
            session.scalars(
                sa.select(Explanation)
                .where(
                    Explanation.sae_id == sae.id,
                    Explanation.unit_kind == unit.unit_kind,
                    Explanation.unit_index == unit.index,
                    Explanation.deleted_at.is_not(None),
                )
                .order_by(Explanation.id)
            )
        )
    out = [explanation_dict(session, sae, e) for e in items]
    return {"items": out, "total": len(out), "limit": len(out), "offset": 0}


# -- search --------------------------------------------------------------------------------------
def search(
    session: Session,
    q: str,
    *,
    limit: int,
    offset: int,
    sae: Sae | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """Full-text search over live explanations of all SAEs (or one), best first, with
    highlights as segments and as escaped HTML with ``<mark>``."""
    page = expl_repo.search_explanations(
        session,
        q,
        sae_id=sae.id if sae is not None else None,
        unit_kind=int(KINDS[kind]) if kind else None,
        limit=limit,
        offset=offset,
    )
    saes: dict[int, Sae] = {}
    items = []
    for hit in page.items:
        e = hit.explanation
        owner = saes.get(e.sae_id) or sae_repo.get_sae(session, e.sae_id)
        assert owner is not None
        saes[e.sae_id] = owner
        items.append(
            {
                "id": e.id,
                "sae": hit.sae_slug,
                "unit": unit_dict(owner, e.unit_kind, e.unit_index),
                "text": e.text,
                "source": e.source,
                "author": e.author,
                "score": e.score,
                "rank": hit.rank,
                "snippet": [{"text": t, "match": m} for t, m in hit.snippet],
                "snippet_html": hit.snippet_html,
                "updated_at": e.updated_at,
            }
        )
    return {"items": items, "total": page.total, "limit": limit, "offset": offset, "query": q}


# -- generation jobs -----------------------------------------------------------------------------
def _busy_jobs(session: Session, sae: Sae) -> list[Any]:
    return [
        j
        for status in (JobStatus.QUEUED, JobStatus.RUNNING)
        for j in job_repo.list_jobs(session, status=status.value, sae_id=sae.id, limit=100).items
        if j.kind == JobKind.EXPLAIN
    ]


def plan_units(sae: Sae, units: UnitsChoice, limit: int | None = None) -> list[Unit]:
    """Parents first (so latents can quote them), then latents; ``limit`` per kind."""
    out: list[Unit] = []
    if units in ("parents", "all") and sae.is_kronsae:
        assert sae.h and sae.m and sae.n
        for kind, count in (("base", sae.h * sae.m), ("extension", sae.h * sae.n)):
            out += [Unit(kind, i) for i in range(min(count, limit or count))]  # type: ignore[arg-type]
    if units in ("latents", "all"):
        out += [Unit("latent", i) for i in range(min(sae.d_sae, limit or sae.d_sae))]
    return out


def start_explain(
    session: Session,
    settings: Settings,
    sae: Sae,
    *,
    backend: Backend,
    units: UnitsChoice,
    overwrite: bool,
    author: str,
    limit: int | None = None,
) -> Any:
    """Queue an ``explain`` job (409 while one runs for this SAE or without a harvest)."""
    if backend == "llm" and not (settings.llm_url and settings.llm_model):
        raise Unprocessable(
            "No LLM endpoint is configured on this server (KRONSCOPE_LLM_URL and "
            "KRONSCOPE_LLM_MODEL); use backend 'heuristic'.",
            detail={"field": "backend"},
        )
    if units == "parents" and not sae.is_kronsae:
        raise Unprocessable(
            f"{sae.slug} is a {sae.architecture} SAE: it has no parents to explain."
        )
    if sae.active_harvest_id is None:
        raise Conflict(
            f"{sae.slug} has no complete harvest: explanations are generated from its examples, "
            "so run a harvest first.",
        )
    busy = _busy_jobs(session, sae)
    if busy:
        raise Conflict(
            f"An explain job for {sae.slug} is already {busy[0].status} (job {busy[0].id}).",
            detail={"job": busy[0].id},
        )
    params = {
        "backend": backend,
        "units": units,
        "overwrite": overwrite,
        "author": author,
        "limit": limit,
    }
    return job_repo.create_job(
        session,
        JobKind.EXPLAIN.value,
        params=params,
        sae_id=sae.id,
        harvest_id=sae.active_harvest_id,
        progress_total=len(plan_units(sae, units, limit)),
    )


def make_explainer(settings: Settings, backend: str) -> Explainer:
    if backend == "heuristic":
        from .explainers.heuristic import HeuristicExplainer

        return HeuristicExplainer()
    if backend == "llm":
        from .explainers.openai_compat import OpenAICompatExplainer

        return OpenAICompatExplainer(settings)
    raise Unprocessable(f"Unknown backend {backend!r}: use 'heuristic' or 'llm'.")


def _snippet(e: ExampleView, *, sampled: bool) -> Snippet:
    pos = e.sample_pos if sampled and e.sample_pos is not None else e.max_pos
    values = [float(v) for v in e.values]
    return Snippet(tokens=list(e.tokens), values=values, position=int(pos))


def _best_texts(
    session: Session, sae: Sae, kind: UnitKind, indices: Iterable[int]
) -> dict[int, str]:
    found = expl_repo.explanations_for_units(session, sae.id, kind, indices)
    return {i: items[0].text for i, items in found.items() if items}


@dataclass
class Generated:
    unit: Unit
    text: str


@dataclass
class ExplainResult:
    written: int
    updated: int
    skipped_existing: int
    skipped_dead: int
    source: str

    def message(self) -> str:
        return (
            f"{self.written} explanations written, {self.updated} revised, "
            f"{self.skipped_existing} units already explained, {self.skipped_dead} without examples "
            f"(source {self.source})"
        )


def _skip(items: list[Explanation], overwrite: bool) -> bool:
    """Units a job leaves alone: any live explanation, or with ``overwrite`` a human one."""
    return any(e.source == "human" for e in items) if overwrite else bool(items)


def _existing_units(session: Session, sae_id: int, units: list[Unit], overwrite: bool) -> set[Unit]:
    have: set[Unit] = set()
    by_kind: dict[UnitName, list[int]] = {}
    for u in units:
        by_kind.setdefault(u.kind, []).append(u.index)
    for kind, indices in by_kind.items():
        found = expl_repo.explanations_for_units(session, sae_id, int(KINDS[kind]), indices)
        have |= {Unit(kind, i) for i, items in found.items() if _skip(items, overwrite)}
    return have


def _chunks(items: list[Unit], size: int) -> Iterator[list[Unit]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate(
    session_factory: sessionmaker[Session],
    settings: Settings,
    sae_id: int,
    params: dict[str, Any],
    progress: Callable[[int, int], None] | None = None,
) -> ExplainResult:
    """Generate the texts of one explain run, then write them all in one transaction."""
    backend = str(params.get("backend", "heuristic"))
    units_choice: UnitsChoice = params.get("units", "latents")
    overwrite = bool(params.get("overwrite", False))
    author = str(params.get("author") or "kronscope")
    limit = params.get("limit")
    with session_factory() as s:
        sae = sae_repo.get_sae(s, sae_id)
        if sae is None:
            raise ExplainerError("the SAE was deleted")
        if sae.active_harvest_id is None:
            raise ExplainerError(f"{sae.slug} has no complete harvest to read examples from")
        plan = plan_units(sae, units_choice, limit)
        skip = _existing_units(s, sae_id, plan, overwrite)
        s.rollback()
    explainer = make_explainer(settings, backend)
    generated: list[Generated] = []
    fresh: dict[tuple[str, int], str] = {}  # parents explained by this run
    dead = 0
    done = 0
    try:
        for chunk in _chunks(plan, READ_CHUNK):
            with session_factory() as s:
                sae = sae_repo.get_sae(s, sae_id)
                if sae is None:
                    raise ExplainerError(
                        "the SAE was deleted while its explanations were generated"
                    )
                parent_texts = _parent_texts(s, sae, chunk, fresh)
                for unit in chunk:
                    done += 1
                    if unit in skip:
                        if progress:
                            progress(done, len(plan))
                        continue
                    ev = _evidence(s, sae, unit, settings.explain_examples, parent_texts)
                    try:
                        text = explainer.explain(ev)
                    except ExplainerError as exc:
                        raise ExplainerError(
                            f"explaining {unit_label(sae, unit)} failed: {exc}"
                        ) from exc
                    if text is None:
                        dead += 1
                    else:
                        generated.append(Generated(unit, clean_text(text)[:MAX_TEXT]))
                        if unit.kind != "latent":  # later latents quote it
                            fresh[(unit.kind, unit.index)] = generated[-1].text
                            parent_texts[(unit.kind, unit.index)] = generated[-1].text
                    if progress:
                        progress(done, len(plan))
                s.rollback()
    finally:
        close = getattr(explainer, "close", None)
        if callable(close):
            close()
    written, updated, existing = _write_all(
        session_factory, sae_id, generated, explainer.source, author, overwrite
    )
    return ExplainResult(written, updated, len(skip) + existing, dead, explainer.source)


def _parent_texts(
    s: Session, sae: Sae, chunk: list[Unit], fresh: dict[tuple[str, int], str]
) -> dict[tuple[str, int], str]:
    if not sae.is_kronsae:
        return {}
    assert sae.m and sae.n
    bases, exts = set(), set()
    for u in chunk:
        if u.kind == "latent":
            g, rest = divmod(u.index, sae.m * sae.n)
            bases.add(g * sae.m + rest // sae.n)
            exts.add(g * sae.n + rest % sae.n)
    texts = {("base", i): t for i, t in _best_texts(s, sae, UnitKind.BASE, bases).items()}
    texts |= {("extension", i): t for i, t in _best_texts(s, sae, UnitKind.EXTENSION, exts).items()}
    texts.update(fresh)  # this run's own parents win over older texts
    return texts


def _evidence(
    s: Session, sae: Sae, unit: Unit, n_examples: int, parent_texts: dict[tuple[str, int], str]
) -> Evidence:
    top = example_repo.top_examples(s, sae, unit.unit_kind, unit.index, limit=n_examples)
    samples = example_repo.sampled_examples(s, sae, unit.unit_kind, unit.index, limit=n_examples)
    ev: dict[str, Any] = {}
    if unit.kind == "latent" and sae.is_kronsae:
        assert sae.m and sae.n
        g, rest = divmod(unit.index, sae.m * sae.n)
        i, j = divmod(rest, sae.n)
        ev = {
            "base_label": f"base h{g}/b{i}",
            "extension_label": f"extension h{g}/e{j}",
            "base_text": parent_texts.get(("base", g * sae.m + i)),
            "extension_text": parent_texts.get(("extension", g * sae.n + j)),
        }
    return Evidence(
        sae=sae.slug,
        kind=unit.kind,
        index=unit.index,
        label=unit_label(sae, unit),
        top=[_snippet(e, sampled=False) for e in top],
        samples=[_snippet(e, sampled=True) for e in samples],
        **ev,
    )


def _write_all(
    session_factory: sessionmaker[Session],
    sae_id: int,
    generated: list[Generated],
    source: str,
    author: str,
    overwrite: bool,
) -> tuple[int, int, int]:
    """Everything in one transaction: ``(created, revised, skipped because explained meanwhile)``."""
    created = revised = existing = 0
    with session_factory() as s:
        try:
            if sae_repo.get_sae(s, sae_id) is None:
                raise ExplainerError("the SAE was deleted while its explanations were generated")
            units = [g.unit for g in generated]
            current: dict[Unit, list[Explanation]] = {}
            for kind in ("latent", "base", "extension"):
                idx = [u.index for u in units if u.kind == kind]
                if idx:
                    for i, items in expl_repo.explanations_for_units(
                        s, sae_id, int(KINDS[kind]), idx
                    ).items():
                        current[Unit(kind, i)] = items  # type: ignore[arg-type]
            for g in generated:
                have = current.get(g.unit, [])
                if _skip(have, overwrite):
                    existing += 1
                    continue
                same = next((e for e in have if e.source == source), None)
                if same is not None:
                    if same.text != g.text:
                        expl_repo.update_explanation(
                            s, same.id, g.text, author=author, source=source
                        )
                        revised += 1
                    continue
                expl_repo.create_explanation(
                    s, sae_id, g.unit.unit_kind, g.unit.index, g.text, source=source, author=author
                )
                created += 1
            tx.commit(s)
        except BaseException:
            tx.rollback(s)
            raise
    return created, revised, existing


def run_explain_job(ctx: Any) -> str | None:
    """The job runner's handler for kind ``explain``."""
    from .jobs import JobFailed

    if ctx.sae_id is None:
        raise JobFailed("the SAE of this job was deleted")

    def progress(done: int, total: int) -> None:
        ctx.progress(done, total)

    try:
        result = generate(ctx.session_factory, ctx.settings, ctx.sae_id, ctx.params, progress)
    except ExplainerError as exc:
        raise JobFailed(f"{exc}; nothing was written") from exc
    except db_errors.NotFound as exc:
        raise JobFailed(f"{exc}; nothing was written") from exc
    return result.message()
