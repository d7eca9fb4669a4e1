"""The error boundary: each error class -> status, ErrorResponse body, errors_total{reason}; 5xx carry
an error id that is also logged. Uses the real handlers on a small app with routes that raise."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from rellax.errors import BackendError, BundleError, HistoryStoreError, UnknownItem
from service.errors import DeadlineExceeded, LimitExceeded, Overloaded, Unauthorized, install_error_handlers
from service.metrics import Metrics

RAISES = {
    "unknown": UnknownItem([7, 9]),
    "store": HistoryStoreError("connection refused"),
    "bundle": BundleError("weights.safetensors: checksum mismatch"),
    "backend": BackendError("model failed"),
    "overloaded": Overloaded("model queue full", retry_after=1),
    "deadline": DeadlineExceeded("not scored within 2000 ms"),
    "limit": LimitExceeded("item_ids: at most 200", param="item_ids"),
    "auth": Unauthorized("invalid API key"),
    "bug": ZeroDivisionError("division by zero"),
}


@pytest.fixture()
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.state.metrics = Metrics()
    install_error_handlers(app)

    @app.get("/raise/{name}")
    async def raise_(name: str) -> None:
        raise RAISES[name]

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


@pytest.mark.parametrize(
    ("name", "status", "code", "param"),
    [
        ("unknown", 404, "unknown_item", "item_ids"),
        ("store", 503, "history_store_unavailable", None),
        ("bundle", 503, "bundle_unavailable", None),
        ("backend", 500, "backend_error", None),
        ("overloaded", 503, "queue_full", None),
        ("deadline", 504, "deadline_exceeded", None),
        ("limit", 422, "limit_exceeded", "item_ids"),
        ("auth", 401, "invalid_api_key", None),
        ("bug", 500, "internal_error", None),
    ],
)
async def test_each_error_class_maps_to_status_body_and_metric(
    client: httpx.AsyncClient, name: str, status: int, code: str, param: str | None
) -> None:
    r = await client.get(f"/raise/{name}")
    assert r.status_code == status
    err = r.json()["error"]
    assert set(r.json()) == {"error"}
    assert err["code"] == code and err["param"] == param and err["message"]
    assert (err["error_id"] is not None) == (status >= 500)
    if status >= 500:
        assert len(err["error_id"]) == 16
    registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
    assert registry.get_sample_value("rellax_errors_total", {"reason": code}) == 1


async def test_backend_error_id_is_the_one_the_batcher_logged(client: httpx.AsyncClient) -> None:
    err = BackendError("model failed (error id 0123456789abcdef)")
    err.error_id = "0123456789abcdef"  # type: ignore[attr-defined]
    RAISES["tagged"] = err
    r = await client.get("/raise/tagged")
    assert r.status_code == 500 and r.json()["error"]["error_id"] == "0123456789abcdef"
    assert "division" not in r.text  # internals are logged, not returned


async def test_unknown_route_and_method_use_the_same_body(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.post("/raise/bug")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


async def test_retry_after_and_www_authenticate_headers(client: httpx.AsyncClient) -> None:
    assert (await client.get("/raise/overloaded")).headers["retry-after"] == "1"
    assert (await client.get("/raise/store")).headers["retry-after"] == "1"
    assert (await client.get("/raise/auth")).headers["www-authenticate"] == "Bearer"
