"""Fault drills under load, over real HTTP against uvicorn and a real redis-server: Redis frozen
(SIGSTOP), Redis slow (a TCP proxy adding latency, below and above RELLAX_REDIS_TIMEOUT_MS), the model
hanging. Each: only the documented statuses (never a 500 for what is not a bug), no request held past
its bound, 200s again within 5 s of the fault ending, and the metrics show it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_support import GatedTorchBackend, make_settings, tiny_bundle, uvicorn_app

from service.embedded_redis import EmbeddedRedis

REDIS_TIMEOUT_S = 0.3
# A request that meets a dead Redis waits one timeout, retries once on a fresh connection (connect +
# read timeout): 3 timeouts; the margin is for a loaded 2-core CI machine.
REDIS_BOUND_S = 3 * REDIS_TIMEOUT_S + 1.0
RECOVERY_S = 5.0


@dataclass
class Answer:
    sent: float  # time.monotonic()
    seconds: float
    status: int


def counter(metrics: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}\{{{re.escape(want)}\}} ([0-9.e+-]+)$" if labels else rf"^{name} ([0-9.e+-]+)$"
    found = re.search(pattern, metrics, flags=re.M)
    return float(found.group(1)) if found else 0.0


async def load(url: str, seconds: float, clients: int, fault: Callable[[], object]) -> list[Answer]:
    """`clients` loops of /v1/score for `seconds`; `fault()` runs (in a thread) once the load is on."""
    items = sorted(tiny_bundle().items)
    answers: list[Answer] = []
    stop = time.monotonic() + seconds

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.monotonic() < stop:
                body = {"user_id": f"drill-{n % 3}", "item_ids": items[n % 5 : n % 5 + 2]}
                sent = time.monotonic()
                r = await http.post("/v1/score", json=body)
                answers.append(Answer(sent, time.monotonic() - sent, r.status_code))
                await asyncio.sleep(0.02)

    async def drill() -> None:
        await asyncio.sleep(0.8)
        await asyncio.to_thread(fault)

    await asyncio.gather(drill(), *(client(n) for n in range(clients)))
    return answers


def first_ok_after(answers: list[Answer], t: float) -> float:
    """Seconds from `t` to the first request sent after it that got a 200."""
    oks = [a.sent + a.seconds for a in answers if a.sent >= t and a.status == 200]
    assert oks, "no 200 after the fault ended"
    return min(oks) - t


@pytest.fixture
def redis(tmp_path: Path) -> EmbeddedRedis:
    server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    yield server
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGCONT)  # never leave a stopped server behind
    server.stop()


def test_redis_frozen_under_load_is_503_within_the_timeout_then_recovers(redis: EmbeddedRedis) -> None:
    ended: list[float] = []

    def freeze() -> None:
        os.kill(redis.pid, signal.SIGSTOP)
        time.sleep(2.0)
        os.kill(redis.pid, signal.SIGCONT)
        ended.append(time.monotonic())

    settings = make_settings(redis.url, redis_timeout_ms=int(REDIS_TIMEOUT_S * 1000))
    with uvicorn_app(settings) as (_, url):
        answers = asyncio.run(load(url, seconds=5.5, clients=4, fault=freeze))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    statuses = {a.status for a in answers}
    assert statuses == {200, 503}, statuses  # frozen: 503s; before and after: 200s; nothing else
    assert max(a.seconds for a in answers) <= REDIS_BOUND_S, max(a.seconds for a in answers)
    assert first_ok_after(answers, ended[0]) <= RECOVERY_S
    assert counter(metrics, "rellax_errors_total", reason="history_store_unavailable") > 0
    assert counter(metrics, "rellax_requests_total", endpoint="/v1/score", status_class="5xx") > 0


class LatencyProxy:
    """A TCP proxy to Redis that holds every chunk `delay_s` (each way) while `delay_s` is set."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay_s = 0.0
        self.port = 0
        self._tasks: set[asyncio.Task] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while chunk := await reader.read(65536):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(chunk)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LatencyProxy]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self
            for task in self._tasks:  # connections still open: end them with the proxy
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


