"""The contract between the request path and a model backend.

The request path (Redis -> SUBR -> DIN -> prompt) produces one `ModelInput` per (user, candidate); a
backend turns a list of them into P(click). Soft-token vectors arrive already projected by SPA from
*our* DIN embeddings: a backend never sees client-supplied embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["ModelInput", "ScoringBackend"]


@dataclass(frozen=True, slots=True)
class ModelInput:
    """One prompt ready for the LLM.

    input_ids: prompt token ids (chat template applied, soft-token placeholders included).
    soft_positions: token positions whose input embedding is replaced, in text order.
    soft_vectors: (len(soft_positions), H) float32 SPA outputs for those positions, or None.
    gate_h: (d_h,) float32 DIN hidden state feeding CFLoRA gates (exact mode), or None.
    """

    input_ids: Sequence[int]
    soft_positions: Sequence[int] = ()
    soft_vectors: np.ndarray | None = None
    gate_h: np.ndarray | None = None


@runtime_checkable
class ScoringBackend(Protocol):
    """A loaded model that scores prompts; one engine per process."""

    name: str

    async def start(self) -> None:
        """Load weights / start the engine; called once from the app lifespan."""

    async def score(self, inputs: Sequence[ModelInput]) -> np.ndarray:
        """P(yes) per input, float64 array of len(inputs), in input order."""

    async def close(self) -> None:
        """Release the engine."""
