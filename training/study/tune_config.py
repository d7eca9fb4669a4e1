"""The recipe trials' typed config (`rellax experiment tune`), free of torch so the command builds
its options from the fields (`training.config.with_config`), as every recipe does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from training.config import artefact, not_positive, setting

__all__ = ["ALL_PROJECTIONS", "DIN_HOLDOUT", "TRIALS", "Trial", "TuneConfig"]


def _runs() -> Path:
    from rellax.paths import cache_dir

    return cache_dir("runs") / "tune"


# The DIN whose training left out every trial's and study step's few-shot rows (N = 256, 1024,
# 4096): stage 2 then trains on rows DIN never saw, as every validation, test and served row is.
DIN_HOLDOUT = (256, 1024, 4096)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Trial:
    """One short run. Stage 1 trains LoRA on text prompts; stage 2 trains SPA + CFLoRA gates (and,
    with `train_lora`, A and B too) over the stage-1 trial named by `over`."""

    name: str
    stage: Literal[1, 2]
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 1
    warmup_ratio: float = 0.05
    k: int = 5
    n_rows: int = 256
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    over: str | None = None
    mode: Literal["rellax", "spa", "cflora"] = "rellax"
    prompts: Literal["mixed", "subr"] = "mixed"
    train_lora: bool = False
    din_residual: bool = False
    din: Literal["din", "din-holdout"] = "din"  # which frozen DIN feeds stage 2 (see DIN_HOLDOUT)
    note: str = ""


# Stage 1 at K=5 on 256 rows (512 prompts an epoch). First the one-stage variant (over a 0-step
# stage 1, so B starts at 0 and LoRA, gates and projector all train from step 0): the quickest test
# of "DIN's signal lifts the LLM". Then stage 1 with more optimizer steps per example (small batches)
# and stage 2 over it (small batches, SUBR-only prompts, the study's recipe, A and B unfrozen), then
# the paper's recipe, learning rates, every projection adapted, and K=15.
def _one_stage(name: str, **changes: Any) -> Trial:
    """A one-stage trial: LoRA, gates and projector from step 0 over the 0-step stage 1, on SUBR
    prompts, batch 8, lr 1e-3, 4 epochs, unless `changes` say otherwise."""
    base: dict[str, Any] = dict(
        stage=2, lr=1e-3, batch_size=8, epochs=4, over="s1-init", train_lora=True, prompts="subr"
    )
    return Trial(name, **{**base, **changes})


TRIALS: tuple[Trial, ...] = (
    Trial("s1-init", 1, epochs=0, note="0 steps: the LoRA init, for the one-stage trial"),
    _one_stage("one-stage-b8-lr1e-3", epochs=2, prompts="mixed"),
    _one_stage("one-stage-b8-lr1e-3-subr", note="one-stage on SUBR prompts only (as validation and serving)"),
    _one_stage("one-stage-b16-lr1e-3-subr", batch_size=16),
    _one_stage("one-stage-b8-lr3e-4-subr", lr=3e-4),
    _one_stage(
        "one-stage-b16-lr1e-3-subr-n1024",
        batch_size=16,
        epochs=2,
        n_rows=1024,
        note="the batch-16 trial on 4x the rows: does more data carry it past DIN's valid AUC?",
    ),
    _one_stage("one-stage-b8-lr1e-3-subr-k10", k=10, note="K=10 prompts: ~1.4x tokens"),
    _one_stage(
        "one-stage-din-residual",
        din_residual=True,
        note="beyond the paper: the LLM's Yes/No logit added to DIN's own logit (a correction to DIN)",
    ),
    _one_stage(
        "one-stage-b8-lr1e-3-subr-holdout",
        din="din-holdout",
        note="DIN trained without the few-shot rows (its AUC on its own training rows: 0.81, unseen 0.78)",
    ),
    Trial("s1-b8-lr1e-3", 1, lr=1e-3, batch_size=8, epochs=4, note="small batches, the probe's recipe"),
    Trial("s2-b8-lr1e-3", 2, lr=1e-3, batch_size=8, epochs=2, over="s1-b8-lr1e-3", note="probe's stage 2"),
    Trial("s2-b8-lr1e-3-subr", 2, lr=1e-3, batch_size=8, epochs=2, over="s1-b8-lr1e-3", prompts="subr"),
    Trial("s2-b64-lr3e-4", 2, lr=3e-4, batch_size=64, epochs=2, over="s1-b8-lr1e-3", note="study's stage 2"),
    Trial("s2-b8-lr1e-3-lora", 2, lr=1e-3, batch_size=8, epochs=2, over="s1-b8-lr1e-3", train_lora=True),
    Trial("s1-paper", 1, lr=1e-3, batch_size=64, epochs=10, note="authors' recipe: 10 epochs, batch 64"),
    Trial("s1-b16-lr1e-3", 1, lr=1e-3, batch_size=16, epochs=4),
    Trial("s1-b8-lr3e-4", 1, lr=3e-4, batch_size=8, epochs=4),
    Trial("s1-b8-lr3e-3", 1, lr=3e-3, batch_size=8, epochs=4),
    Trial("s1-b8-lr1e-3-all", 1, lr=1e-3, batch_size=8, epochs=4, target_modules=ALL_PROJECTIONS),
    Trial("s1-b8-lr1e-3-k15", 1, lr=1e-3, batch_size=8, epochs=4, k=15, note="K=15 prompts: ~1.6x tokens"),
)


@dataclass
class TuneConfig:
    """Where trials live and what they share; `trials` is the table above unless a YAML file
    (`--config`) lists its own."""

    results: Path = setting(Path("docs/results/tune"), help="Where each trial's JSON (and kept weights) go.")
    runs: Path = setting(factory=_runs, help="Trial run folders and checkpoints.")
    trials: tuple[Trial, ...] = setting(
        TRIALS, help="The trials, in order (YAML: a list of Trial fields).", cli=False
    )
    budget_min: float = setting(15.0, help="Training minutes per trial (validation not counted).")
    valid_rows: int = setting(512, help="Fixed validation rows every trial is measured on.")
    evals: int = setting(4, help="Validation points per trial (plus step 0), spread over its steps.")
    micro_batch: int = setting(8, help="Examples per forward pass.")
    only: tuple[str, ...] = setting((), help="Run only these trials (by name); the rest wait.")
    max_seconds: float | None = setting(
        None, help="Stop starting new trials after this long (the option is --hours).", cli=False
    )
    model_dir: Path | None = setting(None, help="Base LLM folder (default: the bundled SmolLM2).")
    din_dir: Path = setting(factory=artefact("crm", "din"), help="The frozen DIN stage-2 trials read.")
    index_dir: Path | None = setting(None, help="Item index folder (default: the data set's, for this LLM).")

    @property
    def budget_s(self) -> float:
        return self.budget_min * 60

    def problems(self) -> list[str]:
        found = not_positive(self, "valid_rows", "evals", "micro_batch")
        if self.budget_min < 0:
            found.append(f"budget_min={self.budget_min!r} must be >= 0")
        names = [t.name for t in self.trials]
        if len(set(names)) < len(names):
            found.append(f"trials: names repeat ({sorted({n for n in names if names.count(n) > 1})})")
        unknown = sorted(set(self.only) - set(names))
        if unknown:
            found.append(f"only={list(self.only)!r}: unknown trials {unknown}; known: {names}")
        for t in self.trials:
            if t.stage == 2 and t.over not in names:
                found.append(f"trials: {t.name} trains over {t.over!r}, which is not a trial")
        return found
