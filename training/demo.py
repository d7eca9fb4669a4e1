"""The offline half of `make demo`: assets -> samples -> DIN -> item index -> stage 1 -> stage 2 ->
eval -> LLM-SRec (SASRec teacher + the frozen LLM's small modules) -> bundle, each step cached so
a second run only re-checks. Prints what it made and where.

In a clone of the repository the two LLM stages are not trained here: the demo builds its bundle
from the best ReLLaX run of the recipe trials whose trainable weights are committed under
docs/results/tune/ (its stage-1 LoRA, its stage-2 SPA projector, gates and A/B), so a newcomer
serves the study's model, not a 64-row toy. DIN and the item index are rebuilt here as always
(both deterministic from the data and the LLM). `--train-here` (or no committed run) trains the
demo-size stages instead."""

from __future__ import annotations

import json
import time
from pathlib import Path

from data.loading import artefact_dir
from rellax.logs import get_logger

__all__ = [
    "DEMO_EVAL_ROWS",
    "DEMO_ROWS",
    "DEMO_VALID_ROWS",
    "STUDY_RUNS",
    "best_study_run",
    "build",
    "demo_paths",
]

log = get_logger(__name__)

# Sized so the whole demo fits ~20 minutes on a 2-core CPU without native bf16 (measured 17 min from
# an empty cache, fp32: stage 1 ~0.6-0.8 samples/s, scoring ~1.85 candidates/s at K=15). Too few
# rows for a meaningful AUC (see docs/results.md for the real runs): the demo proves the pipeline.
DEMO_ROWS = 64
DEMO_VALID_ROWS = 64
DEMO_EVAL_ROWS = 128
# LLM-SRec at demo size: a 20-epoch SASRec teacher and 30 steps of 8 users over the frozen SmolLM2
# (the full recipe: `rellax train sasrec`, `rellax train llmsrec`; a finished full run is used instead).
DEMO_SASREC_EPOCHS = 20
DEMO_LLMSREC_STEPS = 30


STUDY_RUNS = Path(__file__).resolve().parents[1] / "docs" / "results" / "tune"


def best_study_run(folder: Path = STUDY_RUNS) -> tuple[str, dict] | None:
    """(name, record) of the committed ReLLaX trial (SPA + CFLoRA; not the "+ DIN's logit"
    variant, which a bundle does not serve) with the highest valid AUC whose weights, and those of
    the stage-1 trial under it, are all in `folder`; None when there is none."""
    from training.llm.runs import WEIGHTS

    best: tuple[str, dict] | None = None
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = json.loads(path.read_text())
        trial = record.get("trial")
        if not trial or trial["stage"] != 2 or trial["mode"] != "rellax" or trial.get("din_residual"):
            continue
        whole = all((folder / trial["name"] / name).exists() for name in WEIGHTS[2]) and all(
            (folder / str(trial["over"]) / name).exists() for name in WEIGHTS[1]
        )
        if whole and (best is None or record["best_valid_auc"] > best[1]["best_valid_auc"]):
            best = (trial["name"], record)
    return best


