"""Deadline-aware micro-batcher: merges candidates of concurrent requests into model batches
(docs/design.md §8).

Why hand-written: the model lives in this process and we need batching *across* requests with a
token budget, a bounded queue that fails fast, and per-request deadlines that drop expired work
before it is computed. Serving frameworks that batch (Triton's dynamic batcher, Ray Serve's
`@serve.batch`, TorchServe) own the process or need their own runtime; the small asyncio batching
helpers on PyPI batch by count and time only, with no token budget, no deadline and no fast reject.
The whole policy fits in this file.

Policy, per worker (one by default; a backend may set `max_concurrent_batches` to run several):
  1. Wait for the first candidate, then up to `max_wait_s` (measured from the *oldest* waiting
     candidate, so a backlog runs at once) or until the batch is full.
  2. Take candidates in arrival order while count <= `max_batch` and padded tokens
     (longest prompt x count) <= `max_tokens`; the first candidate always fits.
  3. Drop candidates whose request gave up (deadline, disconnect) or whose deadline passed: they
     are never computed.
  4. Await `backend.score(batch)` (the backend runs the model off the event loop), resolve futures.
     A model error fails that batch's requests with a `BackendError` carrying an error id; the
     worker keeps serving.
Admission is checked in `submit`: if the queue would exceed `max_queue` candidates, `Overloaded`
is raised at once; nothing waits. The request path checks first, before Redis and prepare, counting
the candidates still being prepared (service.pipeline); this check is the race-safe last word.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rellax.errors import BackendError
from rellax.logs import get_logger
from service.backends.base import ModelInput, ScoringBackend
from service.errors import DeadlineExceeded, Overloaded
from service.metrics import Metrics

__all__ = ["BatchResult", "MicroBatcher"]

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Scores of one request plus where its time went, from submit to its last score.

    model_s: time the model spent on the batches that carried this request's candidates (each
        batch counted once; a 50-candidate request at RELLAX_MAX_BATCH=8 runs 7 of them).
    queue_wait_s: the rest: waiting for other requests' batches and for the batch window.
    batches: how many batches carried its candidates.
    """

    scores: np.ndarray
    queue_wait_s: float
    model_s: float
    batches: int = 0


@dataclass(slots=True)
class _Pending:
    input: ModelInput
    tokens: int
    future: asyncio.Future[tuple[float, float, float]]  # (score, batch start, batch end)
    deadline: float  # time.monotonic()


