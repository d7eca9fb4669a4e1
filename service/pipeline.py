"""The scoring path of one request (docs/design.md §8), shared by /v1/score and /v1/rerank.

    Redis (one round trip) -> bundle.prepare: SUBR per candidate, DIN (h and its own CTR),
    prompt + soft tokens (rellax's one prompt function, the same one training calls) -> micro-batcher
    -> backend -> P(yes)

Every stage is timed into `rellax_stage_duration_seconds` under the contract's names (service.metrics
.STAGES): redis, subr, crm, prompt (as reported by `bundle.prepare(timings=...)` when the bundle
supports it), queue_wait, model, total. The response's timing also shows "prepare", the whole of
SUBR + DIN + prompt as the service saw it. The two degraded modes return DIN's own
CTR with `degraded: true` (a 200, not an error): queue full with OVERLOAD_MODE=degrade, and Redis down
with REDIS_DOWN_MODE=degrade (then on an empty history and unknown profile).

Admission and deadline, before any work:
  * A request with more candidates than the model queue holds (RELLAX_MAX_QUEUE) can never be
    scored by the model: 422 naming `item_ids` (a limit, not a 503 that invites a retry); with
    OVERLOAD_MODE=degrade it gets DIN's own CTR instead, as any request the queue cannot take.
  * Otherwise it is admitted only if the batcher's queued candidates + the candidates of requests
    already admitted and still on their way (Redis, waiting for or running prepare) + its own fit in
    `max_queue`; if not, `Overloaded` (503 + Retry-After) at once: no Redis, no prepare, no wait for
    the model thread. With the torch backend prepare queues on the single model thread, so this is
    also what bounds the requests waiting there. `MicroBatcher.submit` checks again (the last word).
  * In degrade mode a request that is not admitted still gets DIN's own CTR, prepared on the default
    thread pool rather than behind the model thread.
  * The deadline is checked after Redis and again when prepare gets the executor, and bounds the
    wait for it: an expired request is answered 504 and its SUBR/DIN/prompt never run.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rellax.entities import HistoryEvent, Profile
from rellax.errors import HistoryStoreError, UnknownItem
from rellax.logs import get_logger
from service.batcher import MicroBatcher
from service.errors import DeadlineExceeded, LimitExceeded, Overloaded
from service.metrics import STAGES, Metrics
from service.store import HistoryStore, UserState

__all__ = ["ScoreResult", "Scored", "ScoringPipeline"]

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Scored:
    """One candidate's answer."""

    item_id: int
    p_click: float
    retrieved: list[int]
    degraded: bool


@dataclass(slots=True)
class ScoreResult:
    """Scores in request order, the user's state flags and the per-stage times in seconds."""

    items: list[Scored]
    cold_start: bool
    stages: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0
    model_batches: int = 0  # model batches that carried this request's candidates

    @property
    def degraded(self) -> bool:
        return any(s.degraded for s in self.items)


