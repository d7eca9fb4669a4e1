"""The quality study's typed config, free of torch so `rellax experiment ml100k` builds its options
from the fields (`training.config.with_config`), as the training recipes do."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from training.config import artefact, not_positive, setting

__all__ = ["ExperimentConfig", "is_batch_step", "serves_as_rellax"]


def serves_as_rellax(step: str) -> bool:
    """A study step that is ReLLaX as a bundle serves it (exact CFLoRA with SPA, any K, N, batch,
    gate init, recipe dtype or stage order): what the report and `make demo` select among on validation.
    Not the merged model, the ablations without SPA or gates, nor ReLLa."""
    return step in ("rellax", "rellax-bf16", "rellax-random-init", "rellax-two-stage") or step.startswith(
        ("rellax-k", "rellax-n", "rellax-b")
    )


def is_batch_step(step: str) -> bool:
    """A batch-sweep step (`rellax-b16`), not `rellax-bf16`."""
    return re.fullmatch(r"rellax-b\d+", step) is not None


def _runs() -> Path:
    from rellax.paths import cache_dir

    return cache_dir("runs") / "ml100k-v2"


@dataclass
class ExperimentConfig:
    """What the study runs. Defaults are the re-planned study (training.study.experiment); a GPU
    (`RELLAX_DEVICE`, auto = cuda when torch sees one) runs the same steps faster."""

    results: Path = setting(Path("docs/results"), help="Where each step's JSON (and kept weights) go.")
    runs: Path = setting(factory=_runs, help="Run folders and checkpoints.")
    test_rows: int = setting(2000, help="Fixed seeded test rows every model is scored on.")
    test_seed: int = setting(1234, help="Seed of the test rows.")
    k: int = setting(5, help="History items per prompt.")
    n_values: tuple[int, ...] = setting(
        (1024,), help="Few-shot N of the ReLLa runs (the one-stage runs use the largest).",
        flag=("--n-values", "--n"),
    )  # fmt: skip
    k_sweep: tuple[int, ...] = setting((10, 15), help="Extra K values for ReLLaX.")
    n_sweep: tuple[int, ...] = setting(
        (2048,), help="More training rows for ReLLaX, at the K of the K sweep with the best valid AUC."
    )
    b_sweep: tuple[int, ...] = setting(
        (16,), help="Other optimizer batch sizes for ReLLaX, at the K of the K sweep with the best valid AUC."
    )
    bf16_rerun: bool = setting(
        True, help="Retrain ReLLaX in the bf16 recipe (rellax-bf16) when its run trained in another dtype.",
        flag="--bf16-rerun/--no-bf16-rerun",
    )  # fmt: skip
    zero_shot: tuple[str, ...] = setting(("recency", "subr"), help="Zero-shot modes scored (subr, recency).")
    valid_rows: int = setting(512, help="Validation rows for selection and the curves.")
    stage1_lr: float = setting(1e-3, help="Learning rate of the stage-1 (ReLLa) runs.")
    stage2_lr: float = setting(1e-3, help="Learning rate of the ReLLaX-family runs.")
    batch_size: int = setting(8, help="Examples per optimizer step.")
    micro_batch: int = setting(8, help="Examples per forward pass.")
    epochs: int = setting(1, help="Epochs of every LLM run.")
    prompts: Literal["subr", "mixed"] = setting(
        "subr", help="Training prompts of every LLM step: subr, or mixed (ReLLa's recency + SUBR)."
    )
    evals_per_epoch: int = setting(3, help="Validation points per run (plus step 0): the curves.")
    chunk: int = setting(128, help="LLM test rows scored between checkpoints.")
    only: tuple[str, ...] = setting((), help="Run only these steps (names as planned); the rest wait.")
    model_dir: Path | None = setting(None, help="Base LLM folder (default: the bundled SmolLM2).")
    din_dir: Path = setting(
        factory=artefact("crm", "din"), help="The DIN every LLM step reads (trained when missing)."
    )
    # Off by default: the tuning trial with it (one-stage-b8-lr1e-3-subr-holdout) reached no higher
    # valid AUC than the shared DIN.
    din_holdout: bool = setting(
        False, help="LLM steps read a DIN trained without their few-shot rows (crm.holdout_rows)."
    )
    index_dir: Path | None = setting(None, help="Item index folder (default: the data set's, for this LLM).")
    max_seconds: float | None = setting(
        None, help="Stop starting new chunks/steps after this long (the option is --hours).", cli=False
    )

    def problems(self) -> list[str]:
        found = not_positive(
            self, "test_rows", "k", "valid_rows", "batch_size", "micro_batch", "epochs", "chunk"
        )
        if not self.n_values or min(self.n_values) <= 0:
            found.append(f"n_values={self.n_values!r} needs positive N")
        if self.n_sweep and min(self.n_sweep) <= 0:
            found.append(f"n_sweep={self.n_sweep!r} needs positive N")
        if self.b_sweep and min(self.b_sweep) <= 0:
            found.append(f"b_sweep={self.b_sweep!r} needs positive batch sizes")
        return found

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))