def test_slow_redis_is_slower_below_the_timeout_and_503_above_it(redis: EmbeddedRedis) -> None:
    """A proxy thread adds latency: 100 ms (under the 300 ms timeout) still answers 200, just
    later; 600 ms answers 503 within the bound; back to 0 and 200s return within 5 s."""
    import threading

    proxy = LatencyProxy(redis.port)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    done = asyncio.Event()

    async def serve_proxy() -> None:
        async with proxy.running():
            started.set()
            await done.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve_proxy(),), daemon=True)
    thread.start()
    assert started.wait(10)
    phases: dict[str, float] = {}

    def slow_down() -> None:
        phases["slow"] = time.monotonic()
        proxy.delay_s = 0.1
        time.sleep(1.5)
        phases["too_slow"] = time.monotonic()
        proxy.delay_s = 0.6
        time.sleep(2.5)
        proxy.delay_s = 0.0
        phases["ended"] = time.monotonic()

    settings = make_settings(
        f"redis://127.0.0.1:{proxy.port}/0", redis_timeout_ms=int(REDIS_TIMEOUT_S * 1000)
    )
    try:
        with uvicorn_app(settings) as (_, url):
            answers = asyncio.run(load(url, seconds=7.0, clients=3, fault=slow_down))
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(timeout=10)
    # Answers that started and ended inside one phase (a request straddling a switch is in neither).
    slow = [a for a in answers if phases["slow"] + 0.3 <= a.sent and a.sent + a.seconds <= phases["too_slow"]]
    too_slow = [
        a for a in answers if phases["too_slow"] + 0.7 <= a.sent and a.sent + a.seconds <= phases["ended"]
    ]
    assert {a.status for a in answers} <= {200, 503}
    assert slow and {a.status for a in slow} == {200}  # 2 x 100 ms per round trip: slower, served
    assert min(a.seconds for a in slow) >= 0.2
    assert too_slow and {a.status for a in too_slow} == {503}
    assert max(a.seconds for a in answers) <= REDIS_BOUND_S
    assert first_ok_after(answers, phases["ended"]) <= RECOVERY_S
    assert counter(metrics, "rellax_errors_total", reason="history_store_unavailable") > 0


def test_a_hanging_model_is_504_at_the_deadline_and_serving_resumes(redis: EmbeddedRedis) -> None:
    """The model thread stops returning (a stuck kernel, a deadlock): requests get 504 at their
    deadline, not a hang; readiness stays up (the process is fine; the queue's own limit sheds load);
    when the model returns, 200s again."""
    deadline_s = 1.0
    backend = GatedTorchBackend(tiny_bundle())
    ended: list[float] = []
    ready_while_hung: list[int] = []

    def hang() -> None:
        backend.gate.clear()
        time.sleep(1.5)
        ready_while_hung.append(httpx.get(f"{url}/readyz", timeout=5).status_code)
        time.sleep(1.0)
        backend.gate.set()
        ended.append(time.monotonic())

    settings = make_settings(redis.url, deadline_ms=int(deadline_s * 1000))
    with uvicorn_app(settings, backend=backend) as (_, url):
        answers = asyncio.run(load(url, seconds=5.5, clients=3, fault=hang))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert {a.status for a in answers} == {200, 504}
    assert ready_while_hung == [200]  # the process is fine: a restart would not help
    assert max(a.seconds for a in answers) <= deadline_s + 0.75, max(a.seconds for a in answers)
    assert first_ok_after(answers, ended[0]) <= RECOVERY_S
    assert counter(metrics, "rellax_errors_total", reason="deadline_exceeded") > 0
    assert counter(metrics, "rellax_requests_total", endpoint="/v1/score", status_class="5xx") > 0