class ScoringPipeline:
    """Wires bundle, store and batcher; plain arguments, no settings object."""

    def __init__(
        self,
        bundle: Any,
        store: HistoryStore,
        batcher: MicroBatcher,
        metrics: Metrics,
        *,
        k: int | None = None,
        deadline_s: float = 2.0,
        max_candidates: int = 200,
        overload_mode: str = "reject",
        redis_down_mode: str = "reject",
    ) -> None:
        self.bundle, self.store, self.batcher, self.metrics = bundle, store, batcher, metrics
        self.k = k
        self.deadline_s = deadline_s
        self.max_candidates = max_candidates
        self.overload_degrades = overload_mode == "degrade"
        self.redis_down_degrades = redis_down_mode == "degrade"
        # A bundle that reports its own sub-stage times (subr, crm, prompt) gets a dict to fill.
        self._bundle_times = "timings" in inspect.signature(bundle.prepare).parameters
        # Candidates of admitted requests not yet handed to the batcher (Redis, prepare): they count
        # as queued, so a burst cannot pile up behind the model thread before the batcher sees it.
        self.admitted = 0
        if batcher.max_queue < max_candidates:
            log.warning(
                "max_queue is below max_candidates: requests with more than max_queue candidates are "
                + ("scored by DIN only" if self.overload_degrades else "refused with 422"),
                max_queue=batcher.max_queue,
                max_candidates=max_candidates,
            )

    async def score(
        self,
        user_id: str,
        item_ids: Sequence[int],
        endpoint: str,
        user: tuple[UserState, bool] | None = None,
    ) -> ScoreResult:
        """Score `item_ids` for `user_id`; raises UnknownItem, LimitExceeded, HistoryStoreError,
        Overloaded, DeadlineExceeded, BackendError (mapped to HTTP in service.errors). `user`: the
        (state, store_down) `fetch_user` already returned for this request (no second Redis trip)."""
        start = time.perf_counter()
        deadline = time.monotonic() + self.deadline_s
        self._check(item_ids)
        self.metrics.candidates.labels(endpoint=endpoint).observe(len(item_ids))
        stages: dict[str, float] = {}
        count = len(item_ids)
        admitted = self._admit(count)  # raises Overloaded, or False: degrade mode, DIN only
        try:
            state, store_down = user if user is not None else await self.fetch_user(user_id, stages)
            if state.cold_start and not store_down:
                self.metrics.cold_starts.inc()
            if time.monotonic() >= deadline:
                raise DeadlineExceeded("the request deadline passed before its candidates were prepared")
            prepared = await self._prepare(user_id, state, item_ids, stages, deadline, model_thread=admitted)
        finally:
            if admitted:
                self.admitted -= count
        # No await between the release above and submit's own admission check: nothing can slip in.
        scores, model_batches = None, 0
        if admitted and not store_down:
            try:
                batch = await self.batcher.submit([p.model_input for p in prepared], deadline)
                stages["queue_wait"] = stages.get("queue_wait", 0.0) + batch.queue_wait_s
                stages["model"] = batch.model_s
                model_batches = batch.batches
                scores = batch.scores
            except Overloaded:
                if not self.overload_degrades:
                    raise
        if scores is None:  # degraded: DIN's own CTR, a 200 with degraded: true
            self.metrics.degraded.labels(endpoint=endpoint).inc()
        self.metrics.scored.labels(model="din" if scores is None else "rellax").inc(len(prepared))
        items = [
            Scored(
                item_id=int(p.item_id),
                p_click=float(p.din_prob if scores is None else scores[n]),
                retrieved=[int(r) for r in p.retrieved],
                degraded=scores is None,
            )
            for n, p in enumerate(prepared)
        ]
        stages["total"] = time.perf_counter() - start
        self._observe(stages)
        return ScoreResult(
            items=items, cold_start=state.cold_start, stages=stages, total_s=stages.pop("total"),
            model_batches=model_batches,
        )  # fmt: skip

    def _observe(self, stages: dict[str, float]) -> None:
        # Only the contract's names: "prepare" (= subr + crm + prompt) would be counted twice by the
        # dashboard's stacked stage panel.
        for name, seconds in stages.items():
            if name in STAGES:
                self.metrics.stage_duration.labels(stage=name).observe(seconds)

    async def canary(self) -> bool:
        """Score one cold-start candidate through prepare + batcher + backend (no Redis): the
        readiness proof that the model answers. Failures are logged, never raised."""
        try:
            item_id = next(iter(self.bundle.items))
            prepared = await self._off_loop(self._prepare_sync, "canary", Profile(), [], [item_id])
            result = await self.batcher.submit([p.model_input for p in prepared], time.monotonic() + 60)
            p_click = float(result.scores[0])
        except Exception:
            log.exception("canary score failed; /readyz stays false")
            return False
        log.info("canary scored", item_id=item_id, p_click=round(p_click, 6))
        return 0.0 <= p_click <= 1.0

    async def measure_capacity(self, n: int = 8) -> float | None:
        """Model candidates/s on one batch of `n` prompts the size of a real one (a user with twice
        K events), to say at start-up how many candidates the deadline covers. None on failure."""
        items = list(self.bundle.items)
        k = int(getattr(self.bundle.config, "k", 5))
        if len(items) < 2 * k + n:
            return None
        history = [HistoryEvent(i, 4.0, 1_000_000 + 60 * t) for t, i in enumerate(items[: 2 * k])]
        try:
            prepared = await self._off_loop(
                self._prepare_sync, "capacity", Profile(), history, items[2 * k : 2 * k + n]
            )
            result = await self.batcher.submit([p.model_input for p in prepared], time.monotonic() + 600)
        except Exception:
            log.exception("capacity probe failed")
            return None
        return n / max(result.model_s, 1e-9)

    def _check(self, item_ids: Sequence[int]) -> None:
        if len(item_ids) > self.max_candidates:
            raise LimitExceeded(
                f"item_ids: at most {self.max_candidates} candidates per request, got {len(item_ids)}",
                param="item_ids",
            )
        if len(item_ids) > self.batcher.max_queue and not self.overload_degrades:  # never fits
            raise LimitExceeded(
                f"item_ids: at most {self.batcher.max_queue} candidates fit the model queue "
                f"(RELLAX_MAX_QUEUE), got {len(item_ids)}; split the request",
                param="item_ids",
            )
        unknown = [i for i in item_ids if i not in self.bundle.items]
        if unknown:
            raise UnknownItem(unknown)

    def _admit(self, n: int) -> bool:
        """Reserve queue room for `n` candidates before any work; False = not admitted, degrade."""
        queued = self.batcher.queued + self.admitted
        if queued + n > self.batcher.max_queue:
            if not self.overload_degrades:
                raise Overloaded(
                    f"model queue full ({queued} of {self.batcher.max_queue} candidates queued or "
                    "being prepared)",
                    retry_after=1,
                )
            return False
        self.admitted += n
        return True

    async def fetch_user(self, user_id: str, stages: dict[str, float]) -> tuple[UserState, bool]:
        """(history + profile, store_down): Redis once, timed into stages["redis"]; with
        REDIS_DOWN_MODE=degrade a store outage is an empty state and store_down=True."""
        t = time.perf_counter()
        try:
            state = await self.store.fetch(user_id)
        except HistoryStoreError:
            if not self.redis_down_degrades:
                raise
            log.warning("history store down; degrading to DIN on an empty history", user_id=user_id)
            return UserState(history=[], profile=None), True
        finally:
            stages["redis"] = time.perf_counter() - t
        return state, False

    async def _prepare(
        self,
        user_id: str,
        state: UserState,
        item_ids: Sequence[int],
        stages: dict[str, float],
        deadline: float,
        *,
        model_thread: bool = True,
    ) -> list[Any]:
        """SUBR + DIN + prompt off the event loop (tokenising and DIN are CPU work). Time spent waiting
        for the executor (the model thread, with the torch backend) counts as queue_wait. The wait is
        bounded by the deadline, and an executor that frees up after the deadline skips the work."""
        submitted = time.perf_counter()

        def run() -> list[Any]:
            started = time.perf_counter()
            if time.monotonic() >= deadline:
                raise DeadlineExceeded("the request deadline passed while waiting to be prepared")
            stages["queue_wait"] = started - submitted
            out = self._prepare_sync(user_id, state.prompt_profile, state.history, list(item_ids), stages)
            stages["prepare"] = time.perf_counter() - started
            return out

        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return await self._off_loop(run, model_thread=model_thread)
        except TimeoutError:  # a queued executor job is cancelled with the await: never computed
            raise DeadlineExceeded(
                f"not prepared within the {1000 * self.deadline_s:.0f} ms deadline"
            ) from None

    async def _off_loop(self, fn: Any, *args: Any, model_thread: bool = True) -> Any:
        """Run CPU work (tokenising, DIN, SUBR) off the event loop, on the executor the backend names.

        The torch backend names its own model thread: prepare then runs *between* model batches
        instead of beside them. On a small CPU the two would otherwise fight for the same cores
        (torch's intra-op threads stall when preempted); measured with benchmarks/service.py on
        2 cores, the model slowed by a third at concurrency 32. A GPU backend names none, so
        prepare overlaps the model in the default pool. `model_thread=False` forces the default pool
        (the degraded DIN-only path must not queue behind the model it stands in for).
        """
        executor = getattr(self.batcher.backend, "prepare_executor", None) if model_thread else None
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))

    def _prepare_sync(
        self,
        user_id: str,
        profile: Profile,
        history: list[HistoryEvent],
        item_ids: list[int],
        stages: dict[str, float] | None = None,
    ) -> list[Any]:
        extra = {"timings": stages} if self._bundle_times and stages is not None else {}
        return self.bundle.prepare(profile, history, item_ids, k=self.k, user_id=user_id, **extra)
