"""CTR metrics shared by every recipe and ablation: AUC, LogLoss, accuracy, and a paired bootstrap
for "is model A really better than model B on the same test samples"."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import log_loss, roc_auc_score

__all__ = ["EPS", "ctr_metrics", "null_auc_se", "paired_bootstrap_auc_diff"]

# Probabilities are clipped to [EPS, 1 - EPS] so one confident mistake costs ~16 nats, not infinity.
EPS = 1e-7


def _arrays(labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray) -> tuple:
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probs {p.shape} differ in shape")
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or inf")
    return y, np.clip(p, EPS, 1.0 - EPS)


def ctr_metrics(labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray) -> dict:
    """AUC, LogLoss (natural log, mean), accuracy at 0.5 and n, as plain floats for JSON."""
    y, p = _arrays(labels, probs)
    if len(np.unique(y)) < 2:
        raise ValueError("AUC needs both labels present")
    return {
        "auc": float(roc_auc_score(y, p)),
        "logloss": float(log_loss(y, p, labels=[0, 1])),
        "accuracy": float(np.mean((p >= 0.5) == (y == 1))),
        "n": int(len(y)),
    }


def null_auc_se(n: int) -> float:
    """Standard error of an AUC near 0.5 on n rows with balanced labels (Hanley & McNeil):
    what a validation point moves by from sampling alone."""
    return math.sqrt((n + 1) / (3 * n * n))


def paired_bootstrap_auc_diff(
    labels: Sequence[float] | np.ndarray,
    p_a: Sequence[float] | np.ndarray,
    p_b: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """AUC(a) - AUC(b) on the same samples and its 95% percentile interval (`scipy.stats.bootstrap`,
    paired: samples are resampled jointly for both models so their correlation is kept)."""
    y, a = _arrays(labels, p_a)
    _, b = _arrays(labels, p_b)
    if a.shape != b.shape:
        raise ValueError(f"p_a {a.shape} and p_b {b.shape} differ in shape")

    def diff(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        if y.min() == y.max():
            return math.nan  # a resample with one class has no AUC (vanishingly rare at CTR sizes)
        return float(roc_auc_score(y, a) - roc_auc_score(y, b))

    res = bootstrap(
        (y, a, b), diff, paired=True, vectorized=False, n_resamples=n_boot, method="percentile",
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    boots = res.bootstrap_distribution[np.isfinite(res.bootstrap_distribution)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": diff(y, a, b), "lo": float(lo), "hi": float(hi), "n_boot": int(len(boots))}
