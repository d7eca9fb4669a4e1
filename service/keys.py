"""API-key digests: what RELLAX_API_KEYS holds (`sha256:<64 hex>`) and `rellax keys` prints.

Its own module (no FastAPI) because the settings validate entries with it and the CLI prints it.
"""

from __future__ import annotations

import hashlib
import re
import secrets

__all__ = ["MIN_KEY_CHARS", "hash_key", "is_hashed", "new_key"]

MIN_KEY_CHARS = 16
_HASHED = re.compile(r"^sha256:[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The RELLAX_API_KEYS entry for `key`."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def is_hashed(entry: str) -> bool:
    return bool(_HASHED.match(entry))


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return "rlx_" + secrets.token_urlsafe(32)
