"""docs/results.md from the quality study's JSON files (never typed by hand).

Reads every `<step>.json` the experiment wrote, recomputes paired bootstrap intervals from the
saved per-row predictions (same rows for every model), draws the learning curves, and says which
of issue 6's targets are met and by how much each is missed. Steps that have not finished yet are
listed as pending, so a partial study still renders honestly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.metrics import null_auc_se, paired_bootstrap_auc_diff
from training.study.config import ExperimentConfig, is_batch_step, serves_as_rellax
from training.study.tune_report import machines_note, tune_section
from training.tables import markdown_table

__all__ = ["load_results", "render"]

CHANCE = "chance"  # a constant score: AUC 0.5 on every resample, so "x - chance" is x's AUC - 0.5
# (label, a, b): the comparisons the conclusions rest on, AUC(a) - AUC(b) on the same rows.
COMPARISONS = (
    ("DIN - LR on prompt features", "DIN", "LR on prompt features"),
    ("ReLLaX - DIN", "rellax", "DIN"),
    ("ReLLaX - CFLoRA only (what SPA adds)", "rellax", "cflora"),
    ("ReLLaX - SPA only (what CFLoRA adds)", "rellax", "spa"),
    ("zero-shot SUBR - zero-shot recency", "zero-shot-subr", "zero-shot-recency"),
    ("zero-shot recency - chance", "zero-shot-recency", CHANCE),
    ("zero-shot SUBR - chance", "zero-shot-subr", CHANCE),
    ("+SPA - ReLLa", "spa", "rella"),
    ("+CFLoRA - ReLLa", "cflora", "rella"),
    ("ReLLaX - ReLLa", "rellax", "rella"),
    ("identity gate init - random init", "rellax", "rellax-random-init"),
    ("exact CFLoRA - merged (mean gate)", "rellax", "rellax-merged"),
    ("one stage - two stages (paper)", "rellax", "rellax-two-stage"),
    ("ReLLaX - DIN (hold-out, the DIN it reads)", "rellax", "DIN (hold-out)"),
    ("ReLLaX - LR on prompt features", "rellax", "LR on prompt features"),
    ("ReLLa - LR on prompt features", "rella", "LR on prompt features"),
    ("ReLLa - zero-shot SUBR", "rella", "zero-shot-subr"),  # did stage 1 move its starting point?
)
# Steps a study runs only when asked: a comparison that needs one is "not in this run's plan", not
# "not measured yet", unless the run's config asked for it.
OPTIONAL = {
    "zero-shot-recency": ("--zero-shot recency", lambda cfg: "recency" in cfg.get("zero_shot", ())),
    "DIN (hold-out)": ("--din-holdout", lambda cfg: bool(cfg.get("din_holdout"))),
}
TARGETS = (
    ("ReLLaX >= DIN on test AUC", "rellax", "DIN"),
    ("zero-shot SUBR >= zero-shot recency", "zero-shot-subr", "zero-shot-recency"),
    ("SPA is a positive gain over ReLLa", "spa", "rella"),
    ("CFLoRA is a positive gain over ReLLa", "cflora", "rella"),
)
ABLATION_NOTE = (
    "`spa`, `cflora`, `rellax` and `rellax-random-init` are one-stage runs: LoRA A, B trained together "
    "with the SPA projector and/or the CFLoRA gates from step 0, on the same prompts and steps as "
    "`rella`, so each differs from it in its modules only. `rellax-two-stage` is the paper's order: "
    "SPA + gates trained over the finished `rella` run with A, B frozen. `rellax-merged` is `rellax` "
    "served with CFLoRA folded in at the mean gate (the vLLM path). `rellax-bf16` is `rellax` "
    "trained again in the bf16 recipe the other ablations trained in (`rellax` trained in fp32 on an "
    "fp32-only machine): the like-for-like ReLLaX of the `..., bf16 rerun` comparisons."
)
# ReLLa paper, ML-1M test AUC (docs/design.md §12): typed once, read by both the footer and the reading.
PAPER_AUC = {
    "DIN": 0.7962,
    "SIM": 0.7992,
    "Vicuna-13B zero-shot": 0.6993,
    "ReLLa with <1% of the data": 0.7927,
    "ReLLa with <10%": 0.8033,
}
PAPER = (
    "ReLLa paper, ML-1M test AUC (design.md §12): "
    + ", ".join(f"{k} {v}" for k, v in PAPER_AUC.items())
    + "."
)
# The paper's pattern as differences from its DIN, to set beside ours: (what, AUC - DIN AUC).
PAPER_VS_DIN = tuple(
    (what, PAPER_AUC[key] - PAPER_AUC["DIN"])
    for what, key in (
        ("zero-shot", "Vicuna-13B zero-shot"),
        ("ReLLa, <1% of the data", "ReLLa with <1% of the data"),
    )
)
LARGER_N = 16_384  # the issue's "larger N if training throughput allows"


def load_results(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """{model name: record} (baselines split into their models; 'rella' = the selected N) and the
    experiment's status file."""
    status = (
        json.loads((folder / "experiment.json").read_text()) if (folder / "experiment.json").exists() else {}
    )
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        if path.name in ("experiment.json", "ranking.json"):  # the status, and the rankers (own section)
            continue
        record = json.loads(path.read_text())
        if record["step"] == "baselines":
            for name, model in record["models"].items():
                records[name] = {**model, "step": name, "rows_hash": record["rows_hash"]}
        else:
            records[record["step"]] = record
    hashes = {r["rows_hash"] for r in records.values()}
    if len(hashes) > 1:
        raise ValueError(f"results in {folder} were scored on different test rows: {sorted(hashes)}")
    sweep = [r for name, r in records.items() if name.startswith("rella-n")]
    if sweep:  # the stage-1 model the rest builds on: best validation AUC, never test
        records["rella"] = max(sweep, key=lambda r: r["valid_auc"])
    return records, status


