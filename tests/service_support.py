"""Helpers for the service tests: the tiny bundle, settings, the app in-process (ASGI) or on a real
uvicorn server on a loopback port. Real components only: a real bundle (tiny random Llama, real
tokenizer, real item index), real Redis, real HTTP."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
import threading
import time
import types
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from rellax.entities import Profile
from service.backends.base import ModelInput, ScoringBackend
from service.backends.torch_backend import TorchBackend
from service.embedded_redis import free_port
from service.main import create_app
from service.settings import Settings

__all__ = [
    "GatedTorchBackend",
    "asgi_app",
    "make_settings",
    "tiny_bundle",
    "tiny_bundle_path",
    "uvicorn_app",
]


def _bundle_api() -> Any:
    """`Bundle` (rellax.bundle) and `make_tiny_bundle` (training.llm.tiny_bundle) as one namespace."""
    try:
        from rellax.bundle import Bundle
        from training.llm.tiny_bundle import make_tiny_bundle
    except ImportError as exc:
        pytest.fail(
            "the service tests need rellax.bundle with Bundle.load / prepare / score_prepared and "
            f"training.llm.tiny_bundle.make_tiny_bundle, which are not importable: {exc!r}",
            pytrace=False,
        )
    return types.SimpleNamespace(Bundle=Bundle, make_tiny_bundle=make_tiny_bundle)


@functools.cache
def tiny_bundle_path() -> Path:
    """Built once per test process, removed at exit; carries a tiny LLM-SRec for /v1/rerank's strategies."""
    folder = Path(tempfile.mkdtemp(prefix="rellax-service-bundle-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(_bundle_api().make_tiny_bundle(folder, llmsrec=True))


@functools.cache
def tiny_bundle() -> Any:
    """The tiny bundle loaded in fp32 (the numerically checked reference)."""
    return _bundle_api().Bundle.load(tiny_bundle_path(), dtype="float32")


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    """Settings from arguments only: no .env file, explicit values for everything the tests rely on."""
    values: dict[str, Any] = {
        "bundle": tiny_bundle_path(),
        "dtype": "float32",
        "redis_url": redis_url,
        "api_keys": [],
        "max_wait_ms": 2.0,
        "deadline_ms": 30_000,  # generous: a loaded CI machine must not turn happy paths into 504s
        "redis_timeout_ms": 300,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


class GatedTorchBackend(TorchBackend):
    """The real torch backend (the bundle's exact model on its one model thread) with two test hooks:

    * `gate`: while cleared, a batch that reached the model waits inside the model thread (as a long
      batch would); `entered` is set when a batch is in there, `finished` counts batches computed.
    * `poison`: item ids whose cold-start prompts make the model raise, as a model bug would.
    """

    def __init__(self, bundle: Any, poison: Iterable[int] = ()) -> None:
        super().__init__(bundle)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.finished = 0
        # what the service builds for a cold-start user (no history, unknown profile)
        self._poison = {tuple(p.model_input.input_ids) for p in bundle.prepare(Profile(), [], list(poison))}

    def _score_sync(self, inputs: list[ModelInput]) -> np.ndarray:
        self.entered.set()
        try:
            if not self.gate.wait(timeout=60):
                raise RuntimeError("test gate never opened")
            if any(tuple(x.input_ids) in self._poison for x in inputs):
                raise RuntimeError("poisoned input (test)")
            return super()._score_sync(inputs)
        finally:
            self.entered.clear()
            self.finished += 1

    async def close(self) -> None:
        self.gate.set()  # never leave the model thread parked at shutdown
        await super().close()


@contextlib.asynccontextmanager
async def asgi_app(
    settings: Settings, backend: ScoringBackend | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app with its lifespan, called in-process through httpx's ASGI transport."""
    app = create_app(settings, bundle=tiny_bundle(), backend=backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://rellax.test") as client:
            yield app, client


@contextlib.contextmanager
def uvicorn_app(settings: Settings, backend: ScoringBackend | None = None) -> Iterator[tuple[FastAPI, str]]:
    """The real app served by uvicorn on a free loopback port, in a background thread."""
    app = create_app(settings, bundle=tiny_bundle(), backend=backend)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


async def ingest_in_chunks(client: httpx.AsyncClient, uid: str, plan: list[dict], chunk: int = 10) -> int:
    """POST `plan`'s events for `uid` `chunk` at a time (each must be 200); returns how many were new."""
    added = 0
    for start in range(0, len(plan), chunk):
        r = await client.post(f"/v1/users/{uid}/events", json={"events": plan[start : start + chunk]})
        assert r.status_code == 200, r.text
        added += r.json()["added"]
    return added
