"""Optional API-key auth for the /v1 routes, checked once, in one dependency.

Keys come from `RELLAX_API_KEYS`; with none configured auth is off (the demo). A key is sent as
`Authorization: Bearer <key>` or `X-API-Key: <key>`. Every configured key is compared with
`hmac.compare_digest` and the loop never stops early, so the response time does not reveal how
much of a key matched or which key it was. /healthz, /readyz and /metrics stay open: keep /metrics
on the cluster network (the k8s Service does not expose it through the ingress).
"""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Unauthorized

__all__ = ["key_matches", "require_api_key"]


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time membership: time depends only on the number and length of configured keys."""
    supplied = presented.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(supplied, key.encode())
    return found


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


async def require_api_key(request: Request) -> None:
    """Raise 401 unless auth is off or the request carries one of the configured keys."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    presented = _presented_key(request)
    if presented is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if not key_matches(presented, keys):
        raise Unauthorized("invalid API key")
