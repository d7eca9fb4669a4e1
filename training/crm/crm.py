"""Recipe: train the conventional CTR model (DIN, docs/design.md §6) and its two baselines.

Reads top to bottom: `setup(cfg)` loads the samples, builds the vocab from the train split only,
encodes every split once with the same `encode_batch` serving uses, and builds model and optimiser;
`train()` is a plain epoch loop with early stopping on valid AUC that restores the best weights;
`main(cfg)` also fits the baselines, evaluates everything on valid and test, and writes the model
with `metrics.json` beside it. Fork it rather than adding flags.

    python -m training.crm                     # the typed defaults (training/crm/config.py)
    rellax train crm --epochs 4 lr=0.002       # generated options and key=value overrides
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data.loading import artefact_dir, load_dataset
from data.samples import Samples
from rellax.din import DIN, DINBatch, DINConfig, DINVocab, encode_batch
from rellax.logs import get_logger
from training import config
from training.crm.baselines import Fields, fields_for, run_baselines
from training.crm.config import CRMConfig
from training.metrics import ctr_metrics, paired_bootstrap_auc_diff

__all__ = ["CRMConfig", "CRMRecipe", "ensure_din", "load_config", "main"]

log = get_logger(__name__)


def load_config(path: Path | str | None = None, overrides: Sequence[str] = (), **values: Any) -> CRMConfig:
    """The DIN recipe's config: typed defaults, a YAML file, `key=value` overrides, then keyword
    values (None = not given); every problem is reported in one ConfigError (a ValueError)."""
    return config.load_config(CRMConfig, path, overrides, values)


def holdout_rows(samples: Samples, ns: tuple[int, ...]) -> np.ndarray:
    """The union of the LLM's few-shot training rows for each N (`fewshot_rows`, seed 0).

    Why: a DIN scores its own training rows far better than unseen ones (ML-100K: AUC 0.81 on
    train vs 0.74 on valid), so an LLM trained on those rows with DIN's embeddings as input learns
    to trust a signal that is weaker on every row it will be judged or served on. Left out of DIN's
    training (a few thousand of 76K rows), they are as new to DIN as the test rows are.
    """
    from training.fewshot import fewshot_rows

    if not ns:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([fewshot_rows(samples, int(n)) for n in ns]))


class CRMRecipe:
    """setup(cfg) -> train() -> evaluate(split) -> save(folder)."""

    def setup(self, cfg: CRMConfig) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self.data, self.samples, self.manifest = load_dataset(cfg.dataset)
        self.fields = {s: fields_for(self.data, self.samples, s) for s in ("train", "valid", "test")}
        self.held_out = holdout_rows(self.samples, cfg.holdout_fewshot)
        if len(self.held_out):
            self.fields["train"] = self.fields["train"].select(
                ~np.isin(self.fields["train"].index, self.held_out)
            )
        self.vocab = self._setup_vocab(self.samples, self.fields["train"])
        self.batches = {s: self._encode(f) for s, f in self.fields.items()}
        self.model = self._setup_model(cfg, self.vocab)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.history: list[dict] = []
        log.info("crm.setup", samples={s: len(b) for s, b in self.batches.items()}, **self.vocab.sizes())

    @staticmethod
    def _setup_vocab(samples: Samples, train: Fields) -> DINVocab:
        """Only what training sees gets a row: users and items of train samples and of their
        histories. Anything else maps to row 0 (unknown), which is also how serving meets it."""
        idx = train.index
        seen_until = np.zeros(len(samples.user_ids), dtype=np.int64)
        np.maximum.at(seen_until, samples.user_row[idx], samples.hist_len[idx] + 1)
        hist_items = np.concatenate(
            [samples.seq_item[samples.seq_ptr[u] : samples.seq_ptr[u] + n] for u, n in enumerate(seen_until)]
        )
        return DINVocab.build(
            user_ids=train.user_id,
            item_ids=np.union1d(train.item_id, hist_items),
            genres=train.genre,
            genders=train.gender,
            ages=train.age,
            jobs=train.job,
            extra={name: train.extra[:, j] for j, name in enumerate(train.extra_names)},
        )

    def _encode(self, f: Fields) -> DINBatch:
        histories = [self.samples.history(int(i), last=self.cfg.max_history)[:2] for i in f.index]
        return encode_batch(
            self.vocab,
            f.user_id,
            f.profiles(),
            f.item_id,
            f.genre,
            histories,
            max_history=self.cfg.max_history,
        )

    @staticmethod
    def _setup_model(cfg: CRMConfig, vocab: DINVocab) -> DIN:
        config = DINConfig(
            embed_dim=cfg.embed_dim,
            hidden=cfg.hidden,
            dropout=cfg.dropout,
            max_history=cfg.max_history,
            **vocab.sizes(),
        )
        return DIN(config, vocab)

    def train(self) -> None:
        """Epochs of shuffled minibatches; keep the weights of the best valid AUC; stop after
        `patience` epochs without improvement and restore the best."""
        cfg, train = self.cfg, self.batches["train"]
        labels = torch.from_numpy(self.fields["train"].label).float()
        best_auc, best_state, stale = -1.0, None, 0
        start = time.perf_counter()
        for epoch in range(1, cfg.max_epochs + 1):
            self.model.train()
            order = torch.randperm(len(train), generator=self._rng)
            bar = tqdm(order.split(cfg.batch_size), desc=f"DIN epoch {epoch}", unit="batch", leave=False)
            total, seen = 0.0, 0
            for step, idx in enumerate(bar):
                if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
                    break
                loss = self.loss_fn(self.model(train.select(idx)), labels[idx])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total, seen = total + loss.item() * len(idx), seen + len(idx)
                bar.set_postfix(loss=f"{total / seen:.4f}")
            valid = self.evaluate("valid")[0]
            self.history.append({"epoch": epoch, "train_loss": total / seen, "valid": valid})
            log.info(
                "crm.epoch", epoch=epoch, train_loss=round(total / seen, 4), valid_auc=round(valid["auc"], 4)
            )
            if valid["auc"] > best_auc:
                best_auc, best_state, stale = valid["auc"], copy.deepcopy(self.model.state_dict()), 0
                self.best_epoch = epoch
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        self.train_seconds = time.perf_counter() - start
        self.model.load_state_dict(best_state)
        self.model.eval()

    @torch.no_grad()
    def predict(self, batch: DINBatch) -> np.ndarray:
        """P(click) for every row of `batch`, in eval mode, in chunks."""
        self.model.eval()
        chunks = [
            torch.sigmoid(self.model(batch.select(slice(s, s + self.cfg.eval_batch_size))))
            for s in range(0, len(batch), self.cfg.eval_batch_size)
        ]
        return torch.cat(chunks).numpy().astype(np.float64)

    def evaluate(self, split: str) -> tuple[dict, np.ndarray]:
        probs = self.predict(self.batches[split])
        return ctr_metrics(self.fields[split].label, probs), probs

    def save(self, folder: Path) -> dict[str, str]:
        return self.model.save(folder)


def main(cfg: CRMConfig) -> dict:
    """Train DIN, fit the baselines, evaluate all on valid and test, save model + metrics.json."""
    recipe = CRMRecipe()
    recipe.setup(cfg)
    recipe.train()
    valid, _ = recipe.evaluate("valid")
    test, test_probs = recipe.evaluate("test")
    out = Path(cfg.out) if cfg.out else artefact_dir("crm", "din")
    files = recipe.save(out)
    np.save(out / "test_probs.npy", test_probs.astype(np.float32))
    metrics: dict[str, Any] = {
        "din": {"valid": valid, "test": test},
        "baselines": {},
        "train_seconds": round(recipe.train_seconds, 2),
        "epochs": len(recipe.history),
        "best_epoch": recipe.best_epoch,
        "history": recipe.history,
        "config": asdict(cfg),
        "held_out_rows": int(len(recipe.held_out)),
        "data": {
            k: recipe.manifest.get(k)
            for k in ("dataset", "dataset_key", "source_hash", "users", "items", "interactions", "splits")
        },
        "files": files,
        "out": str(out),
    }
    if cfg.baselines:
        start = time.perf_counter()
        f = recipe.fields
        results = run_baselines(f["train"], f["valid"], f["test"])
        metrics["baselines"] = {
            k: {n: v for n, v in r.items() if n != "test_probs"} for k, r in results.items()
        }
        metrics["baselines_seconds"] = round(time.perf_counter() - start, 2)
        # Is DIN's lead real on these test samples? A paired bootstrap over the same samples.
        metrics["din_minus_baseline_test_auc"] = {
            k: paired_bootstrap_auc_diff(
                f["test"].label, test_probs, r["test_probs"], n_boot=500, seed=cfg.seed
            )
            for k, r in results.items()
        }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("crm.done", out=str(out), test_auc=round(test["auc"], 4))
    return metrics


def ensure_din(out: Path, holdout_fewshot: tuple[int, ...] = ()) -> dict:
    """The DIN in `out` (its metrics.json), trained with the default recipe when it is not there:
    every LLM step that reads DIN's embeddings starts from this, on an empty cache too. A DIN there
    that held out other rows is refused, never silently used or replaced."""
    metrics = out / "metrics.json"
    if metrics.exists() and (out / "model.safetensors").exists():
        found = json.loads(metrics.read_text())
        held = tuple(found["config"].get("holdout_fewshot") or ())
        if held != tuple(holdout_fewshot):
            raise ValueError(
                f"the DIN in {out} held out the few-shot rows of N={list(held)}, "
                f"not N={list(holdout_fewshot)}; move it away or pass its own folder"
            )
        return found
    log.info("no DIN yet; training it", out=str(out), holdout_fewshot=list(holdout_fewshot))
    baselines = not holdout_fewshot  # the baselines are judged on the shared DIN's training rows
    return main(load_config(out=str(out), holdout_fewshot=holdout_fewshot, baselines=baselines))


if __name__ == "__main__":
    main(load_config())
