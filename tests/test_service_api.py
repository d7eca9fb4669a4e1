"""Every endpoint's happy path through the real app (tiny bundle, real Redis), plus train/serve parity:
the service's P(click) equals `bundle.score_prepared` on the same user state and candidates."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
import uuid

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from service_support import GatedTorchBackend, asgi_app, make_settings, tiny_bundle

from rellax import allocator
from rellax.entities import HistoryEvent, Profile
from service.keys import hash_key
from service.metrics import STAGES


async def forget_user(app: FastAPI, uid: str) -> None:
    """Numeric ids can repeat across tests on the shared Redis: start from an empty history."""
    store = app.state.store
    await store.client.delete(store.hist_key(uid), store.profile_key(uid))


def new_user() -> str:
    return f"u{uuid.uuid4().hex[:10]}"


def catalogue(n: int, offset: int = 0) -> list[int]:
    return sorted(tiny_bundle().items)[offset : offset + n]


def events_for(items: list[int]) -> list[dict]:
    return [
        {"item_id": i, "rating": 1 + (i * 7) % 5, "timestamp": 880_000_000 + 60 * n}
        for n, i in enumerate(items)
    ]


def expected(
    profile: Profile, events: list[dict], item_ids: list[int], user_id: str | None = None
) -> tuple[np.ndarray, list[list[int]]]:
    """The offline path on the same inputs: what training and evaluation compute."""
    bundle = tiny_bundle()
    history = [HistoryEvent(e["item_id"], float(e["rating"]), e["timestamp"]) for e in events]
    prepared = bundle.prepare(profile, history, item_ids, user_id=user_id)
    return np.asarray(bundle.score_prepared(prepared)), [list(map(int, p.retrieved)) for p in prepared]


@pytest.mark.parametrize("known_user", [False, True])
async def test_score_equals_offline_scorer(redis_url: str, known_user: bool) -> None:
    # a numeric id inside DIN's user vocabulary (1..40 in the tiny bundle) uses its own embedding row
    uid = str(7 + int(uuid.uuid4().int % 30)) if known_user else new_user()
    history, cands = catalogue(25), catalogue(6, offset=100)
    events = events_for(history)
    async with asgi_app(make_settings(redis_url)) as (_, client):
        r = await client.post(f"/v1/users/{uid}/events", json={"events": events})
        assert r.status_code == 200 and r.json() == {
            "user_id": uid,
            "received": 25,
            "added": 25,
            "history_len": 25,
        }
        r = await client.put(
            f"/v1/users/{uid}/profile", json={"gender": "female", "age": "25-34", "job": "writer"}
        )
        assert r.status_code == 200
        r = await client.post("/v1/score", json={"user_id": uid, "item_ids": cands})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == uid and body["model_version"] == tiny_bundle().model_version
    assert body["cold_start"] is False and body["degraded"] is False
    assert [it["item_id"] for it in body["items"]] == cands
    want, retrieved = expected(Profile("female", "25-34", "writer"), events, cands, user_id=uid)
    np.testing.assert_allclose([it["p_click"] for it in body["items"]], want, atol=1e-5)
    assert [it["retrieved"] for it in body["items"]] == retrieved
    k = tiny_bundle().k
    for it in body["items"]:
        assert 0 < len(it["retrieved"]) <= k and set(it["retrieved"]) <= set(history)
    assert {"redis", "prepare", "queue_wait", "model"} <= set(body["timing"]["stages_ms"])
    assert body["timing"]["model_batches"] >= 1
    assert body["timing"]["total_ms"] >= max(body["timing"]["stages_ms"].values())


async def test_unknown_user_is_scored_cold(redis_url: str) -> None:
    cands = catalogue(3, offset=10)
    async with asgi_app(make_settings(redis_url)) as (app, client):
        r = await client.post("/v1/score", json={"user_id": new_user(), "item_ids": cands})
        cold = app.state.metrics.registry.get_sample_value("rellax_cold_starts_total")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] is True and cold == 1
    assert all(it["retrieved"] == [] for it in body["items"])
    want, _ = expected(Profile(), [], cands, user_id=body["user_id"])
    np.testing.assert_allclose([it["p_click"] for it in body["items"]], want, atol=1e-5)


async def test_items_are_served_from_the_catalogue(redis_url: str) -> None:
    """Integer-id data sets: the key is the id itself; unknown ids and keys are 404s naming the field."""
    item = catalogue(1)[0]
    async with asgi_app(make_settings(redis_url)) as (_, client):
        by_id = await client.get(f"/v1/items/{item}")
        by_key = await client.get("/v1/items", params={"key": str(item)})
        unknown = await client.get("/v1/items/999999")
        no_key = await client.get("/v1/items", params={"key": "x1"})
        missing = await client.get("/v1/items")
    assert by_id.status_code == 200 and by_id.json()["key"] == str(item) and by_id.json()["title"]
    assert by_key.json() == by_id.json()
    assert unknown.status_code == 404 and "999999" in unknown.text
    assert no_key.status_code == 404 and no_key.json()["error"]["param"] == "key"
    assert missing.status_code == 422 and "key" in missing.text


async def test_numeric_user_ids_are_accepted(redis_url: str) -> None:
    async with asgi_app(make_settings(redis_url)) as (_, client):
        r = await client.post("/v1/score", json={"user_id": 196, "item_ids": catalogue(1)})
    assert r.status_code == 200 and r.json()["user_id"] == "196"


async def test_rerank_sorts_by_the_same_scores(redis_url: str) -> None:
    uid, cands = new_user(), catalogue(8, offset=40)
    async with asgi_app(make_settings(redis_url)) as (_, client):
        await client.post(f"/v1/users/{uid}/events", json={"events": events_for(catalogue(12))})
        scored = (await client.post("/v1/score", json={"user_id": uid, "item_ids": cands})).json()
        r = await client.post("/v1/rerank", json={"user_id": uid, "item_ids": cands})
        top = await client.post("/v1/rerank", json={"user_id": uid, "item_ids": cands, "top_k": 3})
    assert r.status_code == 200, r.text
    ranked = r.json()["items"]
    p = {it["item_id"]: it["p_click"] for it in scored["items"]}
    assert sorted(it["item_id"] for it in ranked) == sorted(cands)
    assert [it["rank"] for it in ranked] == list(range(1, 9))
    assert [it["p_click"] for it in ranked] == sorted(p.values(), reverse=True)
    np.testing.assert_allclose(
        [it["p_click"] for it in ranked], [p[it["item_id"]] for it in ranked], atol=1e-6
    )
    assert [it["item_id"] for it in top.json()["items"]] == [it["item_id"] for it in ranked[:3]]


async def test_events_are_idempotent_and_history_reads_back(redis_url: str) -> None:
    uid = new_user()
    events = events_for(catalogue(5))
    async with asgi_app(make_settings(redis_url, history_cap=4)) as (_, client):
        first = await client.post(f"/v1/users/{uid}/events", json={"events": events})
        again = await client.post(f"/v1/users/{uid}/events", json={"events": events[::-1]})
        empty = await client.get(f"/v1/users/{new_user()}/history")
        await client.put(
            f"/v1/users/{uid}/profile", json={"gender": "male", "age": "under 18", "job": "student"}
        )
        hist = await client.get(f"/v1/users/{uid}/history")
    assert first.json()["added"] == 4 and first.json()["history_len"] == 4  # the oldest fell off the cap
    assert again.json()["added"] == 0 and again.json()["history_len"] == 4
    assert empty.json() == {
        "user_id": empty.json()["user_id"],
        "cold_start": True,
        "profile": None,
        "events": [],
    }
    body = hist.json()
    assert body["profile"] == {"gender": "male", "age": "under 18", "job": "student", "extra": {}}
    assert [e["item_id"] for e in body["events"]] == [e["item_id"] for e in events[1:]]
    assert [e["rating"] for e in body["events"]] == [float(e["rating"]) for e in events[1:]]


def test_start_up_warns_when_the_deadline_cannot_cover_max_candidates(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rellax.logs import configure_logging
    from service.main import warn_if_deadline_too_short

    configure_logging("INFO", json=True)
    warn_if_deadline_too_short(make_settings(redis_url, deadline_ms=2000, max_candidates=200), 1.8)
    warn_if_deadline_too_short(make_settings(redis_url, deadline_ms=2000, max_candidates=3), 1.8)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "deadline covers" in line]
    assert [(x["level"], x["fits_in_deadline"]) for x in lines] == [("warning", 3), ("info", 3)]
    assert "RELLAX_MAX_CANDIDATES" in lines[0]["advice"] and lines[1]["advice"] is None


async def test_health_ready_metrics_and_docs(redis_url: str) -> None:
    async with asgi_app(make_settings(redis_url)) as (_, client):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        await client.post("/v1/score", json={"user_id": "m1", "item_ids": catalogue(2)})
        await client.post("/v1/users/m1/events", json={"events": events_for(catalogue(1))})
        await client.post("/v1/score", json={"user_id": "m1", "item_ids": [10**9]})
        metrics = (await client.get("/metrics")).text
        docs = await client.get("/docs")
        openapi = (await client.get("/openapi.json")).json()
    assert ready.status_code == 200
    body = ready.json()
    cps, fits = body.pop("candidates_per_s"), body.pop("fits_in_deadline")
    assert body == {
        "ready": True,
        "checks": {"accepting": True, "bundle": True, "redis": True, "canary": True, "batcher": True},
        "model_version": tiny_bundle().model_version,
        "dtype": "float32",  # what the model computes in, as RELLAX_DTYPE resolved
        "malloc_tuned": allocator.is_tuned(),  # this pytest process's own start-up environment
    }
    # measured at start-up on a real-sized batch; the deadline (30 s in these tests) covers that many
    assert cps > 0 and fits == int(cps * 30)
    for stage in ("redis", "queue_wait", "model", "total"):
        assert f'rellax_stage_duration_seconds_count{{stage="{stage}"}}' in metrics
    seen = set(re.findall(r'rellax_stage_duration_seconds_count\{stage="(\w+)"\}', metrics))
    assert seen <= set(STAGES)  # the dashboard stacks these: no overlapping "prepare" label
    if "timings" in inspect.signature(tiny_bundle().prepare).parameters:  # the bundle reports sub-stages
        assert {"subr", "crm", "prompt"} <= seen
    assert 'rellax_requests_total{endpoint="/v1/score",status_class="2xx"} 1.0' in metrics
    assert 'rellax_requests_total{endpoint="/v1/score",status_class="4xx"} 1.0' in metrics
    assert 'endpoint="/v1/users/{user_id}/events"' in metrics  # route template: no ids in labels
    assert "m1" not in metrics
    assert 'rellax_errors_total{reason="unknown_item"} 1.0' in metrics
    assert "rellax_batch_size_count" in metrics and "rellax_queue_depth 0.0" in metrics
    assert docs.status_code == 200
    assert {"/v1/score", "/v1/rerank", "/v1/users/{user_id}/events", "/readyz"} <= set(openapi["paths"])
    for name, schema in openapi["components"]["schemas"].items():
        if name.startswith(("HTTPValidationError", "ValidationError")):
            continue  # FastAPI's own, unused: our 422s are ErrorResponse
        for field, spec in schema.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field} has no description"


async def test_inflight_gauge_counts_v1_requests_only(redis_url: str) -> None:
    """The HPA's metric: the scrape and the probes do not count themselves, a /v1 request does."""
    backend = GatedTorchBackend(tiny_bundle())

    def inflight(text: str) -> float:
        return float(re.search(r"^rellax_inflight_requests (\S+)$", text, re.M).group(1))

    async with asgi_app(make_settings(redis_url), backend) as (_, client):
        await client.get("/healthz")
        await client.get("/readyz")
        idle = inflight((await client.get("/metrics")).text)
        backend.gate.clear()
        try:
            held = asyncio.create_task(
                client.post("/v1/score", json={"user_id": new_user(), "item_ids": catalogue(2)})
            )
            give_up = time.monotonic() + 30
            while not backend.entered.is_set():  # the request is inside the model, held by the gate
                assert time.monotonic() < give_up, "the request never reached the model"
                await asyncio.sleep(0.005)
            probes = [(await client.get(p)).status_code for p in ("/healthz", "/readyz")]
            busy = inflight((await client.get("/metrics")).text)
        finally:
            backend.gate.set()
        assert (await held).status_code == 200
        after = inflight((await client.get("/metrics")).text)
    assert probes == [200, 200]
    assert (idle, busy, after) == (0.0, 1.0, 0.0)


