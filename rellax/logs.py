"""Structured logging for every rellax process: key=value lines on a TTY, JSON lines otherwise."""

from __future__ import annotations

import logging
import os
import sys

import structlog

__all__ = ["configure_logging", "get_logger"]


def configure_logging(level: str | None = None, json: bool | None = None) -> None:
    """Route stdlib and structlog records through one renderer (`RELLAX_LOG_LEVEL`, `RELLAX_LOG_JSON`)."""
    level = (level or os.environ.get("RELLAX_LOG_LEVEL", "INFO")).upper()
    if json is None:
        json = (
            os.environ.get("RELLAX_LOG_JSON", "").lower() in {"1", "true", "yes"} or not sys.stderr.isatty()
        )
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )  # fmt: skip
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """A stream handler bound to whatever `sys.stderr` is when a record is written, not when the
    handler was made: pytest (and any caller that swaps stderr) closes the stream it replaced, and a
    handler holding that stream then fails with "I/O operation on closed file" (as logging's own
    last-resort handler does)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # noqa: ANN201 - a text stream
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler.setStream assigns it; ignored
        pass


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
