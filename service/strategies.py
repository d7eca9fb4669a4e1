"""/v1/rerank's strategies: who scores which candidates of one request.

    rellax   ReLLaX scores every candidate (`ScoringPipeline.score`, the /v1/score path).
    llmsrec  one LLM-SRec user pass (the user prompt through the frozen LLM), then one dot product
             per candidate with the bundle's stored item vectors: the cost barely grows with the list.
    cascade  llmsrec ranks every candidate; ReLLaX re-scores the top m and those lead, by P(click);
             the rest follow in LLM-SRec's order.

Without item_ids, the candidates are LLM-SRec's own top n from the bundle's item-vector index
(items in the user's history excluded), then ranked by the strategy: retrieval and ranking in one
call. The user's state is read from Redis once per request and the user pass runs once per request,
never per candidate; it runs on the backend's model executor (the torch model thread), as prepare does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from rellax.errors import UnknownItem
from service.errors import DeadlineExceeded, InvalidRequest, LimitExceeded
from service.pipeline import ScoringPipeline

__all__ = ["STRATEGIES", "Ranked", "RerankResult", "Reranker"]

Strategy = Literal["rellax", "llmsrec", "cascade"]
STRATEGIES: tuple[Strategy, ...] = ("rellax", "llmsrec", "cascade")


@dataclass(frozen=True, slots=True)
class Ranked:
    """One candidate of a ranked list, best first; `scored_by` names whose score placed it."""

    item_id: int
    scored_by: Literal["rellax", "llmsrec", "din"]
    p_click: float | None
    llmsrec_score: float | None
    retrieved: list[int]
    degraded: bool


@dataclass(slots=True)
class RerankResult:
    items: list[Ranked]
    cold_start: bool
    generated: bool
    stages: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0
    model_batches: int = 0

    @property
    def degraded(self) -> bool:
        return any(r.degraded for r in self.items)


class Reranker:
    """The strategies over one `ScoringPipeline` (plain arguments, as the pipeline takes)."""

    def __init__(
        self,
        pipeline: ScoringPipeline,
        *,
        cascade_m: int = 10,
        cascade_m_max: int = 50,
        generate_n: int = 100,
        max_rank_candidates: int = 2000,
    ) -> None:
        self.pipeline = pipeline
        self.ranker = getattr(pipeline.bundle, "llmsrec", None)  # None: the bundle has no LLM-SRec
        self.cascade_m, self.cascade_m_max = cascade_m, cascade_m_max
        self.generate_n, self.max_rank_candidates = generate_n, max_rank_candidates

    async def rerank(
        self,
        user_id: str,
        item_ids: Sequence[int] | None,
        strategy: Strategy = "rellax",
        m: int | None = None,
        n_candidates: int | None = None,
    ) -> RerankResult:
        """Rank `item_ids` (or LLM-SRec's own top n_candidates) for `user_id`, best first."""
        start = time.perf_counter()
        self._check(item_ids, strategy, m, n_candidates)
        metrics = self.pipeline.metrics
        if strategy == "rellax" and item_ids is not None:  # today's path, untouched
            result = await self.pipeline.score(user_id, item_ids, endpoint="rerank")
            out = RerankResult(
                self._by_p_click(result.items), result.cold_start, False, result.stages, result.total_s,
                result.model_batches,
            )  # fmt: skip
            metrics.rerank_duration.labels(strategy=strategy).observe(time.perf_counter() - start)
            return out

        stages: dict[str, float] = {}
        user = await self.pipeline.fetch_user(user_id, stages)
        state = user[0]
        history_ids = [e.item_id for e in state.history]
        if item_ids is not None:
            if len(item_ids) > self.max_rank_candidates:
                raise LimitExceeded(
                    f"item_ids: at most {self.max_rank_candidates} candidates per request with strategy "
                    f"{strategy} (RELLAX_MAX_RANK_CANDIDATES), got {len(item_ids)}",
                    param="item_ids",
                )
            unknown = [i for i in item_ids if i not in self.pipeline.bundle.items]
            if unknown:
                raise UnknownItem(unknown)
        vector = await self._user_pass(state.history, stages)
        generated = item_ids is None
        if generated:
            n = n_candidates or self.generate_n
            item_ids = self.ranker.candidates(vector, n, exclude=history_ids)
        ids = [int(i) for i in item_ids]
        llm_scores = self.ranker.scores(vector, ids) if ids else np.zeros(0)
        if strategy != "rellax":
            metrics.scored.labels(model="llmsrec").inc(len(ids))
        shown = self._shown(history_ids)
        order = sorted(range(len(ids)), key=lambda n: -llm_scores[n])  # stable: ties keep request order
        by_llmsrec = [Ranked(ids[n], "llmsrec", None, float(llm_scores[n]), shown, False) for n in order]

        batches = 0
        if strategy == "llmsrec" or not ids:
            items = by_llmsrec if strategy != "rellax" else []
        else:
            top = ids if strategy == "rellax" else [r.item_id for r in by_llmsrec[: m or self.cascade_m]]
            result = await self.pipeline.score(user_id, top, endpoint="rerank", user=user)
            for name, seconds in result.stages.items():
                stages[name] = stages.get(name, 0.0) + seconds
            batches = result.model_batches
            llm = dict(zip(ids, llm_scores.tolist(), strict=True)) if strategy == "cascade" else {}
            head = self._by_p_click(result.items, llm)
            items = head + by_llmsrec[len(head) :] if strategy == "cascade" else head
        total = time.perf_counter() - start
        metrics.rerank_duration.labels(strategy=strategy).observe(total)
        return RerankResult(items, state.cold_start, generated, stages, total, batches)

    def _check(
        self, item_ids: Sequence[int] | None, strategy: Strategy, m: int | None, n_candidates: int | None
    ) -> None:
        if m is not None:
            if strategy != "cascade":
                raise InvalidRequest(f"m: only with strategy cascade (got strategy {strategy})", param="m")
            if m > self.cascade_m_max:
                raise LimitExceeded(
                    f"m: at most {self.cascade_m_max} (RELLAX_CASCADE_M_MAX), got {m}", param="m"
                )
            if m > self.pipeline.max_candidates:
                raise LimitExceeded(
                    f"m: at most {self.pipeline.max_candidates} (RELLAX_MAX_CANDIDATES), got {m}", param="m"
                )
        if n_candidates is not None:
            if item_ids is not None:
                raise InvalidRequest("n_candidates: only without item_ids", param="n_candidates")
            limit = self.pipeline.max_candidates if strategy == "rellax" else self.max_rank_candidates
            if n_candidates > limit:
                raise LimitExceeded(
                    f"n_candidates: at most {limit} with strategy {strategy}, got {n_candidates}",
                    param="n_candidates",
                )
        if self.ranker is None:
            if strategy != "rellax":
                raise InvalidRequest(
                    f"strategy: {strategy} needs LLM-SRec, and this bundle has none (use rellax)",
                    param="strategy",
                )
            if item_ids is None:
                raise InvalidRequest(
                    "item_ids: required, this bundle has no LLM-SRec to retrieve candidates", param="item_ids"
                )

    async def _user_pass(self, history: Sequence, stages: dict[str, float]) -> np.ndarray:
        """LLM-SRec's user vector on the model executor, bounded by the deadline."""
        t = time.perf_counter()
        try:
            async with asyncio.timeout(self.pipeline.deadline_s):
                return await self.pipeline._off_loop(self.ranker.user_vector, list(history))
        except TimeoutError:
            raise DeadlineExceeded(
                f"LLM-SRec's user pass took over the {1000 * self.pipeline.deadline_s:.0f} ms deadline"
            ) from None
        finally:
            stages["user_pass"] = time.perf_counter() - t

    def _shown(self, history_ids: list[int]) -> list[int]:
        """The history items LLM-SRec's user prompt showed (`recent_history`, as `user_vector` picks)."""
        from rellax.llmsrec import recent_history  # loaded with the bundle already; torch stays lazy here

        return [
            it.item_id
            for it, _ in recent_history(self.ranker.items, ((i, 0) for i in history_ids), self.ranker.k)
        ]

    @staticmethod
    def _by_p_click(items: Sequence, llm: dict[int, float] | None = None) -> list[Ranked]:
        ranked = sorted(items, key=lambda s: -s.p_click)  # stable: ties keep order
        llm = llm or {}
        return [
            Ranked(s.item_id, "din" if s.degraded else "rellax", s.p_click, llm.get(s.item_id), s.retrieved,
                   s.degraded)
            for s in ranked
        ]  # fmt: skip
