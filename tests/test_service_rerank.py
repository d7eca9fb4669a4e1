"""/v1/rerank's strategies through the real app over HTTP, real Redis and the tiny bundle's LLM-SRec:
llmsrec and cascade give the offline ranker's scores, the cascade's head is ReLLaX's own P(click),
retrieval without item_ids excludes the history, one user pass per request, and bad fields are 422s."""

from __future__ import annotations

import copy
import uuid

import numpy as np
import pytest
from service_support import asgi_app, make_settings, tiny_bundle

from rellax.entities import HistoryEvent
from service.main import create_app


def catalogue(n: int, offset: int = 0) -> list[int]:
    return sorted(tiny_bundle().items)[offset : offset + n]


def events_for(items: list[int]) -> list[dict]:
    return [{"item_id": i, "rating": 4, "timestamp": 880_000_000 + 3600 * n} for n, i in enumerate(items)]


def offline_scores(events: list[dict], cands: list[int]) -> np.ndarray:
    """What the offline ranker (LLM-SRec over the same history) gives."""
    ranker = tiny_bundle().llmsrec
    history = [HistoryEvent(e["item_id"], float(e["rating"]), e["timestamp"]) for e in events]
    return ranker.scores(ranker.user_vector(history), cands)


@pytest.fixture
def user() -> tuple[str, list[dict]]:
    return f"r{uuid.uuid4().hex[:10]}", events_for(catalogue(14, offset=3))


async def test_llmsrec_ranks_by_the_offline_dot_products(
    redis_url: str, user: tuple[str, list[dict]]
) -> None:
    uid, events = user
    cands = catalogue(20, offset=50)
    async with asgi_app(make_settings(redis_url)) as (_, client):
        await client.post(f"/v1/users/{uid}/events", json={"events": events})
        r = await client.post("/v1/rerank", json={"user_id": uid, "item_ids": cands, "strategy": "llmsrec"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["strategy"] == "llmsrec" and body["generated"] is False and body["cold_start"] is False
    want = dict(zip(cands, offline_scores(events, cands), strict=True))
    items = body["items"]
    assert sorted(it["item_id"] for it in items) == sorted(cands)
    assert [it["item_id"] for it in items] == sorted(cands, key=lambda i: -want[i])
    np.testing.assert_allclose([it["llmsrec_score"] for it in items], [want[it["item_id"]] for it in items],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert {it["scored_by"] for it in items} == {"llmsrec"} and all(it["p_click"] is None for it in items)
    k = tiny_bundle().llmsrec.k
    assert items[0]["retrieved"] == [e["item_id"] for e in events][-k:]  # what the user prompt showed


async def test_cascade_rescores_llmsrecs_top_m_with_rellax(
    redis_url: str, user: tuple[str, list[dict]]
) -> None:
    uid, events = user
    cands = catalogue(12, offset=60)
    async with asgi_app(make_settings(redis_url)) as (_, client):
        await client.post(f"/v1/users/{uid}/events", json={"events": events})
        r = await client.post(
            "/v1/rerank", json={"user_id": uid, "item_ids": cands, "strategy": "cascade", "m": 4}
        )
        llm = dict(zip(cands, offline_scores(events, cands), strict=True))
        top4 = sorted(cands, key=lambda i: -llm[i])[:4]
        scored = await client.post("/v1/score", json={"user_id": uid, "item_ids": top4})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    head, tail = items[:4], items[4:]
    p = {it["item_id"]: it["p_click"] for it in scored.json()["items"]}
    assert {it["item_id"] for it in head} == set(top4)  # LLM-SRec chose the 4, ReLLaX ordered them
    assert [it["item_id"] for it in head] == sorted(top4, key=lambda i: -p[i])
    np.testing.assert_allclose([it["p_click"] for it in head], [p[it["item_id"]] for it in head], atol=1e-5)
    assert {it["scored_by"] for it in head} == {"rellax"} and {it["scored_by"] for it in tail} == {"llmsrec"}
    assert [it["item_id"] for it in tail] == sorted(set(cands) - set(top4), key=lambda i: -llm[i])
    assert all(it["llmsrec_score"] is not None for it in items) and all(it["p_click"] is None for it in tail)
    assert [it["rank"] for it in items] == list(range(1, 13))


async def test_without_item_ids_llmsrec_retrieves_outside_the_history(
    redis_url: str, user: tuple[str, list[dict]]
) -> None:
    uid, events = user
    seen = {e["item_id"] for e in events}
    unseen = [i for i in sorted(tiny_bundle().items) if i not in seen]
    exact = offline_scores(events, unseen)
    best = [unseen[n] for n in np.argsort(-exact, kind="stable")[:6]]
    async with asgi_app(make_settings(redis_url)) as (_, client):
        await client.post(f"/v1/users/{uid}/events", json={"events": events})
        gen = await client.post("/v1/rerank", json={"user_id": uid, "strategy": "llmsrec", "n_candidates": 6})
        both = await client.post("/v1/rerank", json={"user_id": uid, "n_candidates": 6})  # ReLLaX ranks them
        default = await client.post("/v1/rerank", json={"user_id": uid, "strategy": "cascade", "top_k": 3})
    assert gen.status_code == 200, gen.text
    body = gen.json()
    assert body["generated"] is True
    # 120 items, hnswlib's beam of 200: the index returns the exact top 6 (recall 1 at this size).
    assert [it["item_id"] for it in body["items"]] == best
    ranked = both.json()
    assert ranked["generated"] is True and ranked["strategy"] == "rellax"
    assert {it["item_id"] for it in ranked["items"]} == set(best)
    assert {it["scored_by"] for it in ranked["items"]} == {"rellax"}
    p = [it["p_click"] for it in ranked["items"]]
    assert p == sorted(p, reverse=True)
    assert default.status_code == 200 and len(default.json()["items"]) == 3
    assert not seen & {it["item_id"] for it in default.json()["items"]}


async def test_one_user_pass_per_request_and_metrics_per_strategy(
    redis_url: str, user: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    uid, events = user
    ranker = tiny_bundle().llmsrec
    calls: list[int] = []
    real = ranker.user_vector

    def counted(history: list) -> np.ndarray:
        calls.append(len(history))
        return real(history)

    monkeypatch.setattr(ranker, "user_vector", counted)
    cands = catalogue(30, offset=40)
    async with asgi_app(make_settings(redis_url)) as (app, client):
        await client.post(f"/v1/users/{uid}/events", json={"events": events})
        for strategy in ("llmsrec", "cascade"):
            r = await client.post(
                "/v1/rerank", json={"user_id": uid, "item_ids": cands, "strategy": strategy}
            )
            assert r.status_code == 200, r.text
        sample = app.state.metrics.registry.get_sample_value
        metrics = (await client.get("/metrics")).text
    assert calls == [len(events), len(events)]  # once per request, never per candidate
    assert sample("rellax_candidates_scored_total", {"model": "llmsrec"}) == 60
    assert sample("rellax_candidates_scored_total", {"model": "rellax"}) == 10  # RELLAX_CASCADE_M
    for strategy in ("llmsrec", "cascade"):
        assert f'rellax_rerank_duration_seconds_count{{strategy="{strategy}"}} 1.0' in metrics


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"item_ids": [1], "strategy": "popular"}, "strategy", "'rellax', 'llmsrec' or 'cascade'"),
        ({"item_ids": [1], "strategy": "cascade", "m": 0}, "m", "greater than or equal to 1"),
        ({"item_ids": [1], "strategy": "cascade", "m": 51}, "m", "at most 50"),
        ({"item_ids": [1], "strategy": "cascade", "m": None}, "m", "must not be null"),
        ({"item_ids": [1], "m": 3}, "m", "only with strategy cascade"),
        ({"item_ids": [1], "n_candidates": 3}, "n_candidates", "only without item_ids"),
        ({"n_candidates": 201}, "n_candidates", "at most 200"),
        ({"item_ids": None}, "item_ids", "must not be null"),
        ({"item_ids": list(range(1, 2002)), "strategy": "llmsrec"}, "item_ids", "at most 2000"),
    ],
)
async def test_bad_strategy_fields_are_422_naming_the_field(
    redis_url: str, body: dict, param: str, needle: str
) -> None:
    async with asgi_app(make_settings(redis_url)) as (_, client):
        r = await client.post("/v1/rerank", json={"user_id": "u", **body})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


