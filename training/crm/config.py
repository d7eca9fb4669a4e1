"""The DIN recipe's typed config (docs/design.md §6), free of torch so the CLI builds its options
from it; `training/configs/crm.yaml` is the same defaults written out."""

from __future__ import annotations

from dataclasses import dataclass

from training.config import not_positive, setting

__all__ = ["CRMConfig"]


@dataclass
class CRMConfig:
    """Everything the DIN recipe reads."""

    seed: int = setting(0, help="Random seed.")
    max_epochs: int = setting(
        6, help="Maximum epochs (early stopping usually ends sooner).", flag=("--max-epochs", "--epochs")
    )
    patience: int = setting(1, help="Epochs without a better valid AUC before stopping.")
    max_steps_per_epoch: int | None = setting(None, help="Cut epochs short (smoke tests); null: all.")
    batch_size: int = setting(1024, help="Training batch size.")
    eval_batch_size: int = setting(8192, help="Scoring batch size.")
    lr: float = setting(1e-3, help="Adam learning rate.")
    weight_decay: float = setting(0.0, help="Adam weight decay.")
    embed_dim: int = setting(64, help="Embedding width of every feature.")
    hidden: tuple[int, ...] = setting((256, 256, 256), help="MLP layer sizes.")
    dropout: float = setting(0.1, help="MLP dropout.")
    max_history: int = setting(30, help="Most recent history items DIN attends over.")
    baselines: bool = setting(True, help="Also fit the LR and rating-prior baselines.")
    out: str | None = setting(None, help="Model folder (null: the data set's, cache/crm/din for ML-100K).")
    dataset: str | None = setting(
        None, help="Data set folder: atomic files or ML-1M .dat (null: RELLAX_DATASET, else ML-100K)."
    )
    holdout_fewshot: tuple[int, ...] = setting(
        (), help="N values whose few-shot LLM rows DIN does not train on (see holdout_rows)."
    )

    def problems(self) -> list[str]:
        """Every bad value, so a run fails at start-up, once, naming all of them."""
        problems = not_positive(
            self, "max_epochs", "patience", "batch_size", "eval_batch_size", "lr", "embed_dim"
        )
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch <= 0:
            problems.append(f"max_steps_per_epoch={self.max_steps_per_epoch!r} must be > 0 or null")
        if self.max_history < 1:
            problems.append(f"max_history={self.max_history!r} must be >= 1")
        if not self.hidden or min(self.hidden) <= 0:
            problems.append(f"hidden={self.hidden!r} needs positive layer sizes")
        return problems
