"""Item semantic embeddings, the hnswlib item index and SUBR retrieval (DESIGN §4).

Public names resolve lazily, so `import index` (or loading a saved index in the service) does not
import torch; only embedding does.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ItemIndex",
    "build_item_index",
    "cpu_supports_bf16",
    "embed_texts",
    "item_text",
    "recency_positions",
    "subr_positions",
    "subr_positions_many",
]

_WHERE = {
    "ItemIndex": "index.item_index",
    "build_item_index": "index.item_index",
    "cpu_supports_bf16": "index.embed",
    "embed_texts": "index.embed",
    "item_text": "index.embed",
    "recency_positions": "index.subr",
    "subr_positions": "index.subr",
    "subr_positions_many": "index.subr",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'index' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
