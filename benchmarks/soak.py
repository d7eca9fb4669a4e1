"""Soak: the real service under steady load for minutes, watching for what only time shows.

    .venv/bin/python benchmarks/soak.py [--bundle DIR] [--minutes 10] [--load 0.7]

1. A private redis-server; `rellax serve` in a subprocess on a free port (benchmarks/service.py's).
2. Seeds 50 users with 30 events each through the ingest API (items from the bundle's catalogue).
3. Capacity: closed-loop /v1/score requests from `--clients` clients for `--capacity-s` seconds.
4. Soak: open-loop (Poisson) arrivals at `--load` x capacity for `--minutes`; 1 in 10 is an event
   ingest, the rest 5-candidate scores. Every window (`--window-s`) it samples the server's RSS, open
   file descriptors and threads (/proc), Redis' connected clients (INFO), and the window's latency
   p50/p99, statuses and errors.
5. Verdicts: RSS and fd (not socket) growth from the first window to the last, most sockets and Redis
   connections, p99 drift
   (last window / first), errors (anything but 200). Saved as JSON + markdown under
   benchmarks/results/ (`--name`, default soak). `make test` runs a 30-second version of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import save  # noqa: E402
from benchmarks.service import start_server  # noqa: E402
from service.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from service.settings import default_bundle_path  # noqa: E402
from training.tables import markdown_table  # noqa: E402

USERS, EVENTS_PER_USER, CANDIDATES = 50, 30, 5
MAX_OUTSTANDING = 512  # the load generator's own bound: an arrival beyond it counts as shed


@dataclass
class Window:
    """What one window's requests saw, and the server's state at its end."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    shed: int = 0


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (MB), open fds and threads of a Linux process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed between the listing and the read
            continue
    sockets = sum(t.startswith("socket:") for t in targets)
    return {
        "rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "fds": len(targets) - sockets,  # files, pipes, eventfds: these must stay flat
        "sockets": sockets,  # client keep-alive connections + Redis pool: bounded, not flat
        "threads": int(fields["Threads"]),
    }


def redis_clients(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("clients")["connected_clients"]) - 1  # not this probe itself
    finally:
        client.close()


def catalogue(bundle: Path) -> list[int]:
    return sorted(int(d["item_id"]) for d in json.loads((bundle / "items.json").read_text()))


class Load:
    """The request mix, over one keep-alive pool; every answer lands in the current window."""

    def __init__(self, client: httpx.AsyncClient, items: list[int], seed: int = 0) -> None:
        self.client, self.items = client, items
        self.rng = np.random.default_rng(seed)
        self.window = Window()
        self.clock = 2_000_000_000  # event timestamps keep rising: every ingest adds one event
        self.outstanding = 0

    async def one(self) -> None:
        self.outstanding += 1
        user = f"soak-{int(self.rng.integers(USERS))}"
        try:
            t = time.perf_counter()
            if self.rng.random() < 0.1:
                self.clock += 1
                event = {"item_id": int(self.rng.choice(self.items)), "rating": 4, "timestamp": self.clock}
                r = await self.client.post(f"/v1/users/{user}/events", json={"events": [event]})
            else:
                items = [int(i) for i in self.rng.choice(self.items, CANDIDATES, replace=False)]
                r = await self.client.post("/v1/score", json={"user_id": user, "item_ids": items})
            status = str(r.status_code)
            self.window.latencies.append(time.perf_counter() - t)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        finally:
            self.outstanding -= 1
        self.window.statuses[status] = self.window.statuses.get(status, 0) + 1


async def seed(client: httpx.AsyncClient, items: list[int]) -> None:
    rng = np.random.default_rng(1)
    for u in range(USERS):
        picks = rng.choice(items, EVENTS_PER_USER, replace=False)
        events = [
            {"item_id": int(i), "rating": int(rng.integers(1, 6)), "timestamp": 1_000_000_000 + 60 * n}
            for n, i in enumerate(picks)
        ]
        r = await client.post(f"/v1/users/soak-{u}/events", json={"events": events})
        r.raise_for_status()


async def capacity(load: Load, clients: int, seconds: float) -> float:
    """Requests/s the service sustains with `clients` always waiting on it."""
    stop = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < stop:
            await load.one()

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    done = sum(load.window.statuses.values())
    load.window = Window()
    return done / (time.perf_counter() - start)


