"""Scoring benchmark: naive transformers vs careful transformers vs the rellax runtime.

    .venv/bin/python benchmarks/scoring.py [--candidates 64] [--naive 4] [--ks 15 30]

One ML-100K user (the first test-split sample with at least 60 history items: its profile and
history), `--candidates` candidates (that sample's target plus seeded unseen catalogue items), real
prompts from `rellax.prompt.build_prompt` with recency selection, for each K. All three variants
read the very same token ids (the SPA prompts, K+1 placeholders included), so candidates/s compare
like for like:

(a) naive: transformers fp32, one candidate at a time, full-vocabulary logits at every position,
    softmax over the two answer logits at the last one (on the first `--naive` candidates only:
    it is slow, and its rate does not depend on how many there are);
(b) careful: transformers with weights in the fast dtype (bf16 where the CPU has native bf16, else
    fp32), all candidates in one left-padded batch with an
    attention mask and matching position ids, `logits_to_keep=1`;
(c) rellax: `Scorer` (the same dtype, in `rellax.precision`'s recipe: bf16 decoder linears, fp32
    residual stream; right padding, length buckets, two-row head) over a model with CFLoRA on every
    q_proj/v_proj (r=8, random B and gates, a random h per candidate) and a random SPA projector fed
    random 64-d "DIN" vectors;
(d) where (b)/(c) run in bf16: the same rellax runtime in fp32, which is what RELLAX_DTYPE=auto serves.

Precision per K, where the fast dtype is bf16: max and mean |P(yes)| of the base model (no random
adapters, which amplify any rounding) through `Scorer` in the bf16 recipe against fp32, on all
candidates; and, from benchmarks/results/precision.json when it has that K, the trained demo
bundle's AUC in bf16 - fp32 on 2,000 labelled test rows (`benchmarks/precision.py`).

Also measured in the same run: the matmul peak of each dtype used (square 2048^3 matmuls, best of
10; each row's "% of peak" is against its own dtype's peak) and the model FLOPs per candidate =
2 x (decoder linear weights) x tokens + causal attention 2 x layers x hidden x tokens^2; embedding
lookups and the head are not counted (the naive variant also computes the full-vocabulary head at
every position, which is wasted work, not useful FLOPs).
Writes benchmarks/results/scoring.json and scoring.md. The machine is shared: the load average
before and after is recorded, and figures taken under load are depressed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index.embed import resolve_dtype  # noqa: E402
from rellax.model_input import ModelInput  # noqa: E402
from rellax.precision import cpu_supports_bf16, cpu_supports_fp16  # noqa: E402
from rellax.prompt import Prompt, build_prompt  # noqa: E402
from rellax.tokens import add_soft_tokens, answer_token_ids  # noqa: E402
from training.tables import markdown_table  # noqa: E402

# (b) and (c) run in the dtype the service would pick here: bf16 only where the CPU has native bf16
# (on a CPU without it, emulated bf16 matmul measured 400x slower than fp32 and would say nothing).
FAST = resolve_dtype(torch.device("cpu"), None)


def _short(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return name.replace("bfloat16", "bf16").replace("float32", "fp32").replace("float16", "fp16")


FAST_NAME = _short(FAST)
VARIANTS = {
    "a": "(a) naive fp32, one at a time, full vocab",
    "b": f"(b) transformers {FAST_NAME}, batched, logits_to_keep=1",
    "c": f"(c) rellax runtime {FAST_NAME}, CFLoRA + SPA",
    **({"d": "(d) rellax runtime fp32, CFLoRA + SPA"} if torch.float32 != FAST else {}),
    **({"e": "(e) rellax runtime fp16, CFLoRA + SPA"} if cpu_supports_fp16() else {}),
}
VARIANT_DTYPE = {"a": torch.float32, "b": FAST, "c": FAST, "d": torch.float32, "e": torch.float16}
# Half-precision recipes compared with fp32 per K: each only where the CPU computes it natively.
HALF = [
    d for d, native in ((torch.bfloat16, cpu_supports_bf16()), (torch.float16, cpu_supports_fp16())) if native
]


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: torch.dtype = FAST) -> float:
    """Best GFLOP/s of an n^3 matmul in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def workload(
    tokenizer, n_candidates: int, ks: list[int], seed: int = 0
) -> tuple[dict, dict[int, list[Prompt]]]:  # noqa: ANN001
    """One user's profile and history, candidates, and the recency prompts for each K."""
    from data.loading import load_dataset

    data, samples, _ = load_dataset()
    items = {item.item_id: item for item in data.item_records()}
    test = samples.indices("test")
    i = int(test[np.argmax(samples.hist_len[test] >= 60)])
    hist_ids, ratings, _ = samples.history(i)
    history = [(items[int(a)], float(r)) for a, r in zip(hist_ids, ratings, strict=True)]
    profile = data.profile(samples.user_id(i))
    unseen = sorted(set(items) - set(int(a) for a in hist_ids) - {int(samples.item_id[i])})
    rng = np.random.default_rng(seed)
    candidates = [int(samples.item_id[i]), *rng.choice(unseen, n_candidates - 1, replace=False).tolist()]
    prompts = {
        k: [
            build_prompt(tokenizer, profile, history, items[c], k=k, mode="recency", spa=True)
            for c in candidates
        ]
        for k in ks
    }
    info = {"user_id": samples.user_id(i), "history_len": len(history), "candidates": len(candidates)}
    return info, prompts


