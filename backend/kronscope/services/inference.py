"""Live inference: the subject model's prefix and the SAE on any text, batched across requests.

Design decisions:

- **One engine per process, one worker thread per device.** A request resolves its SAE to
  an :class:`SaeSpec`, loads (or reuses) the subject model and the SAE, tokenises and checks
  its texts in a thread of the request, then puts a work item into a bounded queue and
  awaits an ``asyncio`` future. The device's worker takes the first waiting item, waits up
  to ``inference_batch_wait_ms`` for more items of the same (model, hook, SAE), pads all
  their texts into one ``[B, T]`` batch, runs the model only up to the hook and the SAE
  once, and hands each request its own slice. Building the JSON happens back in the
  request's thread, so the worker only ever runs tensors.
- **Bounded.** The queue holds ``inference_queue_size`` items; a request that finds it full
  gets 503 with ``Retry-After`` at once, never an unbounded wait. Requests announce
  themselves (``admit``) before they load and tokenise, so while some are known to be on
  their way the worker waits for them instead of starting a small batch: under load,
  batches fill up instead of alternating big and small. That wait is half the recent
  batch compute time (a moving average), at most ``inference_batch_max_wait_ms``: a few
  ms on a GPU, more on a slow CPU where one batch costs much more than the wait. A
  request whose result takes longer than ``inference_timeout_s`` gets 503 too. A padded
  batch holds at most ``inference_max_batch`` requests and about ``MAX_BATCH_TOKENS``
  padded positions.
- **Loaded once, bounded LRU.** Models (by name) and SAEs (by checkpoint hash and folder)
  are kept in two LRUs sized by ``inference_max_models`` / ``inference_max_saes``; each key
  has its own lock, so one model loads once however many requests ask, and a slow or
  broken load never blocks requests for other SAEs. A failed load is remembered for
  ``FAILURE_TTL_S`` seconds (503 at once rather than a retry per request). An SAE whose
  model name resolves to nothing is 422 (it can never work here); a model that resolves but
  cannot be loaded is 503 (it may work later). (``kronscope.lm`` keeps its own small cache
  of models too; evicting from ours drops our reference only.)
- **Texts.** JSON bodies are already Unicode: any script, emoji and right-to-left text are
  fine and tokens come back as the tokenizer's strings, unescaped (the UI escapes them).
  Lone surrogates (``"\\ud800"`` is valid JSON but not encodable) are replaced with
  U+FFFD where the JSON layer lets them through (pydantic refuses some: 422); bytes that
  are not UTF-8 are a malformed body (4xx). NUL characters are refused with 422 (never
  meaningful text; several tokenizers treat them specially). Empty or whitespace-only
  texts are 422. A request's texts together over ``inference_max_text_bytes`` UTF-8 bytes
  are 413; a text over ``inference_max_tokens`` tokens (capped at the model's context less
  one) is 422.
- **Exactness.** Texts are padded on the right and masked, so every real token's value
  is what running that text alone gives (up to float rounding of a larger matmul).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ..config import Settings, resolve_device
from ..sae.base import TopKStyleSAE
from .errors import KronScopeError, PayloadTooLarge, ServiceUnavailable, Unprocessable

if TYPE_CHECKING:
    from ..db.models import Sae
    from ..lm import SubjectModel
    from ..sae import SAE

log = logging.getLogger(__name__)

MAX_TOP_K = 64
"""Most latents (and parents) per token a request may ask for."""
MAX_REQUESTED_LATENTS = 256
MAX_BATCH_TOKENS = 16_384
"""Padded positions (rows x longest row) one batch may hold; the first item always fits."""
FAILURE_TTL_S = 15.0
RETRY_AFTER_BUSY_S = 1
DENSE_CHUNK_ROWS = 256
"""Rows encoded densely at once (non-TopK SAEs): bounds memory at rows x F floats."""

Mode = Literal["activations", "search"]


# -- what a request is about -------------------------------------------------------------------
@dataclass(frozen=True)
class SaeSpec:
    """Everything the engine needs to know of an SAE row, detached from the database."""

    slug: str
    path: Path
    file_hash: str
    model_name: str | None
    hook_name: str | None
    architecture: str
    d_sae: int
    h: int | None = None
    m: int | None = None
    n: int | None = None

    @classmethod
    def from_row(cls, sae: Sae, settings: Settings) -> SaeSpec:
        return cls(
            slug=sae.slug,
            path=settings.data_dir / sae.storage_path,
            file_hash=sae.file_hash,
            model_name=sae.model_name,
            hook_name=sae.hook_name,
            architecture=sae.architecture,
            d_sae=sae.d_sae,
            h=sae.h,
            m=sae.m,
            n=sae.n,
        )

    @property
    def sae_key(self) -> tuple[str, str]:
        return (self.file_hash, str(self.path))

    @property
    def is_kronsae(self) -> bool:
        return self.architecture == "kronsae" and bool(self.h and self.m and self.n)

    def coordinates(self, index: int) -> tuple[int, int, int] | None:
        if not self.is_kronsae:
            return None
        assert self.m and self.n
        g, rest = divmod(int(index), self.m * self.n)
        i, j = divmod(rest, self.n)
        return g, i, j


@dataclass
class Loaded:
    """A subject model, the hook and the SAE, ready to run together."""

    model: SubjectModel
    sae: SAE
    hook: str
    spec: SaeSpec

    @property
    def key(self) -> tuple[Any, ...]:
        return (id(self.model), self.hook, id(self.sae))


@dataclass
class Prepared:
    """Texts checked and tokenised for one model."""

    rows: list[list[int]]
    tokens: list[list[str]]
    special: list[list[bool]]


# -- results the worker hands back ---------------------------------------------------------------
@dataclass
class RowResult:
    """One text's tensors (CPU), sliced out of a batch."""

    top_values: Tensor
    """[T, k'] largest latent values per token (k' = the SAE's k for TopK-style SAEs)."""
    top_indices: Tensor
    """[T, k'] their indices."""
    requested: Tensor | None = None
    """[T, L] values of the requested latents (after TopK for TopK-style SAEs)."""
    requested_pre: Tensor | None = None
    """[T, L] KronSAE: the requested latents' composed values before TopK."""
    requested_base: Tensor | None = None
    """[T, L] KronSAE: the values of the requested latents' base parents."""
    requested_extension: Tensor | None = None
    """[T, L] KronSAE: the values of the requested latents' extension parents."""
    base_values: Tensor | None = None
    """[T, kp] KronSAE: the largest base parents per token (flat index g*m + i)."""
    base_indices: Tensor | None = None
    extension_values: Tensor | None = None
    """[T, kq] KronSAE: the largest extension parents per token (flat index g*n + j)."""
    extension_indices: Tensor | None = None
    dense_max: Tensor | None = None
    """Search on non-TopK SAEs: [F] max over the selected positions."""
    dense_sum: Tensor | None = None
    dense_count: Tensor | None = None
    dense_argmax: Tensor | None = None


