"""The offline half of `make demo`: assets -> samples -> DIN -> item index -> stage 1 -> stage 2 ->
eval -> bundle, each step cached so a second run only re-checks. Prints what it made and where."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rellax.logs import get_logger
from rellax.paths import cache_dir

__all__ = ["DEMO_EVAL_ROWS", "DEMO_ROWS", "DEMO_VALID_ROWS", "build", "demo_paths"]

log = get_logger(__name__)

# Sized so the whole demo fits ~20 minutes on a 2-core CPU without native bf16 (measured 17 min from
# an empty cache, fp32: stage 1 ~0.6-0.8 samples/s, scoring ~1.85 candidates/s at K=15). Too few
# rows for a meaningful AUC (see docs/results.md for the real runs): the demo proves the pipeline.
DEMO_ROWS = 64
DEMO_VALID_ROWS = 64
DEMO_EVAL_ROWS = 128


def demo_paths() -> dict[str, Path]:
    runs = cache_dir("runs") / "demo"
    return {
        "din": cache_dir("crm") / "din",
        "index": cache_dir("index") / "ml100k",
        "stage1": runs / "stage1",
        "stage2": runs / "stage2",
        "eval": runs / "eval",
        "bundle": cache_dir("bundles") / "demo",
    }


def build(n_rows: int = DEMO_ROWS, eval_rows: int = DEMO_EVAL_ROWS, valid_rows: int = DEMO_VALID_ROWS) -> str:
    """Run every offline step the demo needs; returns a human summary.

    Each step is reused only when its inputs are the same: a stage run by its config (training.runs),
    the eval by its rows and the run ids it scored, the bundle by the stage-2 run id it came from.
    """
    from rellax.assets import prepare_model
    from training.crm import ensure_din
    from training.datasets import load_dataset
    from training.evaluate import EvalConfig, markdown_table
    from training.evaluate import main as evaluate
    from training.export import ExportConfig
    from training.export import main as export
    from training.llm_data import Catalogue
    from training.llm_setup import load_base_lm, load_or_build_index
    from training.stage1 import Stage1Config
    from training.stage1 import main as stage1
    from training.stage2 import Stage2Config
    from training.stage2 import main as stage2

    paths = demo_paths()
    started = time.perf_counter()
    lines = []
    model_dir = prepare_model()
    lines.append(f"LLM            {model_dir}")
    data, _, manifest = load_dataset()
    counts = " / ".join(f"{s}: {v['count']}" for s, v in manifest["splits"].items())
    lines.append(f"samples        {counts}")
    din = ensure_din(paths["din"])
    lines.append(f"DIN            test AUC {din['din']['test']['auc']:.4f}  ({paths['din']})")
    if not (paths["index"] / "meta.json").exists():
        lm, tok = load_base_lm(model_dir)
        load_or_build_index(paths["index"], lm, tok, Catalogue.from_tables(data))
    lines.append(f"item index     {paths['index']}")
    s1 = stage1(Stage1Config(out=paths["stage1"], n_rows=n_rows, valid_rows=valid_rows))
    lines.append(
        f"stage 1        valid AUC {s1['result']['best_valid_auc']:.4f}, "
        f"{s1['result']['samples_per_s']:.2f} samples/s  ({paths['stage1']})"
    )
    s2 = stage2(
        Stage2Config(stage1=paths["stage1"], out=paths["stage2"], n_rows=n_rows, valid_rows=valid_rows)
    )
    lines.append(
        f"stage 2        valid AUC {s2['result']['best_valid_auc']:.4f}, "
        f"{s2['result']['samples_per_s']:.2f} samples/s  ({paths['stage2']})"
    )
    eval_json = paths["eval"] / "eval.json"
    scored = {"rows": eval_rows, "stage1_run_id": s1.get("run_id"), "stage2_run_id": s2.get("run_id")}
    report = json.loads(eval_json.read_text()) if eval_json.exists() else {}
    if {key: report.get(key) for key in scored} != scored:
        report = evaluate(
            EvalConfig(
                n=eval_rows, stage1=paths["stage1"], stage2={"rellax": paths["stage2"]}, out=paths["eval"]
            )
        )
        report.update(scored)
        eval_json.write_text(json.dumps(report, indent=2))
    manifest_path = paths["bundle"] / "manifest.json"
    bundle = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if bundle.get("training", {}).get("stage2_run_id") != s2.get("run_id"):
        cfg = ExportConfig(
            stage2=paths["stage2"], out=paths["bundle"], eval_json=eval_json, merged_valid_rows=valid_rows
        )
        bundle = export(cfg)
    lines.append(f"bundle         {bundle['model_version']}  ({paths['bundle']})")
    lines.append(f"took           {time.perf_counter() - started:.0f} s")
    return "\n".join(lines) + "\n\n" + markdown_table(report)
