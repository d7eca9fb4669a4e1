"""The typed configs of the LLM recipes (stage 1, stage 2, evaluation) and their shared loop settings.

Kept free of torch so `rellax --help` stays instant: the CLI generates each command's options from
these fields (`training.config.with_config`); `training/configs/{rella,rellax,eval}.yaml` are the
same defaults written out, and the other YAML files there named variants of them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from training.config import artefact, not_positive, setting

__all__ = ["DEFAULT_K", "EvalConfig", "LoopConfig", "Stage1Config", "Stage2Config", "Stage2Mode"]

DEFAULT_K = 15  # history items a prompt shows (the paper's K), for every LLM recipe
Stage2Mode = Literal["spa", "cflora", "rellax"]
PROMPTS_HELP = (
    "Training prompts: mixed = each row as a recency and a SUBR prompt (ReLLa's mix); "
    "subr = one SUBR prompt a row."
)


@dataclass
class LoopConfig:
    """Optimisation settings of one stage."""

    lr: float = setting(1e-3, help="Peak learning rate (AdamW; linear warmup, then linear decay).")
    epochs: int = setting(1, help="Passes over the training prompts.")
    batch_size: int = setting(64, help="Examples per optimizer step, per process (gradient accumulation).")
    micro_batch: int = setting(8, help="Examples per forward pass.")
    warmup_ratio: float = setting(0.05, help="Share of the steps spent warming the learning rate up.")
    weight_decay: float = setting(0.0, help="AdamW weight decay.")
    evals_per_epoch: int = setting(2, help="Validation points per epoch (plus step 0): the curve.")
    seed: int = setting(0, help="Random seed (LoRA init, dropout, data order).")
    # Forcing bf16 where the CPU has no native bf16 is a trap: emulated bf16 matmul measured
    # 0.29 GFLOP/s vs fp32's 122 on a 2-core AMD EPYC (no AVX-512), 400x slower.
    bf16: bool | None = setting(
        None, help="Frozen base weights in bf16 (default: only where the CPU has native bf16).",
        flag="--bf16/--fp32",
    )  # fmt: skip
    fsdp: bool = setting(False, help="Under torchrun: shard the frozen base's layers (FSDP2) instead of DDP.")

    def problems(self) -> list[str]:
        found = not_positive(self, "lr", "batch_size", "micro_batch", "evals_per_epoch")
        if self.epochs < 0:  # 0 is a 0-step run: the seeded LoRA init the one-stage recipe starts from
            found.append(f"epochs={self.epochs!r} must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            found.append(f"warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        return found


def _rows_problems(cfg: Stage1Config | Stage2Config) -> list[str]:
    return not_positive(cfg, "n_rows", "k", "valid_rows")


@dataclass
class Stage1Config:
    """Stage 1 (ReLLa): LoRA over few-shot prompts; defaults are sized for the demo on a 2-core CPU."""

    out: Path = setting(factory=artefact("runs", "demo", "stage1"), help="Run folder.")
    model_dir: Path | None = setting(None, help="Base LLM folder (default: the bundled SmolLM2).")
    index_dir: Path | None = setting(None, help="Item index folder (default: the data set's, for this LLM).")
    n_rows: int = setting(256, help="Few-shot training rows.")
    k: int = setting(DEFAULT_K, help="History items per prompt.")
    valid_rows: int = setting(256, help="Validation rows for checkpoint selection.")
    r: int = setting(8, help="LoRA rank.")
    alpha: float = setting(16.0, help="LoRA alpha (scaling alpha / r).")
    dropout: float = setting(0.05, help="LoRA dropout.")
    target_modules: tuple[str, ...] = setting(
        ("q_proj", "v_proj"),
        help="Modules LoRA adapts: the paper's q_proj, v_proj, or every attention and MLP projection.",
    )
    prompts: Literal["mixed", "subr"] = setting("mixed", help=PROMPTS_HELP)
    loop: LoopConfig = setting(factory=LoopConfig, help="Optimisation.")

    def problems(self) -> list[str]:
        return _rows_problems(self)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


@dataclass
class Stage2Config:
    """Stage 2 (ReLLaX): SPA and/or CFLoRA gates over stage 1; defaults are sized for the demo."""

    stage1: Path = setting(factory=artefact("runs", "demo", "stage1"), help="The stage-1 run it builds on.")
    out: Path = setting(factory=artefact("runs", "demo", "stage2"), help="Run folder.")
    din_dir: Path = setting(factory=artefact("crm", "din"), help="The frozen DIN (default: the data set's).")
    model_dir: Path | None = setting(None, help="Base LLM folder (default: the bundled SmolLM2).")
    index_dir: Path | None = setting(None, help="Item index folder (default: the data set's, for this LLM).")
    mode: Stage2Mode = setting("rellax", help="rellax (SPA + CFLoRA), spa or cflora.")
    gate_init: Literal["identity", "random"] = setting(
        "identity", help="CFLoRA gate init: identity (step 0 = stage 1) or random (the authors')."
    )
    n_rows: int = setting(256, help="Few-shot training rows.")
    k: int = setting(DEFAULT_K, help="History items per prompt.")
    valid_rows: int = setting(256, help="Validation rows for checkpoint selection.")
    # The authors' ReLLaX code trains stage 2 on SUBR prompts only (validation, test, serving are SUBR).
    prompts: Literal["mixed", "subr"] = setting("mixed", help=PROMPTS_HELP)
    train_lora: bool = setting(
        False,
        help="Train stage 1's LoRA A, B too; over a 0-step stage 1 (B = 0) this is the one-stage variant.",
    )
    # Beyond the paper (labelled so in every report), as FLIP and ClickPrompt do for small LMs.
    din_residual: bool = setting(
        False, help="P(yes) = sigmoid(LLM margin + DIN's own logit): the LLM learns a correction to DIN."
    )
    loop: LoopConfig = setting(factory=lambda: LoopConfig(lr=3e-4), help="Optimisation.")

    def problems(self) -> list[str]:
        return _rows_problems(self)

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class EvalConfig:
    """Every mode and DIN scored on the same seeded rows of a split."""

    split: Literal["train", "valid", "test"] = setting("test", help="The split scored.")
    n: int | None = setting(2000, help="Rows of the split (null: every row).")
    seed: int = setting(1234, help="Seed of the row sample.")
    k: int = setting(DEFAULT_K, help="History items per prompt.")
    stage1: Path | None = setting(
        factory=artefact("runs", "demo", "stage1"), help="Stage-1 run folder (null: none)."
    )
    stage2: dict[str, Path] = setting(
        factory=dict, help="Stage-2 runs, mode -> run folder (option: --stage2 mode=DIR).", cli=False
    )
    din_dir: Path = setting(factory=artefact("crm", "din"), help="The DIN (default: the data set's).")
    out: Path = setting(factory=artefact("runs", "demo", "eval"), help="Where eval.json / eval.md go.")
    zero_shot: bool = setting(True, help="Also score the base LLM zero-shot.")
    model_dir: Path | None = setting(None, help="Base LLM folder (default: the bundled SmolLM2).")
    index_dir: Path | None = setting(None, help="Item index folder (default: the data set's, for this LLM).")
    # "auto" resolves as the service's RELLAX_DTYPE=auto does (`rellax.precision.resolve`), so the
    # table describes the bundle as served; recorded in eval.json.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", help="auto (as RELLAX_DTYPE=auto serves: float32), float32, bfloat16 or float16."
    )

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))
