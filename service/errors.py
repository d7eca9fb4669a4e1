"""Service errors and the one place that turns any error into a status, an `ErrorResponse` and a metric.

Service-level additions to the rellax tree (rellax/errors.py):

RellaxError
└── ServiceError        an error the API answers on purpose
    ├── Overloaded        the model queue is full: 503 + Retry-After
    ├── DeadlineExceeded  the request ran past its deadline: 504
    ├── LimitExceeded     a request limit was broken: 422 (or 413 for the body), naming the field
    ├── NotFound          a looked-up thing does not exist (an item key): 404
    ├── Unauthorized      missing or wrong API key: 401
    └── RateLimited       the key's rate limit is spent: 429 + Retry-After

Mapping (`install_error_handlers`): UnknownItem 404 · HistoryStoreError 503 · BundleError 503 ·
BackendError 500 · validation 422 · anything else 500. Every 5xx carries an `error_id` that is also
in the log line, and every error counts in `rellax_errors_total{reason}` (reason = the code).
"""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rellax.errors import BackendError, BundleError, HistoryStoreError, RellaxError, UnknownItem
from rellax.logs import get_logger
from service.schemas import ErrorDetail, ErrorResponse

__all__ = [
    "DeadlineExceeded",
    "InvalidRequest",
    "LimitExceeded",
    "NotFound",
    "Overloaded",
    "RateLimited",
    "ServiceError",
    "Unauthorized",
    "error_response",
    "install_error_handlers",
]

log = get_logger(__name__)


class ServiceError(RellaxError):
    """An error the API answers on purpose, with its status and error fields."""

    status = 500
    type = "internal_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.retry_after = retry_after


class NotFound(ServiceError):
    """Something looked up by the request does not exist; `param` names the field."""

    status = 404
    type = "not_found_error"
    code = "not_found"


class InvalidRequest(ServiceError):
    """A well-formed request this bundle or configuration cannot serve; `param` names the field."""

    status, type, code = 422, "invalid_request_error", "invalid_value"


class Overloaded(ServiceError):
    """The model queue is full; retry after `retry_after` seconds."""

    status, type, code = 503, "overloaded", "queue_full"


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its candidates were scored."""

    status, type, code = 504, "timeout", "deadline_exceeded"


class LimitExceeded(ServiceError):
    """A request limit was broken; `param` names the field."""

    status, type, code = 422, "invalid_request_error", "limit_exceeded"

    def __init__(self, message: str, *, param: str, status: int = 422) -> None:
        super().__init__(message, param=param)
        self.status = status


class Unauthorized(ServiceError):
    """No API key, or not one of RELLAX_API_KEYS."""

    status, type, code = 401, "authentication_error", "invalid_api_key"


class RateLimited(ServiceError):
    """The caller's requests/s (RELLAX_RATE_LIMIT_RPS) are spent; retry after `retry_after` s."""

    status, type, code = 429, "rate_limit_error", "rate_limited"


def error_response(
    status: int,
    message: str,
    *,
    type: str,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    request: Request | None = None,
    exc: BaseException | None = None,
) -> JSONResponse:
    """Build the body, count the error, and log 5xx with a fresh (or the error's own) error id."""
    error_id = None
    if status >= 500:
        error_id = getattr(exc, "error_id", None) or uuid.uuid4().hex[:16]
        log.error(
            "request failed",
            error_id=error_id,
            status=status,
            code=code,
            path=request.url.path if request else None,
            exc_info=exc if exc is not None and status == 500 else None,
            message=message,
        )
    if request is not None and (metrics := getattr(request.app.state, "metrics", None)) is not None:
        metrics.errors.labels(reason=code).inc()
    body = ErrorResponse(
        error=ErrorDetail(message=message, type=type, param=param, code=code, error_id=error_id)
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    return error_response(exc.status, str(exc), type=exc.type, code=exc.code, param=exc.param,
                          headers=headers, request=request, exc=exc)  # fmt: skip


def _rellax_error(request: Request, exc: RellaxError) -> JSONResponse:
    if isinstance(exc, UnknownItem):
        return error_response(404, f"unknown item id(s): {exc.item_ids}", type="not_found_error",
                              code="unknown_item", param="item_ids", request=request)  # fmt: skip
    if isinstance(exc, HistoryStoreError):
        return error_response(503, f"history store unavailable: {exc}", type="service_unavailable",
                              code="history_store_unavailable", headers={"Retry-After": "1"},
                              request=request, exc=exc)  # fmt: skip
    if isinstance(exc, BundleError):
        return error_response(503, f"model bundle not loaded: {exc}", type="service_unavailable",
                              code="bundle_unavailable", request=request, exc=exc)  # fmt: skip
    code = "backend_error" if isinstance(exc, BackendError) else "internal_error"
    return error_response(500, "the model failed to score this request", type="internal_error",
                          code=code, request=request, exc=exc)  # fmt: skip


def _json_error(request: Request, exc: RequestValidationError, err: dict) -> JSONResponse:
    """Malformed JSON: say what the parser found and where (line, column), not a bare offset."""
    pos = next((p for p in err.get("loc", ()) if isinstance(p, int)), 0)
    doc = exc.body if isinstance(exc.body, str) else ""
    line = doc.count("\n", 0, pos) + 1
    column = pos - (doc.rfind("\n", 0, pos) + 1) + 1
    reason = (err.get("ctx") or {}).get("error", "invalid JSON")
    message = f"body is not valid JSON: {reason} at line {line}, column {column} (character {pos})"
    return error_response(422, message, type="invalid_request_error", code="invalid_json",
                          param="body", request=request)  # fmt: skip


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return _json_error(request, exc, errors[0])
    parts, param = [], None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query", "header")]
        name = ".".join(loc) or "body"
        param = param or name
        parts.append(f"{name}: {err.get('msg', 'invalid')}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return error_response(422, "; ".join(parts) + more, type="invalid_request_error",
                          code="invalid_value", param=param, request=request)  # fmt: skip


_HTTP_CODES = {
    400: "invalid_body",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    param = "body" if exc.status_code in (400, 413) else None
    message = str(exc.detail)
    if exc.status_code == 400:  # FastAPI's "There was an error parsing the body": bytes, not JSON
        message = "body could not be read as JSON text (is it UTF-8?)"
    return error_response(exc.status_code, message, type=kind, code=code, param=param,
                          headers=getattr(exc, "headers", None), request=request, exc=exc)  # fmt: skip


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, "internal error", type="internal_error", code="internal_error",
                          request=request, exc=exc)  # fmt: skip


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through `error_response` (one body shape, one metric)."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RellaxError, _rellax_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
