"""The sampled-candidate ranking protocol every ranker is judged by (issue 17): per user, one
positive against 99 sampled negatives, HR@K and NDCG@K.

Per user with a liked (label 1) sample in the split, the first such sample is the case: its history
is everything before it (as the CTR samples define it), its positive is its item, and 99 negatives
are drawn uniformly, seeded, from the catalogue items the user never interacted with in the whole
data set (so no negative is a held-back positive). Every ranker scores the same candidates. Ties
count against the positive (a constant scorer gets HR 0, not a flattering 1/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.samples import SPLITS, Samples

__all__ = ["RankingCase", "rank_metrics", "ranking_cases", "ranks"]


@dataclass(frozen=True)
class RankingCase:
    sample: int  # index into Samples
    user_id: int
    history: np.ndarray  # item ids, oldest first
    ratings: np.ndarray
    times: np.ndarray  # unix seconds of the history entries
    candidates: np.ndarray  # the positive first, then the negatives


def ranking_cases(
    samples: Samples, split: str, item_ids: np.ndarray, n_neg: int = 99, seed: int = 0
) -> list[RankingCase]:
    """One case per user with a liked sample in `split` (module docstring), in user order."""
    rng = np.random.default_rng(seed)
    catalogue = np.unique(item_ids)
    in_split = (samples.split == SPLITS.index(split)) & (samples.label == 1)
    first: dict[int, int] = {}
    for i in np.flatnonzero(in_split):
        first.setdefault(int(samples.user_row[i]), int(i))
    cases = []
    for row in sorted(first):
        i = first[row]
        seen = samples.seq_item[samples.seq_ptr[row] : samples.seq_ptr[row + 1]]
        pool = np.setdiff1d(catalogue, seen, assume_unique=False)
        negatives = rng.choice(pool, size=min(n_neg, len(pool)), replace=False)
        items, ratings, times = samples.history(i)
        cand = np.concatenate([[samples.item_id[i]], negatives]).astype(np.int64)
        user = int(samples.user_ids[row])
        cases.append(RankingCase(i, user, items.copy(), ratings.copy(), times.copy(), cand))
    return cases


def ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of column 0 in each row of (n, candidates) scores, ties counted against it."""
    scores = np.asarray(scores, dtype=np.float64)
    return (scores[:, 1:] >= scores[:, :1]).sum(axis=1)


def rank_metrics(scores: np.ndarray, ks: tuple[int, ...] = (10, 20)) -> dict[str, float]:
    """HR@K and NDCG@K (one relevant item: 1/log2(rank + 2) when it is in the top K)."""
    r = ranks(scores)
    out: dict[str, float] = {"n": int(len(r))}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2), 0.0).mean())
    return out