def _labels(folder: Path) -> np.ndarray | None:
    from data.loading import load_dataset
    from training.fewshot import eval_rows

    status = json.loads((folder / "experiment.json").read_text())
    cfg = status["config"]
    _, samples, _ = load_dataset()
    rows = eval_rows(samples, "test", cfg["test_rows"], seed=cfg["test_seed"])
    return samples.label[rows].astype(np.int64)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _row(name: str, r: dict[str, Any]) -> list[str]:
    t = r["test"]
    return [
        name,
        _fmt(t["auc"]),
        _fmt(t["logloss"]),
        _fmt(t["accuracy"]),
        _fmt(r.get("valid_auc")),
        _fmt(r.get("trainable_params")),
        _fmt(r.get("train_examples")),
        _fmt(r.get("train_seconds"), 0),
        _fmt(r.get("samples_per_s"), 2),
        _dtypes(r),
    ]


def _dtypes(r: dict[str, Any]) -> str:
    """ "trained / scored" dtypes of an LLM step. Records from before `score_dtype` was kept were
    scored in the recipe they trained in (the study then loaded its base as training did)."""
    trained = _trained_dtype(r)
    scored = r.get("score_dtype") or trained
    return f"{trained} / {scored}" if trained else (scored or "–")


_COLUMNS = (
    "model", "test AUC", "LogLoss", "accuracy", "valid AUC (selection)", "trainable params",
    "train examples", "train s", "samples/s", "dtype (train / test)",
)  # fmt: skip


def _table(rows: list[list[str]]) -> str:
    return markdown_table(_COLUMNS, rows, align="l" + "r" * 8 + "l")


def _diff_table(what: str, diffs: dict[str, dict[str, float]], name: str = "AUC diff") -> str:
    cells = [[k, f"{v['diff']:+.4f}", f"[{v['lo']:+.4f}, {v['hi']:+.4f}]"] for k, v in diffs.items()]
    return markdown_table((what, name, "95% interval"), cells, align="lrl")


def _trained_dtype(r: dict[str, Any]) -> str | None:
    """The dtype an LLM step trained in ("cpu/bfloat16" -> "bfloat16"); None for models without one."""
    return r.get("device", "").rpartition("/")[2] or None


def _mixed_dtypes(records: dict[str, dict[str, Any]], diffs: dict[str, dict[str, float]]) -> list[str]:
    """The measured comparisons whose two LLM runs trained in different dtypes."""
    out = []
    for label, a, b in _comparisons(records):
        if (a, b) == ("rellax-bf16", "rellax"):  # the comparison that measures the dtype itself
            continue
        if label in diffs and b in records:
            ta, tb = _trained_dtype(records[a]), _trained_dtype(records[b])
            if ta and tb and ta != tb:
                out.append(f"{label} ({a} {ta}, {b} {tb})")
    return out


