"""The contract between the request path and a model backend.

The request path (Redis -> SUBR -> DIN -> prompt) produces one `ModelInput` per (user, candidate); a
backend turns a list of them into P(click). Soft-token vectors arrive already projected by SPA from
*our* DIN embeddings: a backend never sees client-supplied embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from rellax.model_input import ModelInput

__all__ = ["ModelInput", "ScoringBackend"]


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
