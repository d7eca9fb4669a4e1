"""Offline item side (docs/design.md §4): item texts, their LLM embeddings and `build_item_index`, plus the
`rellax index build` command. The index format, its loading and SUBR are serving-time code and live
in `rellax.item_index` and `rellax.subr`; this package imports rellax, never the other way round.

Public names resolve lazily, so `import index` does not import torch; only embedding does.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "build_item_index",
    "cpu_supports_bf16",
    "embed_texts",
    "item_text",
]

_WHERE = {
    "build_item_index": "index.build",
    "cpu_supports_bf16": "index.embed",
    "embed_texts": "index.embed",
    "item_text": "index.embed",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'index' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