async def test_unknown_items_are_404_naming_them(redis_url: str) -> None:
    async with asgi_app(make_settings(redis_url)) as (_, client):
        r = await client.post(
            "/v1/score", json={"user_id": "x", "item_ids": [catalogue(1)[0], 999_999, 888_888]}
        )
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "unknown_item" and err["param"] == "item_ids"
    assert "999999" in err["message"] and "888888" in err["message"]


@pytest.mark.parametrize(
    ("path", "body", "param", "needle"),
    [
        ("/v1/score", {"user_id": "a b", "item_ids": [1]}, "user_id", "user_id"),
        ("/v1/score", {"user_id": "u", "item_ids": []}, "item_ids", "at least 1"),
        ("/v1/score", {"user_id": "u", "item_ids": [0]}, "item_ids.0", "greater than or equal to 1"),
        ("/v1/score", {"user_id": "u", "item_ids": [5, 6, 5]}, "item_ids", "duplicate item ids [5]"),
        ("/v1/score", {"user_id": "u", "item_ids": [1, 2, 3, 4]}, "item_ids", "at most 3 candidates"),
        (
            "/v1/score",
            {"user_id": "u", "item_ids": [1], "embeddings": [[0.1]]},
            "embeddings",
            "not permitted",
        ),
        ("/v1/rerank", {"user_id": "u", "item_ids": [1], "top_k": 0}, "top_k", "top_k"),
        (
            "/v1/users/u/events",
            {"events": [{"item_id": 1, "rating": 7, "timestamp": 1}]},
            "events.0.rating",
            "5",
        ),
        ("/v1/users/u/events", {"events": []}, "events", "at least 1"),
        # pydantic's lax mode took each of these with a 200: ids and ratings are strict.
        ("/v1/score", {"user_id": 1.5, "item_ids": [1]}, "user_id", "string or an integer"),
        ("/v1/score", {"user_id": 12345678901234567890, "item_ids": [1]}, "user_id", "int64"),
        ("/v1/score", {"user_id": True, "item_ids": [1]}, "user_id", "string or an integer"),
        ("/v1/score", {"user_id": "u", "item_ids": [True, False]}, "item_ids.0", "must be an integer"),
        ("/v1/score", {"user_id": "u", "item_ids": [2.0]}, "item_ids.0", "must be an integer"),
        ("/v1/score", {"user_id": "u", "item_ids": ["7x"]}, "item_ids.0", "string of digits"),
        ("/v1/rerank", {"user_id": "u", "item_ids": [1], "top_k": None}, "top_k", "omit the field"),
        ("/v1/rerank", {"user_id": "u", "item_ids": [1], "top_k": True}, "top_k", "integer"),
        ("/v1/rerank", {"user_id": "u", "item_ids": [1], "top_k": 2.0}, "top_k", "integer"),
        (
            "/v1/users/u/events",
            {"events": [{"item_id": 1, "rating": 0, "timestamp": 1}]},
            "events.0.rating",
            "not on the bundle's scale: 1 to 5",
        ),
        (
            "/v1/users/u/events",
            {
                "events": [
                    {"item_id": 1, "rating": 4, "timestamp": 1},
                    {"item_id": 2, "rating": 3.5, "timestamp": 1},
                ]
            },
            "events.1.rating",
            "in steps of 1",
        ),
        (
            "/v1/users/u/events",
            {"events": [{"item_id": 1, "rating": True, "timestamp": 1}]},
            "events.0.rating",
            "must be a number",
        ),
        (
            "/v1/users/u/events",
            {"events": [{"item_id": 1, "rating": "4", "timestamp": 1}]},
            "events.0.rating",
            "must be a number",
        ),
        (
            "/v1/users/u/events",
            {"events": [{"item_id": 1, "rating": 4, "timestamp": True}]},
            "events.0.timestamp",
            "integer",
        ),
        (
            "/v1/users/bad%20id/events",
            {"events": [{"item_id": 1, "rating": 3, "timestamp": 1}]},
            "user_id",
            "pattern",
        ),
    ],
)
async def test_limits_and_formats_are_422_naming_the_field(
    redis_url: str, path: str, body: dict, param: str, needle: str
) -> None:
    async with asgi_app(make_settings(redis_url, max_candidates=3)) as (_, client):
        r = await client.post(path, json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert needle in err["message"] and err["message"].startswith(param)


async def test_malformed_json_says_what_and_where(redis_url: str) -> None:
    async with asgi_app(make_settings(redis_url)) as (_, client):
        r = await client.post(
            "/v1/score",
            content=b'{"user_id": "u",\n "item_ids": [1, 2',
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "body" and err["code"] == "invalid_json"
    assert err["message"].startswith("body is not valid JSON: ") and "line 2, column 19" in err["message"]


async def test_a_body_that_is_not_text_is_400_naming_the_body(redis_url: str) -> None:
    async with asgi_app(make_settings(redis_url)) as (_, client):
        r = await client.post("/v1/score", content=b"\xff\xfe[", headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "body" and err["code"] == "invalid_body" and "UTF-8" in err["message"]


async def test_rejected_events_store_nothing(redis_url: str) -> None:
    uid = new_user()
    good = events_for(catalogue(3))
    async with asgi_app(make_settings(redis_url)) as (_, client):
        bad = await client.post(
            f"/v1/users/{uid}/events", json={"events": [*good, {"item_id": 9, "rating": 6, "timestamp": 2}]}
        )
        hist = await client.get(f"/v1/users/{uid}/history")
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "events.3.rating"
    assert hist.json()["events"] == []


async def test_documented_lax_forms_are_accepted(redis_url: str) -> None:
    """Integer user ids become strings and digit strings are item ids: both documented in the schema."""
    items = catalogue(2)
    async with asgi_app(make_settings(redis_url)) as (_, client):
        r = await client.post("/v1/score", json={"user_id": 2**63 - 1, "item_ids": [str(items[0]), items[1]]})
        e = await client.post(
            f"/v1/users/{new_user()}/events",
            json={"events": [{"item_id": items[0], "rating": 4.0, "timestamp": 1}]},
        )
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] == str(2**63 - 1) and [it["item_id"] for it in r.json()["items"]] == items
    assert e.status_code == 200, e.text


async def test_a_candidate_is_never_in_its_own_history(redis_url: str) -> None:
    """Re-scoring an item the user rated: the prompt, SUBR and DIN see the history without it."""
    uid, seen = new_user(), catalogue(20)
    events = events_for(seen)
    cands = [seen[3], seen[-1], catalogue(1, offset=40)[0]]
    async with asgi_app(make_settings(redis_url)) as (_, client):
        await client.post(f"/v1/users/{uid}/events", json={"events": events})
        r = await client.post("/v1/score", json={"user_id": uid, "item_ids": cands})
        alone = await client.post("/v1/score", json={"user_id": uid, "item_ids": [seen[3]]})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    for it in items:
        assert it["item_id"] not in it["retrieved"] and it["retrieved"], it
    # The same as scoring it over the history without it, and independent of its batch mates.
    without = [e for e in events if e["item_id"] != seen[3]]
    want, retrieved = expected(Profile(), without, [seen[3]], user_id=uid)
    assert items[0]["retrieved"] == retrieved[0] == alone.json()["items"][0]["retrieved"]
    np.testing.assert_allclose([items[0]["p_click"], alone.json()["items"][0]["p_click"]], want[0], atol=1e-5)


async def test_profile_values_are_checked(redis_url: str) -> None:
    """Ages are the bundle's DIN's own values (here the ML-1M buckets), whatever the data set."""
    async with asgi_app(make_settings(redis_url)) as (_, client):
        r = await client.put("/v1/users/u-age/profile", json={"gender": "male", "age": "31"})
        stored = (await client.get("/v1/users/u-age/history")).json()["profile"]
        ok = await client.put("/v1/users/u-age/profile", json={"gender": "male", "age": "unknown"})
        bad_gender = await client.put("/v1/users/u-age/profile", json={"gender": "other"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "age"
    assert "'31' is not an age this bundle knows" in r.text and "'25-34'" in r.text and stored is None
    assert ok.status_code == 200 and bad_gender.status_code == 422


async def test_oversized_bodies_are_413(redis_url: str) -> None:
    big = {"events": [{"item_id": 1, "rating": 3, "timestamp": t} for t in range(200)]}

    async def chunks():  # noqa: ANN202 - no Content-Length: the limit must hold on the stream too
        yield b'{"events": ['
        for t in range(200):
            yield b'{"item_id": 1, "rating": 3, "timestamp": %d},' % t
        yield b'{"item_id": 1, "rating": 3, "timestamp": 1}]}'

    async with asgi_app(make_settings(redis_url, max_body_bytes=2048)) as (app, client):
        r1 = await client.post("/v1/users/u/events", json=big)
        r2 = await client.post(
            "/v1/users/u/events", content=chunks(), headers={"content-type": "application/json"}
        )
        ok = await client.post("/v1/users/u/events", json={"events": big["events"][:5]})
        errors = app.state.metrics.registry.get_sample_value(
            "rellax_errors_total", {"reason": "body_too_large"}
        )
    for r in (r1, r2):
        assert r.status_code == 413, r.text
        assert r.json()["error"]["param"] == "body" and "2048 bytes" in r.json()["error"]["message"]
    assert ok.status_code == 200 and errors == 2


async def test_api_keys_guard_v1_only(redis_url: str) -> None:
    key, other = "k" * 24, "s3cret-" + "x" * 20
    digests = [hash_key(key), hash_key(other)]  # configured as digests: the keys are nowhere
    async with asgi_app(make_settings(redis_url, api_keys=digests)) as (_, client):
        body = {"user_id": "a", "item_ids": catalogue(1)}
        missing = await client.post("/v1/score", json=body)
        wrong = await client.post(
            "/v1/score", json=body, headers={"Authorization": "Bearer " + "k" * 23 + "j"}
        )
        bearer = await client.post("/v1/score", json=body, headers={"Authorization": f"Bearer {key}"})
        header = await client.get("/v1/users/a/history", headers={"X-API-Key": other})
        open_ = [await client.get(p) for p in ("/healthz", "/readyz", "/metrics")]
        invalid = await client.post("/v1/score", json={"user_id": "a b"})  # no key: 401 before validation
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["error"]["message"]
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert bearer.status_code == 200 and header.status_code == 200
    assert [r.status_code for r in open_] == [200, 200, 200]
    assert invalid.status_code == 401


async def test_rate_limit_is_429_with_retry_after_per_key_and_keys_are_never_logged(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rellax.logs import configure_logging

    configure_logging("DEBUG", json=True)
    key, other = "first-key-" + "a" * 20, "second-key-" + "b" * 20
    settings = make_settings(
        redis_url, api_keys=[hash_key(key), other], rate_limit_rps=0.5, rate_limit_burst=2
    )  # the second one plain: accepted, with a warning that names it by position only
    body = {"user_id": "limited", "item_ids": catalogue(1)}
    async with asgi_app(settings) as (app, client):

        async def call(k: str) -> httpx.Response:
            return await client.post("/v1/score", json=body, headers={"Authorization": f"Bearer {k}"})

        first = [await call(key) for _ in range(3)]
        own_bucket = await call(other)  # the other key has its own burst
        wrong = await call("wrong-key-" + "c" * 20)  # 401, not 429: auth comes first
        metrics = await client.get("/metrics")
    assert [r.status_code for r in first] == [200, 200, 429] and own_bucket.status_code == 200
    limited = first[2]
    assert limited.json()["error"]["code"] == "rate_limited" and limited.headers["retry-after"] == "2"
    assert wrong.status_code == 401
    assert f'rellax_rate_limited_total{{key_id="{hash_key(key)[7:15]}"}} 1.0' in metrics.text
    logs = capsys.readouterr().err
    assert "plain API keys" in logs and '"#1"' in logs  # the warning names the entry, not the key
    for secret in (key, other, "wrong-key-"):
        assert secret not in logs and secret not in metrics.text


def test_vllm_backend_needs_the_merged_export(redis_url: str) -> None:
    from rellax.errors import BackendError
    from service.main import build_backend

    with pytest.raises(BackendError, match="no merged/ export"):
        build_backend(make_settings(redis_url, backend="vllm"), tiny_bundle())
    assert build_backend(make_settings(redis_url), tiny_bundle()).name == "torch"


async def test_vllm_refuses_a_bundle_whose_merged_export_lost_auc(redis_url: str) -> None:
    """The study's one-stage ReLLaX lost all its signal merged at the mean gate (test AUC 0.7468 ->
    0.5072): the vLLM backend must not serve such a bundle silently; torch (exact CFLoRA) still does."""
    from rellax.errors import BundleError
    from service.main import merge_refusal

    bundle = tiny_bundle()
    saved = dict(bundle.manifest["metrics"])
    lost = {"valid_auc_exact_subset": 0.70, "valid_auc_merged_subset": 0.51, "merged_valid_rows": 256}
    bundle.manifest["metrics"].update(lost)
    try:
        with pytest.raises(BundleError, match=r"loses 0\.1900 valid AUC .*256 rows.*RELLAX_BACKEND=torch"):
            async with asgi_app(make_settings(redis_url, backend="vllm")):
                pass
        async with asgi_app(make_settings(redis_url)) as (_, client):
            assert (await client.get("/readyz")).status_code == 200
        assert merge_refusal(make_settings(redis_url, backend="vllm", max_merge_auc_drop=0.2), bundle) is None
        bundle.manifest["metrics"].update(valid_auc_merged_subset=0.695)  # within the default 0.01
        assert merge_refusal(make_settings(redis_url, backend="vllm"), bundle) is None
    finally:
        bundle.manifest["metrics"] = saved
