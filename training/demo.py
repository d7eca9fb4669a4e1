"""The offline half of `make demo`: assets -> samples -> DIN -> item index -> stage 1 -> stage 2 ->
eval -> LLM-SRec (SASRec teacher + the frozen LLM's small modules) -> bundle, each step cached so
a second run only re-checks. Prints what it made and where.

In a clone of the repository the two LLM stages are not trained here: the demo builds its bundle
from the committed ReLLaX run with the best valid AUC, a study step (docs/results/<step>/) or a
recipe trial (docs/results/tune/), from its trainable weights (stage-1 LoRA, stage-2 SPA projector,
gates and A/B), so a newcomer serves the study's model, not a 64-row toy. DIN and the item index
are rebuilt here as always (the same seeded recipes; a DIN retrained on another CPU differs in its
last digits, valid AUC 0.7443 vs 0.7441 measured). `--train-here` (or no committed run) trains the
demo-size stages instead. LLM-SRec likewise: the committed run (docs/results/llmsrec/, its small
modules and SASRec teacher) with the catalogue's item vectors rebuilt here, else a demo-size one."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from data.loading import artefact_dir
from rellax.logs import get_logger

__all__ = [
    "DEMO_EVAL_ROWS",
    "DEMO_ROWS",
    "DEMO_VALID_ROWS",
    "RESULTS",
    "KeptRun",
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


RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@dataclass(frozen=True)
class KeptRun:
    """A committed ReLLaX run a bundle can be built from: its stage-2 and stage-1 weight folders,
    what it was selected on (valid AUC on the study's fixed validation rows), and where known its
    test AUC on the study's fixed test rows."""

    name: str
    where: str  # "trial" (docs/results/tune/) or "step" (docs/results/)
    stage2: Path
    stage1: Path
    valid_auc: float
    valid_rows: int
    k: int
    device: str
    test_auc: float | None = None
    test_rows: int | None = None


def _whole(folder: Path, stage: int) -> bool:
    from training.llm.runs import WEIGHTS

    return all((folder / name).exists() for name in WEIGHTS[stage])


def _same_layout(stage1: Path, stage2: Path) -> bool:
    """The stage-1 adapter has the LoRA layout the stage-2 run was built over (rank, targets)."""
    want = json.loads((stage2 / "metrics.json").read_text())["stage1_config"]
    have = json.loads((stage1 / "adapter" / "adapter_config.json").read_text())
    return have.get("r") == want["r"] and sorted(have.get("target_modules") or []) == sorted(
        want["target_modules"]
    )


def _trials(folder: Path) -> list[KeptRun]:
    """ReLLaX recipe trials (never the "+ DIN's logit" variant, which a bundle does not serve)."""
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = json.loads(path.read_text())
        trial = record.get("trial")
        if not trial or trial["stage"] != 2 or trial["mode"] != "rellax" or trial.get("din_residual"):
            continue
        s2, s1 = folder / trial["name"], folder / str(trial["over"])
        if _whole(s2, 2) and _whole(s1, 1):
            out.append(KeptRun(trial["name"], "trial", s2, s1, record["best_valid_auc"], record["valid_rows"],
                               int(trial["k"]), record["device"]))  # fmt: skip
    return out


def _steps(results: Path) -> list[KeptRun]:
    """The quality study's ReLLaX steps. A one-stage step keeps its own LoRA A, B with its SPA and
    gates; its stage 1 is the seeded 0-step init, which the recipe trials commit as `tune/s1-init`
    (used when its layout is the step's: the step's A, B replace its tensors on load)."""
    from training.study.config import serves_as_rellax

    out = []
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        name = record.get("step", "")
        if not serves_as_rellax(name) or "valid_auc" not in record:
            continue
        s2 = results / name
        s1 = (
            results / "tune" / "s1-init"
            if record.get("stage1") == "s1-init"
            else results / str(record.get("stage1"))
        )
        if _whole(s2, 2) and _whole(s1, 1) and _same_layout(s1, s2):
            meta = json.loads((s2 / "metrics.json").read_text())
            rows = int(meta["config"]["valid_rows"])
            test = record["test"]["auc"], record["test_rows"]
            out.append(
                KeptRun(
                    name, "step", s2, s1, record["valid_auc"], rows, int(record["k"]), record["device"], *test
                )
            )
    return out


def best_study_run(results: Path = RESULTS) -> KeptRun | None:
    """The committed ReLLaX run, recipe trial or study step, with the highest valid AUC (all on the
    study's 512 fixed validation rows; selection never looks at test); None when none is whole."""
    found = _trials(results / "tune") + _steps(results)
    return max(found, key=lambda r: r.valid_auc) if found else None


def _restore_study_run(run: KeptRun, runs: Path) -> tuple[Path, Path]:
    """Copy the run and its stage 1 into `runs`, pointing the copy at the local stage 1."""
    import shutil

    from training.llm.runs import WEIGHTS

    s1, s2 = runs / "study-stage1", runs / "study-stage2"
    for src, dst, stage in ((run.stage1, s1, 1), (run.stage2, s2, 2)):
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


def ensure_llmsrec(paths: dict[str, Path], kept: Path = RESULTS / "llmsrec") -> tuple[Path, dict]:
    """A finished full `rellax train llmsrec` run when the cache has one, else the committed one
    (`kept`, see `training.llmsrec.llmsrec.keep`), else a demo-size one (teacher included) trained
    here once: (folder, its metrics)."""
    from rellax.assets import file_sha256
    from rellax.llmsrec import WEIGHTS
    from training.llmsrec.llmsrec import LLMSRecConfig, restore
    from training.llmsrec.llmsrec import main as train_llmsrec
    from training.llmsrec.sasrec import SASRecTrainConfig
    from training.llmsrec.sasrec import main as train_sasrec

    full = LLMSRecConfig().out
    if (full / "metrics.json").exists():
        return full, json.loads((full / "metrics.json").read_text())
    if (kept / WEIGHTS).exists():  # the committed run: its item vectors rebuilt here, not retrained
        folder = paths["llmsrec"].with_name("llmsrec-kept")
        made = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else {}
        if made.get("restored_from", {}).get("weights_sha256") != file_sha256(kept / WEIGHTS):
            made = restore(kept, folder)
        return folder, made
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
        paths["stage1"], paths["stage2"] = _restore_study_run(study, paths["stage2"].parent)
        s1 = json.loads((paths["stage1"] / "metrics.json").read_text())
        s2 = json.loads((paths["stage2"] / "metrics.json").read_text())
        k = int(s2["config"]["k"])
        where = "docs/results/tune/" if study.where == "trial" else "docs/results/"
        test = (f"; test AUC {study.test_auc:.4f} on the study's {study.test_rows:,} test rows"
                if study.test_auc is not None else "")  # fmt: skip
        lines.append(
            f"stage 1 + 2    the study's {study.where} {study.name} ({where}, trained on {study.device}): "
            f"valid AUC {study.valid_auc:.4f} on {study.valid_rows} rows, K={k}{test}"
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
