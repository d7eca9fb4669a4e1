"""The typed configs of the ranking recipes (SASRec, LLM-SRec), free of torch so the CLI builds
their options from the fields (`training.config.with_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from training.config import artefact, not_positive, setting

__all__ = ["LLMSRecConfig", "RankingConfig", "SASRecTrainConfig"]


@dataclass
class SASRecTrainConfig:
    """SASRec, LLM-SRec's collaborative teacher."""

    out: Path = setting(factory=artefact("sasrec", "ml100k"), help="Model folder.")
    seed: int = setting(0, help="Random seed.")
    dim: int = setting(64, help="Embedding width.")
    blocks: int = setting(2, help="Transformer blocks.")
    heads: int = setting(1, help="Attention heads.")
    dropout: float = setting(0.1, help="Dropout.")
    max_len: int = setting(128, help="Longest history read (the most recent items).")
    lr: float = setting(1e-3, help="Adam learning rate.")
    batch_size: int = setting(128, help="Users per batch.")
    # ML-100K: valid NDCG@10 0.10 after 5 epochs, 0.30 after 10 (~10 s each)
    max_epochs: int = setting(
        60, help="Maximum epochs (early stopping may end sooner).", flag=("--max-epochs", "--epochs")
    )
    eval_every: int = setting(5, help="Epochs between validations.")
    patience: int = setting(4, help="Validations without a better valid NDCG@10 before stopping.")

    def problems(self) -> list[str]:
        return not_positive(
            self, "dim", "blocks", "heads", "max_len", "lr", "batch_size", "max_epochs", "eval_every"
        )


@dataclass
class LLMSRecConfig:
    """LLM-SRec over the frozen LLM, distilling SASRec."""

    out: Path = setting(factory=artefact("llmsrec", "ml100k"), help="Output folder.")
    sasrec_dir: Path = setting(
        factory=artefact("sasrec", "ml100k"), help="The trained teacher (rellax train sasrec)."
    )
    model_dir: Path | None = setting(None, help="Base LLM folder (default: the bundled SmolLM2).")
    seed: int = setting(0, help="Random seed.")
    steps: int = setting(200, help="Optimizer steps.")
    batch_size: int = setting(8, help="Users per optimizer step.")
    negatives: int = setting(3, help="Sampled negative items per user in the retrieval loss.")
    k: int = setting(10, help="History items in the user prompt.")
    lr: float = setting(5e-4, help="Adam learning rate.")
    out_dim: int = setting(128, help="Width of the user / item vectors.")
    eval_every: int = setting(50, help="Steps between validations (each ranks with a fresh catalogue pass).")
    valid_users: int | None = setting(None, help="Validation users (null: every validation case).")
    test_users: int | None = setting(None, help="Test users (null: every test case).")
    eval_batch: int = setting(32, help="Prompts per forward pass when scoring.")
    keep: Path | None = setting(
        None,
        help="Also copy the trained parts here (no item vectors); make demo serves docs/results/llmsrec.",
    )

    def problems(self) -> list[str]:
        return not_positive(
            self, "steps", "batch_size", "negatives", "k", "lr", "out_dim", "eval_every", "eval_batch"
        )


@dataclass
class RankingConfig:
    """`rellax experiment ranking`: every ranker on the same seeded cases."""

    out: Path = setting(Path("docs/results/ranking.json"), help="Where the JSON goes.")
    sasrec_dir: Path = setting(factory=artefact("sasrec", "ml100k"), help="The SASRec to rank with.")
    llmsrec_dir: Path | None = setting(
        factory=artefact("llmsrec", "ml100k"), help="The LLM-SRec to rank with (null: none)."
    )
    din_dir: Path = setting(factory=artefact("crm", "din"), help="The DIN to rank with.")
    model_dir: Path | None = setting(None, help="Base LLM folder (default: the bundled SmolLM2).")
    bundle: Path | None = setting(
        None, help="A ReLLaX bundle: ReLLaX as a ranker, and the cascade over LLM-SRec at M in cascade_m."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = setting(
        "auto", help="ReLLaX's dtype: auto (as served: float32) or bfloat16 (~3x faster on AMX, noisier)."
    )
    rellax_users: int | None = setting(
        None, help="Only the first n cases for ReLLaX (100 LLM prompts each; null: all)."
    )
    users: int | None = setting(None, help="Only the first n test cases for every model (null: all).")
    cascade_m: tuple[int, ...] = setting((5, 10, 20), help="The cascade's M values.")
    seed: int = setting(0, help="Seed of the sampled candidates.")
    kept: Path = setting(
        factory=artefact("ranking", "ml100k"),
        help="Where ReLLaX's scores are kept as they come (resumable; reused for the same bundle).",
    )
    shuffle_seed: int = setting(1, help="Seed of the history-shuffle diagnostic.")
