"""The recipe trials' section of docs/results.md (issue 16 §1): a table and a plot of valid AUC
against training minutes, from the JSON files `rellax experiment tune` wrote. Never a test figure:
the recipe is chosen on validation AUC per CPU-hour."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.metrics import null_auc_se
from training.tables import markdown_table

__all__ = ["load_trials", "machines_note", "tune_section"]


def load_trials(folder: Path) -> dict[str, dict[str, Any]]:
    """{trial name: record} for every finished trial in `folder` (tune.json, the status, excluded)."""
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "tune.json"}


def machines_note(where: dict[str, str]) -> list[str]:
    """{step: CPU} as one sentence grouped by machine: seconds and samples/s compare only within
    one machine (a 2-core AMX Xeon trains in bf16 several times faster than a 2-core EPYC in fp32)."""
    groups: dict[str, list[str]] = {}
    for name, cpu in where.items():
        groups.setdefault(cpu, []).append(name)
    if not groups:
        return []
    parts = [f"{cpu}: {', '.join(names)}" for cpu, names in groups.items()]
    return ["", f"Machines (seconds and samples/s compare only within one): {'; '.join(parts)}."]


def _cpu(record: dict[str, Any]) -> str:
    """The trial's CPU; for trials run before it was recorded, whether the CPU had native bf16."""
    if record.get("cpu"):
        return record["cpu"]
    if "native_bf16" in record:
        return f"model not recorded ({'native bf16' if record['native_bf16'] else 'no native bf16'})"
    return "not recorded"


def _reading(trials: dict[str, dict[str, Any]], din_valid_auc: float | None) -> list[str]:
    """Two sentences the recipe rests on: did text alone (stage 1) move validation beyond noise, and
    how close did DIN's signal through SPA + gates (ReLLaX trials, the + DIN's logit one excluded)
    come to DIN itself on the same rows."""
    noise = 2 * null_auc_se(next(iter(trials.values()))["valid_rows"])
    lines = []
    text_only = {n: r for n, r in trials.items() if r["trial"]["stage"] == 1 and r["examples"] > 0}
    if text_only:
        name, r = max(text_only.items(), key=lambda kv: kv[1]["best_valid_auc"] - kv[1]["start_valid_auc"])
        gain = r["best_valid_auc"] - r["start_valid_auc"]
        verdict = "within noise" if gain < noise else "beyond noise"
        lines.append(
            f"- Text only (the {len(text_only)} stage-1 trials): the largest gain over a trial's own start "
            f"is {gain:+.4f} (`{name}`), {verdict} (2 standard errors of a {r['valid_rows']}-row AUC: "
            f"{noise:.3f})."
        )
    with_din = {
        n: r for n, r in trials.items() if r["trial"]["stage"] == 2 and not r["trial"].get("din_residual")
    }
    if with_din:
        name, r = max(with_din.items(), key=lambda kv: kv[1]["best_valid_auc"])
        line = (
            f"- With DIN's signal (the {len(with_din)} stage-2 and one-stage trials): best `{name}`, "
            f"{r['start_valid_auc']:.4f} -> {r['best_valid_auc']:.4f} after {r['best_seconds'] / 60:.1f} "
            "training minutes"
        )
        if din_valid_auc is not None:
            line += f"; DIN on the same rows {din_valid_auc:.4f} ({r['best_valid_auc'] - din_valid_auc:+.4f})"
        lines.append(line + ".")
    return ["", *lines] if lines else []


def _per_hour(record: dict[str, Any]) -> float:
    """Valid AUC gained over the trial's own start, per training hour, at its best point."""
    hours = max(record["best_seconds"], 1.0) / 3600
    return (record["best_valid_auc"] - record["start_valid_auc"]) / hours


