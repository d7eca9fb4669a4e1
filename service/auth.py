"""Optional API-key auth and per-key rate limits for the /v1 routes, checked once, in one dependency.

Keys come from `RELLAX_API_KEYS` as SHA-256 digests (`sha256:<64 hex>`, printed by `rellax keys
hash`), so the configuration, a leaked .env or a Secret dump never holds a usable key; a plain key
there is still accepted (hashed at start-up, with a warning). With none configured auth is off (the
demo). A key is sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`. The presented key is
hashed and compared with every configured digest by `hmac.compare_digest`, never stopping early, so
the response time does not reveal which key matched. SHA-256 (not a slow password hash) is right
for random keys of 16+ characters: there is nothing to brute-force. Keys are never logged: a
caller is named by its key id, the digest's first 8 hex digits.

/healthz, /readyz and /metrics stay open: keep /metrics on the cluster network (the k8s Service
does not expose it through the ingress).
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from dataclasses import dataclass

from fastapi import Request

from rellax.logs import get_logger
from service.errors import RateLimited, Unauthorized
from service.keys import hash_key, is_hashed

__all__ = ["RateLimiter", "key_digests", "key_id", "key_matches", "require_api_key"]

log = get_logger(__name__)


def key_digests(entries: list[str]) -> list[str]:
    """The configured keys as digests: hashed entries as they are, plain ones hashed here."""
    plain = [n for n, entry in enumerate(entries) if not is_hashed(entry)]
    if plain:
        log.warning(
            "plain API keys in RELLAX_API_KEYS; store `rellax keys hash` digests instead",
            entries=[f"#{n}" for n in plain],
        )
    return [entry if is_hashed(entry) else hash_key(entry) for entry in entries]


def key_matches(presented: str, digests: list[str]) -> str | None:
    """The matching digest, or None; time depends only on the number of configured keys."""
    supplied = hash_key(presented).encode()
    found = None
    for digest in digests:
        if hmac.compare_digest(supplied, digest.encode()):
            found = digest
    return found


def key_id(digest: str) -> str:
    """A loggable name for a key: its digest's first 8 hex digits."""
    return digest.removeprefix("sha256:")[:8]


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """A token bucket per caller (a key id; with auth off, a client address): `rate` requests a
    second, bursts of `burst`.

    Hand-written (20 lines) rather than a library: it is per process, in memory, one dict lookup on
    the request path. Limits hold per replica; a limit across replicas belongs to the gateway in
    front (an ingress or API gateway rate limit), not to a home-made Redis protocol.
    """

    def __init__(self, rate: float, burst: int, max_callers: int = 10_000) -> None:
        self.rate, self.burst, self.max_callers = rate, burst, max_callers
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, caller: str, now: float | None = None) -> float:
        """0.0 when the request may go, else the seconds until it could."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._buckets) >= self.max_callers:  # client addresses are unbounded: drop the
                refill_s = self.burst / self.rate  # buckets that have refilled (they restart full)
                self._buckets = {k: b for k, b in self._buckets.items() if now - b.stamp < refill_s}
            bucket = self._buckets.setdefault(caller, _Bucket(float(self.burst), now))
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


async def require_api_key(request: Request) -> None:
    """Raise 401 unless auth is off or the request carries a configured key; 429 past its rate."""
    state = request.app.state
    digests: list[str] = state.key_digests
    caller, label = f"client:{request.client.host if request.client else '-'}", "anonymous"
    if digests:
        presented = _presented_key(request)
        if presented is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        digest = key_matches(presented, digests)
        if digest is None:
            raise Unauthorized("invalid API key")
        caller = label = key_id(digest)
    limiter: RateLimiter | None = state.rate_limiter
    if limiter is not None and (wait := limiter.acquire(caller)) > 0:
        state.metrics.rate_limited.labels(key_id=label).inc()
        raise RateLimited(
            f"rate limit of {limiter.rate:g} requests/s (burst {limiter.burst}) exceeded for this key",
            retry_after=max(1, math.ceil(wait)),
        )
