"""Model backends behind one protocol; implementations are imported lazily by name (docs/design.md §8)."""

from __future__ import annotations

import importlib

from service.backends.base import ModelInput, ScoringBackend

__all__ = ["BACKENDS", "ModelInput", "ScoringBackend", "backend_class"]

# "module:Class" strings so `import service` never imports torch-heavy or vLLM code (vLLM's registry idea).
BACKENDS: dict[str, str] = {
    "torch": "service.backends.torch_backend:TorchBackend",
    "vllm": "service.backends.vllm_backend:VllmBackend",
}


def backend_class(name: str) -> type:
    """Import and return the backend class registered under `name`."""
    try:
        module_name, _, attr = BACKENDS[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    return getattr(importlib.import_module(module_name), attr)
