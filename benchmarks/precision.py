"""Precision benchmark: one bundle served in fp32, bf16 and fp16 on the same test rows.

    .venv/bin/python benchmarks/precision.py [--bundle DIR] [--rows 2000] [--ks 15]

For each K: the same seeded ML-100K test rows (`training.fewshot.eval_rows`, seed 1234, the rows
`rellax eval` scores) go through the serving path (`Bundle.prepare`: SUBR, prompt, DIN h, SPA) once,
and the prepared inputs are scored by the bundle loaded with dtype="float32", "float16" and (where
the CPU has native bf16) "bfloat16" (`rellax.precision`'s recipe for both half dtypes). Reported per
half dtype against fp32: AUC and LogLoss of each, the paired bootstrap 95% interval of AUC(half) -
AUC(fp32), LogLoss(half) - LogLoss(fp32), max / p99 / mean |P(yes) half - fp32| and candidates/s of
each. Targets: |dP| <= 0.005 and |dAUC| <= 0.001.

Batch invariance, per dtype: one user (196, the README's example) with its latest history; a
candidate it has not rated scored alone, beside one other candidate, and inside a 50-candidate
request; the largest move of its P(yes) (float noise only: fp32 should stay below 1e-5).

Resumable: scores are saved every `--chunk` rows under the cache (`precision-bench/`), so a killed
run picks up where it stopped. Writes benchmarks/results/precision.json and precision.md.
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

from data.loading import artefact_dir, load_dataset  # noqa: E402
from rellax import allocator  # noqa: E402
from rellax.bundle import Bundle  # noqa: E402
from rellax.entities import HistoryEvent  # noqa: E402
from rellax.paths import cache_dir  # noqa: E402
from rellax.precision import cpu_model, cpu_supports_bf16  # noqa: E402
from training.fewshot import eval_rows  # noqa: E402
from training.llm.data import Catalogue  # noqa: E402
from training.metrics import ctr_metrics, paired_bootstrap_auc_diff  # noqa: E402
from training.tables import markdown_table  # noqa: E402

HALF = ("bfloat16", "float16")
TARGET_P, TARGET_AUC = 0.005, 0.001


def prepare_rows(bundle: Bundle, rows: np.ndarray, k: int) -> list:
    """Model inputs of each (user, candidate) row through the serving path."""
    data, samples, _ = load_dataset()
    profiles = Catalogue.from_tables(data).profiles
    out = []
    for r in rows:
        items, ratings, stamps = samples.history(int(r))
        history = [
            HistoryEvent(int(i), float(x), int(t)) for i, x, t in zip(items, ratings, stamps, strict=True)
        ]
        uid = samples.user_id(int(r))
        (prepared,) = bundle.prepare(profiles[uid], history, [int(samples.item_id[r])], k=k, user_id=str(uid))
        out.append(prepared.model_input)
    return out


def batch_invariance(bundles: dict[str, Bundle], user: int = 196, crowd: int = 50) -> dict[str, dict]:
    """Per dtype: P(yes) of one unseen candidate alone, in a pair and in a `crowd`-candidate request."""
    data, samples, _ = load_dataset()
    profiles = Catalogue.from_tables(data).profiles
    row = int(np.flatnonzero(samples.user_ids[samples.user_row] == user)[-1])  # the user's latest sample
    items, ratings, stamps = samples.history(row)
    history = [HistoryEvent(int(i), float(x), int(t)) for i, x, t in zip(items, ratings, stamps, strict=True)]
    seen = {int(i) for i in items}
    unseen = [i for i in sorted(bundles["float32"].items) if i >= 50 and i not in seen]
    target, neighbour, others = unseen[0], unseen[1], unseen[2:crowd]
    requests = {"alone": [target], "pair": [target, neighbour], "crowd": [*others[:24], target, *others[24:]]}
    out = {}
    for dtype, bundle in bundles.items():
        p = {}
        for name, ids in requests.items():
            prepared = bundle.prepare(profiles[user], history, ids, user_id=str(user))
            p[name] = float(bundle.score_prepared(prepared)[ids.index(target)])
        out[dtype] = {**p, "max_abs_move": max(abs(p[n] - p["alone"]) for n in ("pair", "crowd"))}
    return {"user": user, "item": target, "crowd": len(requests["crowd"]), "by_dtype": out}


def score_resumable(bundle: Bundle, inputs: list, store: Path, chunk: int) -> tuple[np.ndarray, float]:
    """P(yes) for every input, `chunk` at a time, saved after each chunk; (scores, seconds)."""
    done = np.load(store) if store.exists() else {"p": np.zeros(0), "seconds": np.zeros(1)}
    p, seconds = list(done["p"]), float(done["seconds"][0])
    while len(p) < len(inputs):
        batch = inputs[len(p) : len(p) + chunk]
        started = time.perf_counter()
        p.extend(bundle.score_inputs(batch).tolist())
        seconds += time.perf_counter() - started
        np.savez(store, p=np.array(p), seconds=np.array([seconds]))
        print(f"  {bundle.dtype}: {len(p)}/{len(inputs)} rows, {len(p) / seconds:.2f} rows/s", flush=True)
    return np.array(p), seconds


def versus_fp32(labels: np.ndarray, scores: dict[str, np.ndarray], metrics: dict, half: str) -> dict:
    """One half-precision run against the fp32 reference on the same rows: paired AUC interval,
    LogLoss difference, |dP| and whether both targets are met."""
    gap = np.abs(scores[half] - scores["float32"])
    auc = paired_bootstrap_auc_diff(labels, scores[half], scores["float32"])
    logloss = metrics[half]["logloss"] - metrics["float32"]["logloss"]
    return {
        "auc_minus_fp32": auc,
        "logloss_minus_fp32": logloss,
        "abs_p_diff": {
            "max": float(gap.max()),
            "p99": float(np.percentile(gap, 99)),
            "mean": float(gap.mean()),
        },
        "meets": {"p_yes": bool(gap.max() <= TARGET_P), "auc": bool(abs(auc["diff"]) <= TARGET_AUC)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=artefact_dir("bundles", "demo"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--ks", type=int, nargs="+", default=[15])
    parser.add_argument("--chunk", type=int, default=250)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    dtypes = ["float32", "float16"] + (["bfloat16"] if cpu_supports_bf16() else [])
    if "bfloat16" not in dtypes:
        print("this CPU has no native bf16 (AMX / AVX-512-BF16): bf16 would be emulated, not measured")
    bundles = {dtype: Bundle.load(args.bundle, dtype=dtype) for dtype in dtypes}
    _, samples, _ = load_dataset()
    rows = eval_rows(samples, "test", args.rows, seed=1234)
    labels = samples.label[rows].astype(np.int64)
    work = cache_dir("precision-bench") / bundles["float32"].model_version
    work.mkdir(parents=True, exist_ok=True)
    invariance = batch_invariance(bundles)
    print(json.dumps(invariance, indent=2), flush=True)
    report = {
        "bundle": str(args.bundle),
        "batch_invariance": invariance,
        "model_version": bundles["float32"].model_version,
        "seed": 1234,
        "targets": {"max_abs_p_yes": TARGET_P, "abs_auc": TARGET_AUC},
        "results": [],
        "cpu": cpu_model(),
        "malloc_tuned": allocator.is_tuned(),  # GLIBC_TUNABLES as `rellax` sets them (README)
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    for k in args.ks:
        inputs = prepare_rows(bundles["float32"], rows, k)
        scores, seconds = {}, {}
        for dtype, bundle in bundles.items():
            scores[dtype], seconds[dtype] = score_resumable(
                bundle, inputs, work / f"k{k}-{dtype}-{args.rows}.npz", args.chunk
            )
        metrics = {dtype: ctr_metrics(labels, scores[dtype]) for dtype in dtypes}
        report["results"].append(
            {
                "K": k,
                "rows": int(len(rows)),
                "metrics": metrics,
                "rows_per_s": {dtype: len(rows) / seconds[dtype] for dtype in dtypes},
                "versus_fp32": {
                    half: versus_fp32(labels, scores, metrics, half) for half in HALF if half in scores
                },
            }
        )
        print(json.dumps(report["results"][-1], indent=2), flush=True)
        # each finished K is written at once: a run stopped during the next K keeps this one
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "precision.json").write_text(json.dumps(report, indent=2))
        (args.out / "precision.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    lines = [
        f"# Precision benchmark: the same bundle in fp32, fp16 and bf16 "
        f"({report['cpu']}, {report['cpus']} CPUs)",
        "",
        f"Bundle {report['model_version']}, the seeded test rows of `rellax eval` (seed {report['seed']}), "
        "served through `Bundle.prepare` + `score_inputs`; fp16 and bf16 are `rellax.precision`'s "
        "recipe (decoder linears in the half dtype; embeddings, norms, residual stream, head, CFLoRA "
        "and SPA in fp32).",
        "",
    ]
    cells = []
    for r in report["results"]:
        m, speed = r["metrics"], r["rows_per_s"]
        fp32 = m["float32"]
        cells.append((r["K"], r["rows"], "float32", f"{fp32['auc']:.4f}", "", f"{fp32['logloss']:.4f}",
                      "", "", f"{speed['float32']:.2f}", ""))  # fmt: skip
        for half, v in r["versus_fp32"].items():
            d, gap = v["auc_minus_fp32"], v["abs_p_diff"]
            cells.append((
                r["K"], r["rows"], half, f"{m[half]['auc']:.4f}",
                f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]",
                f"{m[half]['logloss']:.4f}", f"{v['logloss_minus_fp32']:+.4f}",
                f"{gap['max']:.4f} / {gap['p99']:.4f} / {gap['mean']:.4f}", f"{speed[half]:.2f}",
                f"{'met' if v['meets']['p_yes'] else 'missed'} / {'met' if v['meets']['auc'] else 'missed'}",
            ))  # fmt: skip
    columns = (
        "K", "rows", "dtype", "AUC", "dAUC vs fp32 [95% CI]", "LogLoss", "dLogLoss",
        "max / p99 / mean abs dP", "rows/s", "targets dP / dAUC",
    )  # fmt: skip
    lines.append(markdown_table(columns, cells, align="rrlrlrrlrl"))
    t = report["targets"]
    lines += [
        "",
        f"Targets: max abs dP <= {t['max_abs_p_yes']}, abs dAUC <= {t['abs_auc']}. "
        "RELLAX_DTYPE=auto serves fp32.",
    ]
    inv = report.get("batch_invariance")
    if inv:
        lines += [
            "",
            f"Batch invariance: user {inv['user']}, item {inv['item']} (not rated by the user), scored "
            f"alone, in a pair and inside a {inv['crowd']}-candidate request:",
            "",
            markdown_table(
                ("dtype", "alone", "pair", "crowd", "max abs move"),
                [
                    (d, *(f"{v[c]:.6f}" for c in ("alone", "pair", "crowd")), f"{v['max_abs_move']:.1e}")
                    for d, v in inv["by_dtype"].items()
                ],
                align="lrrrr",
            ),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
