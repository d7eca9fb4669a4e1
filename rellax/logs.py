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
    handler = logging.StreamHandler()
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


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
