"""A data set that is not MovieLens's, from files to a served bundle, with the commands the README
documents: data prepare, train crm, train rella, train rellax, export, load-history, then scoring
over HTTP with real Redis. A tiny random Llama stands in for SmolLM2; everything else is real."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from typer.testing import CliRunner

from cli.main import app
from rellax.domain import Domain
from rellax.entities import HistoryEvent, Profile
from tests.domain_support import write_books

pytestmark = pytest.mark.filterwarnings("ignore")


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"rellax {' '.join(args)}:\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def books_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own-data")
    books = write_books(root / "books")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RELLAX_CACHE_DIR", str(root / "cache"))  # nothing shared with other tests' caches
        mp.setenv("RELLAX_DATASET", str(books))
        out = _run("data", "prepare")
        assert '"event": "data set in use"' in out.splitlines()[0]  # the first log line names it
        manifest = json.loads(out[out.index("{\n") :])  # the printed manifest (logs are one-line JSON)
        assert manifest["dataset"] == "books" and manifest["dataset_key"].startswith("books-")
        _run("train", "crm", "--epochs", "3", "--no-baselines")
        tiny = str(tiny_model_dir)
        small = ["--n-rows", "16", "--k", "5", "--batch-size", "8", "--micro-batch", "4"]
        small += ["--valid-rows", "32", "--fp32", "--model-dir", tiny]
        _run("train", "rella", "--out", str(root / "s1"), "--lr", "0.01", *small)
        _run(
            "train", "rellax", "--stage1", str(root / "s1"), "--out", str(root / "s2"), "--lr", "0.01", *small
        )
        _run("export", "--stage2", str(root / "s2"), "--out", str(root / "bundle"), "--no-merged",
             "--model-dir", tiny)  # fmt: skip
        _run("load-history", "--redis-url", redis_url)
        # The same stage-1 run under another data set (the bundled ML-100K) is refused.
        mp.delenv("RELLAX_DATASET")
        din = sorted((root / "cache" / "crm").iterdir())[0]
        refused = CliRunner().invoke(
            app, ["train", "rellax", "--stage1", str(root / "s1"), "--out", str(root / "x"), "--din-dir",
                  str(din), *small],
        )  # fmt: skip
    return {"root": root, "books": books, "bundle": root / "bundle", "refused": refused}  # type: ignore[dict-item]


def test_the_bundle_carries_the_domain_and_the_datas_own_ids(books_bundle: dict) -> None:
    bundle = books_bundle["bundle"]
    domain = Domain.from_json(json.loads((bundle / "domain.json").read_text()))
    assert (domain.noun, domain.verb, domain.rating, domain.profile) == ("book", "read", "label", ())
    items = json.loads((bundle / "items.json").read_text())
    assert items[0] == {"item_id": 1, "title": "Silent Winter 0", "genre": "mystery", "key": "b0000"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["data"]["source_hash"]
    assert not (books_bundle["root"] / "cache" / "crm" / "din").exists()  # keyed, not the ML-100K path


def test_another_data_set_cannot_build_on_these_runs(books_bundle: dict) -> None:
    refused = books_bundle["refused"]
    assert refused.exit_code != 0
    assert "was built from another data set" in str(refused.exception)


def test_the_books_bundle_is_served_over_http(books_bundle: dict, redis_url: str) -> None:
    from rellax.bundle import Bundle
    from service.embedded_redis import free_port
    from service.main import create_app
    from tests.service_support import make_settings

    bundle = Bundle.load(books_bundle["bundle"], dtype="float32")
    settings = make_settings(redis_url, bundle=books_bundle["bundle"])
    server_app = create_app(settings, bundle=bundle)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(server_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        base = f"http://127.0.0.1:{port}"
        r = httpx.post(f"{base}/v1/score", json={"user_id": "u003", "item_ids": [1, 2, 3]}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert not body["cold_start"] and not body["degraded"]
        assert [s["item_id"] for s in body["items"]] == [1, 2, 3]
        # The history load-history wrote under the data's own id is what the prompt reads, and the
        # served score is the bundle's own score of that prompt (train/serve parity in this domain).
        history = httpx.get(f"{base}/v1/users/u003/history", timeout=10).json()
        events = [HistoryEvent(e["item_id"], e["rating"], e["timestamp"]) for e in history["events"]]
        assert len(events) > 5
        prepared = bundle.prepare(Profile(), events, [1, 2, 3], user_id="u003")
        np.testing.assert_allclose(
            [s["p_click"] for s in body["items"]], bundle.score_prepared(prepared), atol=1e-5
        )
        prompt = prepared[0].prompt.text
        assert "The user read the following books in order in the past" in prompt
        assert "liked) [hist]" in prompt and "***Silent Winter 0*** [target]" in prompt
        # The catalogue maps the data's own ids to the API's item ids and back.
        by_key = httpx.get(f"{base}/v1/items", params={"key": "b0000"}, timeout=10)
        assert by_key.status_code == 200 and by_key.json() == {
            "item_id": 1,
            "key": "b0000",
            "title": "Silent Winter 0",
            "category": "mystery",
        }
        assert httpx.get(f"{base}/v1/items/2", timeout=10).json()["key"] == "b0001"
        missing = httpx.get(f"{base}/v1/items", params={"key": "nope"}, timeout=10)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "key"
        assert httpx.get(f"{base}/v1/items/999", timeout=10).status_code == 404
        unknown = httpx.post(f"{base}/v1/score", json={"user_id": "u003", "item_ids": [999]}, timeout=10)
        assert unknown.status_code == 404 and "999" in unknown.text
        # A client of a string-id catalogue names candidates and events by its own ids.
        by_keys = httpx.post(
            f"{base}/v1/score", json={"user_id": "u003", "item_keys": ["b0000", "b0001", "b0002"]}, timeout=60
        )
        assert by_keys.status_code == 200, by_keys.text
        keyed = by_keys.json()["items"]
        assert [(s["item_id"], s["item_key"]) for s in keyed] == [(1, "b0000"), (2, "b0001"), (3, "b0002")]
        np.testing.assert_allclose([s["p_click"] for s in keyed], [s["p_click"] for s in body["items"]])
        ranked = httpx.post(
            f"{base}/v1/rerank", json={"user_id": "u003", "item_keys": ["b0002", "b0000"]}, timeout=60
        ).json()["items"]
        assert sorted(r["item_key"] for r in ranked) == ["b0000", "b0002"]
        for payload, param in (
            ({"user_id": "u003", "item_keys": ["b0000", "nope", "gone"]}, "item_keys"),
            ({"user_id": "u003", "item_keys": ["b0000"], "item_ids": [1]}, None),
            ({"user_id": "u003", "item_keys": ["b0000", "b0000"]}, None),
            ({"user_id": "u003"}, None),
        ):
            bad = httpx.post(f"{base}/v1/score", json=payload, timeout=10)
            assert bad.status_code == (404 if param else 422), (payload, bad.text)
            if param:
                assert bad.json()["error"]["param"] == param and "'nope', 'gone'" in bad.text
        stored = len(history["events"])
        events = [
            {"item_key": "b0005", "rating": 5, "timestamp": 2_000_000_000},
            {"item_id": 7, "rating": 1, "timestamp": 2_000_000_001},
        ]
        added = httpx.post(f"{base}/v1/users/u003/events", json={"events": events}, timeout=10)
        assert added.status_code == 200 and added.json()["added"] == 2, added.text
        newest = httpx.get(f"{base}/v1/users/u003/history", timeout=10).json()["events"][-2:]
        assert [e["item_id"] for e in newest] == [6, 7]  # b0005 is catalogue item 6
        refused = httpx.post(
            f"{base}/v1/users/u003/events",
            json={"events": [events[0] | {"timestamp": 2_000_000_002}, {"item_key": "nope", "rating": 5,
                                                                        "timestamp": 2_000_000_003}]},
            timeout=10,
        )  # fmt: skip
        assert refused.status_code == 404 and refused.json()["error"]["param"] == "events.1.item_key"
        both = {"item_key": "b0005", "item_id": 6, "rating": 5, "timestamp": 2_000_000_004}
        assert (
            httpx.post(f"{base}/v1/users/u003/events", json={"events": [both]}, timeout=10).status_code == 422
        )
        after = httpx.get(f"{base}/v1/users/u003/history", timeout=10).json()["events"]
        assert len(after) == stored + 2  # nothing of a refused batch was stored
    finally:
        server.should_exit = True
        thread.join(timeout=30)
