"""How many prompts per forward pass suit this CPU (RELLAX_TORCH_ROWS)?

    .venv/bin/python benchmarks/torch_rows.py [--bundle DIR] [--candidates 64] [--rows 1,2,4,8,16,32,64]

Prepares `--candidates` real candidates (test-split users and items of ML-100K over their
train+valid history, as the service would) once, then scores the same list with the bundle's torch
runtime in length-sorted chunks of each size, twice each (the better run counts), and reports
candidates/s and the share of padded tokens. On a GPU bigger is better; on a small CPU the attention
and activations of a big chunk spill out of the caches. Writes benchmarks/results/torch_rows.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import save  # noqa: E402
from service.settings import default_bundle_path  # noqa: E402
from training.tables import markdown_table  # noqa: E402


def prepared_inputs(bundle, n: int) -> list:  # noqa: ANN001
    """`n` model inputs from real users: test-split candidates over each user's train+valid history
    (benchmarks/service.py's workload and `rellax load-history`'s histories)."""
    from benchmarks.service import workload
    from rellax.entities import Profile
    from service.cli import history_records

    records, _ = history_records(("train", "valid"), None)
    users = {r.user_id: r for r in records}
    inputs = []
    for user, items in workload(n, 1, seed=7):
        record = users[user]
        prepared = bundle.prepare(record.profile or Profile(), list(record.events), items, user_id=user)
        inputs.append(prepared[0].model_input)
    return inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=default_bundle_path())
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    from rellax.bundle import Bundle
    from rellax.scorer import length_buckets

    bundle = Bundle.load(args.bundle, dtype=args.dtype)
    inputs = prepared_inputs(bundle, args.candidates)
    lengths = [len(x.input_ids) for x in inputs]
    bundle.score_inputs(inputs[:4], max_rows=4)  # warm-up
    rows_out = []
    for rows in [int(r) for r in args.rows.split(",")]:
        padded = sum(len(idx) * lengths[idx[0]] for idx in length_buckets(lengths, rows, 1 << 30))
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            bundle.score_inputs(inputs, max_rows=rows)
            best = min(best, time.perf_counter() - t)
        row = {
            "rows": rows,
            "candidates_per_s": round(len(inputs) / best, 3),
            "padded_share": round(1 - sum(lengths) / padded, 4),
        }
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    top = max(rows_out, key=lambda r: r["candidates_per_s"])
    result = {
        "bundle_version": bundle.model_version,
        "dtype": str(bundle.dtype),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "candidates": len(inputs),
        "mean_tokens": round(float(np.mean(lengths)), 1),
        "min_max_tokens": [min(lengths), max(lengths)],
        "results": rows_out,
        "best_rows": top["rows"],
    }
    lines = [
        f"# Prompts per forward pass ({result['bundle_version']}, {result['dtype']})",
        "",
        f"{result['machine']}; {len(inputs)} real candidates, {result['mean_tokens']} tokens on average "
        f"({result['min_max_tokens'][0]}-{result['min_max_tokens'][1]}); best of 2 runs each.",
        "",
        markdown_table(
            ("rows per pass", "cand/s", "padded tokens"),
            [(r["rows"], r["candidates_per_s"], f"{r['padded_share']:.1%}") for r in rows_out],
            align="rrr",
        ),
        "",
        f"Fastest: {top['rows']} rows per pass.",
        "",
    ]
    save(args.out, "torch_rows", result, "\n".join(lines))


if __name__ == "__main__":
    main()
