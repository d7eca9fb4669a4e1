"""POST /v1/score: P(click) for each candidate of one user."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.items import resolve_item_keys
from service.deps import BundleDep, PipelineDep
from service.pipeline import ScoreResult
from service.schemas import ErrorResponse, ScoredItem, ScoreRequest, ScoreResponse, Timing
from service.strategies import RerankResult

__all__ = ["router", "timing"]

router = APIRouter(tags=["scoring"])


def timing(result: ScoreResult | RerankResult) -> Timing:
    return Timing(
        total_ms=round(1000 * result.total_s, 3),
        stages_ms={name: round(1000 * s, 3) for name, s in result.stages.items()},
        model_batches=result.model_batches,
    )


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses={
        404: {"model": ErrorResponse, "description": "Unknown item id(s) or key(s), named in the message."},
        504: {"model": ErrorResponse, "description": "Not scored within RELLAX_DEADLINE_MS."},
    },
)
async def score(body: ScoreRequest, pipeline: PipelineDep, bundle: BundleDep) -> ScoreResponse:
    """Score candidates for one user, in request order."""
    item_ids = body.item_ids if body.item_keys is None else resolve_item_keys(bundle, body.item_keys)
    result = await pipeline.score(body.user_id, item_ids, endpoint="score")
    return ScoreResponse(
        user_id=body.user_id,
        model_version=bundle.model_version,
        cold_start=result.cold_start,
        degraded=result.degraded,
        items=[ScoredItem(item_id=s.item_id, item_key=bundle.item_key(s.item_id), p_click=s.p_click,
                          retrieved=s.retrieved, degraded=s.degraded)
               for s in result.items],
        timing=timing(result),
    )  # fmt: skip
