"""Faults and load over real HTTP: Redis stopped and restarted, full queue, deadlines, degraded modes,
and concurrent writers/readers against uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from service_support import (
    GatedTorchBackend,
    asgi_app,
    ingest_in_chunks,
    make_settings,
    tiny_bundle,
    uvicorn_app,
)

from rellax.entities import HistoryEvent, Profile
from service.embedded_redis import EmbeddedRedis, free_port


def catalogue(n: int, offset: int = 0) -> list[int]:
    return sorted(tiny_bundle().items)[offset : offset + n]


def din_scores(item_ids: list[int]) -> list[float]:
    return [p.din_prob for p in tiny_bundle().prepare(Profile(), [], item_ids)]


def test_redis_stopped_mid_test_then_recovers(tmp_path: Path) -> None:
    redis = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    body = {"user_id": "r1", "item_ids": catalogue(2)}
    try:
        with (
            uvicorn_app(make_settings(redis.url)) as (_, url),
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            assert (
                client.post(
                    "/v1/users/r1/events",
                    json={"events": [{"item_id": catalogue(1)[0], "rating": 5, "timestamp": 9}]},
                ).status_code
                == 200
            )
            assert client.post("/v1/score", json=body).status_code == 200
            redis.stop()
            down = client.post("/v1/score", json=body)
            write = client.post(
                "/v1/users/r1/events", json={"events": [{"item_id": 1, "rating": 5, "timestamp": 9}]}
            )
            not_ready = client.get("/readyz")
            alive = client.get("/healthz")
            redis.start()  # same port, a fresh (empty) server
            up = client.post("/v1/score", json=body)
            ready = client.get("/readyz")
    finally:
        redis.stop()
    assert down.status_code == 503 and down.headers["retry-after"] == "1"
    assert down.json()["error"]["code"] == "history_store_unavailable"
    assert write.status_code == 503
    assert not_ready.status_code == 503 and not_ready.json()["checks"]["redis"] is False
    assert not_ready.json()["checks"]["canary"] is True
    assert alive.status_code == 200
    assert up.status_code == 200 and up.json()["cold_start"] is True  # recovered by itself
    assert ready.status_code == 200


async def test_redis_down_degrades_to_din_when_configured() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    cands = catalogue(3, offset=5)
    async with asgi_app(make_settings(dead, redis_down_mode="degrade")) as (app, client):
        r = await client.post("/v1/score", json={"user_id": "d", "item_ids": cands})
        ready = await client.get("/readyz")
        degraded = app.state.metrics.registry.get_sample_value(
            "rellax_degraded_responses_total", {"endpoint": "score"}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is True and body["cold_start"] is True and degraded == 1
    assert all(it["degraded"] for it in body["items"])
    np.testing.assert_allclose([it["p_click"] for it in body["items"]], din_scores(cands), atol=1e-6)
    assert ready.status_code == 503


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for a state of the app (polled; the timeout only turns a hang into a failure)."""
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def new_user() -> str:
    return f"f{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def model_held_and_queue_full(
    app: FastAPI, client: httpx.AsyncClient, backend: GatedTorchBackend
) -> AsyncIterator[None]:
    """With max_queue=4: request A (2 candidates) is inside the model, held there by the gate;
    request B (3 candidates) is admitted and waits for prepare behind it on the model thread. The
    batcher's own queue is empty, yet 3 of the 4 places are taken. Leaving opens the gate; A and B
    must then both be scored."""
    assert app.state.batcher.max_queue == 4
    backend.gate.clear()
    first = asyncio.create_task(
        client.post("/v1/score", json={"user_id": new_user(), "item_ids": catalogue(2)})
    )
    try:
        await until(backend.entered.is_set, "request A's batch to reach the model")
        second = asyncio.create_task(
            client.post("/v1/score", json={"user_id": new_user(), "item_ids": catalogue(3, offset=2)})
        )
        await until(lambda: app.state.pipeline.admitted == 3, "request B to be admitted")
        assert app.state.batcher.queued == 0
        yield
        assert not first.done() and not second.done() and backend.entered.is_set()
    finally:
        backend.gate.set()
    for r in await asyncio.gather(first, second):
        assert r.status_code == 200, r.text
    assert app.state.pipeline.admitted == 0 and app.state.batcher.queued == 0


