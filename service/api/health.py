"""Operational endpoints, open without an API key: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rellax.allocator import is_tuned
from rellax.errors import HistoryStoreError
from service.deps import MetricsDep, StoreDep
from service.schemas import HealthResponse, ReadyResponse

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """The process is alive (no dependency is checked: restarting would not fix Redis)."""
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(request: Request, store: StoreDep) -> JSONResponse:
    """Ready when the bundle is loaded, Redis answers, the canary scored, the batcher runs and the
    process is not shutting down."""
    state = request.app.state
    try:
        redis_ok = await store.ping()
    except HistoryStoreError:
        redis_ok = False
    if not state.canary_ok and redis_ok:  # a failed start-up canary is retried, so readiness can return
        state.canary_ok = await state.pipeline.canary()
    checks = {
        "accepting": not state.draining,  # false from SIGTERM on (service.server)
        "bundle": getattr(state, "bundle", None) is not None,
        "redis": redis_ok,
        "canary": state.canary_ok,
        "batcher": state.batcher.alive,
    }
    ready = all(checks.values())
    cps = state.candidates_per_s
    body = ReadyResponse(
        ready=ready,
        checks=checks,
        model_version=getattr(state.bundle, "model_version", None),
        dtype=getattr(getattr(state, "backend", None), "compute_dtype", None),
        candidates_per_s=None if cps is None else round(cps, 3),
        fits_in_deadline=None if cps is None else state.settings.fits_in_deadline(cps),
        malloc_tuned=is_tuned(),
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, include_in_schema=True)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus exposition (keep it on the cluster network)."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
