"""The FastAPI app: `create_app()` wires settings, metrics, routers and error handlers; the lifespan
loads the bundle, connects Redis, starts the backend and the micro-batcher, and scores a canary.

Serve with `rellax serve` (which also starts an embedded Redis for the demo) or
`uvicorn --factory service.main:create_app`. One worker per model replica (docs/design.md §8).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from rellax.allocator import is_tuned
from rellax.errors import BundleError
from rellax.logs import get_logger
from service.api import api_router
from service.auth import RateLimiter, key_digests
from service.backends import ScoringBackend, backend_class
from service.batcher import MicroBatcher
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from service.pipeline import ScoringPipeline
from service.settings import Settings
from service.store import HistoryStore, connect
from service.strategies import Reranker

__all__ = ["build_backend", "create_app", "load_bundle", "warn_if_deadline_too_short"]

log = get_logger(__name__)


def load_bundle(settings: Settings) -> Any:
    """Load (and checksum) the bundle named by the settings; heavy imports happen here, not at import."""
    from rellax.bundle import Bundle

    return Bundle.load(settings.bundle, dtype=settings.dtype)


def merge_refusal(settings: Settings, bundle: Any) -> str | None:
    """Why the vLLM backend must not serve this bundle, or None: the merged export (CFLoRA folded in at
    the mean gate) lost more valid AUC than RELLAX_MAX_MERGE_AUC_DROP against the exact model, as the
    export measured on the same validation rows. Without this check it would serve the loss silently."""
    metrics = bundle.manifest.get("metrics", {})
    exact, merged = metrics.get("valid_auc_exact_subset"), metrics.get("valid_auc_merged_subset")
    if settings.backend != "vllm" or exact is None or merged is None:
        return None
    drop = float(exact) - float(merged)
    if drop <= settings.max_merge_auc_drop:
        return None
    rows = metrics.get("merged_valid_rows", "?")
    return (
        f"the merged export loses {drop:.4f} valid AUC (exact {exact:.4f} vs merged {merged:.4f} on {rows} "
        f"rows), over RELLAX_MAX_MERGE_AUC_DROP={settings.max_merge_auc_drop}: serve it with "
        "RELLAX_BACKEND=torch (exact CFLoRA), or raise the limit to accept the loss"
    )


def build_backend(settings: Settings, bundle: Any) -> ScoringBackend:
    """The configured backend over this bundle, through each backend's `from_bundle`: torch scores the
    bundle's exact model; vLLM serves its merged export (CFLoRA folded in with the mean gate,
    docs/design.md §8)."""
    return backend_class(settings.backend).from_bundle(bundle, settings)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load and start everything in order; stop it in reverse, also when start-up fails half-way."""
    s: Settings = app.state.settings
    if s.redis_url is None:
        raise RuntimeError("RELLAX_REDIS_URL is not set (`rellax serve` starts an embedded Redis for demos)")
    if app.state.bundle is None:
        try:
            app.state.bundle = await asyncio.to_thread(load_bundle, s)
        except BundleError as exc:  # one plain line before uvicorn's traceback: what to fix
            log.error("cannot serve this bundle", bundle=str(s.bundle), reason=str(exc))
            raise
    bundle = app.state.bundle
    if (refusal := merge_refusal(s, bundle)) is not None:
        log.error("cannot serve this bundle", bundle=str(s.bundle), reason=refusal)
        raise BundleError(refusal)
    async with AsyncExitStack() as stack:
        client = connect(s.redis_url, timeout_s=s.redis_timeout_ms / 1000)
        stack.push_async_callback(client.aclose)
        store = app.state.store = HistoryStore(client, cap=s.history_cap)
        backend = app.state.backend = app.state.backend or build_backend(s, bundle)
        await backend.start()
        stack.push_async_callback(backend.close)
        batcher = app.state.batcher = MicroBatcher(
            backend, max_batch=s.max_batch, max_tokens=s.max_tokens, max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue, metrics=app.state.metrics,
        )  # fmt: skip
        await batcher.start()
        stack.push_async_callback(batcher.close)
        app.state.pipeline = ScoringPipeline(
            bundle, store, batcher, app.state.metrics, k=s.k, deadline_s=s.deadline_ms / 1000,
            max_candidates=s.max_candidates, overload_mode=s.overload_mode, redis_down_mode=s.redis_down_mode,
        )  # fmt: skip
        app.state.reranker = Reranker(
            app.state.pipeline, cascade_m=s.cascade_m, cascade_m_max=s.cascade_m_max, generate_n=s.generate_n,
            max_rank_candidates=s.max_rank_candidates,
        )  # fmt: skip
        app.state.canary_ok = await app.state.pipeline.canary()
        app.state.candidates_per_s = await app.state.pipeline.measure_capacity(min(s.max_batch, 8))
        warn_if_deadline_too_short(s, app.state.candidates_per_s)
        log.info(
            "service ready",
            model_version=bundle.model_version,
            backend=s.backend,
            dtype=getattr(backend, "compute_dtype", None),
            canary=app.state.canary_ok,
            llmsrec=getattr(bundle, "llmsrec", None) is not None,
            malloc_tuned=is_tuned(),
        )
        yield


def warn_if_deadline_too_short(s: Settings, candidates_per_s: float | None) -> None:
    """Say at start-up when RELLAX_MAX_CANDIDATES cannot be scored within RELLAX_DEADLINE_MS on this
    machine (a CPU scores a few candidates a second): such requests would end in 504 after the
    whole deadline's work. The limits are the operator's to choose; this makes the choice visible."""
    if not candidates_per_s:
        return
    fits = s.fits_in_deadline(candidates_per_s)
    (log.warning if fits < s.max_candidates else log.info)(
        "candidates the deadline covers",
        candidates_per_s=round(candidates_per_s, 2),
        deadline_ms=s.deadline_ms,
        fits_in_deadline=fits,
        max_candidates=s.max_candidates,
        advice=None if fits >= s.max_candidates else (
            "lower RELLAX_MAX_CANDIDATES, raise RELLAX_DEADLINE_MS, or serve on a GPU (vLLM); idle "
            "service, one request: concurrent requests share this rate"
        ),
    )  # fmt: skip


def create_app(
    settings: Settings | None = None, *, bundle: Any = None, backend: ScoringBackend | None = None
) -> FastAPI:
    """Build the app; `bundle` lets tests share one loaded bundle between apps, `backend` serves a
    backend built by the caller (not yet started: the lifespan starts and closes it) instead of the
    configured one."""
    settings = settings or Settings()
    app = FastAPI(
        title="rellax",
        summary="Online CTR scoring with ReLLaX (SUBR + SPA + CFLoRA over a small LLM).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.bundle = bundle
    app.state.backend = backend
    app.state.canary_ok = False
    app.state.candidates_per_s = None
    app.state.draining = False
    app.state.key_digests = key_digests(settings.api_keys)
    app.state.rate_limiter = (
        RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst) if settings.rate_limit_rps else None
    )
    install_error_handlers(app)
    app.include_router(api_router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)  # added last = outermost
    return app