async def test_unknown_items_are_404_with_every_strategy(redis_url: str) -> None:
    async with asgi_app(make_settings(redis_url)) as (_, client):
        for strategy in ("llmsrec", "cascade"):
            r = await client.post(
                "/v1/rerank", json={"user_id": "u", "item_ids": [1, 99999], "strategy": strategy}
            )
            assert r.status_code == 404 and "99999" in r.json()["error"]["message"], r.text


async def test_a_bundle_without_llmsrec_says_so(redis_url: str) -> None:
    import httpx

    plain = copy.copy(tiny_bundle())
    plain.llmsrec = None
    app = create_app(make_settings(redis_url), bundle=plain)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            strat = await client.post(
                "/v1/rerank", json={"user_id": "u", "item_ids": [1], "strategy": "cascade"}
            )
            gen = await client.post("/v1/rerank", json={"user_id": "u"})
            ok = await client.post("/v1/rerank", json={"user_id": "u", "item_ids": [1, 2]})
    assert strat.status_code == 422 and strat.json()["error"]["param"] == "strategy", strat.text
    assert "needs LLM-SRec, and this bundle has none" in strat.json()["error"]["message"]
    assert gen.status_code == 422 and gen.json()["error"]["param"] == "item_ids", gen.text
    assert ok.status_code == 200 and ok.json()["strategy"] == "rellax"


async def test_a_cold_user_is_ranked_from_the_empty_prompt(redis_url: str) -> None:
    cands = catalogue(10, offset=20)
    async with asgi_app(make_settings(redis_url)) as (_, client):
        r = await client.post("/v1/rerank", json={"user_id": f"cold{uuid.uuid4().hex[:8]}", "item_ids": cands,
                                                  "strategy": "cascade", "m": 3})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] is True and all(it["retrieved"] == [] for it in body["items"])
    want = offline_scores([], cands)
    tail = body["items"][3:]
    np.testing.assert_allclose(
        [it["llmsrec_score"] for it in tail], sorted(want, reverse=True)[3:], rtol=1e-5
    )
