"""`rellax train sasrec`: the CF-SRec teacher of LLM-SRec (issue 17), trained on the train period.

Sequences: each user's interactions up to the end of the train split (the global order the CTR
samples use; the first few interactions that are history only count too), the newest 128 kept.
Every position predicts the next item: BCE on the true next item against one negative per
position, drawn from the items the user never interacted with. Adam lr 1e-3, betas (0.9, 0.98).
Every `eval_every` epochs the model ranks the validation cases (`training.llmsrec.ranking`: the first liked
validation sample per user against 99 sampled negatives); the best NDCG@10 is kept, and training
stops after `patience` evaluations without a better one. Seeded; progress shown per epoch.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.samples import Samples
from rellax.logs import get_logger
from rellax.sasrec import SASRec, SASRecConfig
from training.llmsrec.config import SASRecTrainConfig
from training.llmsrec.ranking import RankingCase, rank_metrics, ranking_cases

__all__ = ["SASRecTrainConfig", "main", "score_cases", "train_sequences"]

log = get_logger(__name__)


def train_sequences(samples: Samples) -> list[np.ndarray]:
    """Per user row, the item ids of its interactions up to the end of the train split."""
    last_train = int(samples.indices("train")[-1])
    cut = (
        int(samples.timestamp[last_train]),
        int(samples.user_row[last_train]),
        int(samples.item_id[last_train]),
    )
    out = []
    for u in range(len(samples.user_ids)):
        lo, hi = int(samples.seq_ptr[u]), int(samples.seq_ptr[u + 1])
        ts, items = samples.seq_ts[lo:hi], samples.seq_item[lo:hi]
        keep = [(int(t), u, int(i)) <= cut for t, i in zip(ts, items, strict=True)]
        out.append(items[np.asarray(keep, dtype=bool)] if hi > lo else items[:0])
    return out


def _batch(model: SASRec, seqs: list[np.ndarray], seen: list[set[int]], rng: np.random.Generator):  # noqa: ANN202
    """Inputs (B, L), positives and negatives (B, L) as rows, left-padded alike."""
    length = model.config.max_len
    x = np.zeros((len(seqs), length), dtype=np.int64)
    pos, neg = np.zeros_like(x), np.zeros_like(x)
    n_items = model.config.n_items
    for b, (seq, user_seen) in enumerate(zip(seqs, seen, strict=True)):
        rows = np.asarray(model.rows(seq[-(length + 1) :]), dtype=np.int64)
        if len(rows) < 2:
            continue
        inp, nxt = rows[:-1], rows[1:]
        x[b, -len(inp) :], pos[b, -len(nxt) :] = inp, nxt
        draws = rng.integers(1, n_items + 1, size=len(nxt))
        for j in range(len(draws)):  # resample the rare draw the user did interact with
            while int(draws[j]) in user_seen:
                draws[j] = rng.integers(1, n_items + 1)
        neg[b, -len(nxt) :] = draws
    return torch.from_numpy(x), torch.from_numpy(pos), torch.from_numpy(neg)


@torch.no_grad()
def score_cases(model: SASRec, cases: list[RankingCase], batch: int = 256) -> np.ndarray:
    """(n, candidates) scores: user vector . candidate item embedding (unknown items score 0)."""
    model.eval()
    out = []
    for s in range(0, len(cases), batch):
        chunk = cases[s : s + batch]
        users = model.user_vector(model.encode([c.history for c in chunk]))
        cand = torch.tensor([model.rows(c.candidates) for c in chunk])
        out.append(torch.einsum("bd,bcd->bc", users, model.item_vectors(cand)).numpy())
    return np.concatenate(out)


def main(
    cfg: SASRecTrainConfig, samples: Samples | None = None, catalogue: np.ndarray | None = None
) -> dict[str, Any]:
    """Train, select on validation NDCG@10, save the model and metrics.json into `cfg.out`."""
    if samples is None or catalogue is None:
        from data.loading import load_dataset

        data, samples, _ = load_dataset()
        catalogue = data.items.item_id.to_numpy()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    seqs = train_sequences(samples)
    users = [u for u, s in enumerate(seqs) if len(s) >= 2]
    items = SASRec.item_map(np.concatenate([seqs[u] for u in users]))
    config = SASRecConfig(len(items), cfg.dim, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len)
    model = SASRec(config, items)
    seen = [
        set(model.rows(np.unique(samples.seq_item[samples.seq_ptr[u] : samples.seq_ptr[u + 1]])))
        for u in users
    ]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    valid = ranking_cases(samples, "valid", catalogue, seed=cfg.seed)
    log.info("sasrec.setup", users=len(users), items=len(items), valid_cases=len(valid))
    best, best_state, stale, history = -1.0, None, 0, []
    started = time.perf_counter()
    bar = tqdm(range(1, cfg.max_epochs + 1), desc="SASRec", unit="epoch")
    for epoch in bar:
        model.train()
        order = rng.permutation(len(users))
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            x, pos, neg = _batch(model, [seqs[users[i]] for i in idx], [seen[i] for i in idx], rng)
            h = model(x)
            mask = pos != 0
            pl = (h * model.item_vectors(pos)).sum(-1)[mask]
            nl = (h * model.item_vectors(neg)).sum(-1)[mask]
            loss = loss_fn(pl, torch.ones_like(pl)) + loss_fn(nl, torch.zeros_like(nl))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(users):.4f}", best_ndcg10=f"{max(best, 0):.4f}")
        if epoch % cfg.eval_every and epoch != cfg.max_epochs:
            continue
        metrics = rank_metrics(score_cases(model, valid))
        history.append({"epoch": epoch, "loss": total / len(users), **metrics})
        log.info(
            "sasrec.eval", epoch=epoch, loss=round(total / len(users), 4), ndcg10=round(metrics["ndcg@10"], 4)
        )
        if metrics["ndcg@10"] > best:
            best, best_state, stale = metrics["ndcg@10"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    test = rank_metrics(score_cases(model, ranking_cases(samples, "test", catalogue, seed=cfg.seed)))
    model.save(cfg.out)
    result = {
        "valid": max(history, key=lambda h: h["ndcg@10"]) if history else {},
        "test": test,
        "history": history,
        "train_seconds": round(seconds, 1),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "users": len(users),
        "items": len(items),
    }
    (cfg.out / "metrics.json").write_text(json.dumps(result, indent=1))
    log.info(
        "sasrec.done", out=str(cfg.out), test_ndcg10=round(test["ndcg@10"], 4), seconds=round(seconds, 1)
    )
    return result
