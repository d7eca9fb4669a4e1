"""Which device offline work (training, index builds, the quality study) runs on.

One resolver, so every stage of a run puts the base LLM, its adapters and each batch on the same
device: `RELLAX_DEVICE` (auto, cpu, cuda, cuda:N), where auto is cuda when torch sees a GPU.
The online torch backend stays on the CPU (docs/design.md §8); the GPU path there is vLLM.
"""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str | None = None) -> torch.device:
    """`name`, else `RELLAX_DEVICE`, else auto; an unknown or unavailable device raises ValueError
    naming the setting, rather than failing later in the middle of a run."""
    chosen = (name or os.environ.get("RELLAX_DEVICE") or "auto").strip().lower()
    if chosen == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(chosen)
    except RuntimeError as err:
        raise ValueError(f"RELLAX_DEVICE={chosen!r} is not a device (auto, cpu, cuda or cuda:N)") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"RELLAX_DEVICE={chosen!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"RELLAX_DEVICE={chosen!r} but torch sees no CUDA GPU here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"RELLAX_DEVICE={chosen!r} but torch sees {torch.cuda.device_count()} GPU(s)")
    return device
