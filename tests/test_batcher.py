"""The micro-batcher with a real (small) torch model behind the `ScoringBackend` protocol.

`TinyTorchBackend` is a test double at the documented boundary (service/backends/base.py): a real
padded, masked torch computation in a worker thread, plus a gate the test can hold closed to keep the
model busy, and a log of which inputs were actually computed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest
import torch

from rellax.errors import BackendError
from service.backends.base import ModelInput, ScoringBackend
from service.batcher import MicroBatcher
from service.errors import DeadlineExceeded, Overloaded
from service.metrics import Metrics

VOCAB = 500


class TinyTorchBackend:
    """sigmoid(w . masked_mean(E[input_ids])): batch-invariant, so batched == alone."""

    name = "tiny-torch"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, 1)
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[tuple[int, ...]]] = []  # inputs of every computed batch
        self.entered = threading.Event()
        self.delay_s = 0.0  # per batch, as a bigger model would take

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.gate.set()

    async def score(self, inputs: Sequence[ModelInput]) -> np.ndarray:
        return await asyncio.to_thread(self._score, list(inputs))

    @torch.no_grad()
    def _score(self, inputs: list[ModelInput]) -> np.ndarray:
        self.entered.set()
        self.gate.wait(timeout=30)
        time.sleep(self.delay_s)
        self.batches.append([tuple(x.input_ids) for x in inputs])
        longest = max(len(x.input_ids) for x in inputs)
        ids = torch.zeros(len(inputs), longest, dtype=torch.long)
        mask = torch.zeros(len(inputs), longest)
        for row, x in enumerate(inputs):
            ids[row, : len(x.input_ids)] = torch.tensor(list(x.input_ids))
            mask[row, : len(x.input_ids)] = 1
        pooled = (self.emb(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.sigmoid(self.head(pooled)).squeeze(1).double().numpy()

    def alone(self, x: ModelInput) -> float:
        return float(self._score([x])[0])


def make_input(rng: np.random.Generator, length: int | None = None) -> ModelInput:
    n = int(length or rng.integers(3, 40))
    return ModelInput(input_ids=tuple(int(t) for t in rng.integers(1, VOCAB, n)))


@pytest.fixture()
async def backend() -> TinyTorchBackend:
    return TinyTorchBackend()


@pytest.fixture()
async def batcher(backend: TinyTorchBackend) -> AsyncIterator[MicroBatcher]:
    b = await MicroBatcher(
        backend, max_batch=8, max_tokens=200, max_wait_s=0.02, max_queue=64, metrics=Metrics()
    ).start()
    try:
        yield b
    finally:
        backend.gate.set()
        await b.close()


def later(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def test_tiny_backend_satisfies_the_protocol(backend: TinyTorchBackend) -> None:
    assert isinstance(backend, ScoringBackend)


async def test_concurrent_requests_are_merged_and_scores_match_alone(
    batcher: MicroBatcher, backend: TinyTorchBackend
) -> None:
    rng = np.random.default_rng(0)
    requests = [[make_input(rng) for _ in range(int(rng.integers(1, 6)))] for _ in range(12)]
    results = await asyncio.gather(*(batcher.submit(r, later()) for r in requests))
    for req, res in zip(requests, results, strict=True):
        np.testing.assert_allclose(res.scores, [backend.alone(x) for x in req], atol=1e-6)
        assert res.queue_wait_s >= 0 and res.model_s >= 0
    n_candidates = sum(len(r) for r in requests)
    assert sum(len(b) for b in backend.batches[: batcher.batches_run]) == n_candidates
    assert batcher.batches_run < len(requests)  # requests shared batches
    assert max(len(b) for b in backend.batches) > 5  # more than any single request holds


async def test_timing_splits_own_model_time_from_waiting_for_others(backend: TinyTorchBackend) -> None:
    """A 10-candidate request at max_batch 4 runs 3 batches: its model time is all 3 (not the last
    one), and it waited for nobody; a 1-candidate request queued behind it waits for the big one's
    first two batches and shares the third (2 of the big one's candidates + its own)."""
    backend.delay_s = 0.1
    rng = np.random.default_rng(1)
    b = await MicroBatcher(backend, max_batch=4, max_tokens=10_000, max_wait_s=0.0, max_queue=64).start()
    try:
        big = asyncio.ensure_future(b.submit([make_input(rng, 8) for _ in range(10)], later()))
        await asyncio.sleep(0.01)  # the big request is queued first
        small = await b.submit([make_input(rng, 8)], later())
        big_res = await big
    finally:
        await b.close()
    assert big_res.batches == 3 and small.batches == 1
    # lower bounds are the accounting; upper ones only catch double counting (loose for a busy CI)
    assert 0.3 <= big_res.model_s < 0.6 and big_res.queue_wait_s < 0.1
    assert 0.1 <= small.model_s < 0.2 and 0.15 <= small.queue_wait_s < 0.5


async def test_batches_respect_count_and_padded_token_budget(
    batcher: MicroBatcher, backend: TinyTorchBackend
) -> None:
    rng = np.random.default_rng(1)
    requests = [[make_input(rng, int(rng.integers(5, 60))) for _ in range(4)] for _ in range(10)]
    await asyncio.gather(*(batcher.submit(r, later()) for r in requests))
    assert sum(len(b) for b in backend.batches) == 40
    for b in backend.batches:
        assert len(b) <= 8
        assert len(b) == 1 or len(b) * max(len(x) for x in b) <= 200


async def test_arrival_order_is_kept_within_and_across_batches(
    batcher: MicroBatcher, backend: TinyTorchBackend
) -> None:
    rng = np.random.default_rng(2)
    inputs = [make_input(rng, 10) for _ in range(20)]
    await batcher.submit(inputs, later())
    assert [x for b in backend.batches for x in b] == [tuple(x.input_ids) for x in inputs]


async def test_full_queue_rejects_at_once_without_waiting(
    batcher: MicroBatcher, backend: TinyTorchBackend
) -> None:
    rng = np.random.default_rng(3)
    backend.gate.clear()  # hold the model: the first batch blocks inside the worker thread
    running = asyncio.create_task(batcher.submit([make_input(rng, 10) for _ in range(8)], later()))
    await asyncio.to_thread(backend.entered.wait, 10)
    assert batcher.queued == 0  # all 8 went into the (blocked) batch
    queued = [
        asyncio.create_task(batcher.submit([make_input(rng) for _ in range(30)], later())) for _ in range(2)
    ]
    await asyncio.sleep(0)
    assert batcher.queued == 60
    # 60 + 5 > 64: refused in submit itself, while the model is still blocked
    with pytest.raises(Overloaded, match="queue full") as info:
        await asyncio.wait_for(batcher.submit([make_input(rng) for _ in range(5)], later()), timeout=5)
    assert info.value.retry_after == 1
    assert (await asyncio.wait_for(batcher.submit([], later()), 5)).scores.shape == (0,)
    backend.gate.set()
    done = await asyncio.gather(running, *queued)
    assert [len(d.scores) for d in done] == [8, 30, 30]
    assert batcher.queued == 0


async def test_expired_candidates_are_dropped_before_compute(
    batcher: MicroBatcher, backend: TinyTorchBackend
) -> None:
    rng = np.random.default_rng(4)
    backend.gate.clear()
    first = asyncio.create_task(batcher.submit([make_input(rng) for _ in range(8)], later()))
    await asyncio.to_thread(backend.entered.wait, 10)
    doomed = [make_input(rng, 41) for _ in range(3)]  # length 41 marks them: others are 3..39
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await batcher.submit(doomed, time.monotonic() + 0.05)
    survivor = asyncio.create_task(batcher.submit([make_input(rng, 7)], later()))
    await asyncio.sleep(0.05)
    backend.gate.set()
    await first
    assert len((await survivor).scores) == 1
    computed = [x for b in backend.batches for x in b]
    assert not any(len(x) == 41 for x in computed)  # the expired request was never computed
    assert batcher.queued == 0


async def test_deadline_in_the_past_is_refused(batcher: MicroBatcher) -> None:
    with pytest.raises(DeadlineExceeded):
        await batcher.submit([make_input(np.random.default_rng(5))], time.monotonic() - 1)


async def test_model_error_fails_only_its_batch_and_the_worker_survives(
    batcher: MicroBatcher, backend: TinyTorchBackend
) -> None:
    rng = np.random.default_rng(6)
    bad = ModelInput(input_ids=(1, 2, VOCAB + 7))  # out of the embedding table: torch raises IndexError
    with pytest.raises(BackendError, match="error id") as info:
        await batcher.submit([make_input(rng), bad], later())
    assert len(info.value.error_id) == 16
    good = [make_input(rng) for _ in range(3)]
    res = await batcher.submit(good, later())
    np.testing.assert_allclose(res.scores, [backend.alone(x) for x in good], atol=1e-6)
    assert batcher.alive


async def test_cancelled_request_is_not_computed(batcher: MicroBatcher, backend: TinyTorchBackend) -> None:
    rng = np.random.default_rng(7)
    backend.gate.clear()
    first = asyncio.create_task(batcher.submit([make_input(rng) for _ in range(8)], later()))
    await asyncio.to_thread(backend.entered.wait, 10)
    gone = asyncio.create_task(batcher.submit([make_input(rng, 42)], later()))  # client disconnects
    await asyncio.sleep(0)
    gone.cancel()
    backend.gate.set()
    await first
    await batcher.submit([make_input(rng, 5)], later())
    assert not any(len(x) == 42 for b in backend.batches for x in b)


async def test_metrics_track_batches_and_queue_depth(batcher: MicroBatcher) -> None:
    rng = np.random.default_rng(8)
    await asyncio.gather(*(batcher.submit([make_input(rng) for _ in range(3)], later()) for _ in range(5)))
    registry = batcher.metrics.registry
    assert registry.get_sample_value("rellax_batch_size_count") == batcher.batches_run
    assert registry.get_sample_value("rellax_batch_size_sum") == 15
    assert registry.get_sample_value("rellax_queue_depth") == 0


async def test_close_fails_waiting_requests(backend: TinyTorchBackend) -> None:
    rng = np.random.default_rng(9)
    b = await MicroBatcher(backend, max_batch=2, max_wait_s=0.0).start()
    backend.gate.clear()
    first = asyncio.create_task(b.submit([make_input(rng) for _ in range(2)], later()))
    await asyncio.to_thread(backend.entered.wait, 10)
    waiting = asyncio.create_task(b.submit([make_input(rng) for _ in range(2)], later()))
    await asyncio.sleep(0)
    backend.gate.set()
    await b.close()
    for task in (first, waiting):  # in the model and queued: both answered, neither hangs
        with pytest.raises(BackendError, match="shutting down"):
            await asyncio.wait_for(task, 5)
    with pytest.raises(BackendError, match="not running"):
        await b.submit([make_input(rng)], later())


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_batch=0"):
        MicroBatcher(TinyTorchBackend(), max_batch=0)
