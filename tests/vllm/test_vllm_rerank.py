"""/v1/rerank's strategies with RELLAX_BACKEND=vllm, over HTTP (the real app, real Redis, real engine).

With the vLLM backend, ReLLaX's P(click) comes from the engine on the merged export while LLM-SRec's
user pass runs on the bundle's own torch model, adapters switched off, in the same process (the
engine returns tokens and log-probs, not hidden states at a chosen position). So:
  * llmsrec ranks exactly as it does with the torch backend (same torch pass);
  * cascade re-scores LLM-SRec's top m with the engine: the same P(click) /v1/score gives them;
  * rellax scores equal the torch runtime merged at the same Ḡ, within the parity tolerance;
  * LLM-SRec's pass leaves ReLLaX's scores untouched (no adapter state leaks between the two).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rellax.bundle import Bundle
from rellax.entities import HistoryEvent, Profile

pytestmark = pytest.mark.vllm

TOL = 1e-3  # fp32 vLLM on the merged export vs the fp32 torch runtime on the same weights
MAX_MODEL_LEN = 512
USER = "u-vllm"
HISTORY = [HistoryEvent(i, float(1 + i % 5), 1_000 + i) for i in (3, 17, 29, 44, 58, 71, 90)]
CANDIDATES = [5, 12, 33, 101, 64, 77, 8, 96]


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    from tests.vllm.test_vllm_bundle_parity import _mean_gates, _vllm_sized_llama_config, _write_merged_export
    from training.llm.tiny_bundle import make_tiny_bundle

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers, "LlamaConfig", _vllm_sized_llama_config(transformers.LlamaConfig))
        path = make_tiny_bundle(tmp_path_factory.mktemp("rerank") / "bundle", llmsrec=True)
    bundle = Bundle.load(path, dtype="float32")
    _write_merged_export(bundle, _mean_gates(bundle))
    return path


@contextlib.asynccontextmanager
async def _served(
    bundle_path: Path, redis_url: str, backend: str
) -> AsyncIterator[tuple[Bundle, httpx.AsyncClient]]:
    """The real app (lifespan, error handlers) on `backend`, called through httpx's ASGI transport."""
    from service.main import create_app
    from tests.service_support import make_settings

    bundle = Bundle.load(bundle_path, dtype="float32")
    settings = make_settings(redis_url, bundle=bundle_path, backend=backend)
    engine = None
    if backend == "vllm":
        from service.backends.vllm_backend import VllmBackend

        engine = VllmBackend.from_bundle(
            bundle, settings, kv_cache_memory_bytes=64 << 20, max_model_len=MAX_MODEL_LEN
        )
    app = create_app(settings, bundle=bundle, backend=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        base = "http://rellax.test"
        async with httpx.AsyncClient(transport=transport, base_url=base, timeout=120) as client:
            events = [{"item_id": e.item_id, "rating": e.rating, "timestamp": e.timestamp} for e in HISTORY]
            r = await client.post(f"/v1/users/{USER}/events", json={"events": events})
            assert r.status_code == 200, r.text
            yield bundle, client


async def _all_strategies(bundle_path: Path, redis_url: str, backend: str) -> dict[str, Any]:
    async with _served(bundle_path, redis_url, backend) as (bundle, client):
        out: dict[str, Any] = {"bundle": bundle}
        for name, extra in (("rellax", {}), ("llmsrec", {}), ("cascade", {"m": 3})):
            r = await client.post(
                "/v1/rerank", json={"user_id": USER, "item_ids": CANDIDATES, "strategy": name, **extra}
            )
            assert r.status_code == 200, r.text
            out[name] = r.json()["items"]
        r = await client.post("/v1/score", json={"user_id": USER, "item_ids": CANDIDATES})
        assert r.status_code == 200, r.text
        out["score"] = {s["item_id"]: s["p_click"] for s in r.json()["items"]}
        # ReLLaX again after the LLM-SRec passes: nothing of theirs may have stuck to the model.
        r = await client.post("/v1/score", json={"user_id": USER, "item_ids": CANDIDATES})
        out["score_after"] = {s["item_id"]: s["p_click"] for s in r.json()["items"]}
        return out


@pytest.fixture(scope="module")
def served(bundle_path: Path, redis_url: str) -> dict[str, dict[str, Any]]:
    return {b: asyncio.run(_all_strategies(bundle_path, redis_url, b)) for b in ("torch", "vllm")}


def test_llmsrec_ranks_the_same_on_either_backend(served: dict[str, dict[str, Any]]) -> None:
    torch_side, vllm_side = served["torch"]["llmsrec"], served["vllm"]["llmsrec"]
    assert [i["item_id"] for i in vllm_side] == [i["item_id"] for i in torch_side]
    np.testing.assert_allclose(
        [i["llmsrec_score"] for i in vllm_side], [i["llmsrec_score"] for i in torch_side], atol=1e-6
    )
    assert all(i["scored_by"] == "llmsrec" and i["p_click"] is None for i in vllm_side)


def test_the_cascade_head_is_what_the_engine_scores(served: dict[str, dict[str, Any]]) -> None:
    vllm_side = served["vllm"]
    head = [i for i in vllm_side["cascade"] if i["scored_by"] == "rellax"]
    top3 = {i["item_id"] for i in vllm_side["llmsrec"][:3]}
    assert {i["item_id"] for i in head} == top3  # LLM-SRec chose the m, the engine ordered them
    assert [i["p_click"] for i in head] == sorted((i["p_click"] for i in head), reverse=True)
    for item in head:
        assert item["p_click"] == pytest.approx(vllm_side["score"][item["item_id"]], abs=1e-4)
    assert [i["item_id"] for i in vllm_side["cascade"][3:]] == [
        i["item_id"] for i in vllm_side["llmsrec"] if i["item_id"] not in top3
    ]


def test_rellax_scores_match_the_torch_model_merged_at_the_mean_gate(
    served: dict[str, dict[str, Any]], bundle_path: Path
) -> None:
    from rellax.cflora import cflora_modules
    from tests.vllm.test_vllm_bundle_parity import _mean_gates

    bundle = Bundle.load(bundle_path, dtype="float32")
    g_bars = _mean_gates(bundle)  # the same seeded draw the export was merged at
    for name, module in cflora_modules(bundle.scorer.model.lm).items():
        module.merge(g_bars[name] if module.gate is not None else None)
    prepared = bundle.prepare(Profile(), HISTORY, CANDIDATES, user_id=USER)
    expected = bundle.score_prepared(prepared)
    vllm_side = served["vllm"]
    np.testing.assert_allclose([vllm_side["score"][i] for i in CANDIDATES], expected, atol=TOL)
    by_rellax = {i["item_id"]: i["p_click"] for i in vllm_side["rellax"]}
    np.testing.assert_allclose([by_rellax[i] for i in CANDIDATES], expected, atol=TOL)
    assert np.ptp(expected) > 10 * TOL  # the scores spread: a wrong candidate order would show


def test_llmsrec_passes_leave_rellax_scores_untouched(served: dict[str, dict[str, Any]]) -> None:
    for backend in ("torch", "vllm"):
        before, after = served[backend]["score"], served[backend]["score_after"]
        assert before == pytest.approx(after, abs=1e-6), backend