@dataclass
class _Work:
    loaded: Loaded
    prepared: Prepared
    mode: Mode
    top_k: int
    latents: list[int]
    positions: list[list[bool]] | None
    future: asyncio.Future[list[RowResult]]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def n_rows(self) -> int:
        return len(self.prepared.rows)

    @property
    def width(self) -> int:
        return max((len(r) for r in self.prepared.rows), default=0)


# -- counters -------------------------------------------------------------------------------------
class EngineStats:
    """Counters the status endpoint and the tests read (``batched_requests`` > 0 means
    requests really shared a batch)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.batches = 0
        self.multi_request_batches = 0
        self.batched_requests = 0
        """Requests that ran in a batch with at least one other request."""
        self.max_requests_in_batch = 0
        self.rows = 0
        self.tokens = 0
        self.rejected_busy = 0
        self.timeouts = 0
        self.errors = 0
        self.batch_sizes: dict[int, int] = {}

    def record_batch(self, n_requests: int, n_rows: int, n_tokens: int) -> None:
        with self.lock:
            self.batches += 1
            self.requests += n_requests
            self.rows += n_rows
            self.tokens += n_tokens
            self.max_requests_in_batch = max(self.max_requests_in_batch, n_requests)
            self.batch_sizes[n_requests] = self.batch_sizes.get(n_requests, 0) + 1
            if n_requests > 1:
                self.multi_request_batches += 1
                self.batched_requests += n_requests

    def bump(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "batches": self.batches,
                "multi_request_batches": self.multi_request_batches,
                "batched_requests": self.batched_requests,
                "max_requests_in_batch": self.max_requests_in_batch,
                "mean_requests_per_batch": (self.requests / self.batches) if self.batches else None,
                "rows": self.rows,
                "tokens": self.tokens,
                "rejected_busy": self.rejected_busy,
                "timeouts": self.timeouts,
                "errors": self.errors,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            }


# -- text checks ------------------------------------------------------------------------------------
def clean_text(text: str, where: str) -> str:
    """Replace lone surrogates, refuse NUL and empty text (see the module docstring)."""
    if not isinstance(text, str):
        raise Unprocessable(f"{where} must be a string.")
    nul = text.find("\x00")
    if nul >= 0:
        raise Unprocessable(
            f"{where} contains a NUL character (U+0000) at character {nul}; send text without it.",
            detail={"field": where, "position": nul},
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: pairs become their character, strays U+FFFD.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if not text.strip():
        raise Unprocessable(
            f"{where} is empty (or only whitespace); send some text.", detail={"field": where}
        )
    return text


def check_texts(texts: Sequence[str], settings: Settings) -> list[str]:
    if not texts:
        raise Unprocessable("Send a 'text' or a non-empty list 'texts'.")
    if len(texts) > settings.inference_max_texts:
        raise Unprocessable(
            f"Send at most {settings.inference_max_texts} texts at once (got {len(texts)}).",
            detail={"limit": settings.inference_max_texts},
        )
    names = ["text"] if len(texts) == 1 else [f"texts[{i}]" for i in range(len(texts))]
    cleaned = [clean_text(t, w) for t, w in zip(texts, names, strict=True)]
    size = sum(len(t.encode("utf-8")) for t in cleaned)
    if size > settings.inference_max_text_bytes:
        raise PayloadTooLarge(
            f"The text is {size:,} bytes; live inference takes at most "
            f"{settings.inference_max_text_bytes:,} bytes per request.",
            detail={"bytes": size, "limit_bytes": settings.inference_max_text_bytes},
        )
    return cleaned


# -- the engine ----------------------------------------------------------------------------------
class _LRU:
    """A small thread-safe LRU with one lock per key for loading."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.failures: dict[Any, tuple[float, KronScopeError]] = {}
        self.lock = threading.Lock()
        self.key_locks: dict[Any, threading.Lock] = {}

    def get(self, key: Any) -> Any | None:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            failed = self.failures.get(key)
            if failed is not None:
                if time.monotonic() - failed[0] < FAILURE_TTL_S:
                    raise failed[1]
                del self.failures[key]
            return None

    def key_lock(self, key: Any) -> threading.Lock:
        with self.lock:
            return self.key_locks.setdefault(key, threading.Lock())

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                old, _ = self.items.popitem(last=False)
                self.key_locks.pop(old, None)
                log.info("inference: unloaded %s (LRU)", old)

    def fail(self, key: Any, error: KronScopeError) -> None:
        with self.lock:
            self.failures[key] = (time.monotonic(), error)

    def snapshot(self) -> list[Any]:
        with self.lock:
            return list(self.items)


