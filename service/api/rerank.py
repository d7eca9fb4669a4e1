"""POST /v1/rerank: the candidates of one user sorted by P(click), best first."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.score import timing
from service.deps import BundleDep, PipelineDep
from service.schemas import ErrorResponse, RerankedItem, RerankRequest, RerankResponse

__all__ = ["router"]

router = APIRouter(tags=["scoring"])


@router.post(
    "/rerank",
    response_model=RerankResponse,
    responses={
        404: {"model": ErrorResponse, "description": "Unknown item id(s), named in the message."},
        504: {"model": ErrorResponse, "description": "Not scored within RELLAX_DEADLINE_MS."},
    },
)
async def rerank(body: RerankRequest, pipeline: PipelineDep, bundle: BundleDep) -> RerankResponse:
    """Score candidates for one user and return them best first (optionally only the top_k)."""
    result = await pipeline.score(body.user_id, body.item_ids, endpoint="rerank")
    ranked = sorted(result.items, key=lambda s: -s.p_click)[: body.top_k]  # stable: ties keep order
    return RerankResponse(
        user_id=body.user_id,
        model_version=bundle.model_version,
        cold_start=result.cold_start,
        degraded=result.degraded,
        items=[RerankedItem(item_id=s.item_id, p_click=s.p_click, retrieved=s.retrieved,
                            degraded=s.degraded, rank=n) for n, s in enumerate(ranked, 1)],
        timing=timing(result),
    )  # fmt: skip