def naive(model, prompts: list[Prompt], yes: int, no: int) -> np.ndarray:  # noqa: ANN001
    out = []
    with torch.inference_mode():
        for p in prompts:
            logits = model(input_ids=torch.tensor([p.input_ids])).logits  # (1, T, V): every position
            out.append(torch.softmax(logits[0, -1, [yes, no]].float(), dim=0)[0].item())
    return np.array(out)


def careful(model, prompts: list[Prompt], yes: int, no: int, pad: int) -> np.ndarray:  # noqa: ANN001
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding: the last position is every prompt's last token
        ids[row, width - len(p.input_ids) :] = torch.tensor(p.input_ids)
        mask[row, width - len(p.input_ids) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    device = next(model.parameters()).device  # the GPU check runs it on a GPU
    with torch.inference_mode():
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
            logits_to_keep=1,
        ).logits  # fmt: skip
    return torch.softmax(logits[:, -1, [yes, no]].float(), dim=1)[:, 0].cpu().numpy()


def build_runtime(base, tokenizer, gate_dim: int = 256, embed_dim: int = 64, dtype=FAST):  # noqa: ANN001, ANN201
    """The rellax runtime with CFLoRA and SPA on, random adapters (G != I, B != 0), in `dtype`."""
    from rellax.cflora import cflora_modules, inject_cflora
    from rellax.scorer import Scorer, ScoringModel
    from rellax.spa import SPAProjector

    lm = copy.deepcopy(base).float()
    inject_cflora(lm, r=8, alpha=16, dropout=0.05, gate_dim=gate_dim)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in cflora_modules(lm).values():
            m.lora_B.weight.normal_(0, 0.01, generator=g)
            m.gate[-1].weight.normal_(0, 0.05, generator=g)
    model = ScoringModel(lm, *answer_token_ids(tokenizer), spa=SPAProjector(embed_dim, lm.config.hidden_size))
    return Scorer(model, dtype=dtype, pad_id=tokenizer.pad_token_id or 0)


def base_precision(base, tokenizer, prompts: list[Prompt]) -> dict[str, dict[str, float]]:  # noqa: ANN001
    """Per half dtype: max / mean |P(yes) recipe - fp32| of the base model (no adapters) through
    `Scorer`."""
    from rellax.scorer import Scorer, ScoringModel

    yes, no = answer_token_ids(tokenizer)
    text = [ModelInput(p.input_ids) for p in prompts]  # the same ids, placeholders left as plain tokens
    p = {
        dtype: Scorer(ScoringModel(copy.deepcopy(base), yes, no), dtype=dtype).score(text)
        for dtype in (torch.float32, *HALF)
    }
    out = {}
    for dtype in HALF:
        gap = np.abs(p[dtype] - p[torch.float32])
        out[str(dtype).removeprefix("torch.")] = {
            "max": round(float(gap.max()), 4),
            "mean": round(float(gap.mean()), 4),
        }
    return out