class InferenceEngine:
    """See the module docstring. Thread-safe; ``run`` is awaited by request handlers."""

    def __init__(self, settings: Settings, *, device: str | None = None):
        self.settings = settings
        self.device = device or resolve_device(settings.device)
        self.stats = EngineStats()
        self._models = _LRU(settings.inference_max_models)
        self._saes = _LRU(settings.inference_max_saes)
        self._tokenizer_locks: dict[int, threading.Lock] = {}
        self._queue: queue.Queue[_Work] = queue.Queue(maxsize=settings.inference_queue_size)
        self._gate = threading.Event()
        self._gate.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._incoming = 0
        """Admitted requests not yet queued (loading or tokenising)."""
        self._batch_seconds = 0.0
        """Moving average of a batch's compute time (bounds the wait for admitted requests)."""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._worker is not None and self._worker.is_alive():
                return
            self._stop.clear()
            self._worker = threading.Thread(
                target=self._loop, name=f"kronscope-inference-{self.device}", daemon=True
            )
            self._worker.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._gate.set()
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        self._worker = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the worker (requests queue up) while the block runs: for maintenance and
        tests of the bounded queue."""
        self._gate.clear()
        try:
            yield
        finally:
            self._gate.set()

    def status(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "worker_alive": self._worker is not None and self._worker.is_alive(),
            "queue_depth": self._queue.qsize(),
            "queue_size": self._queue.maxsize,
            "max_batch": self.settings.inference_max_batch,
            "batch_wait_ms": self.settings.inference_batch_wait_ms,
            "incoming": self._incoming,
            "mean_batch_seconds": round(self._batch_seconds, 4),
            "loaded_models": self._models.snapshot(),
            "loaded_saes": [k[0] for k in self._saes.snapshot()],
            "counters": self.stats.as_dict(),
        }

    # -- loading -----------------------------------------------------------------------------
    def load(self, spec: SaeSpec) -> Loaded:
        """The model and SAE of ``spec`` (loaded once; 422 / 503 in plain words)."""
        if not spec.model_name or not spec.hook_name:
            raise Unprocessable(
                f"{spec.slug} does not name its subject model and hook, so it cannot run live."
            )
        model = self._load_model(spec.model_name)
        sae = self._load_sae(spec)
        from ..lm import HookError

        try:
            model.resolve_hook(spec.hook_name)
        except HookError as exc:
            raise Unprocessable(
                f"The hook {spec.hook_name!r} of {spec.slug} does not exist in model "
                f"{spec.model_name!r}: {exc}"
            ) from exc
        return Loaded(model=model, sae=sae, hook=spec.hook_name, spec=spec)

    def _load_model(self, name: str) -> SubjectModel:
        from ..lm import ModelNotFoundError, load_model, resolve_model

        found = self._models.get(name)
        if found is not None:
            return found  # type: ignore[no-any-return]
        with self._models.key_lock(name):
            found = self._models.get(name)
            if found is not None:
                return found  # type: ignore[no-any-return]
            try:
                resolve_model(name, self.settings, allow_paths=False)
            except ModelNotFoundError as exc:
                err: KronScopeError = Unprocessable(
                    f"The SAE's subject model {name!r} is not available on this server: {exc}",
                    detail={"model": name},
                )
                self._models.fail(name, err)
                raise err from exc
            started = time.monotonic()
            try:
                model = load_model(name, device=self.device, settings=self.settings)
            except Exception as exc:
                log.warning("inference: model %r could not be loaded", name, exc_info=True)
                err = ServiceUnavailable(
                    f"The subject model {name!r} could not be loaded right now ({_short(exc)}); "
                    "other SAEs are not affected.",
                    retry_after=int(FAILURE_TTL_S),
                    detail={"model": name},
                )
                self._models.fail(name, err)
                raise err from exc
            log.info("inference: loaded model %r in %.1fs", name, time.monotonic() - started)
            self._models.put(name, model)
            return model

    def _load_sae(self, spec: SaeSpec) -> SAE:
        from ..sae import load

        key = spec.sae_key
        found = self._saes.get(key)
        if found is not None:
            return found  # type: ignore[no-any-return]
        with self._saes.key_lock(key):
            found = self._saes.get(key)
            if found is not None:
                return found  # type: ignore[no-any-return]
            try:
                sae = load(spec.path, device=self.device)
            except Exception as exc:
                log.warning("inference: SAE %s could not be loaded", spec.slug, exc_info=True)
                err = ServiceUnavailable(
                    f"The checkpoint of {spec.slug} could not be loaded ({_short(exc)}).",
                    retry_after=int(FAILURE_TTL_S),
                )
                self._saes.fail(key, err)
                raise err from exc
            sae.eval()
            sae.requires_grad_(False)
            self._saes.put(key, sae)
            return sae

    # -- tokenising ----------------------------------------------------------------------------
    def token_limit(self, model: SubjectModel) -> int:
        return max(1, min(self.settings.inference_max_tokens, model.max_length - 1))

    def prepare(self, loaded: Loaded, texts: Sequence[str]) -> Prepared:
        """Tokenise checked texts; 422 for one over the token limit."""
        model = loaded.model
        limit = self.token_limit(model)
        lock = self._tokenizer_locks.setdefault(id(model), threading.Lock())
        with lock:  # fast tokenizers are not safe to share between threads
            batch = model.tokenize(list(texts), max_length=limit + 1)
        rows: list[list[int]] = []
        special: list[list[bool]] = []
        for b in range(len(batch)):
            n = int(batch.attention_mask[b].sum())
            if n > limit:
                where = "The text" if len(texts) == 1 else f"Text {b}"
                raise Unprocessable(
                    f"{where} has more than {limit} tokens, the most live inference takes for "
                    f"model {model.name!r}; send a shorter text.",
                    detail={"limit_tokens": limit, "text_index": b},
                )
            if n == 0:
                raise Unprocessable("The text produced no tokens.", detail={"text_index": b})
            rows.append([int(t) for t in batch.input_ids[b, :n]])
            special.append([bool(s) for s in batch.special_mask[b, :n]])
        return Prepared(rows=rows, tokens=[list(t) for t in batch.tokens], special=special)

    # -- submitting ----------------------------------------------------------------------------
    def admit(self) -> Admission:
        """Announce a request that will be queued soon (see the module docstring)."""
        return Admission(self)

    def _count_incoming(self, delta: int) -> None:
        with self._lock:
            self._incoming += delta

    async def run(
        self,
        loaded: Loaded,
        prepared: Prepared,
        *,
        mode: Mode = "activations",
        top_k: int = 5,
        latents: Sequence[int] = (),
        positions: list[list[bool]] | None = None,
        admission: Admission | None = None,
    ) -> list[RowResult]:
        """Queue one request and wait for its rows' results (503 when the queue is full)."""
        self.start()
        loop = asyncio.get_running_loop()
        work = _Work(
            loaded=loaded,
            prepared=prepared,
            mode=mode,
            top_k=top_k,
            latents=list(latents),
            positions=positions,
            future=loop.create_future(),
            loop=loop,
        )
        try:
            self._queue.put_nowait(work)
            if admission is not None:
                admission.release()
        except queue.Full:
            if admission is not None:
                admission.release()
            self.stats.bump("rejected_busy")
            raise ServiceUnavailable(
                "Live inference is busy (its queue is full); try again in a moment.",
                retry_after=RETRY_AFTER_BUSY_S,
                detail={"queue_size": self._queue.maxsize},
            ) from None
        try:
            return await asyncio.wait_for(work.future, self.settings.inference_timeout_s)
        except TimeoutError:
            self.stats.bump("timeouts")
            raise ServiceUnavailable(
                f"Live inference did not answer within {self.settings.inference_timeout_s:g} s; "
                "try again later.",
                retry_after=RETRY_AFTER_BUSY_S * 5,
            ) from None

    def run_sync(
        self,
        loaded: Loaded,
        prepared: Prepared,
        *,
        mode: Mode = "activations",
        top_k: int = 5,
        latents: Sequence[int] = (),
        positions: list[list[bool]] | None = None,
    ) -> list[RowResult]:
        """Compute directly in the calling thread (CLI, benchmarks' baseline), no queue."""
        work = _Work(loaded, prepared, mode, top_k, list(latents), positions, None, None)  # type: ignore[arg-type]
        return self._compute([work])[0]

    # -- the worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        pending: deque[_Work] = deque()
        while not self._stop.is_set():
            if not pending:
                try:
                    pending.append(self._queue.get(timeout=0.5))
                except queue.Empty:
                    continue
            self._gate.wait()
            if self._stop.is_set():
                break
            try:
                group = self._collect(pending)
                group = [w for w in group if not w.future.done()]  # timed out or disconnected
                if group:
                    self._run_group(group)
            except Exception:  # never let the worker die: requests would wait in vain
                log.exception("inference: the worker hit an unexpected error")

    def _collect(self, pending: deque[_Work]) -> list[_Work]:
        """The first pending item plus whatever joins it within the wait (same model, hook
        and SAE; within the batch's size limits). Others wait in ``pending``."""
        wait_s = self.settings.inference_batch_wait_ms / 1000.0
        max_batch = self.settings.inference_max_batch
        first = pending.popleft()
        group = [first]
        rows, width = first.n_rows, first.width
        key = first.loaded.key

        def take(w: _Work) -> bool:
            nonlocal rows, width
            if w.loaded.key != key or (rows + w.n_rows) * max(width, w.width) > MAX_BATCH_TOKENS:
                return False
            group.append(w)
            rows, width = rows + w.n_rows, max(width, w.width)
            return True

        for w in list(pending):
            if len(group) >= max_batch:
                break
            if take(w):
                pending.remove(w)
        now = time.monotonic()
        soft = now + wait_s
        cap = self.settings.inference_batch_max_wait_ms / 1000.0
        hard = now + max(wait_s, min(cap, 0.5 * self._batch_seconds))
        while len(group) < max_batch:
            remaining = (hard if self._incoming > 0 else soft) - time.monotonic()
            try:
                if remaining > 0:
                    w = self._queue.get(timeout=min(remaining, 0.002))
                else:
                    w = self._queue.get_nowait()
            except queue.Empty:
                if remaining > 0:
                    continue
                break
            if not take(w):
                pending.append(w)
        return group

    def _run_group(self, group: list[_Work]) -> None:
        started = time.monotonic()
        try:
            results = self._compute(group)
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)
        except Exception as exc:
            self.stats.bump("errors")
            if not isinstance(exc, KronScopeError):
                log.exception("inference: a batch failed")
            for w in group:
                _resolve(w, _set_exception, exc)
            return
        for w, res in zip(group, results, strict=True):
            _resolve(w, _set_result, res)

    @torch.inference_mode()
    def _compute(self, group: list[_Work]) -> list[list[RowResult]]:
        loaded = group[0].loaded
        model, sae, spec = loaded.model, loaded.sae, loaded.spec
        all_rows = [r for w in group for r in w.prepared.rows]
        lengths = [len(r) for r in all_rows]
        width = max(lengths)
        ids = torch.full((len(all_rows), width), model.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(all_rows), width), dtype=torch.long)
        for b, row in enumerate(all_rows):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, : len(row)] = 1
        self.stats.record_batch(len(group), len(all_rows), sum(lengths))

        acts = model.activations(ids, mask, loaded.hook)  # [B, T, d]
        if acts.shape[-1] != sae.d_in:
            raise Unprocessable(
                f"The hook {loaded.hook!r} gives activations of width {acts.shape[-1]}, but "
                f"{spec.slug} reads width {sae.d_in}."
            )
        x = acts.to(sae.device)[mask.to(acts.device).bool()]  # [N, d], row-major
        if isinstance(sae, TopKStyleSAE):
            top_v, top_i = sae.encode(x)  # all k kept latents: the requested values need them
        else:
            k_display = max((w.top_k for w in group if w.mode == "activations"), default=1)
            top_v, top_i = sae.top_latents(x, max(1, k_display))
        top_v, top_i = top_v.float().cpu(), top_i.cpu()

        parents: tuple[Tensor, Tensor] | None = None
        if spec.is_kronsae and any(w.mode == "activations" for w in group):
            from ..sae import KronSAE

            assert isinstance(sae, KronSAE)
            p, q = sae.parents(x)
            parents = (p.float().cpu(), q.float().cpu())

        out: list[list[RowResult]] = []
        start = 0
        for w in group:
            n_tok = sum(len(r) for r in w.prepared.rows)
            sl = slice(start, start + n_tok)
            item_rows: list[RowResult] = []
            if w.mode == "activations":
                item = self._activations(w, sae, spec, x[sl], top_v[sl], top_i[sl], parents, sl)
            else:
                item = self._search(w, sae, x[sl], top_v[sl], top_i[sl])
            # split the item's tokens back into its texts
            offset = 0
            for r in w.prepared.rows:
                item_rows.append(_slice_result(item, slice(offset, offset + len(r))))
                offset += len(r)
            out.append(item_rows)
            start += n_tok
        return out

    def _activations(
        self,
        w: _Work,
        sae: SAE,
        spec: SaeSpec,
        x: Tensor,
        top_v: Tensor,
        top_i: Tensor,
        parents: tuple[Tensor, Tensor] | None,
        sl: slice,
    ) -> RowResult:
        k = min(w.top_k, top_v.shape[-1])
        res = RowResult(top_values=top_v[:, :k], top_indices=top_i[:, :k])
        if parents is not None and w.top_k > 0:
            p, q = parents[0][sl], parents[1][sl]
            pf, qf = p.reshape(p.shape[0], -1), q.reshape(q.shape[0], -1)
            bv = pf.topk(min(w.top_k, pf.shape[-1]), dim=-1)
            ev = qf.topk(min(w.top_k, qf.shape[-1]), dim=-1)
            res.base_values, res.base_indices = bv.values, bv.indices
            res.extension_values, res.extension_indices = ev.values, ev.indices
        if w.latents:
            lat = torch.tensor(w.latents, dtype=torch.long)
            if sae.sparse:
                match = top_i.unsqueeze(-1) == lat  # [N, k, L]
                res.requested = (top_v.unsqueeze(-1) * match).sum(1)
            else:
                res.requested = _dense_columns(sae, x, lat)
            if parents is not None:
                assert spec.m and spec.n
                p, q = parents[0][sl], parents[1][sl]
                g = lat // (spec.m * spec.n)
                i = (lat % (spec.m * spec.n)) // spec.n
                j = lat % spec.n
                u, v = p[:, g, i], q[:, g, j]  # [N, L]
                res.requested_base, res.requested_extension = u, v
                res.requested_pre = _compose_pairs(u, v, getattr(sae, "composition", "mand"))
        return res

    def _search(self, w: _Work, sae: SAE, x: Tensor, top_v: Tensor, top_i: Tensor) -> RowResult:
        res = RowResult(top_values=top_v, top_indices=top_i)
        if sae.sparse:
            return res
        # Non-TopK SAEs: aggregate every latent over the selected positions, chunk by chunk.
        keep = _position_mask(w)
        F = sae.d_sae
        mx = torch.zeros(F)
        sm = torch.zeros(F)
        cnt = torch.zeros(F)
        arg = torch.full((F,), -1, dtype=torch.long)
        rows = torch.nonzero(keep).flatten()
        for chunk in rows.split(DENSE_CHUNK_ROWS):
            dense = sae.encode_dense(x[chunk.to(x.device)]).float().cpu()  # [c, F]
            cm, ca = dense.max(0)
            better = cm > mx
            mx = torch.where(better, cm, mx)
            arg = torch.where(better, chunk[ca], arg)
            sm += dense.clamp_min(0).sum(0)
            cnt += (dense > 0).sum(0)
        res.dense_max, res.dense_sum, res.dense_count, res.dense_argmax = mx, sm, cnt, arg
        return res


