"""SUBR benchmark: exact vs hnsw latency, hnsw recall, and item-embedding throughput.

    .venv/bin/python benchmarks/subr.py [--calls 200] [--catalogue 20000] [--embed-items 96]

1. Catalogues. `ml100k`: the item index `rellax index build` saved (1,682 SmolLM2 final-layer
   vectors, 512 dims); when it is missing, the same pipeline over SmolLM2's input token embeddings
   stands in, and the results say so. `synthetic`: a larger catalogue (default 20,000 items) made by
   mixing pairs of ML-100K vectors plus a little noise, so it keeps the real spectrum; without it, a
   10,000-item history would cover most of ML-100K and a "filtered" search would filter nothing.
   Its hnsw graph uses the package defaults and is cached under <cache>/bench.
2. Latency of `subr_positions` (whole call: id lookup, scoring, top-k, chronological order) for
   histories of 100, 1,000 and 10,000 items, K = 15 and 30: p50/p99 over `--calls` random
   (history, candidate) draws, plus hnsw recall@K against exact on the same draws. Histories are
   drawn from the catalogue without repeats when it is large enough, with repeats otherwise.
   `exact x32` is `subr_positions_many` for 32 candidates of one history, per candidate.
3. Recall of hnsw against exact on 400 real ML-100K test-split (history, candidate) pairs.
4. Embedding throughput of SmolLM2 over the first `--embed-items` item texts: fp32, bf16 autocast,
   and a bf16 copy of the weights.
Writes benchmarks/results/subr.json and subr.md and prints the table. The machine's load average is
recorded: on a shared 2-core box the absolute numbers move with it, the ratios much less.
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

from data.loading import artefact_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rellax.item_index import ItemIndex, fit_pca  # noqa: E402
from rellax.paths import cache_dir  # noqa: E402
from rellax.subr import subr_positions, subr_positions_many  # noqa: E402
from training.tables import markdown_table  # noqa: E402

SIZES = (100, 1_000, 10_000)
KS = (15, 30)
MANY = 32


def ml100k_index() -> tuple[ItemIndex, str]:
    """The built index, or the token-embedding stand-in when `rellax index build` has not run."""
    folder = artefact_dir("index", "ml100k")
    if (folder / "meta.json").exists():
        return ItemIndex.load(folder), f"SmolLM2 final layer ({folder})"
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from data.loading import load_dataset
    from index.embed import item_text
    from rellax.assets import prepare_model

    items = load_dataset()[0].item_records()
    tokenizer = AutoTokenizer.from_pretrained(prepare_model())
    with safe_open(str(prepare_model() / "model.safetensors"), "np") as weights:
        table = weights.get_tensor("model.embed_tokens.weight")
    raw = np.stack([table[tokenizer(item_text(it), add_special_tokens=False)["input_ids"]].mean(0)
                    for it in items])  # fmt: skip
    mean, comps, _ = fit_pca(raw, 512)
    index = ItemIndex.from_vectors([it.item_id for it in items], (raw - mean) @ comps.T)
    return index, "SmolLM2 input token embeddings (stand-in: run `rellax index build` for the real ones)"


def synthetic_index(base: ItemIndex, n: int, seed: int = 0) -> tuple[ItemIndex, float]:
    """n items mixed from random pairs of `base` vectors plus noise; graph cached. (index, build s)."""
    folder = cache_dir("bench") / f"synthetic-{n}-{base.dim}-{seed}-{base.vectors[:4].sum():.6f}"
    if (folder / "meta.json").exists():
        index = ItemIndex.load(folder)
        return index, float(index.meta["build_seconds"])
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(base), (2, n))
    w = rng.uniform(0.2, 0.8, (n, 1)).astype(np.float32)
    mixed = w * base.vectors[i] + (1 - w) * base.vectors[j]
    mixed += rng.standard_normal(mixed.shape).astype(np.float32) * (0.3 / np.sqrt(base.dim))
    started = time.perf_counter()
    index = ItemIndex.from_vectors(np.arange(n) + 1, mixed, num_threads=os.cpu_count() or 1)
    seconds = time.perf_counter() - started
    index.meta["build_seconds"] = seconds
    index.save(folder)
    return index, seconds


def draw(index: ItemIndex, n: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    history = rng.choice(index.item_ids, size=n, replace=n > len(index) // 2)
    return history, int(rng.choice(index.item_ids))


def latency(index: ItemIndex, n: int, k: int, calls: int, seed: int) -> dict:
    """Wall p50/p99 and CPU p50 (ms) per method, and hnsw recall@k vs exact, on the same draws.

    Methods alternate call by call, as SUBR calls alternate with other work in the service; CPU time
    (`process_time`) is what the call costs, wall time adds what the machine's load makes it wait.
    """
    rng = np.random.default_rng(seed)
    draws = [draw(index, n, rng) for _ in range(calls)]
    for history, cand in draws[:5]:  # warm caches and code paths
        subr_positions(index, history, cand, k, "exact")
        subr_positions(index, history, cand, k, "hnsw")
    wall: dict[str, list[float]] = {"exact": [], "hnsw": [], f"exact x{MANY}": []}
    cpu: dict[str, list[float]] = {m: [] for m in wall}
    recall = []
    for history, cand in draws:
        got = {}
        for method in ("exact", "hnsw"):
            t, c = time.perf_counter(), time.process_time()
            got[method] = subr_positions(index, history, cand, k, method)
            wall[method].append(time.perf_counter() - t)
            cpu[method].append(time.process_time() - c)
        recall.append(len(np.intersect1d(got["exact"], got["hnsw"])) / len(got["exact"]))
    for history, _ in draws[: max(1, calls // 10)]:
        cands = rng.choice(index.item_ids, size=MANY)
        t, c = time.perf_counter(), time.process_time()
        subr_positions_many(index, history, cands, k)
        wall[f"exact x{MANY}"].append((time.perf_counter() - t) / MANY)
        cpu[f"exact x{MANY}"].append((time.process_time() - c) / MANY)
    out = {
        m: {
            "p50_ms": float(np.percentile(wall[m], 50) * 1e3),
            "p99_ms": float(np.percentile(wall[m], 99) * 1e3),
            "cpu_p50_ms": float(np.percentile(cpu[m], 50) * 1e3),
        }
        for m in wall
    }
    out["hnsw"]["recall"] = float(np.mean(recall))
    return out


def real_history_recall(index: ItemIndex, pairs: int = 400) -> dict[str, float]:
    from data.loading import load_dataset

    _, samples, _ = load_dataset()
    test = samples.indices("test")
    picks = np.random.default_rng(0).choice(test, pairs, replace=False)
    out = {}
    for k in KS:
        hits = []
        for i in picks:
            history, cand = samples.history(int(i))[0], int(samples.item_id[i])
            exact = subr_positions(index, history, cand, k, "exact")
            hnsw = subr_positions(index, history, cand, k, "hnsw")
            hits.append(len(np.intersect1d(exact, hnsw)) / max(1, len(exact)))
        out[f"K={k}"] = float(np.mean(hits))
    return out


def embedding_throughput(n_items: int) -> dict[str, float]:
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.loading import load_dataset
    from index.embed import cpu_supports_bf16, embed_texts, item_text
    from rellax.assets import prepare_model

    texts = [item_text(it) for it in load_dataset()[0].item_records()[:n_items]]
    model = AutoModelForCausalLM.from_pretrained(prepare_model()).eval()
    tokenizer = AutoTokenizer.from_pretrained(prepare_model())
    variants = {"float32 (reference)": (model, torch.float32)}
    if cpu_supports_bf16():
        variants["bfloat16 autocast (embed_texts default here)"] = (model, torch.bfloat16)
        variants["bfloat16 weights (model.to(bfloat16))"] = (copy.deepcopy(model).to(torch.bfloat16), None)
    embed_texts(model, tokenizer, texts[:8], dtype=torch.float32, progress=False)  # warm-up
    out = {}
    for name, (variant, dtype) in variants.items():
        started = time.perf_counter()
        embed_texts(variant, tokenizer, texts, batch_size=64, dtype=dtype, progress=False)
        out[name] = len(texts) / (time.perf_counter() - started)
    return out


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"# SUBR benchmark ({machine['cpu_count']} CPUs, load average {machine['load_before']} -> "
        f"{machine['load_after']}, {result['calls']} calls per cell)",
        "",
        "One `subr_positions` call in ms: wall p50/p99 and CPU-time p50. `exact x32` is "
        "`subr_positions_many` with 32 candidates, per candidate.",
        "",
    ]
    cells = []
    for row in result["latency"]:
        e, h, m = row["exact"], row["hnsw"], row[f"exact x{MANY}"]
        row_cells = [row["catalogue"], f"{row['history']:,}", row["k"]]
        row_cells += [e["p50_ms"], e["p99_ms"], e["cpu_p50_ms"], h["p50_ms"], h["p99_ms"], h["cpu_p50_ms"]]
        row_cells += [f"{h['recall']:.4f}", m["p50_ms"], m["cpu_p50_ms"]]
        cells.append([f"{c:.3f}" if isinstance(c, float) else c for c in row_cells])
    columns = ("catalogue", "history", "K", "exact p50", "exact p99", "exact cpu", "hnsw p50", "hnsw p99",
               "hnsw cpu", "hnsw recall@K", f"exact x{MANY} p50", f"exact x{MANY} cpu")  # fmt: skip
    lines.append(markdown_table(columns, cells, align="l" + "r" * 11))
    cat = result["catalogues"]
    lines += [
        "",
        f"Catalogues: ml100k = {cat['ml100k']['items']:,} items, vectors: {cat['ml100k']['vectors']}; "
        f"synthetic = {cat['synthetic']['items']:,} items (pairs of ml100k vectors mixed + noise), hnsw "
        f"build {cat['synthetic']['build_seconds']:.1f} s. hnsw: {cat['hnsw']}.",
        "",
        "hnsw recall@K against exact on 400 real ML-100K test-split histories: "
        + ", ".join(f"{k} {v:.4f}" for k, v in result["real_history_recall"].items()),
        "",
    ]
    rates = [(name, f"{rate:.1f}") for name, rate in result["embedding_items_per_s"].items()]
    if build := result.get("index_build"):
        rates.append((f"full `rellax index build` ({build['items']} items, {build['dtype']})",
                      f"{build['items_per_s']:.1f}"))  # fmt: skip
    what = f"embedding (SmolLM2-135M, first {result['embed_items']} ML-100K items, batch 64)"
    lines.append(markdown_table((what, "items/s"), rates, align="lr"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--catalogue", type=int, default=20_000)
    parser.add_argument("--embed-items", type=int, default=96)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    load_before = round(os.getloadavg()[0], 2)

    base, vectors = ml100k_index()
    synthetic, build_s = synthetic_index(base, args.catalogue)
    rows = []
    for name, index in (("ml100k", base), ("synthetic", synthetic)):
        for n in SIZES:
            for k in KS:
                rows.append({"catalogue": name, "history": n, "k": k,
                             **latency(index, n, k, args.calls, seed=n + k)})  # fmt: skip
                done = rows[-1]
                print(f"{name} n={n} k={k}: exact p50 {done['exact']['p50_ms']:.3f} ms, "
                      f"hnsw p50 {done['hnsw']['p50_ms']:.3f} ms", file=sys.stderr, flush=True)  # fmt: skip
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_before": load_before},
        "calls": args.calls,
        "catalogues": {
            "ml100k": {"items": len(base), "dim": base.dim, "vectors": vectors},
            "synthetic": {"items": len(synthetic), "dim": synthetic.dim, "build_seconds": build_s},
            "hnsw": base.meta.get("hnsw"),
        },
        "latency": rows,
        "real_history_recall": real_history_recall(base),
        "embed_items": args.embed_items,
        "embedding_items_per_s": embedding_throughput(args.embed_items),
    }
    if "embed_seconds" in base.meta:
        result["index_build"] = {"items": len(base), "dtype": base.meta.get("embed_dtype"),
                                 "items_per_s": len(base) / base.meta["embed_seconds"]}  # fmt: skip
    result["machine"]["load_after"] = round(os.getloadavg()[0], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "subr.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "subr.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