def _plot(trials: dict[str, dict[str, Any]], path: Path, din_valid_auc: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in trials.items():
        curve = r["curve"]
        ax.plot([p.get("seconds", 0.0) / 60 for p in curve], [p["valid_auc"] for p in curve], marker="o",
                linestyle="-" if r["trial"]["stage"] == 2 else ":", label=name)  # fmt: skip
    rows = next(iter(trials.values()))["valid_rows"]
    noise = 2 * null_auc_se(rows)
    ax.axhspan(0.5 - noise, 0.5 + noise, color="grey", alpha=0.15, label=f"chance +- 2 SE ({rows} rows)")
    if din_valid_auc is not None:
        ax.axhline(din_valid_auc, color="black", linestyle="--", linewidth=1, label="DIN")
    ax.set_xlabel("training minutes (validation not counted)")
    ax.set_ylabel("validation AUC")
    ax.set_title("Recipe trials: stage 1 dotted, stage 2 solid")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune_section(folder: Path, out_dir: Path) -> list[str]:
    """Markdown lines of the trials' section (and tune_trials.png in `out_dir`); [] without trials.
    DIN's line is its AUC on the trials' own validation rows (tune.json), never another row set."""
    trials = load_trials(folder)
    if not trials:
        return []
    status = json.loads((folder / "tune.json").read_text()) if (folder / "tune.json").exists() else {}
    same_rows = status.get("valid_rows") == next(iter(trials.values()))["valid_rows"]
    din_valid_auc = status.get("din_valid_auc") if same_rows else None
    _plot(trials, out_dir / "tune_trials.png", din_valid_auc)
    lines = [
        "",
        "## Recipe trials (`rellax experiment tune`, validation only)",
        "",
        f"Each trial trains for at most {next(iter(trials.values()))['budget_s'] / 60:.0f} training minutes "
        "(validation not counted) and is validated on the study's fixed validation rows. AUC/h = valid AUC "
        "gained over the trial's own step 0, per training hour, at its best point.",
        "",
    ]
    cells = []
    for name, r in trials.items():
        t = r["trial"]
        label = f"{name} (beyond the paper: + DIN's logit)" if t.get("din_residual") else name
        if t.get("din", "din") != "din":
            label += " (DIN trained without the few-shot rows)"
        cells.append([
            label, t["stage"], t["over"] or "-", f"{t['lr']:g}", t["batch_size"], t["epochs"], t["k"],
            "q,v" if t["target_modules"] == ["q_proj", "v_proj"] else "all",
            t["prompts"] if t["stage"] == 2 else "mixed",
            "yes" if t["stage"] == 1 or t["train_lora"] else "no", r["examples"],
            f"{r['fit_seconds'] / 60:.1f}", f"{r['samples_per_s']:.2f}",
            f"{r['start_valid_auc']:.4f} -> {r['best_valid_auc']:.4f}", f"{_per_hour(r):+.3f}", r["device"],
        ])  # fmt: skip
    columns = (
        "trial", "stage", "over", "lr", "batch", "epochs", "K", "targets", "prompts", "A,B train", "examples",
        "train min", "samples/s", "valid AUC start -> best", "AUC/h", "device",
    )  # fmt: skip
    lines.append(markdown_table(columns, cells, align="lrlrrrrlllrrrlrl"))
    lines += ["", "![validation AUC against training minutes](tune_trials.png)"]
    if any(r["trial"].get("din_residual") for r in trials.values()):
        lines += [
            "",
            "A trial marked *+ DIN's logit* is not ReLLaX: its P(yes) is sigmoid(LLM margin + the frozen "
            "DIN's own logit), so the LLM learns a correction to DIN (as FLIP and ClickPrompt do for small "
            "language models). It is reported beside ReLLaX, never instead of it.",
        ]
    lines += machines_note({name: _cpu(r) for name, r in trials.items()})
    if din_valid_auc is not None:
        lines += ["", f"DIN's validation AUC on the same rows: {din_valid_auc:.4f}."]
    best = max(trials.items(), key=lambda kv: kv[1]["best_valid_auc"])
    lines += [
        "",
        f"Highest valid AUC so far: `{best[0]}` {best[1]['best_valid_auc']:.4f} after "
        f"{best[1]['best_seconds'] / 60:.1f} training minutes.",
    ]
    lines += _reading(trials, din_valid_auc)
    pending = [n for n, state in status.get("status", {}).items() if n not in trials]
    if pending:
        lines += ["", f"Trials not finished yet (`rellax experiment tune` runs them): {', '.join(pending)}."]
    return lines
