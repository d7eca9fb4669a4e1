"""Two pure ASGI middlewares: request metrics (outermost) and the request body size limit.

Pure ASGI rather than `BaseHTTPMiddleware`: no extra task per request and the body stream is seen
as it arrives, so an oversized chunked upload is cut off without being buffered.
"""

from __future__ import annotations

import re
import time

from fastapi import FastAPI, HTTPException, Request
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.metrics import Metrics

__all__ = ["API_PREFIX", "BodyLimitMiddleware", "RequestMetricsMiddleware"]

API_PREFIX = "/v1/"  # requests under it count in rellax_inflight_requests; probes and /metrics do not


class RequestMetricsMiddleware:
    """Latency by endpoint (the route template, never the raw path: no ids in labels) and status class.

    `rellax_inflight_requests` (the HPA's metric) counts only API requests (paths under /v1/): the
    Prometheus scrape and the kubelet's probes would otherwise count themselves, and a scrape always
    sees at least itself in flight.

    The template is found by matching the path against the app's own route templates (its OpenAPI
    paths plus plain routes such as /docs), compiled once: FastAPI keeps included routers nested, so
    `scope["route"].path` lacks the router prefixes ("/score" instead of "/v1/score").
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    def endpoint(self, scope: Scope) -> str:
        if self._templates is None:
            fastapi_app: FastAPI = scope["app"]
            paths = set(fastapi_app.openapi().get("paths", {}))
            paths |= {p for r in fastapi_app.routes if isinstance(p := getattr(r, "path", None), str)}
            self._templates = [(compile_path(p)[0], p) for p in sorted(paths)]
        path = scope.get("path", "")
        return next((template for regex, template in self._templates if regex.match(path)), "unmatched")

    @staticmethod
    def is_api(scope: Scope) -> bool:
        """A /v1 request (the path as routed: after a `root_path` prefix, if the server has one)."""
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return path.startswith(API_PREFIX)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = self.is_api(scope)
        if counted:
            self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            if counted:
                self.metrics.inflight.dec()
            endpoint, status_class = self.endpoint(scope), f"{status // 100}xx"
            self.metrics.request_duration.labels(endpoint, status_class).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, status_class).inc()


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: at once from Content-Length, or as soon as the stream passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"body: request body larger than {self.max_bytes} bytes (RELLAX_MAX_BODY_BYTES)"
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, message, type="invalid_request_error", code="body_too_large",
                                      param="body", request=Request(scope))  # fmt: skip
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, counted, send)
