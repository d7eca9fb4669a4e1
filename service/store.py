"""User histories and profiles in Redis (DESIGN §9), read in one pipelined round trip.

Layout, namespaced and versioned so a later format can live beside this one:

    rellax:v1:user:{id}:hist     sorted set, score = timestamp, member = "{item:010d}|{rating:g}|{timestamp}"
    rellax:v1:user:{id}:profile  hash with gender, age, job

The member *is* the event, so replaying an event is a no-op ZADD: ingest is idempotent without any
read-modify-write, and concurrent writers cannot lose or duplicate events. Equal timestamps sort by
member, i.e. by zero-padded item id, the same tie order as the training samples (timestamp, user,
item). Each write runs ZADD + ZREMRANGEBYRANK (keep the newest `cap`) in one MULTI, so the cap holds
after every write (Redis >= 6.2 for ZMSCORE). redis-py errors become `HistoryStoreError` here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from rellax.entities import HistoryEvent, Profile
from rellax.errors import HistoryStoreError

__all__ = ["HistoryStore", "UserRecord", "UserState", "connect", "decode_event", "encode_event"]

PREFIX = "rellax:v1:user"


def encode_event(event: HistoryEvent) -> str:
    """The sorted-set member of an event; a canonical text so the same event always encodes the same."""
    return f"{int(event.item_id):010d}|{float(event.rating):g}|{int(event.timestamp)}"


def decode_event(member: bytes | str) -> HistoryEvent:
    text = member.decode() if isinstance(member, bytes) else member
    item, rating, stamp = text.split("|")
    return HistoryEvent(item_id=int(item), rating=float(rating), timestamp=int(stamp))


@dataclass(frozen=True, slots=True)
class UserState:
    """What the scoring path needs about a user. `profile` is None when none was stored."""

    history: list[HistoryEvent]
    profile: Profile | None

    @property
    def cold_start(self) -> bool:
        return not self.history

    @property
    def prompt_profile(self) -> Profile:
        return self.profile or Profile()


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One user for the bulk loader."""

    user_id: str
    profile: Profile | None
    events: Sequence[HistoryEvent] = field(default_factory=list)


def connect(url: str, timeout_s: float = 0.5) -> aioredis.Redis:
    """An asyncio client with short timeouts and one immediate retry.

    The retry is what makes recovery automatic: after a Redis restart the pooled connections are dead,
    the first command on one fails and is retried on a fresh connection. More retries with backoff
    (redis-py's default) would hold a request for seconds while Redis is down; we answer 503 instead.
    """
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


@asynccontextmanager
async def _mapped(action: str) -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        raise HistoryStoreError(f"Redis {action} failed: {type(exc).__name__}: {exc}") from exc


class HistoryStore:
    """Per-user capped, idempotent event history and profile."""

    def __init__(self, client: aioredis.Redis, cap: int = 1000) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        self.client = client
        self.cap = cap

    @staticmethod
    def hist_key(user_id: str) -> str:
        return f"{PREFIX}:{user_id}:hist"

    @staticmethod
    def profile_key(user_id: str) -> str:
        return f"{PREFIX}:{user_id}:profile"

    async def ping(self) -> bool:
        async with _mapped("ping"):
            return bool(await self.client.ping())

    async def fetch(self, user_id: str) -> UserState:
        """History (oldest first) and profile in one round trip."""
        async with _mapped("read"), self.client.pipeline(transaction=False) as pipe:
            pipe.zrange(self.hist_key(user_id), 0, -1)
            pipe.hgetall(self.profile_key(user_id))
            members, fields = await pipe.execute()
        return UserState(history=[decode_event(m) for m in members], profile=_profile(fields))

    async def append(self, user_id: str, events: Iterable[HistoryEvent]) -> tuple[int, int]:
        """Add events; returns (newly stored, stored after capping). Replays add nothing.

        "Newly stored" counts events absent before and present after the cap, checked inside the same
        MULTI (ZMSCORE before and after): a replayed event older than the kept window is re-added and
        trimmed at once, and does not count.
        """
        mapping = {encode_event(e): int(e.timestamp) for e in events}
        if not mapping:
            return 0, await self.count(user_id)
        key, members = self.hist_key(user_id), list(mapping)
        async with _mapped("write"), self.client.pipeline(transaction=True) as pipe:
            pipe.zmscore(key, members)
            pipe.zadd(key, mapping)
            pipe.zremrangebyrank(key, 0, -(self.cap + 1))
            pipe.zmscore(key, members)
            pipe.zcard(key)
            before, _, _, after, stored = await pipe.execute()
        added = sum(1 for b, a in zip(before, after, strict=True) if b is None and a is not None)
        return added, int(stored)

    async def count(self, user_id: str) -> int:
        async with _mapped("read"):
            return int(await self.client.zcard(self.hist_key(user_id)))

    async def set_profile(self, user_id: str, profile: Profile) -> None:
        mapping = {"gender": profile.gender, "age": profile.age, "job": profile.job}
        async with _mapped("write"):
            await self.client.hset(self.profile_key(user_id), mapping=mapping)

    async def bulk_load(self, users: Iterable[UserRecord], chunk_events: int = 20_000) -> int:
        """Load many users with few round trips (pipelined, no MULTI); returns users written.

        Same layout and cap as `append`, so a bulk load followed by live events is consistent.
        """
        written, pending = 0, 0
        async with _mapped("bulk write"), self.client.pipeline(transaction=False) as pipe:
            for user in users:
                if user.events:
                    key = self.hist_key(user.user_id)
                    pipe.zadd(key, {encode_event(e): int(e.timestamp) for e in user.events})
                    pipe.zremrangebyrank(key, 0, -(self.cap + 1))
                if user.profile is not None:
                    p = user.profile
                    pipe.hset(
                        self.profile_key(user.user_id),
                        mapping={"gender": p.gender, "age": p.age, "job": p.job},
                    )
                written += 1
                pending += len(user.events) + 1
                if pending >= chunk_events:
                    await pipe.execute()
                    pending = 0
            await pipe.execute()
        return written


def _profile(fields: dict[bytes, bytes]) -> Profile | None:
    if not fields:
        return None
    text = {k.decode(): v.decode() for k, v in fields.items()}
    return Profile(
        gender=text.get("gender", "unknown"), age=text.get("age", "unknown"), job=text.get("job", "unknown")
    )
