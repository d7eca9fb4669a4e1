"""Where rellax keeps its caches: one root, `RELLAX_CACHE_DIR`, so a user can wipe or move it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(sub: str | None = None) -> Path:
    """Return (and create) the cache root or one of its sub-folders."""
    root = Path(os.environ.get("RELLAX_CACHE_DIR", Path.home() / ".cache" / "rellax")).expanduser()
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path
