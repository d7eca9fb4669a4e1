"""What rellax's glibc malloc settings (`rellax/allocator.py`) change for CPU scoring.

    .venv/bin/python benchmarks/allocator.py [--candidates 32] [--k 15] [--rounds 3]

The scoring benchmark's workload (SmolLM2-135M, one ML-100K user's recency prompts, base model) is
scored in a worker thread, the way the service's model thread runs it, by child processes started
with glibc's defaults and with the tunables `rellax` starts itself with, alternating so a busy
machine slows both alike. Per process and dtype (fp32; bf16 too where the CPU has native bf16):
candidates/s over two passes after a warm-up, the minor page faults per candidate, the peak RSS,
and P(yes), which must not change. Writes benchmarks/results/allocator.json and allocator.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_io import save  # noqa: E402

from rellax import allocator  # noqa: E402
from rellax.precision import cpu_model, cpu_supports_bf16  # noqa: E402
from training.tables import markdown_table  # noqa: E402


def child(candidates: int, k: int, rows: list[int]) -> None:
    """Score the workload in a worker thread and print one JSON line per dtype."""
    import torch
    from scoring import workload
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rellax.assets import prepare_model
    from rellax.model_input import ModelInput
    from rellax.scorer import Scorer, ScoringModel
    from rellax.tokens import add_soft_tokens, answer_token_ids

    path = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    add_soft_tokens(tokenizer)
    _, prompts = workload(tokenizer, candidates, [k])
    texts = [ModelInput(p.input_ids) for p in prompts[k]]
    yes, no = answer_token_ids(tokenizer)
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_supports_bf16() else [])

    def run(out: list[dict]) -> None:
        for dtype, n_rows in ((d, r) for d in dtypes for r in rows):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            add_soft_tokens(tokenizer, model)
            scorer = Scorer(ScoringModel(model, yes, no), dtype=dtype)
            scorer.score(texts[:n_rows], max_batch=n_rows)  # warm-up
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for _ in range(2):
                p = scorer.score(texts, max_batch=n_rows)
            seconds = time.perf_counter() - start
            out.append({
                "dtype": str(dtype).removeprefix("torch."),
                "rows": n_rows,
                "candidates_per_s": round(2 * len(texts) / seconds, 3),
                "faults_per_candidate": round(
                    (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (2 * len(texts))
                ),
                "p_yes": [round(float(x), 7) for x in p],
            })  # fmt: skip

    out: list[dict] = []
    worker = threading.Thread(target=run, args=(out,), name="rellax-model")
    worker.start()
    worker.join()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for row in out:
        print(json.dumps({**row, "peak_rss_mb": round(peak_mb)}), flush=True)


def measure(env: dict[str, str], candidates: int, k: int, rows: list[int]) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", "--candidates", str(candidates), "--k", str(k),
           "--rows", ",".join(map(str, rows))]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rows", default="4,32", help="prompts per forward pass: the service's RELLAX_TORCH_ROWS, one pass"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    passes = [int(r) for r in args.rows.split(",")]
    if args.child:
        child(args.candidates, args.k, passes)
        return
    if not allocator.wanted({}):
        print("skipped: not a glibc Linux process, so rellax leaves the allocator alone")
        return
    base = {k: v for k, v in os.environ.items() if k not in (allocator.VARIABLE, allocator.SWITCH)}
    envs = {"glibc defaults": base, "rellax tunables": allocator.tuned_env(base)}
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs: dict[str, list[list[dict]]] = {name: [] for name in envs}
    for round_ in range(args.rounds):
        for name, env in envs.items():
            runs[name].append(measure(env, args.candidates, args.k, passes))
            print(f"round {round_ + 1} {name}: {runs[name][-1]}", flush=True)
    rows = []
    for name, rounds in runs.items():
        for i, (dtype, n_rows) in enumerate((r["dtype"], r["rows"]) for r in rounds[0]):
            per = [r[i] for r in rounds]
            same = per[0]["p_yes"] == runs["glibc defaults"][0][i]["p_yes"]
            rows.append({
                "allocator": name,
                "dtype": dtype,
                "rows": n_rows,
                "candidates_per_s": [r["candidates_per_s"] for r in per],
                "median_candidates_per_s": statistics.median(r["candidates_per_s"] for r in per),
                "faults_per_candidate": statistics.median(r["faults_per_candidate"] for r in per),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in per),
                "same_p_yes_as_defaults": same,
            })  # fmt: skip
    result = {
        "workload": {"candidates": args.candidates, "k": args.k, "rounds": args.rounds, "rows": passes},
        "tunables": allocator.TUNING,
        "rows": rows,
        "cpu": cpu_model(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "libc": " ".join(platform.libc_ver()),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    save(args.out, "allocator", result, render(result))


def render(result: dict) -> str:
    rows = result["rows"]
    base = {
        (r["dtype"], r["rows"]): r["median_candidates_per_s"]
        for r in rows
        if r["allocator"] == "glibc defaults"
    }
    table = [
        [
            r["allocator"], r["dtype"], str(r["rows"]), " / ".join(f"{x:.2f}" for x in r["candidates_per_s"]),
            f"{r['median_candidates_per_s']:.2f}",
            f"{r['median_candidates_per_s'] / base[(r['dtype'], r['rows'])]:.2f}x",
            str(r["faults_per_candidate"]), str(r["peak_rss_mb"]),
            "yes" if r["same_p_yes_as_defaults"] else "NO",
        ]
        for r in rows
    ]  # fmt: skip
    work = result["workload"]
    return "\n".join([
        f"# glibc malloc tunables for CPU scoring ({result['cpu']}, {result['libc']}, "
        f"load avg {result['load_avg_before'][0]} -> {result['load_avg_after'][0]})",
        "",
        f"SmolLM2-135M base model, {work['candidates']} candidates, K={work['k']} recency prompts, scored "
        f"in a worker thread in passes of `rows` prompts (4: the service's RELLAX_TORCH_ROWS; 32: one "
        f"pass, as offline scoring batches); {work['rounds']} child processes per allocator, alternating. "
        "Tunables: "
        f"`GLIBC_TUNABLES={':'.join(f'{k}={v}' for k, v in result['tunables'].items())}`.",
        "",
        markdown_table(
            ("allocator", "dtype", "rows per pass", "cand/s per process", "median", "vs defaults",
             "page faults / cand", "peak RSS MB", "same P(yes)"),
            table, align="llrrrrrrl",
        ),
        "",
        f"Wall time {result['wall_s']} s.",
        "",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