def _din_drift(records: dict[str, dict[str, Any]]) -> list[str]:
    """The LLM steps that read another DIN than the DIN rows' (retrained after a lost cache: the
    same recipe, other last digits), each with that DIN's own test AUC on these rows."""
    scored = {records[n].get("sha256") for n in ("DIN", "DIN (hold-out)") if n in records}
    other = {
        n: r["din"] for n, r in records.items()
        if n != "rella" and r.get("din") and r["din"]["sha256"] not in scored
    }  # fmt: skip
    if not other:
        return []
    what = "; ".join(
        f"{n} (DIN {d['sha256'][:8]}, test AUC {d['test_auc']:.4f})" for n, d in sorted(other.items())
    )
    row = f"{records['DIN']['test']['auc']:.4f}" if "DIN" in records else "–"
    return [
        "",
        f"Read a DIN retrained from the same recipe on another machine, not the DIN row's ({row}): {what}.",
    ]


def _machines(records: dict[str, dict[str, Any]]) -> list[str]:
    """Where each LLM step trained and was scored (recorded since 2026-12-08; earlier steps say so)."""
    where = {}
    for name, r in records.items():
        if "score_seconds" not in r or name == "rella":  # 'rella' repeats the selected rella-n* step
            continue
        trained, scored = r.get("cpu", ""), r.get("score_cpu", "")
        if not trained and not scored:
            where[name] = "not recorded (run before the study recorded the CPU)"
        elif not r.get("train_examples") or trained == scored or not scored:
            where[name] = trained or scored
        else:
            where[name] = f"trained on {trained or 'an unrecorded CPU'}, scored on {scored}"
    return machines_note(where)


def _comparisons(records: dict[str, dict[str, Any]]) -> tuple[tuple[str, str, str], ...]:
    """COMPARISONS, plus each K-sweep run against DIN and against the main ReLLaX run's K, each
    N-sweep run against DIN and against the run at its K on the default N, and, once `rellax-bf16`
    exists, every comparison of `rellax` with a run trained in another dtype again with it."""
    base = records.get("rellax", {}).get("k")
    sweep = sorted((r["k"], n) for n, r in records.items() if n.startswith("rellax-k"))
    extra = [(f"ReLLaX K={k} - DIN", n, "DIN") for k, n in sweep]
    extra += [(f"ReLLaX K={k} - K={base}", n, "rellax") for k, n in sweep if base is not None]
    at_k = {k: n for k, n in sweep} | ({base: "rellax"} if base is not None else {})
    for n, r in sorted(records.items()):
        if n.startswith("rellax-n"):
            extra.append((f"ReLLaX N={r['n_rows']:,} (K={r['k']}) - DIN", n, "DIN"))
            if r["k"] in at_k:
                shorter = records[at_k[r["k"]]]
                label = f"ReLLaX N={r['n_rows']:,} - N={shorter['n_rows']:,} (K={r['k']})"
                extra.append((label, n, at_k[r["k"]]))
    for n, r in sorted(records.items()):
        if is_batch_step(n):
            extra.append((f"ReLLaX B={_batch(r)} (K={r['k']}) - DIN", n, "DIN"))
            if r["k"] in at_k:
                label = f"ReLLaX B={_batch(r)} - B={_batch(records[at_k[r['k']]])} (K={r['k']})"
                extra.append((label, n, at_k[r["k"]]))
    best = _best_rellax(records)
    if best and not any((x, y) == (best[0], "DIN") for _, x, y in (*COMPARISONS, *extra)):
        extra.append((f"{best[0]} - DIN (the ReLLaX run with the best valid AUC)", best[0], "DIN"))
    found = (*COMPARISONS, *extra)
    if "rellax-bf16" not in records:
        return found
    rerun = [("ReLLaX bf16 recipe - fp32 recipe (same run otherwise)", "rellax-bf16", "rellax")]
    own = _trained_dtype(records["rellax-bf16"])
    for label, a, b in found:
        if "rellax" in (a, b) and (other := b if a == "rellax" else a) in records:
            theirs = _trained_dtype(records[other])
            if theirs and theirs == own != _trained_dtype(records["rellax"]):
                swap = ("rellax-bf16", b) if a == "rellax" else (a, "rellax-bf16")
                rerun.append((f"{label}, bf16 rerun", *swap))
    return (*found, *rerun)


