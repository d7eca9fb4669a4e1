"""The non-LLM rows of the quality study, on the study's fixed test rows.

Besides DIN and the two one-hot baselines, a logistic regression on features read from the very
prompt the LLM sees (issue 6): the mean and the last stars of the K history items SUBR shows, and
the candidate's like-rate on the train split. It is the bar any LLM on that prompt must clear: if
the LLM cannot beat three numbers it could read off its own input, it is not using the input.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from data.samples import Samples
from rellax.item_index import ItemIndex
from rellax.subr import subr_positions
from training.crm.baselines import fields_for, run_baselines
from training.metrics import ctr_metrics

__all__ = ["baseline_predictions", "prompt_features"]

_PRIOR_WEIGHT = 10.0  # pseudo-counts pulling a rarely seen item's like-rate to the global rate


def _item_like_rates(samples: Samples, rows: np.ndarray) -> np.ndarray:
    """Each row's candidate like-rate over train samples, leaving the row itself out (no leakage)."""
    train = samples.indices("train")
    items, labels = samples.item_id[train], samples.label[train].astype(np.float64)
    prior = float(labels.mean())
    n_items = int(samples.item_id.max()) + 1
    likes = np.bincount(items, weights=labels, minlength=n_items)
    count = np.bincount(items, minlength=n_items).astype(np.float64)
    item = samples.item_id[rows]
    own = np.isin(rows, train)  # a train row's own label is not evidence about itself
    likes_r = likes[item] - np.where(own, samples.label[rows], 0)
    count_r = count[item] - own
    return (likes_r + _PRIOR_WEIGHT * prior) / (count_r + _PRIOR_WEIGHT)


def prompt_features(samples: Samples, index: ItemIndex, rows: np.ndarray, k: int) -> np.ndarray:
    """(n, 3): mean stars and last stars of the K SUBR-shown history items, candidate like-rate."""
    out = np.empty((len(rows), 3), dtype=np.float64)
    for n, r in enumerate(rows):
        items, ratings, _ = samples.history(int(r))
        shown = subr_positions(index, items, int(samples.item_id[r]), k)  # ascending = time order
        stars = ratings[shown].astype(np.float64)
        out[n, 0], out[n, 1] = stars.mean(), stars[-1]
    out[:, 2] = _item_like_rates(samples, rows)
    return out


def baseline_predictions(ctx: Any, k: int) -> dict[str, Any]:
    """Test predictions of DIN, LR, prior and prompt-feature LR on `ctx.rows` (the study's rows)."""
    from training.llm.evaluate import din_predictions
    from training.llm.setup import din_checksum, load_din

    samples, rows = ctx.samples, ctx.rows
    train, valid = samples.indices("train"), samples.indices("valid")
    n_train = len(train)
    dins = {"DIN": ctx.cfg.din_dir}
    if ctx.din_dir != ctx.cfg.din_dir:  # the LLM steps read a DIN that held their rows out: it too
        dins["DIN (hold-out)"] = ctx.din_dir
    models: dict[str, dict[str, Any]] = {}
    for name, folder in dins.items():
        din = load_din(folder)
        models[name] = {
            "p": din_predictions(din, ctx.catalogue, samples, rows),
            "trainable_params": sum(p.numel() for p in din.parameters()),
            "sha256": din_checksum(folder),  # which DIN (the LLM steps record theirs)
        }
        crm = folder / "metrics.json"
        if crm.exists():  # what `rellax train crm` selected the DIN on, and what it cost
            trained = json.loads(crm.read_text())
            seen = (n_train - int(trained.get("held_out_rows", 0))) * int(trained["epochs"])  # epochs run
            models[name] |= {
                "valid_auc": trained["din"]["valid"]["auc"],
                "train_seconds": trained["train_seconds"],
                "train_examples": seen,
                "samples_per_s": round(seen / trained["train_seconds"], 1),  # validation included
            }

    fields = {split: fields_for(ctx.data, samples, split) for split in ("train", "valid", "test")}
    at = {int(r): n for n, r in enumerate(fields["test"].index)}
    pick = np.array([at[int(r)] for r in rows])
    for name, result in run_baselines(fields["train"], fields["valid"], fields["test"]).items():
        models[{"lr": "LR one-hot", "prior": "user+item mean prior"}[name]] = {
            "p": result["test_probs"][pick],
            "valid_auc": result["valid"]["auc"],
            "train_seconds": result["fit_seconds"],
            "params": result["params"],
            "trainable_params": result["n_params"],
            "train_examples": n_train,
        }

    index = ctx.item_index()
    started = time.perf_counter()
    scaler = StandardScaler()
    x_train = scaler.fit_transform(prompt_features(samples, index, train, k))
    x_valid = scaler.transform(prompt_features(samples, index, valid, k))
    lr = LogisticRegression(max_iter=1000).fit(x_train, samples.label[train])
    seconds = time.perf_counter() - started  # features included: they are the model's input
    x_test = scaler.transform(prompt_features(samples, index, rows, k))
    models["LR on prompt features"] = {
        "p": lr.predict_proba(x_test)[:, 1],
        "valid_auc": ctr_metrics(samples.label[valid], lr.predict_proba(x_valid)[:, 1])["auc"],
        "params": {"features": ["mean shown stars", "last shown stars", "item train like-rate"], "k": k},
        "trainable_params": int(lr.coef_.size + lr.intercept_.size),
        "train_examples": n_train,
        "train_seconds": round(seconds, 2),
    }
    return {
        "models": {
            name: {
                "test": ctr_metrics(ctx.labels, m["p"]),
                **{key: v for key, v in m.items() if key != "p"},
                "predictions": [round(float(x), 6) for x in m["p"]],
            }
            for name, m in models.items()
        }
    }
