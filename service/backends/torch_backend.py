"""The default backend: the bundle's own scorer, exact CFLoRA (each input's gate from its own h).

The model runs in one dedicated worker thread: the event loop never blocks, and one batch at a time
owns the CPU cores (torch's intra-op threads already use all of them; two concurrent batches would
only fight over the caches). The request path's own CPU work (prompt, DIN) runs on this thread too,
between batches (`prepare_executor`). Scores come from `bundle.score_prepared`, the very call the offline
evaluation and the train/serve parity test use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rellax.errors import BackendError
from service.backends.base import ModelInput

__all__ = ["TorchBackend"]


class TorchBackend:
    """`ScoringBackend` over `bundle.score_prepared` in a single model thread."""

    name = "torch"
    max_concurrent_batches = 1

    def __init__(self, bundle: Any, rows: int = 4) -> None:
        self.bundle = bundle
        self.rows = rows  # prompts per forward pass: the batcher's batch runs in chunks of this many
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_bundle(cls, bundle: Any, settings: Any = None) -> TorchBackend:
        """The factory every backend offers (`service.main.build_backend`); the bundle was already
        loaded with the configured dtype; RELLAX_TORCH_ROWS sizes its forward passes."""
        return cls(bundle) if settings is None else cls(bundle, rows=settings.torch_rows)

    @property
    def compute_dtype(self) -> str:
        """The dtype the bundle's model computes in ("float32" / "bfloat16" / "float16"), for /readyz
        and logs."""
        return str(self.bundle.dtype)

    @property
    def prepare_executor(self) -> ThreadPoolExecutor | None:
        """The model thread, offered for the request path's CPU work (see ScoringPipeline._off_loop)."""
        return self._pool

    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rellax-model")

    async def score(self, inputs: Sequence[ModelInput]) -> np.ndarray:
        if self._pool is None:
            raise BackendError("torch backend not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._score_sync, list(inputs))

    def _score_sync(self, inputs: list[ModelInput]) -> np.ndarray:
        return np.asarray(self.bundle.score_inputs(inputs, max_rows=self.rows), dtype=np.float64)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
