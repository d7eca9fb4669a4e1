"""uvicorn with a drain phase, for `rellax serve`: SIGTERM turns /readyz false at once, keeps serving
for `drain_s` so a load balancer polling readiness stops sending traffic, then stops accepting
connections, lets in-flight requests finish (at most `timeout_graceful_shutdown`) and exits.

uvicorn alone stops listening at the first SIGTERM, so a balancer that has not yet noticed sends the
next requests into refused connections. Kubernetes removes a terminating pod from its endpoints by
itself (the manifests' preStop sleep covers the propagation), but compose, a VM behind a load
balancer or a service mesh probing readiness only learn from /readyz. A second signal, or SIGINT
(Ctrl-C at a terminal), skips the drain.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from rellax.logs import get_logger

__all__ = ["DrainingServer"]

log = get_logger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn.Server whose first SIGTERM sets `app_state.draining` and exits `drain_s` later."""

    def __init__(self, config: uvicorn.Config, app_state: Any, drain_s: float) -> None:
        super().__init__(config)
        self.app_state = app_state
        self.drain_s = drain_s
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.drain_s <= 0 or self._drain_started is not None:
            self.app_state.draining = True
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        self.app_state.draining = True
        self._drain_started = time.monotonic()
        log.info("draining: readiness is false, still serving", drain_s=self.drain_s)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main loop asks this every 0.1 s whether to exit."""
        if self._drain_started is not None and time.monotonic() - self._drain_started >= self.drain_s:
            self.should_exit = True
        return await super().on_tick(counter)