def _diffs(records: dict[str, dict[str, Any]], labels: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for label, a, b in _comparisons(records):
        if a in records and (b in records or b == CHANCE):
            pa = np.asarray(records[a]["predictions"])
            pb = np.zeros_like(pa) if b == CHANCE else np.asarray(records[b]["predictions"])
            out[label] = paired_bootstrap_auc_diff(labels, pa, pb, n_boot=1000, seed=0)
    return out


def _trained(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The runs that trained, each once: 'rella' repeats a rella-n run, and the merged run reuses
    rellax's curve."""
    return {n: r for n, r in records.items() if n not in ("rella", "rellax-merged") and r.get("curve")}


def _curves(
    records: dict[str, dict[str, Any]],
    path: Path,
    valid_rows: int = 512,
    progress: dict[str, dict[str, Any]] | None = None,
) -> bool:
    """Valid AUC against examples seen, with the scale to read it by: DIN's valid AUC, and the band
    a valid AUC of a no-skill model falls in (0.5 +- 2 standard errors). Unfinished runs
    (`progress`) are drawn dashed, so a curve is visible in the sessions it spans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    staged = [(n, r["curve"], False) for n, r in _trained(records).items() if r.get("curve")]
    staged += [(n, p["curve"], True) for n, p in (progress or {}).items() if p.get("curve")]
    if not staged:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    plotted = set()  # the panels with a run on them
    for name, curve, unfinished in staged:
        ax = axes[0] if name.startswith("rella-") else axes[1]  # LoRA only | with DIN's signal
        plotted.add(ax)
        xs = [p["examples"] for p in curve]
        style = {"linestyle": "--", "marker": "s"} if unfinished else {"marker": "o"}
        label = f"{name} (in progress)" if unfinished else name
        ax.plot(xs, [p["valid_auc"] for p in curve], label=label, **style)
    noise = 2 * null_auc_se(valid_rows)
    for ax, title in zip(axes, ("ReLLa (LoRA, text only)", "with DIN's signal (SPA / CFLoRA)"), strict=True):
        band = f"chance +- 2 SE ({valid_rows} rows)"
        ax.axhspan(0.5 - noise, 0.5 + noise, color="grey", alpha=0.15, label=band)
        if "DIN" in records and records["DIN"].get("valid_auc") is not None:
            ax.axhline(records["DIN"]["valid_auc"], color="black", linestyle="--", linewidth=1, label="DIN")
        ax.set_title(title if ax in plotted else f"{title}: not run yet")
        ax.set_xlabel("training examples seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(folder: Path = Path("docs/results"), out: Path = Path("docs/results.md")) -> str:
    """Write docs/results.md (and the learning-curve PNG beside it); returns the markdown."""
    records, status = load_results(folder)
    labels = _labels(folder)
    cfg = status.get("config", {})
    valid_rows = int(cfg.get("valid_rows", 512))
    lines = [
        "# Model quality on MovieLens-100K",
        "",
        "Generated by `rellax experiment report` from the JSON files in `docs/results/` (written by "
        "`rellax experiment ml100k`); do not edit by hand.",
        "",
        f"Test rows: {len(labels):,} of the temporal test split (seed {cfg.get('test_seed')}), the same rows "
        f"for every model (rows hash `{next(iter(records.values()))['rows_hash'] if records else '-'}`); "
        f"label rate {labels.mean():.3f}. K = {cfg.get('k')} unless the K sweep says otherwise; "
        "LLM = SmolLM2-135M-Instruct.",
        "",
        "## Main table",
        "",
    ]
    order = [
        "DIN",
        "DIN (hold-out)",
        "LR one-hot",
        "user+item mean prior",
        "LR on prompt features",
        "zero-shot-recency",
        "zero-shot-subr",
        *sorted(
            (n for n in records if n.startswith("rella-n")), key=lambda n: int(n.removeprefix("rella-n"))
        ),
        "spa",
        "cflora",
        "rellax",
    ]
    lines.append(_table([_row(n, records[n]) for n in order if n in records]))
    steps = (
        "rella", "spa", "cflora", "rellax", "rellax-bf16", "rellax-random-init", "rellax-merged",
        "rellax-two-stage",
    )  # fmt: skip
    ablation = [_row(n, records[n]) for n in steps if n in records]
    lines += ["", "## Ablation", ""]
    lines.append(_table(ablation) if ablation else "Not run yet.")
    if "rella" in records:
        lines += ["", f"`rella` is `{records['rella']['step']}` (LoRA only). " + ABLATION_NOTE]
    sweep = {r["k"]: r for n, r in records.items() if n.startswith("rellax-k")}
    if "rellax" in records:
        sweep.setdefault(records["rellax"]["k"], records["rellax"])
    if len(sweep) > 1:
        lines += ["", "## K sweep (ReLLaX, same rows and recipe)", ""]
        lines.append(_table([_row(f"K={k}", sweep[k]) for k in sorted(sweep)]))
    lines += _sweep_section(
        records, "N sweep", lambda n: n.startswith("rellax-n"), lambda r: f"K={r['k']}, N={r['n_rows']:,}"
    )
    lines += _sweep_section(records, "Batch sweep", is_batch_step, lambda r: f"K={r['k']}, B={_batch(r)}")
    diffs = _diffs(records, labels)
    lines += ["", "## Paired bootstrap, AUC(a) - AUC(b), 1,000 resamples of the same rows", ""]
    lines.append(_diff_table("comparison", diffs))
    missing, unplanned = [], []
    for label, a, b in COMPARISONS:
        if label in diffs:
            continue
        flag = next((OPTIONAL[n][0] for n in (a, b) if n in OPTIONAL and not OPTIONAL[n][1](cfg)), None)
        if flag:
            unplanned.append(f"{label} (`{flag}`)")
        else:
            missing.append(label)
    if missing:
        lines += ["", f"Not measured yet: {'; '.join(missing)}."]
    if unplanned:
        lines += ["", f"Not in this study's plan (the option that adds it): {'; '.join(unplanned)}."]
    lines += _din_drift(records)
    lines += _machines(records)
    mixed = _mixed_dtypes(records, diffs)
    if mixed:
        lines += ["", "Trained in different dtypes, so the difference mixes the recipe's dtype with the "
                  f"method (every model is scored in the same dtype): {'; '.join(mixed)}."]  # fmt: skip
    # A step is finished when its JSON is here, whatever the last invocation said about it.
    pending = [
        name for name, state in status.get("status", {}).items()
        if state != "not needed" and not (folder / f"{name}.json").exists()
    ]  # fmt: skip
    # Unfinished runs' curves so far, as the last `rellax experiment ml100k` saved them.
    progress = {n: p for n, p in status.get("progress", {}).items() if n in pending}
    if _curves(records, out.parent / "learning_curves.png", valid_rows, progress):
        lines += [
            "",
            "## Learning curves",
            "",
            "![validation AUC against training examples](learning_curves.png)",
        ]
    lines += tune_section(folder / "tune", out.parent)
    lines += ranking_section(folder / "ranking.json")
    lines += ["", "## Reading", ""]
    lines += _reading(records, diffs, valid_rows, float(labels.mean()))
    lines += _beyond_din(records, labels)
    lines += _progress_reading(progress, valid_rows, float(labels.mean()), len(labels))
    if pending:
        why = "not run yet, or paused mid-way; `rellax experiment ml100k` resumes them"
        lines += ["", f"Pending steps ({why}): {', '.join(pending)}."]
    lines += ["", PAPER, ""]
    text = "\n".join(lines)
    out.write_text(text)
    return text


def _sweep_section(
    records: dict[str, dict[str, Any]],
    title: str,
    member: Callable[[str], bool],
    label: Callable[[dict[str, Any]], str],
) -> list[str]:
    """A sweep's runs (the steps `member` picks), each beside the run at the same K with the study's
    defaults: the N sweep (rellax-n*) and the batch sweep (rellax-b*)."""
    swept = [r for n, r in records.items() if member(n)]
    if not swept:
        return []
    at_k = {r["k"]: r for n, r in records.items() if n == "rellax" or n.startswith("rellax-k")}
    runs = [at_k[r["k"]] for r in swept if r["k"] in at_k] + swept
    lines = ["", f"## {title} (ReLLaX at the K with the best valid AUC, same rows and recipe)", ""]
    lines.append(_table([_row(label(r), r) for r in runs]))
    return lines


def _batch(r: dict[str, Any]) -> int:
    """A run's optimizer batch; records from before the batch sweep trained at the study's default."""
    return int(r.get("batch_size") or ExperimentConfig.batch_size)


def _best_rellax(records: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The ReLLaX run (`serves_as_rellax`) with the best *validation* AUC: the one the study would
    ship, chosen without looking at test."""
    family = {n: r for n, r in records.items() if serves_as_rellax(n) and r.get("valid_auc") is not None}
    return max(family.items(), key=lambda kv: kv[1]["valid_auc"]) if family else None


def _logit(p: list[float]) -> np.ndarray:
    from scipy.special import logit

    return logit(np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6))  # rounded to 6 digits: 0, 1 occur


def _beyond_din(records: dict[str, dict[str, Any]], labels: np.ndarray) -> list[str]:
    """Does ReLLaX carry anything DIN lacks? A diagnostic, not a model: the mean of its and DIN's
    logits against DIN alone on the same rows. No gain (and a high logit correlation) means the LLM
    has learnt a noisy copy of DIN's signal, so beating DIN needs knowledge only the text carries."""
    from scipy.special import expit

    din = records.get("DIN")
    best = _best_rellax(records)
    names = dict.fromkeys(n for n in ("rellax", best[0] if best else None) if n in records)
    if din is None or not names:
        return []
    din_logit = _logit(din["predictions"])
    out = []
    for name in names:
        logit = _logit(records[name]["predictions"])
        mean = expit((logit + din_logit) / 2)  # a probability: the bootstrap clips its inputs to (0, 1)
        ci = paired_bootstrap_auc_diff(labels, mean, din["predictions"])
        gain = "a gain beyond DIN" if ci["lo"] > 0 else "nothing beyond DIN"
        out.append(
            f"- What {name} adds to DIN (a diagnostic, not a model): its logit correlates "
            f"{np.corrcoef(logit, din_logit)[0, 1]:.2f} with DIN's; the mean of the two logits - DIN "
            f"{ci['diff']:+.4f} (95% interval [{ci['lo']:+.4f}, {ci['hi']:+.4f}]): {gain}."
        )
    return out


def ranking_section(path: Path) -> list[str]:
    """The rankers on the sampled-candidate protocol (`rellax experiment ranking`), if it has run."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    lines = [
        "",
        "## Ranking (`rellax experiment ranking`)",
        "",
        f"Per test user, the first liked item against {r['negatives']} sampled items the user never "
        f"interacted with (seed {r['seed']}), the same candidates for every model: {r['cases']} users. "
        "Ties count against the positive. Shuffled = every history permuted at test time (relative "
        "NDCG@10 drop).",
        "",
    ]
    cells = [
        [name, m["n"], f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}", f"{m['hr@20']:.4f}", f"{m['ndcg@20']:.4f}",
         f"{m['shuffle_drop']:.1%}" if "shuffle_drop" in m else "–", f"{m['seconds']:.1f}"]
        for name, m in r["models"].items()
    ]  # fmt: skip
    columns = ("model", "users", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "shuffled NDCG@10 drop", "seconds")
    lines.append(markdown_table(columns, cells, align="l" + "r" * 7))
    if r.get("ndcg10_diffs"):
        lines += ["", _diff_table("NDCG@10 comparison (paired bootstrap)", r["ndcg10_diffs"], "diff")]
    rellax = r["models"].get("ReLLaX", {})
    if "bundle" in rellax:
        lines += ["", f"ReLLaX is bundle `{rellax['bundle']}` (K={rellax['k']}) scored in {rellax['dtype']}; "
                  "a cascade's seconds are ReLLaX's share for its M of the 100 candidates."]  # fmt: skip
    target = r.get("ndcg10_diffs", {}).get("cascade M=10 - ReLLaX")
    if target is not None:
        met = _verdict(target["diff"], target, bound=-0.01)
        lines += ["", f"Target, cascade M=10 NDCG@10 within 0.01 of pure ReLLaX's: {met}, "
                  f"{target['diff']:+.4f} (95% interval [{target['lo']:+.4f}, {target['hi']:+.4f}]) "
                  f"on {rellax['n']} users."]  # fmt: skip
    missing = [m for m in ("LLM-SRec", "ReLLaX") if m not in r["models"]]
    if missing:
        lines += ["", f"Rankers not run yet: {', '.join(missing)} (train LLM-SRec, pass a bundle)."]
    return lines


def _reading(
    records: dict[str, dict[str, Any]],
    diffs: dict[str, dict[str, float]],
    valid_rows: int = 512,
    label_rate: float | None = None,
) -> list[str]:
    """One line per target of issue 6: met, missed by how much, or not measured yet."""
    out = []
    for text, a, b in TARGETS:
        if a not in records or b not in records:
            out.append(f"- {text}: not measured yet.")
            continue
        d = records[a]["test"]["auc"] - records[b]["test"]["auc"]
        label = next((k for k, x, y in COMPARISONS if (x, y) == (a, b)), None)
        ci = diffs.get(label) if label else None
        span = f" (95% interval [{ci['lo']:+.4f}, {ci['hi']:+.4f}])" if ci else ""
        verdict = _verdict(d, ci)
        out.append(f"- {text}: {verdict}, {a} {records[a]['test']['auc']:.4f} vs {b} "
                   f"{records[b]['test']['auc']:.4f}, difference {d:+.4f}{span}.")  # fmt: skip
    out += _best_reading(records, diffs)
    out += _paper_pattern(records)
    out += _curve_reading(records, valid_rows, label_rate)
    bar = records.get("LR on prompt features")
    llms = {n: r for n, r in records.items() if n.startswith(("rella", "spa", "cflora", "zero-shot"))}
    if bar and llms:
        best_name, best = max(llms.items(), key=lambda kv: kv[1]["test"]["auc"])
        verdict = "clears" if best["test"]["auc"] > bar["test"]["auc"] else "does not clear"
        out.append(f"- The best LLM so far ({best_name}, {best['test']['auc']:.4f}) {verdict} the LR on "
                   f"the prompt's own features ({bar['test']['auc']:.4f}).")  # fmt: skip
    return out


def _best_reading(records: dict[str, dict[str, Any]], diffs: dict[str, dict[str, float]]) -> list[str]:
    """ReLLaX >= DIN again for the run selected on validation among every ReLLaX setting tried."""
    best = _best_rellax(records)
    if best is None or "DIN" not in records:
        return []
    name, r = best
    label = next((k for k, a, b in _comparisons(records) if (a, b) == (name, "DIN")), None)
    ci = diffs.get(label) if label else None
    d = r["test"]["auc"] - records["DIN"]["test"]["auc"]
    span = f" (95% interval [{ci['lo']:+.4f}, {ci['hi']:+.4f}])" if ci else ""
    din = records["DIN"]["test"]["auc"]
    return [f"- ReLLaX >= DIN, for the ReLLaX run with the best valid AUC ({name}, K={r['k']}, "
            f"N={r['n_rows']:,}, valid {r['valid_auc']:.4f}): {_verdict(d, ci)}, test AUC "
            f"{r['test']['auc']:.4f} vs DIN {din:.4f}, difference {d:+.4f}{span}."]  # fmt: skip


def _verdict(d: float, ci: dict[str, float] | None, bound: float = 0.0) -> str:
    """Met (d >= bound) or missed, and whether the bootstrap interval lets us say so: a point
    estimate whose interval straddles the bound is not a measured pass or fail, and the reading must
    not claim one. `bound` < 0 reads a "within |bound| of" target."""
    word = "met" if d >= bound else "missed"
    if ci is None or ci["lo"] > bound or ci["hi"] < bound:
        return word
    return f"{word} on the point estimate only, not significant (the interval includes {bound:g})"


def _paper_pattern(records: dict[str, dict[str, Any]]) -> list[str]:
    """Our differences from DIN beside the paper's (ML-1M, Vicuna-13B): the shape to compare."""
    din = records.get("DIN")
    if din is None:
        return []
    ours = []
    for name in ("zero-shot-recency", "zero-shot-subr", "rella", "rellax"):
        if name in records:
            r = records[name]
            what = f"{name} ({r['step']}, N={r['n_rows']:,})" if name == "rella" else name
            ours.append(f"{what} {r['test']['auc'] - din['test']['auc']:+.4f}")
    if not ours:
        return []
    paper = ", ".join(f"{what} {d:+.4f}" for what, d in PAPER_VS_DIN)
    return [f"- Against DIN, the paper (ML-1M, 13B LLM): {paper}. Here (ML-100K, "
            f"a 135M LLM): {', '.join(ours)}."]  # fmt: skip


def _binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def _curve_reading(
    records: dict[str, dict[str, Any]], valid_rows: int = 512, label_rate: float | None = None
) -> list[str]:
    """Per trained run: where validation AUC went and where it peaked, i.e. whether more data or
    steps look likely to help; and what a larger N would cost at the measured training speed.

    A gain smaller than two standard errors of a `valid_rows`-row AUC is called noise, not a rise;
    the train rows' decision-token loss beside the label entropy tells "did not fit" from "did
    not generalise".
    """
    out = []
    for name, r in _trained(records).items():
        curve = r.get("curve") or []
        if len(curve) >= 2:
            out.append(f"- Curve, {name}: {_curve_sentence(curve, valid_rows, label_rate)}.")
    sweep = [r for n, r in records.items() if n.startswith("rella-n") and r.get("samples_per_s")]
    if sweep and all(r["n_rows"] < LARGER_N for r in sweep):
        largest = max(sweep, key=lambda r: r["n_rows"])
        rate = largest["samples_per_s"]
        seen = largest.get("train_examples", 2 * largest["n_rows"])  # prompts a row x epochs
        per_row = max(1, round(seen / largest["n_rows"]))
        hours = per_row * LARGER_N / rate / 3600
        out.append(f"- N={LARGER_N:,} (x{per_row} prompts) was not run: at the measured {rate:.2f} training "
                   f"samples/s it would take about {hours:.0f} h of training on this machine.")  # fmt: skip
    return out


def _curve_sentence(curve: list[dict[str, Any]], valid_rows: int, label_rate: float | None) -> str:
    """Start, end and shape of one validation curve, judged against the noise of its AUC."""
    noise = 2 * null_auc_se(valid_rows)
    first, last = curve[0], curve[-1]
    best = max(curve, key=lambda p: p["valid_auc"])
    if best is first:
        shape = "never above its starting point: training did not help on validation"
    elif best["valid_auc"] - first["valid_auc"] < noise:
        shape = (f"its best ({best['valid_auc']:.4f}) is within noise of its start (2 standard "
                 f"errors of a {valid_rows}-row AUC: {noise:.3f})")  # fmt: skip
    elif best is last:
        shape = "best at the last point: still rising, more data or epochs may help"
    else:
        shape = f"peaked at {best['examples']:,} examples ({best['valid_auc']:.4f}), then fell"
    fit = ""
    if last.get("decision_loss") is not None and label_rate is not None:
        fit = (f"; train loss on the Yes/No token {last['decision_loss']:.3f} at the last point, against "
               f"{_binary_entropy(label_rate):.3f} for a constant prediction")  # fmt: skip
    return (f"valid AUC {first['valid_auc']:.4f} at the start, {last['valid_auc']:.4f} after "
            f"{last['examples']:,} examples; {shape}{fit}")  # fmt: skip


def _progress_reading(
    progress: dict[str, dict[str, Any]], valid_rows: int, label_rate: float | None, test_rows: int
) -> list[str]:
    """The unfinished runs, so far: no test figures (a run is scored only once trained)."""
    out = []
    for name, p in progress.items():
        where = (f"trained, {p.get('scored', 0):,} of {test_rows:,} test rows scored" if p.get("trained")
                 else "training, paused")  # fmt: skip
        if len(p.get("curve") or []) >= 2:
            sentence = _curve_sentence(p["curve"], valid_rows, label_rate)
            out.append(f"- Curve so far, {name} ({where}): {sentence}.")
        else:
            out.append(f"- {name} ({where}): no validation point past the start yet.")
    return out
