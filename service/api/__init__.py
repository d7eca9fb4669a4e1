"""HTTP routers: /v1 (authenticated when keys are configured) and the open operational endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api import health, items, rerank, score, users
from service.auth import require_api_key
from service.schemas import ErrorResponse

__all__ = ["api_router"]

v1 = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key)],
    responses={
        400: {"model": ErrorResponse, "description": "Body unreadable (not UTF-8 text); `param` is body."},
        401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
        413: {"model": ErrorResponse, "description": "Body larger than RELLAX_MAX_BODY_BYTES."},
        422: {"model": ErrorResponse, "description": "Invalid request; `param` names the field."},
        429: {"model": ErrorResponse, "description": "The key's rate limit is spent (see Retry-After)."},
        500: {"model": ErrorResponse, "description": "Internal error; quote `error_id`."},
        503: {"model": ErrorResponse, "description": "Redis down or model queue full (see Retry-After)."},
    },
)
v1.include_router(score.router)
v1.include_router(rerank.router)
v1.include_router(users.router)
v1.include_router(items.router)

api_router = APIRouter()
api_router.include_router(v1)
api_router.include_router(health.router)
