"""POST /v1/rerank: one user's candidates best first, by the strategy the request names."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.items import resolve_item_keys
from service.api.score import timing
from service.deps import BundleDep, RerankerDep
from service.schemas import ErrorResponse, RerankedItem, RerankRequest, RerankResponse

__all__ = ["router"]

router = APIRouter(tags=["scoring"])


@router.post(
    "/rerank",
    response_model=RerankResponse,
    responses={
        404: {"model": ErrorResponse, "description": "Unknown item id(s) or key(s), named in the message."},
        422: {"model": ErrorResponse, "description": "A field out of range or this bundle cannot serve it."},
        504: {"model": ErrorResponse, "description": "Not scored within RELLAX_DEADLINE_MS."},
    },
)
async def rerank(body: RerankRequest, reranker: RerankerDep, bundle: BundleDep) -> RerankResponse:
    """Rank the candidates (or LLM-SRec's own top n_candidates) and return them best first."""
    item_ids = body.item_ids if body.item_keys is None else resolve_item_keys(bundle, body.item_keys)
    result = await reranker.rerank(body.user_id, item_ids, body.strategy, body.m, body.n_candidates)
    return RerankResponse(
        user_id=body.user_id,
        model_version=bundle.model_version,
        strategy=body.strategy,
        generated=result.generated,
        cold_start=result.cold_start,
        degraded=result.degraded,
        items=[RerankedItem(item_id=r.item_id, item_key=bundle.item_key(r.item_id), rank=n,
                            scored_by=r.scored_by, p_click=r.p_click, llmsrec_score=r.llmsrec_score,
                            retrieved=r.retrieved, degraded=r.degraded)
               for n, r in enumerate(result.items[: body.top_k], 1)],
        timing=timing(result),
    )  # fmt: skip
