"""Histories on a real Redis Cluster: three masters started here from the same redis-server binary
as every other test (cluster mode, loopback ports, slots split by redis-cli), the real app over HTTP
with `RELLAX_REDIS_URL=redis+cluster://...`.

What must hold: one user's keys share a slot (hash tags), so reads and the idempotent ingest stay
single-slot; users spread over every master; score, rerank, ingest and history answer as on one
Redis; concurrent duplicate ingest loses and duplicates nothing; a master stopped mid-load gives
503 (or degraded answers) and never a 500 or a hang.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from redis import Redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from service_support import ingest_in_chunks, make_settings, tiny_bundle, uvicorn_app

from rellax.entities import HistoryEvent
from service.embedded_redis import EmbeddedRedis, redis_server_binary
from service.schemas import ProfileIn
from service.store import HistoryStore

NODE_TIMEOUT_MS = 1000  # how soon the cluster marks a stopped master failed


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000, Redis's rule) is free too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 55_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalCluster:
    """N masters, no replicas, every slot covered; stopped on exit."""

    def __init__(self, root: Path, masters: int = 3) -> None:
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(NODE_TIMEOUT_MS)]  # fmt: skip
        self.nodes = [
            EmbeddedRedis(root / f"node{i}", port=_cluster_port(), persist=False, extra=extra)
            for i in range(masters)
        ]

    def start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        cli = redis_server_binary().with_name("redis-cli")
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [str(cli), "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not all(self.state(n) == "ok" for n in self.nodes):
            assert time.monotonic() < deadline, "the cluster did not reach cluster_state:ok"
            time.sleep(0.1)
        return self

    @staticmethod
    def state(node: EmbeddedRedis) -> str:
        with Redis(port=node.port) as r:
            return str(r.cluster("info").get("cluster_state", ""))

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def port_of(self, key: str) -> int:
        """The port of the master that holds `key`."""
        with RedisCluster(host="127.0.0.1", port=self.nodes[0].port) as rc:
            return int(rc.get_node_from_key(key).port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    running = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield running
    finally:
        running.stop()


def _users_on_every_master(cluster: LocalCluster, n: int) -> list[str]:
    """n user ids, at least one on each master."""
    users: list[str] = []
    per_port: dict[int, int] = {}
    while len(users) < n or len(per_port) < len(cluster.nodes):
        uid = f"u{uuid.uuid4().hex[:8]}"
        port = cluster.port_of(HistoryStore.hist_key(uid))
        if len(users) < n or per_port.get(port, 0) == 0:
            users.append(uid)
            per_port[port] = per_port.get(port, 0) + 1
    return users


@pytest.mark.parametrize("uid", ["196", "user:with:colons", "a.b@c-d_e", "0"])
def test_one_users_keys_share_a_slot(uid: str) -> None:
    """Hash tags: any id the API accepts hashes its history and profile to one slot."""
    assert key_slot(HistoryStore.hist_key(uid).encode()) == key_slot(HistoryStore.profile_key(uid).encode())


@pytest.mark.parametrize("uid", ["}{", "a{b}c", "x}"])
def test_an_id_with_a_brace_is_refused_by_the_store(uid: str) -> None:
    """A brace would cut the hash tag short (`{}` hashes the whole key): the keys would split."""
    with pytest.raises(ValueError, match="brace"):
        HistoryStore.hist_key(uid)


def test_users_spread_over_the_masters(cluster: LocalCluster) -> None:
    ports = {cluster.port_of(HistoryStore.hist_key(str(u))) for u in range(60)}
    assert ports == {n.port for n in cluster.nodes}


def test_the_api_on_a_cluster_answers_as_on_one_redis(cluster: LocalCluster) -> None:
    bundle = tiny_bundle()
    items = sorted(bundle.items)
    rng = np.random.default_rng(3)
    users = _users_on_every_master(cluster, 4)
    plans = {
        uid: [
            {"item_id": int(i), "rating": int(rng.integers(1, 6)), "timestamp": 1000 + n}
            for n, i in enumerate(rng.choice(items, 12, replace=False))
        ]
        for uid in users
    }
    cands = [int(i) for i in rng.choice(items, 4, replace=False)]
    with uvicorn_app(make_settings(cluster.url)) as (_, url), httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/readyz").status_code == 200
        for uid, events in plans.items():
            r = c.post(f"/v1/users/{uid}/events", json={"events": events})
            assert r.status_code == 200 and r.json()["added"] == len(events), r.text
            assert c.put(f"/v1/users/{uid}/profile", json={"gender": "female"}).status_code == 200
            replay = c.post(f"/v1/users/{uid}/events", json={"events": events[:5]})
            assert replay.json()["added"] == 0  # idempotent on a cluster too
        histories = {uid: c.get(f"/v1/users/{uid}/history").json() for uid in users}
        scores = {uid: c.post("/v1/score", json={"user_id": uid, "item_ids": cands}).json() for uid in users}
        ranked = c.post("/v1/rerank", json={"user_id": users[0], "item_ids": cands}).json()
    for uid, events in plans.items():
        stored = [(e["item_id"], e["rating"], e["timestamp"]) for e in histories[uid]["events"]]
        assert stored == [(e["item_id"], float(e["rating"]), e["timestamp"]) for e in events]
        assert histories[uid]["profile"]["gender"] == "female"
        history = [HistoryEvent(e["item_id"], float(e["rating"]), e["timestamp"]) for e in events]
        want = bundle.score_prepared(bundle.prepare(ProfileIn(gender="female").to_profile(), history, cands))
        body = scores[uid]
        assert body["cold_start"] is False and not body["degraded"]
        np.testing.assert_allclose([it["p_click"] for it in body["items"]], want, atol=1e-4)
    by_item = {it["item_id"]: it["p_click"] for it in scores[users[0]]["items"]}
    assert [it["item_id"] for it in ranked["items"]] == sorted(cands, key=lambda i: -by_item[i])


def test_concurrent_duplicate_ingest_on_a_cluster_loses_and_duplicates_nothing(cluster: LocalCluster) -> None:
    items = sorted(tiny_bundle().items)[:200]
    rng = np.random.default_rng(5)
    users = _users_on_every_master(cluster, 3)
    universe = [
        {"item_id": i, "rating": int(rng.integers(1, 6)), "timestamp": 7_000 + int(rng.integers(0, 30))}
        for i in items
    ]
    plans = [[universe[j] for j in rng.choice(len(universe), 80, replace=False)] for _ in range(6)]
    covered = {(e["item_id"], float(e["rating"]), e["timestamp"]) for plan in plans for e in plan}

    async def run(url: str) -> dict[str, tuple[int, list]]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            out = {}
            for uid in users:  # each user written by 6 concurrent writers with overlapping events
                added = await asyncio.gather(*(ingest_in_chunks(client, uid, p) for p in plans))
                out[uid] = (sum(added), (await client.get(f"/v1/users/{uid}/history")).json()["events"])
            return out

    with uvicorn_app(make_settings(cluster.url)) as (_, url):
        results = asyncio.run(run(url))
    for added, events in results.values():
        stored = [(e["item_id"], e["rating"], e["timestamp"]) for e in events]
        assert added == len(covered) == len(stored) and set(stored) == covered


@pytest.mark.parametrize("mode", ["reject", "degrade"])
def test_a_master_stopped_mid_load_is_503_or_degraded_never_500(tmp_path: Path, mode: str) -> None:
    running = LocalCluster(tmp_path / "cluster").start()
    items = sorted(tiny_bundle().items)
    try:
        users = _users_on_every_master(running, 6)
        victim_port = running.port_of(HistoryStore.hist_key(users[0]))
        victim = next(n for n in running.nodes if n.port == victim_port)
        events = [{"item_id": i, "rating": 4, "timestamp": 100 + n} for n, i in enumerate(items[:8])]

        async def load(url: str) -> list[tuple[str, float, int, bool, bool]]:
            """(phase, seconds, status, degraded, on the stopped master) for requests over ~4 s."""
            out: list[tuple[str, float, int, bool, bool]] = []
            async with httpx.AsyncClient(base_url=url, timeout=15) as client:
                for uid in users:
                    assert (
                        await client.post(f"/v1/users/{uid}/events", json={"events": events})
                    ).status_code == 200

                async def one(uid: str, phase: str) -> None:
                    t = time.monotonic()
                    r = await client.post("/v1/score", json={"user_id": uid, "item_ids": items[20:22]})
                    degraded = r.status_code == 200 and r.json()["degraded"]
                    out.append((phase, time.monotonic() - t, r.status_code, degraded, uid == users[0]))

                started = time.monotonic()
                stopped = False
                while time.monotonic() - started < 4:
                    if not stopped and time.monotonic() - started > 1:
                        await asyncio.to_thread(victim.stop)  # mid-load: requests are in flight
                        stopped = True
                    phase = "after" if stopped else "before"
                    await asyncio.gather(*(one(uid, phase) for uid in users))
                ready = await client.get("/readyz")
                out.append(("readyz", 0.0, ready.status_code, False, False))
            return out

        with uvicorn_app(make_settings(running.url, redis_down_mode=mode)) as (_, url):
            results = asyncio.run(load(url))
    finally:
        running.stop()
    answers = [r for r in results if r[0] != "readyz"]
    assert all(status in (200, 503) for _, _, status, _, _ in answers), {r[2] for r in answers}
    assert max(seconds for _, seconds, *_ in answers) < 10  # no hang: each answer within the timeouts
    assert all(
        status == 200 and not degraded for phase, _, status, degraded, _ in answers if phase == "before"
    )
    after = [r for r in answers if r[0] == "after"]
    victims = [r for r in after if r[4]]
    assert victims
    if mode == "reject":
        assert all(status == 503 for _, _, status, _, _ in victims)
    else:
        assert all(status == 200 and degraded for _, _, status, degraded, _ in victims)
    assert results[-1][2] == 503  # the cluster is failed without that master: not ready


def test_load_history_fills_a_cluster(cluster: LocalCluster, ml100k_samples) -> None:  # noqa: ANN001
    """`rellax load-history` pipelines every user into the cluster (split by node by redis-py);
    each user's history reads back whole, and users sit on every master."""
    from typer.testing import CliRunner

    from cli.main import app
    from service.store import connect

    result = CliRunner().invoke(app, ["load-history", "--redis-url", cluster.url])
    assert result.exit_code == 0, result.output
    assert "loaded 943 users" in result.output
    first_test = int(ml100k_samples.indices("test")[0])
    uid = str(ml100k_samples.user_id(first_test))
    items = ml100k_samples.history(first_test)[0]

    async def fetch() -> list[int]:
        client = connect(cluster.url)
        try:
            return [e.item_id for e in (await HistoryStore(client).fetch(uid)).history]
        finally:
            await client.aclose()

    assert asyncio.run(fetch()) == items.tolist()
    counts = []
    for node in cluster.nodes:
        with Redis(port=node.port) as r:
            counts.append(sum(1 for _ in r.scan_iter(match="rellax:v2:user:{[0-9]*}:hist", count=1000)))
    from service.cli import history_records

    records, _ = history_records(("train", "valid"), None)
    assert min(counts) > 0 and sum(counts) == sum(1 for r in records if r.events)  # every one, once
