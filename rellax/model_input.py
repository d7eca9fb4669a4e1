"""What a backend receives for one (user, candidate): token ids, soft tokens and the gate input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ModelInput"]


@dataclass(frozen=True, slots=True)
class ModelInput:
    """One prompt ready for the LLM.

    input_ids: prompt token ids (chat template applied, soft-token placeholders included).
    soft_positions: token positions whose input embedding is replaced, in text order.
    soft_vectors: (len(soft_positions), H) float32 SPA outputs for those positions, or None. They are
        computed from *our* DIN embeddings by the bundle; a backend never sees client embeddings.
    gate_h: (d_h,) float32 DIN hidden state feeding CFLoRA gates (exact mode), or None.
    """

    input_ids: Sequence[int]
    soft_positions: Sequence[int] = ()
    soft_vectors: np.ndarray | None = None
    gate_h: np.ndarray | None = None
