"""Logging writes to the stderr of the moment: a caller that swaps stderr (pytest's capture, a CLI
runner) and closes the old stream must not turn later log lines into "I/O operation on closed file"
tracebacks."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from rellax.logs import configure_logging, get_logger


def test_log_lines_follow_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("INFO", json=True)
    get_logger("rellax.test").info("first line")
    assert '"event": "first line"' in first.getvalue()
    first.close()  # what pytest does to a finished test's capture stream
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("rellax.test").info("second line")
    assert '"event": "second line"' in second.getvalue()
    assert "Logging error" not in second.getvalue()  # logging's report of a handler that failed