async def test_full_queue_is_503_at_once_while_the_model_is_busy(redis_url: str) -> None:
    backend = GatedTorchBackend(tiny_bundle())
    body = {"user_id": new_user(), "item_ids": catalogue(2, offset=5)}
    with uvicorn_app(make_settings(redis_url, max_queue=4, max_batch=4), backend) as (app, url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async with model_held_and_queue_full(app, client, backend):
                computed = backend.finished
                # 0 queued + 3 being prepared + 2 > 4: refused before Redis, prepare or the model
                r = await asyncio.wait_for(client.post("/v1/score", json=body), timeout=20)
                assert backend.finished == computed  # answered while the model still holds batch A
            again = await client.post("/v1/score", json=body)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "overloaded"
    assert "being prepared" in r.json()["error"]["message"]
    assert again.status_code == 200  # the model is free again: the same request is scored


async def test_full_queue_degrades_to_din_when_configured(redis_url: str) -> None:
    backend = GatedTorchBackend(tiny_bundle())
    cands = catalogue(2, offset=20)
    settings = make_settings(redis_url, max_queue=4, max_batch=4, overload_mode="degrade")
    with uvicorn_app(settings, backend) as (app, url):
        async with (
            httpx.AsyncClient(base_url=url, timeout=60) as client,
            model_held_and_queue_full(app, client, backend),
        ):
            computed = backend.finished
            # DIN's own CTR, prepared beside the model thread rather than behind it
            r = await asyncio.wait_for(
                client.post("/v1/score", json={"user_id": new_user(), "item_ids": cands}), timeout=20
            )
            assert backend.finished == computed
    assert r.status_code == 200 and r.json()["degraded"] is True
    np.testing.assert_allclose([it["p_click"] for it in r.json()["items"]], din_scores(cands), atol=1e-6)


async def test_more_candidates_than_the_queue_holds_is_422(redis_url: str) -> None:
    """It could never be scored, however idle the model: a limit naming the field, not a 503 to retry."""
    async with asgi_app(make_settings(redis_url, max_queue=4)) as (app, client):
        before = app.state.batcher.batches_run
        r = await client.post("/v1/score", json={"user_id": "q", "item_ids": catalogue(5)})
        small = await client.post("/v1/score", json={"user_id": "q", "item_ids": catalogue(4)})
        ran = app.state.batcher.batches_run - before
    assert r.status_code == 422 and "retry-after" not in r.headers
    err = r.json()["error"]
    assert err["param"] == "item_ids" and err["code"] == "limit_exceeded"
    assert err["message"].startswith("item_ids") and "RELLAX_MAX_QUEUE" in err["message"]
    assert small.status_code == 200 and small.json()["degraded"] is False
    assert ran == 1  # the refused request never reached the model


async def test_more_candidates_than_the_queue_holds_degrades_when_configured(redis_url: str) -> None:
    cands = catalogue(5, offset=20)
    settings = make_settings(redis_url, max_queue=4, overload_mode="degrade")
    async with asgi_app(settings) as (app, client):
        before = app.state.batcher.batches_run
        r = await client.post("/v1/score", json={"user_id": new_user(), "item_ids": cands})
        ran = app.state.batcher.batches_run - before
    assert r.status_code == 200 and r.json()["degraded"] is True and ran == 0
    np.testing.assert_allclose([it["p_click"] for it in r.json()["items"]], din_scores(cands), atol=1e-6)


async def test_deadline_drops_the_request_before_compute(redis_url: str) -> None:
    # a 1 ms deadline cannot survive a 200 ms batching window: the candidates expire in the queue
    settings = make_settings(redis_url, deadline_ms=1, max_wait_ms=200)
    async with asgi_app(settings) as (app, client):
        before = app.state.batcher.batches_run
        r = await client.post("/v1/score", json={"user_id": "t", "item_ids": catalogue(4)})
        await asyncio.sleep(0.3)  # past the window: the worker has looked at the queue again
        ran = app.state.batcher.batches_run - before
        queued = app.state.batcher.queued
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert ran == 0 and queued == 0


async def test_deadline_passed_waiting_for_prepare_is_never_prepared(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Request D waits for prepare on the model thread (busy with A's batch) past its deadline: 504 at
    the deadline, and its SUBR/DIN/prompt never run, even once the thread is free."""
    bundle = tiny_bundle()
    prepared_for: list[object] = []
    real_prepare = bundle.prepare

    @functools.wraps(real_prepare)
    def spy(*args: object, **kwargs: object) -> object:
        prepared_for.append(kwargs.get("user_id"))
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(bundle, "prepare", spy)
    backend = GatedTorchBackend(bundle)
    doomed = new_user()
    async with asgi_app(make_settings(redis_url, deadline_ms=2000), backend) as (app, client):
        backend.gate.clear()
        try:
            first = asyncio.create_task(
                client.post("/v1/score", json={"user_id": new_user(), "item_ids": catalogue(2)})
            )
            await until(backend.entered.is_set, "request A's batch to reach the model")
            d = await asyncio.wait_for(
                client.post("/v1/score", json={"user_id": doomed, "item_ids": catalogue(2, offset=2)}),
                timeout=20,
            )
            held = backend.entered.is_set()
        finally:
            backend.gate.set()
        await first  # A itself may have run out of time inside the model: either answer is fine
        after = await client.post(
            "/v1/score", json={"user_id": new_user(), "item_ids": catalogue(2, offset=4)}
        )
    assert held  # D was answered while the model thread was still busy
    assert d.status_code == 504 and d.json()["error"]["code"] == "deadline_exceeded"
    assert "prepared" in d.json()["error"]["message"]
    assert after.status_code == 200  # queued after D's cancelled job on the same thread: D was skipped
    assert doomed not in prepared_for and len(prepared_for) >= 3  # canary, A, the one after


async def test_model_error_is_500_with_an_error_id_and_the_service_keeps_serving(redis_url: str) -> None:
    bundle = tiny_bundle()
    poisoned = catalogue(1, offset=30)[0]
    assert poisoned != next(iter(bundle.items))  # the start-up canary must pass
    backend = GatedTorchBackend(bundle, poison=[poisoned])
    with uvicorn_app(make_settings(redis_url), backend) as (app, url):
        with httpx.Client(base_url=url, timeout=60) as client:
            bad = client.post("/v1/score", json={"user_id": new_user(), "item_ids": [poisoned]})
            good = client.post("/v1/score", json={"user_id": new_user(), "item_ids": catalogue(2, offset=31)})
            ready = client.get("/readyz")
        errors = app.state.metrics.registry.get_sample_value(
            "rellax_errors_total", {"reason": "backend_error"}
        )
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["code"] == "backend_error" and re.fullmatch(r"[0-9a-f]{16}", err["error_id"])
    assert "poisoned" not in bad.text  # internals are logged, not returned
    assert good.status_code == 200 and not good.json()["degraded"]
    assert ready.status_code == 200 and errors == 1


def test_concurrent_ingest_over_http_loses_and_duplicates_nothing(redis_url: str) -> None:
    uid = f"c{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(0)
    items = catalogue(300)
    universe = [
        {"item_id": i, "rating": int(rng.integers(1, 6)), "timestamp": 5_000 + int(rng.integers(0, 40))}
        for i in items
    ]
    plans = [[universe[j] for j in rng.choice(len(universe), 120, replace=False)] for _ in range(8)]
    covered = {(e["item_id"], float(e["rating"]), e["timestamp"]) for plan in plans for e in plan}

    async def writer(url: str, plan: list[dict]) -> int:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await ingest_in_chunks(client, uid, plan)

    async def run(url: str) -> tuple[list[int], dict]:
        added = await asyncio.gather(*(writer(url, p) for p in plans))
        async with httpx.AsyncClient(base_url=url) as client:
            return added, (await client.get(f"/v1/users/{uid}/history")).json()

    with uvicorn_app(make_settings(redis_url)) as (_, url):
        added, hist = asyncio.run(run(url))
    stored = [(e["item_id"], e["rating"], e["timestamp"]) for e in hist["events"]]
    assert sum(added) == len(covered) and len(stored) == len(covered)
    assert set(stored) == covered
    assert stored == sorted(stored, key=lambda e: (e[2], e[0]))


def test_concurrent_scoring_over_http_matches_offline(redis_url: str) -> None:
    """Requests batched together by the micro-batcher still get their own exact scores."""
    users = [f"p{uuid.uuid4().hex[:8]}" for _ in range(6)]
    rng = np.random.default_rng(1)
    items = catalogue(400)
    plans = {
        u: (
            [
                {"item_id": int(i), "rating": int(rng.integers(1, 6)), "timestamp": 1000 + n}
                for n, i in enumerate(rng.choice(items, 15 + 5 * k, replace=False))
            ],
            [int(i) for i in rng.choice(items, 4, replace=False)],
        )
        for k, u in enumerate(users)
    }

    async def one(client: httpx.AsyncClient, uid: str) -> dict:
        r = await client.post("/v1/score", json={"user_id": uid, "item_ids": plans[uid][1]})
        assert r.status_code == 200, r.text
        return r.json()

    async def run(url: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for uid, (events, _) in plans.items():
                assert (
                    await client.post(f"/v1/users/{uid}/events", json={"events": events})
                ).status_code == 200
            return await asyncio.gather(*(one(client, u) for u in users))

    # a wide batching window so the six concurrent requests land in shared batches
    with uvicorn_app(make_settings(redis_url, max_wait_ms=200)) as (app, url):
        before = app.state.batcher.batches_run
        bodies = asyncio.run(run(url))
        batches = app.state.batcher.batches_run - before
    assert batches < len(users)  # requests shared batches
    bundle = tiny_bundle()
    for uid, body in zip(users, bodies, strict=True):
        events, cands = plans[uid]
        history = [HistoryEvent(e["item_id"], float(e["rating"]), e["timestamp"]) for e in events]
        want = bundle.score_prepared(bundle.prepare(Profile(), history, cands))
        # fp32; batch composition differs from the offline call (padding): the scorer's own 1e-4 bound
        np.testing.assert_allclose([it["p_click"] for it in body["items"]], want, atol=1e-4)


def test_acknowledged_events_survive_redis_being_killed(tmp_path: Path) -> None:
    """The persistence the service expects (AOF, fsync every second): every event the API answered
    200 for is still there after redis-server is SIGKILLed straight after the last reply and started
    again on the same data dir; a profile too. (A power cut could lose up to the last second.)"""
    redis = EmbeddedRedis(tmp_path / "redis").start()
    items = catalogue(40)
    try:
        with (
            uvicorn_app(make_settings(redis.url)) as (_, url),
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            acked = []
            for n, item in enumerate(items):  # one request per event: each acknowledged on its own
                event = {"item_id": item, "rating": 1 + n % 5, "timestamp": 1000 + n}
                response = client.post("/v1/users/durable/events", json={"events": [event]})
                assert response.status_code == 200, response.text
                acked.append(event)
            profile = {"gender": "female", "age": "25-34", "job": "programmer"}
            assert client.put("/v1/users/durable/profile", json=profile).status_code == 200
            redis.kill()
            assert client.get("/v1/users/durable/history").status_code == 503  # really gone
            redis.start()
            deadline = time.monotonic() + 10
            while (after := client.get("/v1/users/durable/history")).status_code != 200:
                assert time.monotonic() < deadline, after.text
                time.sleep(0.1)
    finally:
        redis.stop()
    body = after.json()
    assert body["events"] == acked
    assert {k: body["profile"][k] for k in profile} == profile