async def soak(load: Load, rate: float, seconds: float, window_s: float, sample) -> tuple[list[dict], dict]:  # noqa: ANN001
    """Poisson arrivals at `rate`/s for `seconds`; `sample()` gives the server's state per window."""
    windows, tasks = [], set()
    start = time.monotonic()
    next_window = start + window_s
    arrival = start
    while (now := time.monotonic()) < start + seconds:
        arrival += float(load.rng.exponential(1 / rate))
        if arrival > now:
            await asyncio.sleep(arrival - now)
        if load.outstanding >= MAX_OUTSTANDING:
            load.window.shed += 1
        else:
            task = asyncio.create_task(load.one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if time.monotonic() >= next_window:
            windows.append(summarize(load.window, time.monotonic() - start, await asyncio.to_thread(sample)))
            load.window = Window()
            next_window += window_s
    await asyncio.gather(*tasks)
    # The requests still in flight at the end: counted (errors are errors), but too few for a p99.
    tail = summarize(load.window, time.monotonic() - start, await asyncio.to_thread(sample))
    return windows, tail


def summarize(window: Window, at_s: float, state: dict) -> dict:
    lat = np.array(window.latencies or [0.0]) * 1000
    return {
        "at_s": round(at_s, 1),
        "requests": sum(window.statuses.values()),
        "statuses": dict(sorted(window.statuses.items())),
        "shed": window.shed,
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        **state,
    }


def run(
    bundle: Path,
    seconds: float,
    load_share: float = 0.7,
    clients: int = 8,
    capacity_s: float = 20.0,
    window_s: float = 30.0,
    env: dict[str, str] | None = None,
) -> dict:
    """The whole soak; returns its result (see the module docstring)."""
    items = catalogue(bundle)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis", persist=False) as redis:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        server = start_server(bundle, redis.url, port, log, {"RELLAX_DTYPE": "auto", **(env or {})})
        try:

            def sample() -> dict:
                return {**proc_stats(server.pid), "redis_clients": redis_clients(redis.url)}

            async def main() -> dict:
                limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
                async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                    await seed(client, items)
                    load = Load(client, items)
                    cap = await capacity(load, clients, capacity_s)
                    before = await asyncio.to_thread(sample)
                    windows, tail = await soak(load, load_share * cap, seconds, window_s, sample)
                return {"capacity_rps": round(cap, 2), "before": before, "windows": windows, "tail": tail}

            measured = asyncio.run(main())
            version = httpx.get(f"{url}/readyz", timeout=10).json()["model_version"]
        finally:
            server.terminate()
            server.wait(timeout=60)
    windows = measured["windows"]
    first, last = windows[0], windows[-1]
    statuses: dict[str, int] = {}
    for w in [*windows, measured["tail"]]:
        for k, v in w["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "bundle": str(bundle),
        "bundle_version": version,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "seconds": seconds,
        "load_share": load_share,
        "capacity_rps": measured["capacity_rps"],
        "offered_rps": round(load_share * measured["capacity_rps"], 2),
        "answered_rps": round(sum(w["requests"] for w in windows) / windows[-1]["at_s"], 2),
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "errors": sum(v for k, v in statuses.items() if k != "200"),
        "shed": sum(w["shed"] for w in [*windows, measured["tail"]]),
        "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
        "fd_growth": last["fds"] - first["fds"],
        "thread_growth": last["threads"] - first["threads"],
        # Thread pools (asyncio's default executor, anyio's worker threads) start threads lazily, up to
        # their caps, when calls overlap: more under a busy CPU. A leak keeps growing after that.
        "thread_growth_second_half": last["threads"] - windows[len(windows) // 2]["threads"],
        "max_sockets": max(w["sockets"] for w in windows),
        "max_redis_clients": max(w["redis_clients"] for w in windows),
        "p99_drift": round(last["p99_ms"] / max(first["p99_ms"], 1e-3), 2),
        "before_load": measured["before"],
        "windows": windows,
        "tail": measured["tail"],
    }


def markdown(result: dict) -> str:
    r = result
    lines = [
        f"# Soak: {r['seconds'] / 60:.1f} min at {r['load_share']:.0%} of capacity",
        "",
        f"Bundle `{r['bundle_version']}` on {r['machine']}; capacity {r['capacity_rps']} req/s "
        f"(closed loop), offered {result['offered_rps']} req/s (Poisson; 1 in 10 an event ingest, the rest "
        f"5-candidate scores), answered {result['answered_rps']} req/s.",
        "",
        f"- requests {result['requests']}, errors (not 200) {result['errors']}, shed by the load generator "
        f"{result['shed']}; statuses {result['statuses']}",
        f"- RSS growth first -> last window: {result['rss_growth_mb']} MB; open fds (not sockets) "
        f"{r['fd_growth']:+d}; threads {r['thread_growth']:+d}; most sockets {r['max_sockets']} "
        f"(client pool of 64 + Redis); most Redis connections {result['max_redis_clients']}",
        f"- p99 drift (last window / first): {result['p99_drift']}x",
        "",
    ]
    fields = ("at_s", "requests", "p50_ms", "p99_ms", "rss_mb", "fds", "sockets", "threads", "redis_clients",
              "statuses")  # fmt: skip
    columns = ("at s", "requests", "p50 ms", "p99 ms", "RSS MB", "fds", "sockets", "threads", "Redis conns",
               "statuses")  # fmt: skip
    cells = [[w[f] for f in fields] for w in result["windows"]]
    lines.append(markdown_table(columns, cells, align="r" * 9 + "l"))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=default_bundle_path())
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--load", type=float, default=0.7, help="share of the measured capacity to offer")
    ap.add_argument("--clients", type=int, default=8, help="closed-loop clients for the capacity run")
    ap.add_argument("--capacity-s", type=float, default=30.0)
    ap.add_argument("--window-s", type=float, default=30.0)
    ap.add_argument("--name", default="soak")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").exists():
        sys.exit(f"no bundle at {args.bundle} (run `make demo` or pass --bundle)")
    result = run(args.bundle, args.minutes * 60, args.load, args.clients, args.capacity_s, args.window_s)
    save(args.out, args.name, result, markdown(result))


if __name__ == "__main__":
    main()
