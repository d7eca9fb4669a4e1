"""Throughput under concurrency: does the service keep its 1-client throughput with 32
clients, for small and large requests?

    .venv/bin/python benchmarks/concurrency.py [--bundle DIR] [--candidates 1,5,50] [--clients 1,32]

For each request size and client count: closed-loop clients (each sends its next request as soon as
the last one is answered) against `rellax serve` in a subprocess, over real HTTP and a private Redis
holding ML-100K's train+valid histories (benchmarks/service.py's set-up). After `--warmup-s`, a
`--window-s` window counts the candidates the model scored (`rellax_batch_size_sum` from /metrics:
a 50-candidate request at 32 clients takes minutes, so completed requests alone would say little)
and the requests answered. Target: at 32 clients >= 85% of the 1-client candidates/s for each size.
Writes benchmarks/results/concurrency.json and .md. Extra `RELLAX_*` settings for the server come from
`--env NAME=VALUE` (repeatable), so a batching change can be measured against the default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import save  # noqa: E402
from benchmarks.service import served, workload  # noqa: E402
from service.settings import default_bundle_path  # noqa: E402
from training.tables import markdown_table  # noqa: E402

TARGET = 0.85


def scored_candidates(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("rellax_batch_size_sum "):
            return float(line.split()[1])
    return 0.0


async def level(
    url: str, requests: list[tuple[str, list[int]]], clients: int, warmup_s: float, window_s: float
) -> dict:
    """Closed-loop `clients` over `requests` (cycled); candidates/s and requests/s in the window."""
    answered: list[tuple[float, int]] = []
    stop = time.monotonic() + warmup_s + window_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(n: int, http: httpx.AsyncClient) -> None:
        i = n
        while time.monotonic() < stop:
            user, items = requests[i % len(requests)]
            i += clients
            try:
                r = await http.post(
                    "/v1/score",
                    json={"user_id": user, "item_ids": items},
                    timeout=stop - time.monotonic() + 1,
                )
                answered.append((time.monotonic(), r.status_code))
            except httpx.TimeoutException:
                return  # the window ended with this request in flight

    async with httpx.AsyncClient(base_url=url, limits=limits) as http:
        tasks = [asyncio.create_task(client(n, http)) for n in range(clients)]
        await asyncio.sleep(warmup_s)
        start, c0 = time.monotonic(), await asyncio.to_thread(scored_candidates, url)
        await asyncio.sleep(window_s)
        end, c1 = time.monotonic(), await asyncio.to_thread(scored_candidates, url)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    in_window = [s for t, s in answered if start <= t <= end]
    return {
        "clients": clients,
        "window_s": round(end - start, 1),
        "candidates_per_s": round((c1 - c0) / (end - start), 3),
        "requests_per_s": round(len(in_window) / (end - start), 3),
        "non_200": sum(s != 200 for s in in_window),
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Throughput under concurrency ({result['bundle_version']})",
        "",
        f"Machine: {result['machine']}; server settings {result['env'] or 'default'}; closed-loop clients, "
        f"{result['warmup_s']} s warm-up then a {result['window_s']} s window per cell; candidates/s = "
        "what the model scored in the window (rellax_batch_size_sum).",
        "",
    ]
    cells = [
        (size["candidates"], lv["clients"], lv["candidates_per_s"], lv["requests_per_s"], lv["non_200"],
         f"{lv['share_of_one_client']:.0%}")
        for size in result["sizes"]
        for lv in size["levels"]
    ]  # fmt: skip
    columns = ("candidates/request", "clients", "cand/s", "req/s", "non-200", "share of 1 client")
    lines.append(markdown_table(columns, cells, align="rrrrrr"))
    met = ", ".join(f"{s['candidates']}: {'yes' if s['target_met'] else 'no'}" for s in result["sizes"])
    most = result["sizes"][0]["levels"][-1]["clients"]
    lines += ["", f"Target: at {most} clients >= {TARGET:.0%} of 1 client. Met: {met}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=default_bundle_path())
    ap.add_argument("--candidates", default="1,5,50")
    ap.add_argument("--clients", default="1,32")
    ap.add_argument("--warmup-s", type=float, default=15.0)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server (repeatable)")
    ap.add_argument("--name", default="concurrency")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").exists():
        sys.exit(f"no bundle at {args.bundle} (run `make demo` or pass --bundle)")
    env = dict(e.split("=", 1) for e in args.env)
    sizes, clients = [int(c) for c in args.candidates.split(",")], [int(c) for c in args.clients.split(",")]
    results = []
    with served(args.bundle, env) as (url, version):
        for size in sizes:
            requests = workload(64, size, seed=size)
            levels = []
            for c in clients:
                lv = asyncio.run(level(url, requests, c, args.warmup_s, args.window_s))
                print(json.dumps({"candidates": size, **lv}), flush=True)
                levels.append(lv)
            base = levels[0]["candidates_per_s"]
            for lv in levels:
                lv["share_of_one_client"] = round(lv["candidates_per_s"] / base, 3) if base else 0.0
            results.append(
                {
                    "candidates": size,
                    "levels": levels,
                    "target_met": levels[-1]["share_of_one_client"] >= TARGET,
                }
            )
    result = {
        "bundle": str(args.bundle),
        "bundle_version": version,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "env": env,
        "warmup_s": args.warmup_s,
        "window_s": args.window_s,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "sizes": results,
    }
    save(args.out, args.name, result, markdown(result))


if __name__ == "__main__":
    main()
