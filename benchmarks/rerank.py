"""Re-ranking benchmark: rellax vs llmsrec vs cascade on /v1/rerank, one run, one machine.

    .venv/bin/python benchmarks/rerank.py [--bundle DIR] [--sizes 100,500] [--requests 3] [--m 10]

A private redis-server gets ML-100K's train+valid histories (`rellax load-history`'s code path);
`rellax serve` starts on the bundle (it must hold `llmsrec/`: `make demo` builds one) with
RELLAX_MAX_CANDIDATES raised to the largest size. Per candidate-list size, the same requests (a
seeded test-split user, candidates drawn from the catalogue outside that user's history) go through
each strategy, one at a time (concurrency 1: latency, not queueing). Reported per (strategy, size):
latency mean / p50 / max, candidates/s, and the speed-up of each strategy over pure ReLLaX.
The ranking quality of the same strategies (NDCG@10, HR@10, on the same users) is
`rellax experiment ranking`'s (docs/results/ranking.json), shown beside when present.
Writes benchmarks/results/rerank.json and rerank.md.
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
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import save  # noqa: E402
from benchmarks.service import served  # noqa: E402
from service.settings import default_bundle_path  # noqa: E402
from training.tables import markdown_table  # noqa: E402

STRATEGIES = ("rellax", "llmsrec", "cascade")


def workload(n_requests: int, size: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """(user id, `size` candidates outside the user's train+valid history), seeded."""
    from data.loading import load_dataset

    _, samples, _ = load_dataset()
    test = samples.indices("test")
    users = sorted({samples.user_id(int(i)) for i in test})
    seen: dict[int, set[int]] = {}
    for split in ("train", "valid"):
        for i in samples.indices(split):
            seen.setdefault(samples.user_id(int(i)), set()).add(int(samples.item_id[i]))
    catalogue = np.unique(samples.item_id)
    rng = np.random.default_rng(seed)
    out = []
    for u in rng.choice(users, n_requests, replace=False):
        pool = [int(i) for i in catalogue if int(i) not in seen.get(int(u), set())]
        out.append((str(u), [int(x) for x in rng.choice(pool, size, replace=False)]))
    return out


async def drive(url: str, requests: list[tuple[str, list[int]]], strategy: str, m: int) -> dict:
    latencies, stages = [], []
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        for user, items in requests:
            body = {"user_id": user, "item_ids": items, "strategy": strategy}
            if strategy == "cascade":
                body["m"] = m
            t = time.perf_counter()
            r = await client.post("/v1/rerank", json=body)
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"{strategy}: {r.status_code} {r.text[:300]}")
            stages.append(r.json()["timing"]["stages_ms"])
    lat = np.array(latencies)
    size = len(requests[0][1])
    return {
        "strategy": strategy,
        "candidates": size,
        "requests": len(requests),
        "latency_s": {
            "mean": round(float(lat.mean()), 3),
            "p50": round(float(np.median(lat)), 3),
            "max": round(float(lat.max()), 3),
        },  # fmt: skip
        "candidates_per_s": round(size / float(lat.mean()), 2),
        "user_pass_ms_mean": round(float(np.mean([s.get("user_pass", 0.0) for s in stages])), 1),
        "model_ms_mean": round(float(np.mean([s.get("model", 0.0) for s in stages])), 1),
    }


def markdown(result: dict) -> str:
    lines = [
        f"# /v1/rerank by strategy ({result['machine']}, bundle {result['bundle_version']}, "
        f"cascade m={result['m']}, {result['requests']} requests each, concurrency 1)",
        "",
        markdown_table(
            ("candidates", "strategy", "mean latency s", "p50 s", "candidates/s", "vs rellax",
             "user pass ms"),
            [
                (row["candidates"], row["strategy"], f"{row['latency_s']['mean']:.3f}",
                 f"{row['latency_s']['p50']:.3f}", f"{row['candidates_per_s']:.1f}",
                 f"{row['speedup_vs_rellax']:.1f}x faster", f"{row['user_pass_ms_mean']:.1f}")
                for row in result["rows"]
            ],
            align="rlrrrrr",
        ),
    ]  # fmt: skip
    target = result.get("target")
    if target:
        lines += ["", f"Target (cascade m=10 at 500 candidates >= 20x faster than rellax): "
                  f"{target['speedup']:.1f}x, {'met' if target['met'] else 'not met'}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=default_bundle_path())
    ap.add_argument("--sizes", default="100,500")
    ap.add_argument("--requests", type=int, default=3, help="requests per (strategy, size)")
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if not (args.bundle / "llmsrec").is_dir():
        sys.exit(f"{args.bundle} has no llmsrec/ (run `make demo` or `rellax export --llmsrec DIR`)")
    sizes = [int(s) for s in args.sizes.split(",")]
    env = {"RELLAX_DTYPE": args.dtype, "RELLAX_MAX_CANDIDATES": str(max(sizes)), "RELLAX_MAX_BATCH": "8"}
    rows = []
    with served(args.bundle, env) as (url, version):
        warm = workload(1, 20, seed=99)
        for strategy in STRATEGIES:
            asyncio.run(drive(url, warm, strategy, args.m))
        for size in sizes:
            requests = workload(args.requests, size)
            base = None
            for strategy in STRATEGIES:
                row = asyncio.run(drive(url, requests, strategy, args.m))
                base = base or row["latency_s"]["mean"]
                row["speedup_vs_rellax"] = round(base / row["latency_s"]["mean"], 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {
        "bundle": str(args.bundle),
        "bundle_version": version,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other processes share these cores
        "dtype": args.dtype,
        "m": args.m,
        "requests": args.requests,
        "rows": rows,
    }
    at500 = [r for r in rows if r["candidates"] == 500 and r["strategy"] == "cascade"]
    if at500 and args.m == 10:
        result["target"] = {
            "speedup": at500[0]["speedup_vs_rellax"],
            "met": at500[0]["speedup_vs_rellax"] >= 20,
        }
    save(args.out, "rerank", result, markdown(result))


if __name__ == "__main__":
    main()