def model_flops(model, tokens: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """Useful forward FLOPs per prompt: decoder linear layers + causal attention."""
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    return 2.0 * linear * tokens + 2.0 * cfg.num_hidden_layers * cfg.hidden_size * tokens.astype(float) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--naive", type=int, default=4, help="candidates scored by the slow variant (a)")
    parser.add_argument("--ks", type=int, nargs="+", default=[15, 30])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rellax.assets import prepare_model

    load_before = os.getloadavg()
    started = time.perf_counter()
    path = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    add_soft_tokens(tokenizer)
    yes, no = answer_token_ids(tokenizer)
    info, prompts = workload(tokenizer, args.candidates, args.ks)
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    add_soft_tokens(tokenizer, fp32)  # the placeholder ids exist (zero rows) for every variant
    fast = copy.deepcopy(fp32).to(FAST)
    runtimes = {"c": build_runtime(fp32, tokenizer)}
    for kind in ("d", "e"):
        if kind in VARIANTS:
            runtimes[kind] = build_runtime(fp32, tokenizer, dtype=VARIANT_DTYPE[kind])
    rng = np.random.default_rng(1)
    peaks = {dtype: matmul_peak(dtype=dtype) for dtype in set(VARIANT_DTYPE[v] for v in VARIANTS)}

    rows, checks = [], {}
    for k in args.ks:
        ps = prompts[k]
        tokens = np.array([len(p.input_ids) for p in ps])
        flops = model_flops(fp32, tokens)
        vectors = [rng.standard_normal((len(p.soft_positions), 64)).astype(np.float32) for p in ps]
        h = rng.standard_normal((len(ps), 256)).astype(np.float32)

        def run(kind: str, n: int, ps=ps, vectors=vectors, h=h) -> np.ndarray:  # noqa: ANN001
            if kind == "a":
                return naive(fp32, ps[:n], yes, no)
            if kind == "b":
                return careful(fast, ps[:n], yes, no, tokenizer.pad_token_id)
            return runtimes[kind].score(ps[:n], vectors[:n], h[:n])

        results = {}
        for kind, name in VARIANTS.items():
            n = args.naive if kind == "a" else len(ps)
            run(kind, 1 if kind == "a" else 2)  # warm-up on a few candidates
            start = time.perf_counter()
            results[kind] = run(kind, n)
            rate = n / (time.perf_counter() - start)
            achieved = float(flops[:n].mean()) * rate / 1e9
            peak = peaks[VARIANT_DTYPE[kind]]
            rows.append(
                {
                    "K": k,
                    "variant": name,
                    "dtype": _short(VARIANT_DTYPE[kind]),
                    "candidates": n,
                    "candidates_per_s": round(rate, 3),
                    "mean_tokens": round(float(tokens[:n].mean()), 1),
                    "gflop_per_candidate": round(float(flops[:n].mean()) / 1e9, 2),
                    "achieved_gflop_s": round(achieved, 1),
                    "pct_of_peak": round(100 * achieved / peak, 1),
                }
            )
            print(rows[-1], flush=True)
        gap = np.abs(results["a"] - results["b"][: args.naive]).max()
        checks[f"K={k}"] = {"max_abs_p_yes_a_vs_b": round(float(gap), 4)}
        if HALF:
            checks[f"K={k}"]["base_recipe_vs_fp32"] = base_precision(fp32, tokenizer, ps)
    by = {(r["K"], r["variant"][1]): r["candidates_per_s"] for r in rows}
    ratios = {
        f"K={k}": {
            "b_over_a": round(by[k, "b"] / by[k, "a"], 2),
            "c_over_a": round(by[k, "c"] / by[k, "a"], 2),
            "c_over_b": round(by[k, "c"] / by[k, "b"], 3),
        }
        for k in args.ks
    }
    load_after = os.getloadavg()
    result = {
        "workload": info,
        "dtype": FAST_NAME,
        "peak_gflop_s": {_short(dtype): round(value, 1) for dtype, value in peaks.items()},
        "rows": rows,
        "ratios": ratios,
        "checks": checks,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scoring.json").write_text(json.dumps(result, indent=2))
    table = render(result)
    (args.out / "scoring.md").write_text(table)
    print(table)


def render(result: dict) -> str:
    dtype = result.get("dtype", "bf16")  # results saved before the dtype was recorded ran bf16
    peaks = result.get("peak_gflop_s", result.get("peak_bf16_gflop_s"))
    if not isinstance(peaks, dict):  # saved before each dtype had its own peak
        peaks = {dtype: peaks}
    lines = [
        f"# Scoring benchmark (SmolLM2-135M, {result['cpus']} CPUs, {result['torch_threads']} threads, "
        f"load avg {result['load_avg_before'][0]} -> {result['load_avg_after'][0]})",
        "",
        f"One ML-100K user ({result['workload']['history_len']} history items), "
        f"{result['workload']['candidates']} candidates, recency prompts with SPA placeholders "
        "(the same ids for all variants). Matmul peak (2048^3): "
        + ", ".join(f"{name} {value} GFLOP/s" for name, value in peaks.items())
        + "; each row's % of peak is against its own dtype's peak.",
        "",
    ]
    fields = ("K", "variant", "candidates", "mean_tokens", "gflop_per_candidate", "candidates_per_s",
              "achieved_gflop_s", "pct_of_peak")  # fmt: skip
    columns = ("K", "variant", "candidates", "tokens", "GFLOP/cand", "cand/s", "GFLOP/s", "% of peak")
    lines.append(markdown_table(columns, [[r[f] for f in fields] for r in result["rows"]], align="rlrrrrrr"))
    ratios = [(k[2:], v["b_over_a"], v["c_over_a"], v["c_over_b"]) for k, v in result["ratios"].items()]
    lines += ["", markdown_table(("K", "(b)/(a)", "(c)/(a)", "(c)/(b)"), ratios, align="rrrr")]
    gaps = ", ".join(f"{k} {v['max_abs_p_yes_a_vs_b']}" for k, v in result["checks"].items())
    lines += [
        "",
        "FLOPs = 2 x decoder linear weights x tokens + causal attention (2 x layers x hidden x tokens^2); "
        "(a)'s full-vocabulary head is not counted. Figures are depressed when the load average "
        "exceeds the CPU count (other jobs share the cores); the peak is measured in the same run, "
        "so it is depressed too, but over a much shorter window than the model runs.",
        f"Max |P(yes) (a) fp32 - (b) {dtype}| (whole-model cast) on the naive candidates: {gaps}. "
        f"Wall time {result['wall_s']} s.",
        "",
    ]
    lines += _precision_lines(result)
    return "\n".join(lines)


def _precision_lines(result: dict) -> list[str]:
    """Per K and half dtype: the recipe against fp32 (base model, these candidates; the trained demo
    bundle's max |dP| and AUC on labelled rows from precision.json when it has that K and dtype).
    Targets 0.005 / 0.001."""
    base: dict[tuple[str, str], dict] = {}
    for k, v in result["checks"].items():
        if "base_bf16_recipe_vs_fp32" in v:  # saved before fp16 was measured
            base[k[2:], "bfloat16"] = v["base_bf16_recipe_vs_fp32"]
        for dtype, gap in v.get("base_recipe_vs_fp32", {}).items():
            base[k[2:], dtype] = gap
    saved = ROOT / "benchmarks" / "results" / "precision.json"
    trained: dict[tuple[str, str], tuple[dict, int]] = {}
    for r in json.loads(saved.read_text())["results"] if saved.exists() else []:
        if "versus_fp32" in r:
            for dtype, v in r["versus_fp32"].items():
                trained[str(r["K"]), dtype] = (v["abs_p_diff"]["max"], v["auc_minus_fp32"], r["rows"])
        else:  # saved before fp16 was measured: bf16 only
            trained[str(r["K"]), "bfloat16"] = (r["abs_p_diff"]["max"], r["auc_bf16_minus_fp32"], r["rows"])
    lines = [
        "Precision of the half-precision recipes (`rellax.precision`) against fp32, per K (targets: max "
        "|dP| <= 0.005, |dAUC| <= 0.001; RELLAX_DTYPE=auto serves fp32):",
        "",
    ]
    if not base and not trained:
        return []
    cells = []
    for k, dtype in sorted(base.keys() | trained.keys(), key=lambda kd: (int(kd[0]), kd[1])):
        gap = base.get((k, dtype))
        cell = "not measured (benchmarks/precision.py --ks K)"
        if (k, dtype) in trained:
            worst, d, n = trained[k, dtype]
            cell = f"{worst:.4f}, {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] on {n} rows"
        cells.append((k, dtype, "not measured" if gap is None else f"{gap['max']} / {gap['mean']}", cell))
    columns = ("K", "dtype", "base model, these candidates: max / mean abs dP",
               "trained demo bundle, test rows: max abs dP, dAUC [95% CI]")  # fmt: skip
    return [*lines, markdown_table(columns, cells, align="rlll"), ""]


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:  # rewrite the markdown from the saved JSON, no measuring
        saved = json.loads((ROOT / "benchmarks" / "results" / "scoring.json").read_text())
        (ROOT / "benchmarks" / "results" / "scoring.md").write_text(render(saved))
    else:
        main()