def _restore_study_run(name: str, record: dict, runs: Path, folder: Path = STUDY_RUNS) -> tuple[Path, Path]:
    """Copy the trial and its stage-1 trial into `runs`, pointing the copy at the local stage 1."""
    import shutil

    from training.llm.runs import WEIGHTS

    s1, s2 = runs / "study-stage1", runs / "study-stage2"
    for src, dst, stage in ((folder / str(record["trial"]["over"]), s1, 1), (folder / name, s2, 2)):
        for file in WEIGHTS[stage]:
            if (src / file).exists():
                (dst / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / file, dst / file)
    metrics = json.loads((s2 / "metrics.json").read_text())
    metrics["config"]["stage1"] = str(s1)  # the machine that trained it had its own cache path
    (s2 / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return s1, s2


def demo_paths() -> dict[str, Path]:
    runs = artefact_dir("runs", "demo")
    return {
        "din": artefact_dir("crm", "din"),
        "index": artefact_dir("index", "ml100k"),
        "stage1": runs / "stage1",
        "stage2": runs / "stage2",
        "eval": runs / "eval",
        "sasrec": runs / "sasrec",
        "llmsrec": runs / "llmsrec",
        "bundle": artefact_dir("bundles", "demo"),
    }


def ensure_llmsrec(paths: dict[str, Path]) -> tuple[Path, dict]:
    """A finished full `rellax train llmsrec` run when the cache has one, else a demo-size one
    (teacher included) trained here once: (folder, its metrics)."""
    from training.llmsrec.llmsrec import LLMSRecConfig
    from training.llmsrec.llmsrec import main as train_llmsrec
    from training.llmsrec.sasrec import SASRecTrainConfig
    from training.llmsrec.sasrec import main as train_sasrec

    full = LLMSRecConfig().out
    if (full / "metrics.json").exists():
        return full, json.loads((full / "metrics.json").read_text())
    folder = paths["llmsrec"]
    if (folder / "metrics.json").exists():
        return folder, json.loads((folder / "metrics.json").read_text())
    if not (paths["sasrec"] / "sasrec.safetensors").exists():
        train_sasrec(SASRecTrainConfig(out=paths["sasrec"], max_epochs=DEMO_SASREC_EPOCHS))
    cfg = LLMSRecConfig(
        out=folder, sasrec_dir=paths["sasrec"], steps=DEMO_LLMSREC_STEPS, eval_every=DEMO_LLMSREC_STEPS,
        valid_users=64, test_users=128,
    )  # fmt: skip
    return folder, train_llmsrec(cfg)


def build(
    n_rows: int = DEMO_ROWS,
    eval_rows: int = DEMO_EVAL_ROWS,
    valid_rows: int = DEMO_VALID_ROWS,
    train_here: bool = False,
) -> str:
    """Run every offline step the demo needs; returns a human summary.

    Each step is reused only when its inputs are the same: a stage run by its config (training.llm.runs),
    the eval by its rows and the run ids it scored, the bundle by the stage-2 run id it came from.
    """
    from data.loading import load_dataset
    from rellax.assets import prepare_model
    from training.crm.crm import ensure_din
    from training.llm.data import Catalogue
    from training.llm.evaluate import EvalConfig, eval_markdown
    from training.llm.evaluate import main as evaluate
    from training.llm.export import ExportConfig
    from training.llm.export import main as export
    from training.llm.setup import load_base_lm, load_or_build_index
    from training.llm.stage1 import Stage1Config
    from training.llm.stage1 import main as stage1
    from training.llm.stage2 import Stage2Config
    from training.llm.stage2 import main as stage2

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
    study = None if train_here else best_study_run()
    k = 15
    if study is not None:
        name, record = study
        paths["stage1"], paths["stage2"] = _restore_study_run(name, record, paths["stage2"].parent)
        s1 = json.loads((paths["stage1"] / "metrics.json").read_text())
        s2 = json.loads((paths["stage2"] / "metrics.json").read_text())
        k = int(s2["config"]["k"])
        lines.append(
            f"stage 1 + 2    the study's trial {name} (docs/results/tune/, trained on {record['device']}): "
            f"valid AUC {record['best_valid_auc']:.4f} on {record['valid_rows']} rows, K={k}"
        )
    else:
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
                n=eval_rows,
                k=k,
                stage1=paths["stage1"],
                stage2={"rellax": paths["stage2"]},
                out=paths["eval"],
            )  # fmt: skip
        )
        report.update(scored)
        eval_json.write_text(json.dumps(report, indent=2))
    llmsrec_dir, llmsrec = ensure_llmsrec(paths)
    t = llmsrec["test"]
    lines.append(
        f"LLM-SRec       test NDCG@10 {t['ndcg@10']:.4f} HR@10 {t['hr@10']:.4f} on {t['n']} users "
        f"(1 liked vs 99), {llmsrec['examples']} training examples  ({llmsrec_dir})"
    )
    manifest_path = paths["bundle"] / "manifest.json"
    bundle = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    made = bundle.get("training", {})
    if (
        made.get("stage2_run_id") != s2.get("run_id")
        or made.get("llmsrec", {}).get("config") != llmsrec["config"]
    ):
        cfg = ExportConfig(
            stage2=paths["stage2"], out=paths["bundle"], eval_json=eval_json, merged_valid_rows=valid_rows,
            llmsrec=llmsrec_dir,
        )  # fmt: skip
        bundle = export(cfg)
    lines.append(f"bundle         {bundle['model_version']}  ({paths['bundle']})")
    lines.append(f"took           {time.perf_counter() - started:.0f} s")
    return "\n".join(lines) + "\n\n" + eval_markdown(report)
