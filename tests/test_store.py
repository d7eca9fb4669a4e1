"""The Redis history store against a real redis-server: layout, order, idempotence, cap, concurrency."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from rellax.entities import HistoryEvent, Profile
from rellax.errors import HistoryStoreError
from service.embedded_redis import free_port
from service.store import HistoryStore, UserRecord, connect, decode_event, encode_event


def user() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def ev(item: int, rating: float, ts: int) -> HistoryEvent:
    return HistoryEvent(item_id=item, rating=rating, timestamp=ts)


def test_member_is_canonical_and_round_trips() -> None:
    assert encode_event(ev(7, 4, 100)) == encode_event(ev(7, 4.0, 100)) == "0000000007|4|100"
    assert decode_event(encode_event(ev(1682, 3.5, 893286638))) == ev(1682, 3.5, 893286638)


async def test_fetch_is_time_ordered_with_item_id_tie_order(store: HistoryStore) -> None:
    uid = user()
    added, stored = await store.append(uid, [ev(30, 5, 300), ev(12, 1, 100), ev(9, 4, 200), ev(2, 3, 200)])
    assert (added, stored) == (4, 4)
    state = await store.fetch(uid)
    # (timestamp, item id) order, as the training samples are sorted (docs/design.md §3)
    assert state.history == [ev(12, 1, 100), ev(2, 3, 200), ev(9, 4, 200), ev(30, 5, 300)]
    assert state.profile is None and not state.cold_start


async def test_unknown_user_is_cold_start_with_unknown_profile(store: HistoryStore) -> None:
    state = await store.fetch(user())
    assert state.history == [] and state.cold_start
    assert state.profile is None and state.prompt_profile == Profile("unknown", "unknown", "unknown")


async def test_profile_round_trip(store: HistoryStore) -> None:
    uid = user()
    await store.set_profile(uid, Profile("female", "25-34", "programmer"))
    state = await store.fetch(uid)
    assert state.profile == Profile("female", "25-34", "programmer")
    assert state.cold_start  # a profile alone is no behaviour to read
    await store.set_profile(uid, Profile("female", "35-44", "writer"))
    assert (await store.fetch(uid)).profile == Profile("female", "35-44", "writer")


async def test_replayed_events_are_stored_once(store: HistoryStore) -> None:
    uid = user()
    events = [ev(i, 1 + i % 5, 1000 + i) for i in range(1, 21)]
    assert await store.append(uid, events) == (20, 20)
    assert await store.append(uid, events[5:15]) == (0, 20)
    assert await store.append(uid, [*events[:3], ev(99, 2, 5000)]) == (1, 21)
    # the same item at another time is another event (a re-watch), not a replay
    assert await store.append(uid, [ev(1, 2, 9999)]) == (1, 22)
    assert len((await store.fetch(uid)).history) == 22


async def test_cap_keeps_the_newest_events(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        store, uid = HistoryStore(client, cap=5), user()
        await store.append(uid, [ev(i, 3, 100 * i) for i in range(1, 9)])
        assert [e.item_id for e in (await store.fetch(uid)).history] == [4, 5, 6, 7, 8]
        # an event older than everything kept is trimmed in the same MULTI: not counted as stored
        assert await store.append(uid, [ev(50, 3, 1)]) == (0, 5)
        assert [e.item_id for e in (await store.fetch(uid)).history] == [4, 5, 6, 7, 8]
        assert await store.append(uid, [ev(60, 3, 10_000)]) == (1, 5)
        assert [e.item_id for e in (await store.fetch(uid)).history] == [5, 6, 7, 8, 60]
    finally:
        await client.aclose()


async def test_concurrent_writers_lose_and_duplicate_nothing(redis_url: str) -> None:
    uid = user()
    rng = random.Random(0)
    universe = [ev(i, float(rng.randint(1, 5)), 10_000 + rng.randint(0, 50)) for i in range(1, 401)]
    # 8 writers on their own connections, each replaying overlapping random subsets in small batches
    plans = [rng.sample(universe, 150) for _ in range(8)]
    covered = {encode_event(e) for plan in plans for e in plan}
    clients = [connect(redis_url) for _ in plans]

    async def writer(client, plan: list[HistoryEvent]) -> int:  # noqa: ANN001
        s, added = HistoryStore(client, cap=1000), 0
        for start in range(0, len(plan), 7):
            added += (await s.append(uid, plan[start : start + 7]))[0]
            await asyncio.sleep(0)
        return added

    try:
        added = await asyncio.gather(*(writer(c, p) for c, p in zip(clients, plans, strict=True)))
        history = (await HistoryStore(clients[0]).fetch(uid)).history
    finally:
        for c in clients:
            await c.aclose()
    assert sum(added) == len(covered)  # every event counted as new exactly once across writers
    assert len(history) == len(covered)
    assert {encode_event(e) for e in history} == covered
    assert history == sorted(history, key=lambda e: (e.timestamp, e.item_id))


async def test_bulk_load_matches_append_layout(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        store = HistoryStore(client, cap=3)
        a, b, c = user(), user(), user()
        records = [
            UserRecord(a, Profile("male", "18-24", "student"), [ev(i, 4, i) for i in range(1, 6)]),
            UserRecord(b, None, [ev(7, 2, 50)]),
            UserRecord(c, Profile("female", "50-55", "retired"), []),
        ]
        assert await store.bulk_load(records, chunk_events=2) == 3
        sa, sb, sc = [await store.fetch(u) for u in (a, b, c)]
        assert [e.item_id for e in sa.history] == [3, 4, 5] and sa.profile == Profile(
            "male", "18-24", "student"
        )
        assert sb.history == [ev(7, 2, 50)] and sb.profile is None
        assert sc.cold_start and sc.profile == Profile("female", "50-55", "retired")
        assert await store.bulk_load(records) == 3  # re-running is harmless
        assert len((await store.fetch(a)).history) == 3
    finally:
        await client.aclose()


async def test_unreachable_redis_raises_history_store_error() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    try:
        store = HistoryStore(client)
        with pytest.raises(HistoryStoreError, match="Redis read failed"):
            await store.fetch("1")
        with pytest.raises(HistoryStoreError, match="Redis write failed"):
            await store.append("1", [ev(1, 1, 1)])
        with pytest.raises(HistoryStoreError):
            await store.ping()
    finally:
        await client.aclose()


def test_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="cap must be >= 1"):
        HistoryStore(connect("redis://127.0.0.1:1/0"), cap=0)
