"""SUBR — semantic user behaviour retrieval (docs/design.md §4), and the recency baseline.

For a (history, candidate) pair, SUBR keeps the K history positions whose items are most similar
(cosine of the index vectors) to the candidate and returns them in chronological order, so the
prompt still reads as a time line. Everything works on *positions* into the history, never on item
ids: a lifelong history may hold the same item more than once, and each occurrence carries its own
rating and time.

Ties are broken towards the later position (the more recent behaviour), the same rule in every
method. Repeats of one item always tie exactly: similarities are computed once per distinct row and
gathered, so every copy gets the bit-identical value.

Two methods:
  exact  one matrix-vector product over the history's vectors; the reference.
  hnsw   hnswlib's filtered search over the catalogue graph, restricted to the history's rows; then
         the found rows are scored exactly and expanded back to positions. Approximate: recall@K
         against exact is measured by tests and `benchmarks/subr.py`. A history with no more
         distinct items than the search beam (`index.ef`) is scored exactly instead: there the
         filtered search would walk the whole graph for the same answer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
from threadpoolctl import ThreadpoolController

from rellax.item_index import ItemIndex

__all__ = ["Method", "recency_positions", "subr_positions", "subr_positions_many"]

log = logging.getLogger(__name__)
Method = Literal["exact", "hnsw"]
# A history with at least this fraction of the catalogue's size is scored with one product over the
# whole catalogue (no gather, no unique): cheaper than gathering its rows once it is that long.
_FULL_PRODUCT_FRACTION = 0.25


def _as_ids(item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    ids = np.asarray(item_ids)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TypeError(f"item ids must be a 1-D integer sequence, got shape {ids.shape} dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _check_k(k: int) -> None:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


def _top_k(sims: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest values, ascending; among equal values the later positions win.

    O(n): one partition finds the k-th value; everything above it is in, and the tied values at
    the boundary are filled from the end of the history.
    """
    n = len(sims)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(sims, n - k)[n - k]
    above = np.flatnonzero(sims > kth)
    tied = np.flatnonzero(sims == kth)
    chosen = np.concatenate([above, tied[len(tied) - (k - len(above)) :]])
    chosen.sort()
    return chosen.astype(np.int64, copy=False)


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def _product(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """queries (C, D) x vectors (M, D) -> (C, M), on the calling thread only.

    A multi-threaded BLAS call first wakes its worker threads, and next to a busy LLM that wake-up
    costs tens of ms (benchmarks/subr.py measured it), far more than these memory-bound products.
    One query goes through einsum (numpy's own loop, never BLAS); many take BLAS limited to one
    thread (the limit is process-wide while it lasts, which only ever makes BLAS calls smaller).
    """
    if len(queries) == 1:
        return np.einsum("d,md->m", queries[0], vectors)[None, :]
    with _blas().limit(limits=1, user_api="blas"):
        return queries @ vectors.T


def _similarities(index: ItemIndex, hist_rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Cosine of each query (C, D) with each history position: (C, n), equal rows bit-identical."""
    if len(hist_rows) >= _FULL_PRODUCT_FRACTION * len(index):
        return _product(queries, index.vectors)[:, hist_rows]
    unique_rows, inverse = np.unique(hist_rows, return_inverse=True)
    return _product(queries, index.vectors[unique_rows])[:, inverse]


def _hnsw_similarities(index: ItemIndex, hist_rows: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Per-position similarities where only the hnsw top-k distinct rows are scored; others -inf.

    k distinct rows cover at least k positions, so the -inf positions never make the cut.
    """
    unique_rows, inverse = np.unique(hist_rows, return_inverse=True)
    if len(unique_rows) <= max(k, index.ef):
        # With no more allowed rows than the beam, a filtered search never fills its beam and walks
        # the whole graph: the same answer as exact, much slower. Score those rows directly.
        return _product(query[None, :], index.vectors[unique_rows])[0][inverse]
    try:
        found = index.knn(query, k, filter_rows=unique_rows)[0][0]
    except RuntimeError:  # hnswlib reached fewer than k allowed rows; exact is always right
        log.warning("hnsw filtered search came back short; scoring this history exactly")
        return _product(query[None, :], index.vectors[unique_rows])[0][inverse]
    sims = np.full(len(unique_rows), -np.inf, dtype=np.float32)
    sims[np.searchsorted(unique_rows, found)] = _product(query[None, :], index.vectors[found])[0]
    return sims[inverse]


def subr_positions(
    index: ItemIndex,
    history_item_ids: Sequence[int] | np.ndarray,
    candidate_id: int,
    k: int,
    method: Method = "exact",
) -> np.ndarray:
    """Positions (ascending, int64) of the k history items most similar to the candidate.

    k >= len(history) returns every position. Unknown candidate or history ids raise
    `UnknownItem` naming all of them.
    """
    _check_k(k)
    if method not in ("exact", "hnsw"):
        raise ValueError(f"method must be 'exact' or 'hnsw', got {method!r}")
    history = _as_ids(history_item_ids)
    rows = index.rows(np.append(history, np.int64(candidate_id)))
    hist_rows, query = rows[:-1], index.vectors[rows[-1]]
    if k >= len(history):
        return np.arange(len(history), dtype=np.int64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if method == "exact":
        sims = _similarities(index, hist_rows, query[None, :])[0]
    else:
        sims = _hnsw_similarities(index, hist_rows, query, k)
    return _top_k(sims, k)


def subr_positions_many(
    index: ItemIndex,
    history_item_ids: Sequence[int] | np.ndarray,
    candidate_ids: Sequence[int] | np.ndarray,
    k: int,
) -> list[np.ndarray]:
    """Exact SUBR of one history for many candidates, with one matrix product (C, D) x (D, n).

    Equals `[subr_positions(index, history, c, k) for c in candidate_ids]`, at a fraction of the cost
    when a service scores many candidates for one user.
    """
    _check_k(k)
    history, candidates = _as_ids(history_item_ids), _as_ids(candidate_ids)
    rows = index.rows(np.concatenate([history, candidates]))
    hist_rows, cand_rows = rows[: len(history)], rows[len(history) :]
    if k >= len(history):
        return [np.arange(len(history), dtype=np.int64) for _ in range(len(candidates))]
    sims = _similarities(index, hist_rows, index.vectors[cand_rows])
    return [_top_k(row, k) for row in sims]


def recency_positions(n_history: int, k: int) -> np.ndarray:
    """The recency baseline: the last k positions of a history of length n_history, ascending."""
    _check_k(k)
    if n_history < 0:
        raise ValueError(f"n_history must be >= 0, got {n_history}")
    return np.arange(max(0, n_history - k), n_history, dtype=np.int64)
