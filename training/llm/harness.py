"""The one evaluation harness: prompts for fixed rows, P(yes) for them, and their metrics.

Validation inside the training loop, `rellax eval`, the export's merged-vs-exact check and the
quality study's test scoring all go through these functions, so a figure from one is comparable
with a figure from another: the same prompt path (`Featurizer` -> `build_examples`, the one the
service mirrors), the same scorer, the same metrics. What differs is only which rows, which model,
and whether the scoring is checkpointed (the study's 2,000-row passes are; the others are minutes).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from data.samples import Samples
from rellax import precision
from rellax.cflora import cflora_modules
from rellax.features import Featurizer, Mode
from rellax.logs import get_logger
from rellax.scorer import Scorer, ScoringModel
from training.llm.data import Catalogue, LLMExample, build_examples
from training.metrics import ctr_metrics

__all__ = [
    "load_mean_gates",
    "load_partial_scores",
    "make_validator",
    "merged_at_mean_gates",
    "row_examples",
    "score_examples",
    "score_resumably",
]

log = get_logger(__name__)


def row_examples(
    featurizer: Featurizer,
    catalogue: Catalogue,
    samples: Samples,
    rows: np.ndarray,
    mode: Mode,
    *,
    with_din: bool,
    din_logit: bool = False,
    desc: str,
) -> list[LLMExample]:
    """One prompt per sample row, all in one mode (recency or SUBR), in row order."""
    pairs = [(int(r), mode) for r in rows]
    return build_examples(
        featurizer, catalogue, samples, pairs, with_din=with_din, din_logit=din_logit, desc=desc
    )


def score_examples(model: ScoringModel, examples: Sequence[LLMExample], max_batch: int = 32) -> np.ndarray:
    """P(yes) for examples' prompts with the live model, in the dtype it computes in (no casts)."""
    scorer = Scorer(model, dtype=precision.compute_dtype(model.lm), cast=False, inference_mode=False)
    soft = [e.soft for e in examples] if examples and examples[0].soft is not None else None
    h = torch.stack([e.h for e in examples]) if examples and examples[0].h is not None else None
    offsets = [e.din_logit for e in examples] if examples and examples[0].din_logit is not None else None
    return scorer.score(
        [e.prompt for e in examples], soft_vectors=soft, h=h, max_batch=max_batch, offsets=offsets
    )


def score_resumably(
    model: ScoringModel,
    examples: Sequence[LLMExample],
    partial: Path,
    chunk: int,
    deadline: float | None = None,
    name: str = "",
) -> tuple[np.ndarray, float]:
    """`score_examples` chunk by chunk, saving the scores so far (and the seconds they took, every
    session's) to `partial` after each chunk; a later call with the same file resumes there. Raises
    TimeoutError past `deadline` (`time.monotonic()`), between chunks."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    done, seconds = load_partial_scores(partial)
    while len(done) < len(examples):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{name}: {len(done)}/{len(examples)} rows scored; run again to resume")
        t = time.perf_counter()
        part = examples[len(done) : len(done) + chunk]
        done = np.concatenate([done, score_examples(model, part)])
        seconds += time.perf_counter() - t
        np.savez(partial, p=done, seconds=seconds)
        log.info("scored", step=name, rows=len(done), of=len(examples))
    return done, seconds


def load_partial_scores(path: Path) -> tuple[np.ndarray, float]:
    """(scores so far, seconds spent on them); empty and 0 s when nothing is scored yet."""
    if not path.exists():
        return np.zeros(0, dtype=np.float64), 0.0
    with np.load(path) as found:
        return found["p"], float(found["seconds"])


def make_validator(
    model: ScoringModel,
    featurizer: Featurizer,
    catalogue: Catalogue,
    samples: Samples,
    rows: np.ndarray,
    mode: Mode,
    with_din: bool,
    din_logit: bool = False,
) -> Callable[[], float]:
    """A zero-argument function returning validation AUC on fixed rows (prompts built once)."""
    examples = row_examples(
        featurizer,
        catalogue,
        samples,
        rows,
        mode,
        with_din=with_din,
        din_logit=din_logit,
        desc="valid prompts",
    )
    labels = np.array([e.label for e in examples])

    def evaluate() -> float:
        return float(ctr_metrics(labels, score_examples(model, examples))["auc"])

    return evaluate


def load_mean_gates(run: Path) -> dict[str, torch.Tensor] | None:
    """A stage-2 run's mean gates Ḡ by CFLoRA module name (None for a run without gates)."""
    path = run / "gbar.safetensors"
    if not path.exists():
        return None
    return {k.removeprefix("lm."): v.float() for k, v in load_file(path).items()}


@contextlib.contextmanager
def merged_at_mean_gates(
    model: ScoringModel, g_bars: Mapping[str, torch.Tensor] | None
) -> Iterator[ScoringModel]:
    """The model as vLLM serves it, for the block: every CFLoRA layer folded into its base weight
    (W0 + s·B·Ḡᵀ·A; plain LoRA where a layer has no gate), unmerged afterwards."""
    modules = cflora_modules(model.lm)
    for name, module in modules.items():
        module.merge(None if g_bars is None or module.gate is None else g_bars[name])
    try:
        yield model
    finally:
        for module in modules.values():
            module.unmerge()
