"""``run_harvest``: the pass, its checkpoints and resume, and the atomic write.

1. Bad inputs fail before anything is written (no contexts, no usable tokens, ctx_len
   beyond the model, hook width != the SAE's d_in).
2. Rank 0 finds the unfinished harvest of the same run (same SAE, same contexts by hash,
   same result-deciding params, same world size) or creates one, and marks it running.
3. Each rank processes its shard (every P-th batch) in batches, saving its whole state every
   ``checkpoint_every`` contexts (safetensors + JSON under ``work_dir``, never pickle)
   and once more when its pass is done; rank 0 records the progress in
   ``harvest.checkpoint``. A restart with the same arguments loads the states and goes on
   from the saved context: the batches are the same, so the result equals an
   uninterrupted run.
4. States are merged on rank 0, which computes logit effects and neighbours and writes
   everything and flips ``sae.active_harvest_id`` in ONE transaction: the harvest appears
   whole or not at all. On failure the harvest is marked failed with the reason (its rows
   removed); the saved states stay, so running the same command again resumes.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from ..db import DatabaseError, DatabaseUnavailable
from ..db.models import Harvest, HarvestStatus, Sae
from ..db.repositories import harvests as harvests_repo
from ..db.repositories import saes as saes_repo
from ..sae import SAE
from . import distributed
from .compute import Harvester, iter_batches
from .distributed import Shard
from .errors import HarvestError
from .params import HarvestParams
from .result import build_result
from .state import HarvestState
from .writer import WriteCounts, write_result

log = logging.getLogger(__name__)

UNFINISHED = (
    HarvestStatus.PENDING.value,
    HarvestStatus.RUNNING.value,
    HarvestStatus.FAILED.value,
    HarvestStatus.CANCELLED.value,
)


@dataclass(frozen=True)
class HarvestProgress:
    """What a progress callback receives (tokens are counted over all shards)."""

    phase: str
    """``harvest`` (the pass) or ``write``."""
    done: int
    total: int
    rate: float | None
    """Tokens per second over this run."""
    eta_s: float | None


ProgressFn = Callable[[HarvestProgress], None]
FaultFn = Callable[[int], None]
"""Called after every batch with the number of batches this run has done; raising stops
the pass as a crash would (tests use it to interrupt a harvest)."""


@dataclass
class HarvestOutcome:
    harvest_id: int
    resumed_from: int
    """Contexts (of this shard) that were already done when this run started."""
    written: WriteCounts | None
    seconds: float


def contexts_sha256(input_ids: torch.Tensor) -> str:
    ids = input_ids.to(torch.int64).contiguous().cpu()
    digest = hashlib.sha256(f"{list(ids.shape)}".encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def run_harvest(
    session_factory: sessionmaker[Session],
    sae_record_or_slug: Sae | str,
    sae: SAE,
    model: Any,
    contexts: Any,
    params: HarvestParams | None = None,
    *,
    corpus: Any = None,
    hook_name: str | None = None,
    progress: ProgressFn | None = None,
    work_dir: Path | None = None,
    resume: bool = True,
    show_progress: bool = False,
    fault: FaultFn | None = None,
    shard: Shard | None = None,
) -> int:
    """Harvest ``contexts`` (``kronscope.lm.make_contexts``) with ``model`` and ``sae``;
    returns the harvest id (on every rank). See the module docstring."""
    return harvest(
        session_factory,
        sae_record_or_slug,
        sae,
        model,
        contexts,
        params,
        corpus=corpus,
        hook_name=hook_name,
        progress=progress,
        work_dir=work_dir,
        resume=resume,
        show_progress=show_progress,
        fault=fault,
        shard=shard,
    ).harvest_id


def harvest(
    session_factory: sessionmaker[Session],
    sae_record_or_slug: Sae | str,
    sae: SAE,
    model: Any,
    contexts: Any,
    params: HarvestParams | None = None,
    *,
    corpus: Any = None,
    hook_name: str | None = None,
    progress: ProgressFn | None = None,
    work_dir: Path | None = None,
    resume: bool = True,
    show_progress: bool = False,
    fault: FaultFn | None = None,
    shard: Shard | None = None,
) -> HarvestOutcome:
    """``run_harvest`` with a fuller answer (resume point, rows written, time)."""
    t_start = time.perf_counter()
    params = params or HarvestParams()
    shard = shard or distributed.shard_from_env()
    device = sae.device
    distributed.init(shard, device)
    ctx_len = int(contexts.input_ids.shape[1])
    harvester = Harvester(sae, model, params, ctx_len=ctx_len, hook_name=hook_name)
    harvester.check(contexts)
    if work_dir is None:
        from ..config import get_settings

        work_dir = get_settings().data_dir / "harvests"
    n_contexts = len(contexts)
    identity = {
        "result": params.result_dict(),
        "contexts_sha256": contexts_sha256(contexts.input_ids),
        "ctx_len": ctx_len,
        "n_contexts": n_contexts,
        "hook_name": harvester.hook_name,
        "world_size": shard.world_size,
    }

    # -- the harvest row (rank 0) ------------------------------------------------------------
    harvest_id = -1
    if shard.is_main:
        try:
            harvest_id = _open_harvest(
                session_factory, sae_record_or_slug, params, identity, contexts, corpus, resume
            )
        except BaseException:
            distributed.broadcast_int(-1, shard, device)
            raise
    harvest_id = distributed.broadcast_int(harvest_id, shard, device)
    if harvest_id < 0:
        raise HarvestError("rank 0 could not open the harvest")

    directory = Path(work_dir) / f"harvest-{harvest_id}"
    name = f"state-r{shard.rank}-of{shard.world_size}"
    meta = {"harvest_id": harvest_id, "identity": identity, "rank": shard.rank}
    state = harvester.new_state(meta)
    loaded = False
    if resume:
        try:
            loaded = state.load(directory, name)
        except HarvestError as exc:  # damaged or foreign: start this shard over
            log.warning("%s; starting this shard from the beginning", exc)
            state = harvester.new_state(meta)
    resumed_from = state.contexts_done

    try:
        _pass(
            harvester,
            state,
            contexts,
            shard,
            (directory, name, loaded),
            session_factory,
            harvest_id,
            progress,
            show_progress,
            fault,
        )
        ok = True
    except BaseException:
        ok = False
        if shard.is_main:
            _fail(session_factory, harvest_id, _reason())
        distributed.all_ok(False, shard, device)
        raise
    if not distributed.all_ok(ok, shard, device):
        if shard.is_main:
            _fail(session_factory, harvest_id, "another process of the harvest failed")
        raise HarvestError(
            "another process of the harvest failed; run the same command again to resume"
        )

    merged = distributed.gather_to_main(state, harvester.new_state(meta), shard)
    written = None
    failure: BaseException | None = None
    if shard.is_main:
        try:
            if progress is not None:
                progress(HarvestProgress("write", 0, 1, None, None))
            unembed = model.unembed() if getattr(model, "is_causal_lm", False) else None
            result = build_result(merged, sae, params, unembed)
            written = _write(session_factory, harvest_id, result, contexts, model, merged)
            if progress is not None:
                progress(HarvestProgress("write", 1, 1, None, None))
        except BaseException as exc:
            _fail(session_factory, harvest_id, _reason())
            failure = exc
    # Every rank learns whether rank 0 wrote: only then may the states go.
    if not distributed.all_ok(failure is None, shard, device) and failure is None:
        raise HarvestError("rank 0 could not write the harvest; run the same command again")
    if isinstance(failure, DatabaseError):
        raise HarvestError(
            f"harvest {harvest_id} could not be written: {failure}. The computed state is "
            f"saved in {directory}; run the same command again to write it without "
            "recomputing."
        ) from failure
    if failure is not None:
        raise failure
    try:
        (directory / f"{name}.safetensors").unlink(missing_ok=True)
        (directory / f"{name}.json").unlink(missing_ok=True)
        if shard.is_main:
            shutil.rmtree(directory, ignore_errors=True)
    except OSError:
        pass
    return HarvestOutcome(harvest_id, resumed_from, written, time.perf_counter() - t_start)


# -- pieces ------------------------------------------------------------------------------------


def _reason() -> str:
    import sys

    exc = sys.exc_info()[1]
    if exc is None:
        return "unknown error"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, HarvestError) else f"{type(exc).__name__}: {text}"


def _sae_row(session: Session, ref: Sae | str) -> Sae:
    if isinstance(ref, Sae):
        row = session.get(Sae, ref.id)
        if row is None:
            raise HarvestError(f"SAE {ref.slug!r} is not in the database")
        return row
    return saes_repo.require_sae(session, ref)


def _open_harvest(
    session_factory: sessionmaker[Session],
    ref: Sae | str,
    params: HarvestParams,
    identity: dict[str, Any],
    contexts: Any,
    corpus: Any,
    resume: bool,
) -> int:
    try:
        with session_factory() as session:
            sae_row = _sae_row(session, ref)
            found: Harvest | None = None
            if resume:
                for h in harvests_repo.list_harvests(session, sae_row.id):
                    if h.status in UNFINISHED and (h.params or {}).get("identity") == identity:
                        found = h
                        break
            if found is None:
                found = harvests_repo.create_harvest(
                    session,
                    sae_row.id,
                    corpus_name=getattr(corpus, "name", None) or "contexts",
                    corpus_description=getattr(corpus, "description", None),
                    corpus_hash=getattr(corpus, "sha256", None)
                    or getattr(contexts, "corpus_sha256", None)
                    or None,
                    n_tokens=identity["n_contexts"] * identity["ctx_len"],
                    ctx_len=identity["ctx_len"],
                    params={**params.to_dict(), "identity": identity},
                )
            harvests_repo.mark_running(session, found.id)
            session.commit()
            return int(found.id)
    except DatabaseUnavailable as exc:
        raise HarvestError(f"cannot start the harvest: {exc}") from exc


def _pass(
    harvester: Harvester,
    state: HarvestState,
    contexts: Any,
    shard: Shard,
    saved: tuple[Path, str, bool],
    session_factory: sessionmaker[Session],
    harvest_id: int,
    progress: ProgressFn | None,
    show_progress: bool,
    fault: FaultFn | None,
) -> None:
    """Process this shard's remaining batches; saves the state every ``checkpoint_every``
    contexts and at the end (so that a failed write resumes without recomputing)."""
    directory, name, loaded = saved
    params = harvester.params
    L = harvester.ctx_len
    indices = shard.indices(len(contexts), params.batch_size)
    total_tokens = len(contexts) * L
    start = state.contexts_done
    bar = None
    if show_progress and shard.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_tokens,
            initial=min(start * L * shard.world_size, total_tokens),
            unit="tok",
            unit_scale=True,
            desc="harvest",
            dynamic_ncols=True,
        )
    t0 = time.perf_counter()
    last_save = start
    saved_at = start if loaded else -1
    db_warned = False
    batches = 0
    try:
        for batch in iter_batches(contexts, params.batch_size, indices[start:]):
            harvester.process(state, batch)
            state.contexts_done += len(batch.index)
            batches += 1
            done_tokens = min(state.contexts_done * L * shard.world_size, total_tokens)
            if (
                params.checkpoint_every
                and state.contexts_done - last_save >= params.checkpoint_every
            ):
                _save(state, directory, name)
                last_save = saved_at = state.contexts_done
                if shard.is_main:
                    db_warned = _record_progress(
                        session_factory,
                        harvest_id,
                        state,
                        shard,
                        len(indices),
                        directory,
                        db_warned,
                    )
            elapsed = time.perf_counter() - t0
            rate = (
                (state.contexts_done - start) * L * shard.world_size / elapsed if elapsed else None
            )
            eta = (total_tokens - done_tokens) / rate if rate else None
            if bar is not None:  # rank 0's share, times the number of ranks
                bar.n = done_tokens
                bar.refresh()
            if progress is not None and shard.is_main:
                progress(HarvestProgress("harvest", done_tokens, total_tokens, rate, eta))
            if fault is not None:
                fault(batches)
    finally:
        if bar is not None:
            bar.close()
    if saved_at != state.contexts_done:
        _save(state, directory, name)  # the pass is done: a failed write resumes from here


def _save(state: HarvestState, directory: Path, name: str) -> None:
    try:
        state.save(directory, name)
    except OSError as exc:
        raise HarvestError(f"cannot save the harvest state in {directory}: {exc}") from exc


def _record_progress(
    session_factory: sessionmaker[Session],
    harvest_id: int,
    state: HarvestState,
    shard: Shard,
    shard_contexts: int,
    directory: Path,
    warned: bool,
) -> bool:
    """Progress into ``harvest.checkpoint``; a database that went away is not fatal here
    (the state on disk is what a resume needs), it is reported once."""
    doc = {
        "contexts_done": state.contexts_done,
        "shard_contexts": shard_contexts,
        "world_size": shard.world_size,
        "tokens_seen": state.tokens_seen * shard.world_size,
        "state_dir": str(directory),
    }
    try:
        with session_factory() as session:
            harvests_repo.save_checkpoint(
                session, harvest_id, doc, tokens_seen=state.tokens_seen * shard.world_size
            )
            session.commit()
    except DatabaseError as exc:
        if not warned:
            log.warning(
                "could not record harvest progress (%s); going on, state in %s", exc, directory
            )
        return True
    return warned


def _write(
    session_factory: sessionmaker[Session],
    harvest_id: int,
    result: Any,
    contexts: Any,
    model: Any,
    state: HarvestState,
) -> WriteCounts:
    with session_factory() as session:
        harvests_repo.delete_partial_data(session, harvest_id)
        counts = write_result(session, harvest_id, result, contexts.input_ids, model.token_strings)
        row = session.get(Harvest, harvest_id)
        assert row is not None
        row.params = {
            **(row.params or {}),
            "tokens_valid": state.tokens_valid,
        }
        harvests_repo.mark_complete(session, harvest_id, tokens_seen=state.tokens_seen)
        session.commit()
    return counts


def _fail(session_factory: sessionmaker[Session], harvest_id: int, reason: str) -> None:
    """Mark failed with the reason and remove any rows it wrote (best effort: the database
    may be what failed)."""
    try:
        with session_factory() as session:
            row = session.get(Harvest, harvest_id)
            if row is None or row.status == HarvestStatus.COMPLETE.value:
                return
            progress, seen = row.checkpoint, row.tokens_seen
            harvests_repo.delete_partial_data(session, harvest_id)  # (also clears progress)
            if progress is not None:  # keep where it stopped, for the record and the UI
                harvests_repo.save_checkpoint(session, harvest_id, progress, tokens_seen=seen)
            harvests_repo.mark_failed(session, harvest_id, reason[:4000])
            session.commit()
    except Exception as exc:  # the database itself may be down
        log.warning("could not mark harvest %s failed: %s", harvest_id, exc)
