"""Seeded row selection: the few-shot training set (stage 1/2) and the fixed evaluation subsets.

Fixed seeds matter: every model in an ablation must see the same rows, or AUC differences are noise.
"""

from __future__ import annotations

import numpy as np

from data.samples import Samples

__all__ = ["eval_rows", "fewshot_rows", "interleave_modes"]


def fewshot_rows(samples: Samples, n: int, seed: int = 0, split: str = "train") -> np.ndarray:
    """N distinct rows of a split drawn uniformly with a fixed seed, kept in time order."""
    pool = samples.indices(split)
    if n >= len(pool):
        return pool
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=n, replace=False))


def eval_rows(samples: Samples, split: str, n: int | None, seed: int = 1234) -> np.ndarray:
    """A fixed, seeded subset of a split (`None` = all rows), the same for every model."""
    return fewshot_rows(samples, len(samples) if n is None else n, seed=seed, split=split)


def interleave_modes(rows: np.ndarray, seed: int = 0) -> list[tuple[int, str]]:
    """Each row twice, recency then SUBR (ReLLa's mixed prompts), row order shuffled once."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return [(int(rows[i]), mode) for i in order for mode in ("recency", "subr")]
