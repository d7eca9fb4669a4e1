"""User histories and profiles in Redis (docs/design.md §9), read in one pipelined round trip.

Layout, namespaced and versioned so a later format can live beside this one:

    rellax:v2:user:{<id>}:hist     sorted set, score = timestamp,
                                   member = "{item:010d}|{rating:g}|{timestamp}"
    rellax:v2:user:{<id>}:profile  hash with gender, age, job (+ the data set's own profile fields)

The braces are a Redis Cluster hash tag: only `<id>` decides the slot, so one user's two keys live
on one node and every operation below stays single-slot (the read's pipeline, the write's MULTI) on
Redis Cluster exactly as on one server. v1 (no hash tag) is not read: reload histories after an
upgrade (`rellax load-history`). `connect` speaks to a cluster when the URL's scheme says so
(`redis+cluster://host:port`, any node of it; `rediss+cluster://` for TLS).

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
from pathlib import Path

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from rellax.entities import HistoryEvent, Profile
from rellax.errors import HistoryStoreError

__all__ = ["HistoryStore", "UserRecord", "UserState", "connect", "decode_event", "encode_event"]

PREFIX = "rellax:v2:user"
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


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


def connect(url: str, timeout_s: float = 0.5) -> aioredis.Redis | RedisCluster:
    """An asyncio client with short timeouts and one immediate retry; `redis+cluster://` (or
    `rediss+cluster://`) gives redis-py's RedisCluster, which finds the other nodes from the one named.

    The retry is what makes recovery automatic: after a Redis restart the pooled connections are dead,
    the first command on one fails and is retried on a fresh connection. More retries with backoff
    (redis-py's default) would hold a request for seconds while Redis is down; we answer 503 instead.
    On a cluster the same single retry also follows a moved slot or a refreshed topology.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in CLUSTER_SCHEMES:
        return RedisCluster.from_url(
            f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}",
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


_REDIS_PY = str(Path(redis.__file__).parent)


def _inside_redis_py(exc: BaseException) -> bool:
    """True when `exc` was raised in redis-py's own code (its innermost frame is there)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_REDIS_PY)


@asynccontextmanager
async def _mapped(action: str) -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        raise HistoryStoreError(f"Redis {action} failed: {type(exc).__name__}: {exc}") from exc
    except (AttributeError, TypeError) as exc:
        # redis-py's asyncio cluster client can trip over its own state while a node goes away
        # (a connection closed under a command: "'NoneType' object has no attribute 'writelines'";
        # redis/redis-py#3546, #3815, #3835). That is the store failing, not a bug of the request.
        if not _inside_redis_py(exc):
            raise
        raise HistoryStoreError(
            f"Redis {action} failed inside redis-py: {type(exc).__name__}: {exc}"
        ) from exc


class HistoryStore:
    """Per-user capped, idempotent event history and profile."""

    def __init__(self, client: aioredis.Redis | RedisCluster, cap: int = 1000) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        self.client = client
        self.cap = cap

    @staticmethod
    def _tag(user_id: str) -> str:
        """`{user_id}`, the hash tag; an id with a brace would end (or empty) the tag early and split
        the user's keys over slots. The API's id pattern has no braces; other writers are refused."""
        if "{" in user_id or "}" in user_id:
            raise ValueError(f"user id {user_id!r} holds a brace: it cannot be a Redis Cluster hash tag")
        return f"{{{user_id}}}"

    @classmethod
    def hist_key(cls, user_id: str) -> str:
        return f"{PREFIX}:{cls._tag(user_id)}:hist"

    @classmethod
    def profile_key(cls, user_id: str) -> str:
        return f"{PREFIX}:{cls._tag(user_id)}:profile"

    async def ping(self) -> bool:
        """Redis answers; on a cluster, every master answers and the cluster serves every slot
        (a node answering PING while its cluster is failed could serve no one's history)."""
        async with _mapped("ping"):
            if isinstance(self.client, RedisCluster):
                await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
                info = await self.client.cluster_info()
                return info.get("cluster_state") == "ok"
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
        """Replace the stored profile (a field left out is gone, not kept from before)."""
        key = self.profile_key(user_id)
        async with _mapped("write"), self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=_profile_mapping(profile))
            await pipe.execute()

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
                    pipe.hset(self.profile_key(user.user_id), mapping=_profile_mapping(user.profile))
                written += 1
                pending += len(user.events) + 1
                if pending >= chunk_events:
                    await pipe.execute()
                    pending = 0
            await pipe.execute()
        return written


_SLOTS = ("gender", "age", "job")


def _profile_mapping(profile: Profile) -> dict[str, str]:
    return {"gender": profile.gender, "age": profile.age, "job": profile.job, **dict(profile.extra)}


def _profile(fields: dict[bytes, bytes]) -> Profile | None:
    if not fields:
        return None
    text = {k.decode(): v.decode() for k, v in fields.items()}
    extra = tuple((k, v) for k, v in text.items() if k not in _SLOTS)  # Profile sorts them
    return Profile(*(text.get(slot, "unknown") for slot in _SLOTS), extra=extra)
