"""`build_item_index`: the catalogue's item index from the scoring LLM (docs/design.md §4), offline.

Embeds every item's text (`index.embed`), fits the PCA and builds the hnswlib graph; the result is a
`rellax.item_index.ItemIndex`, the format the bundle stores and the service loads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from index.embed import embed_texts, resolve_dtype
from rellax.domain import MOVIES, Domain
from rellax.entities import Item
from rellax.item_index import ItemIndex, fit_pca

__all__ = ["build_item_index"]


def build_item_index(
    model,  # noqa: ANN001 - a Hugging Face causal LM
    tokenizer,  # noqa: ANN001
    items: Sequence[Item],
    dim: int = 512,
    batch_size: int = 64,
    seed: int = 0,
    *,
    dtype=None,  # noqa: ANN001 - torch.dtype | None, see embed_texts
    progress: bool = True,
    domain: Domain = MOVIES,
) -> ItemIndex:
    """Embed every item's text (`domain.describe`) with the LLM, PCA to min(dim, H, N),
    L2-normalise, index (docs/design.md §4)."""
    if not items:
        raise ValueError("cannot build an index over no items")
    started = time.perf_counter()
    raw = embed_texts(model, tokenizer, [domain.describe(it) for it in items], batch_size, dtype, progress)
    embed_seconds = time.perf_counter() - started
    mean, components, explained = fit_pca(raw, dim, seed)
    meta = {
        "model": str(getattr(model.config, "_name_or_path", "")),
        "hidden_size": int(raw.shape[1]),
        "embed_dtype": str(resolve_dtype(next(model.parameters()).device, dtype)).removeprefix("torch."),
        "pca_dim": int(components.shape[0]),
        "pca_explained_variance": round(explained, 6),
        "embed_seconds": round(embed_seconds, 3),
        "item_text": domain.item_text.replace("{noun}", domain.noun),
    }
    projected = (raw - mean) @ components.T
    return ItemIndex.from_vectors(
        [it.item_id for it in items], projected, seed=seed, meta=meta, pca=(mean, components)
    )