class Admission:
    """A request announced to the engine; released once queued (or abandoned)."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine
        self.open = True
        engine._count_incoming(1)

    def release(self) -> None:
        if self.open:
            self.open = False
            self.engine._count_incoming(-1)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- helpers -----------------------------------------------------------------------------------------
def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def _resolve(w: _Work, fn: Any, value: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the request's event loop is gone
        w.loop.call_soon_threadsafe(fn, w.future, value)


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _position_mask(w: _Work) -> Tensor:
    if w.positions is None:
        return torch.ones(sum(len(r) for r in w.prepared.rows), dtype=torch.bool)
    return torch.tensor([b for row in w.positions for b in row], dtype=torch.bool)


def _compose_pairs(u: Tensor, v: Tensor, composition: str) -> Tensor:
    if composition == "product":
        return u * v
    if composition == "relu_product":
        return torch.relu(u) * torch.relu(v)
    from ..sae import mand

    return mand(u, v)


def _dense_columns(sae: SAE, x: Tensor, lat: Tensor) -> Tensor:
    parts = [
        sae.encode_dense(c)[:, lat.to(c.device)].float().cpu() for c in x.split(DENSE_CHUNK_ROWS)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, len(lat))


def _slice_result(res: RowResult, sl: slice) -> RowResult:
    out = RowResult(top_values=res.top_values[sl], top_indices=res.top_indices[sl])
    for name in (
        "requested",
        "requested_pre",
        "requested_base",
        "requested_extension",
        "base_values",
        "base_indices",
        "extension_values",
        "extension_indices",
    ):
        t = getattr(res, name)
        if t is not None:
            setattr(out, name, t[sl])
    for name in ("dense_max", "dense_sum", "dense_count", "dense_argmax"):
        setattr(out, name, getattr(res, name))  # whole-text aggregates
    return out


def _num(v: float) -> float:
    v = float(v)
    return round(v, 6) if math.isfinite(v) else 0.0


# -- responses ---------------------------------------------------------------------------------------
def check_latents(spec: SaeSpec, latents: Sequence[int] | None) -> list[int]:
    out = [int(i) for i in (latents or [])]
    if len(out) > MAX_REQUESTED_LATENTS:
        raise Unprocessable(f"Ask for at most {MAX_REQUESTED_LATENTS} latents at once.")
    bad = [i for i in out if not 0 <= i < spec.d_sae]
    if bad:
        raise Unprocessable(
            f"Latent {bad[0]} is out of range: {spec.slug} has latents 0 to {spec.d_sae - 1}.",
            detail={"latent": bad[0], "d_sae": spec.d_sae},
        )
    return out


def activations_response(
    spec: SaeSpec,
    prepared: Prepared,
    results: list[RowResult],
    *,
    top_k: int,
    latents: list[int],
) -> dict[str, Any]:
    """The JSON of ``POST /saes/{sae}/activations`` (see ``api.inference``)."""
    assert spec.m is None or spec.n is not None
    texts = []
    for t, res in enumerate(results):
        tokens = []
        tv, ti = res.top_values.tolist(), res.top_indices.tolist()
        req = res.requested.tolist() if res.requested is not None else None
        pre = res.requested_pre.tolist() if res.requested_pre is not None else None
        rb = res.requested_base.tolist() if res.requested_base is not None else None
        re_ = res.requested_extension.tolist() if res.requested_extension is not None else None
        bvals = res.base_values.tolist() if res.base_values is not None else None
        bidx = res.base_indices.tolist() if res.base_indices is not None else None
        evals = res.extension_values.tolist() if res.extension_values is not None else None
        eidx = res.extension_indices.tolist() if res.extension_indices is not None else None
        for pos, token in enumerate(prepared.tokens[t]):
            top = []
            for value, index in zip(tv[pos], ti[pos], strict=True):
                if value <= 0:
                    continue
                entry: dict[str, Any] = {"index": int(index), "value": _num(value)}
                coords = spec.coordinates(index)
                if coords is not None:
                    entry.update(head=coords[0], base=coords[1], extension=coords[2])
                top.append(entry)
            tok: dict[str, Any] = {
                "position": pos,
                "token": token,
                "token_id": prepared.rows[t][pos],
                "special": prepared.special[t][pos],
                "top_latents": top,
            }
            if latents:
                assert req is not None
                lat_out = []
                for c, index in enumerate(latents):
                    e: dict[str, Any] = {"index": index, "value": _num(req[pos][c])}
                    if pre is not None and rb is not None and re_ is not None:
                        e.update(
                            pre_topk=_num(pre[pos][c]),
                            base_value=_num(rb[pos][c]),
                            extension_value=_num(re_[pos][c]),
                        )
                    lat_out.append(e)
                tok["latents"] = lat_out
            if bvals is not None and bidx is not None and evals is not None and eidx is not None:
                assert spec.m and spec.n
                tok["parents"] = {
                    "base": [
                        {"head": i // spec.m, "index": i % spec.m, "value": _num(v)}
                        for v, i in zip(bvals[pos], bidx[pos], strict=True)
                        if v > 0
                    ],
                    "extension": [
                        {"head": i // spec.n, "index": i % spec.n, "value": _num(v)}
                        for v, i in zip(evals[pos], eidx[pos], strict=True)
                        if v > 0
                    ],
                }
            tokens.append(tok)
        texts.append({"text_index": t, "n_tokens": len(tokens), "tokens": tokens})
    return {
        "sae": spec.slug,
        "architecture": spec.architecture,
        "top_k_per_token": top_k,
        "latents": latents,
        "texts": texts,
    }


def search_ranking(
    spec: SaeSpec,
    prepared: Prepared,
    result: RowResult,
    keep: list[bool],
    *,
    rank_by: Literal["max", "sum"],
    limit: int,
) -> tuple[list[dict[str, Any]], int]:
    """Latents over the kept positions of one text, best first: ``(items, total)``."""
    positions = [p for p, k in enumerate(keep) if k]
    argmax: dict[int, int] = {}
    if result.dense_max is not None:  # non-TopK SAEs: aggregated by the worker
        assert result.dense_sum is not None and result.dense_count is not None
        assert result.dense_argmax is not None
        mx, sm, cnt = result.dense_max, result.dense_sum, result.dense_count
        dense_arg: Tensor | None = result.dense_argmax
    else:
        keep_t = torch.tensor(keep, dtype=torch.bool)
        v, i = result.top_values[keep_t], result.top_indices[keep_t]  # [n, k]
        active = v > 0
        flat_i, flat_v = i[active], v[active]
        zeros = torch.zeros(spec.d_sae)
        mx = zeros.scatter_reduce(0, flat_i, flat_v, "amax", include_self=True)
        sm = zeros.scatter_add(0, flat_i, flat_v)
        cnt = zeros.scatter_add(0, flat_i, torch.ones_like(flat_v))
        dense_arg = None
    score = mx if rank_by == "max" else sm
    firing = torch.nonzero(cnt > 0).flatten()
    total = int(firing.numel())
    chosen = [
        int(c) for c in firing[torch.argsort(score[firing], descending=True, stable=True)][:limit]
    ]
    if dense_arg is not None:
        argmax = {c: int(dense_arg[c]) for c in chosen}
    elif chosen:
        lat = torch.tensor(chosen, dtype=torch.long)
        per = (v.unsqueeze(-1) * (i.unsqueeze(-1) == lat)).sum(1)  # [n, L]
        best = per.argmax(0)
        argmax = {c: positions[int(best[n])] for n, c in enumerate(chosen)}
    tokens = prepared.tokens[0]
    items = []
    for c in chosen:
        pos = argmax.get(c, -1)
        coords = spec.coordinates(c)
        items.append(
            {
                "index": c,
                "score": _num(float(score[c])),
                "max_value": _num(float(mx[c])),
                "sum_value": _num(float(sm[c])),
                "n_active": int(cnt[c]),
                "max_position": pos,
                "max_token": tokens[pos] if 0 <= pos < len(tokens) else None,
                "head": coords[0] if coords else None,
                "base": coords[1] if coords else None,
                "extension": coords[2] if coords else None,
            }
        )
    return items, total


# -- the process's engine ------------------------------------------------------------------------
_engine_lock = threading.Lock()


def engine_for(state: Any, settings: Settings) -> InferenceEngine:
    """The engine kept on ``state`` (the app's ``app.state``), made on first use."""
    engine = getattr(state, "inference_engine", None)
    if engine is None:
        with _engine_lock:
            engine = getattr(state, "inference_engine", None)
            if engine is None:
                engine = InferenceEngine(settings)
                state.inference_engine = engine
    return engine  # type: ignore[no-any-return]