class MicroBatcher:
    """Queue candidates from many requests; run them through one backend in bounded batches."""

    def __init__(
        self,
        backend: ScoringBackend,
        *,
        max_batch: int = 64,
        max_tokens: int = 16384,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch < 1 or max_tokens < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(
                f"bad batcher limits: max_batch={max_batch} max_tokens={max_tokens} "
                f"max_queue={max_queue} max_wait_s={max_wait_s}"
            )
        self.backend = backend
        self.max_batch, self.max_tokens, self.max_wait_s, self.max_queue = (
            max_batch, max_tokens, max_wait_s, max_queue,
        )  # fmt: skip
        self.metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._running: list[list[_Pending]] = []  # batches inside the backend now
        self.batches_run = 0
        self.dropped_expired = 0

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> MicroBatcher:
        n = max(1, int(getattr(self.backend, "max_concurrent_batches", 1)))
        self._workers = [asyncio.create_task(self._work(), name=f"rellax-batcher-{i}") for i in range(n)]
        return self

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        leftovers = [p for batch in self._running for p in batch] + list(self._queue)
        self._queue.clear()
        self._running.clear()
        for p in leftovers:
            if not p.future.done():
                p.future.set_exception(BackendError("the service is shutting down"))
        self._gauge()

    @property
    def alive(self) -> bool:
        return bool(self._workers) and not any(t.done() for t in self._workers)

    @property
    def queued(self) -> int:
        """Candidates waiting (including ones whose request already gave up, until a worker skips them)."""
        return len(self._queue)

    # ---- request side ----------------------------------------------------------------------------

    async def submit(self, inputs: Sequence[ModelInput], deadline: float) -> BatchResult:
        """Score `inputs` before `deadline` (time.monotonic()); raises Overloaded / DeadlineExceeded."""
        if not inputs:
            return BatchResult(np.zeros(0), 0.0, 0.0)
        if not self.alive:
            raise BackendError("the batcher is not running")
        if len(self._queue) + len(inputs) > self.max_queue:
            raise Overloaded(
                f"model queue full ({len(self._queue)} of {self.max_queue} candidates waiting)",
                retry_after=1,
            )
        submitted = time.monotonic()
        if deadline <= submitted:
            raise DeadlineExceeded("the request deadline passed before scoring started")
        loop = asyncio.get_running_loop()
        pending = [_Pending(x, len(x.input_ids), loop.create_future(), deadline) for x in inputs]
        self._queue.extend(pending)
        self._gauge()
        self._wakeup.set()
        try:
            async with asyncio.timeout(deadline - submitted):
                results = await asyncio.gather(*(p.future for p in pending))
        except TimeoutError:
            raise DeadlineExceeded(
                f"not scored within the {1000 * (deadline - submitted):.0f} ms deadline"
            ) from None
        finally:
            for p in pending:  # anything still queued is skipped by the workers, never computed
                p.future.cancel()
        scores = np.array([r[0] for r in results], dtype=np.float64)
        batches = sorted({(r[1], r[2]) for r in results})  # (start, end) names a batch
        model_s, covered = 0.0, submitted  # the union of the batches' spans (workers may overlap)
        for start, end in batches:
            model_s += max(0.0, end - max(start, covered))
            covered = max(covered, end)
        wall = max(r[2] for r in results) - submitted
        waited = max(0.0, wall - model_s)
        return BatchResult(scores, queue_wait_s=waited, model_s=model_s, batches=len(batches))

    # ---- worker side -----------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            try:
                await self._wait_for_batch()
                batch = self._take_batch()
                if batch:
                    await self._run(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # the worker must outlive any bug in one batch
                log.exception("batcher worker error; continuing")

    async def _wait_for_batch(self) -> None:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        oldest = self._queue[0]
        window_end = time.monotonic() + self.max_wait_s
        while not self._full():
            remaining = window_end - time.monotonic()
            if remaining <= 0 or not self._queue or self._queue[0] is not oldest:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _full(self) -> bool:
        count, longest = 0, 0
        for p in self._queue:
            if p.future.done():
                continue
            count, longest = count + 1, max(longest, p.tokens)
            if count >= self.max_batch or count * longest >= self.max_tokens:
                return True
        return False

    def _take_batch(self) -> list[_Pending]:
        now = time.monotonic()
        batch: list[_Pending] = []
        longest = 0
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # its request gave up (deadline, disconnect, sibling error)
                self._queue.popleft()
                continue
            if p.deadline <= now:
                self._queue.popleft()
                self.dropped_expired += 1
                p.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            new_longest = max(longest, p.tokens)
            if batch and (len(batch) >= self.max_batch or new_longest * (len(batch) + 1) > self.max_tokens):
                break
            self._queue.popleft()
            batch.append(p)
            longest = new_longest
        self._gauge()
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        self._running.append(batch)  # if the worker is cancelled mid-batch, close() answers these
        try:
            scores = np.asarray(await self.backend.score([p.input for p in batch]), dtype=np.float64)
            if scores.shape != (len(batch),):
                raise BackendError(f"backend returned shape {scores.shape} for {len(batch)} inputs")
        except Exception as exc:
            error_id = uuid.uuid4().hex[:16]
            log.error("model batch failed", error_id=error_id, batch=len(batch), exc_info=exc)
            for p in batch:
                if not p.future.done():
                    err = BackendError(f"model failed on a batch of {len(batch)} (error id {error_id})")
                    err.error_id = error_id  # type: ignore[attr-defined]  # echoed in the 500 body
                    p.future.set_exception(err)
        else:
            ended = time.monotonic()
            for p, score in zip(batch, scores, strict=True):
                if not p.future.done():
                    p.future.set_result((float(score), started, ended))
        self._running.remove(batch)
        self.batches_run += 1

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
