"""`rellax experiment tune` end to end on a tiny random Llama (real ML-100K rows, real trainers): a
trial ends at its training budget (validated there, its best state kept), a stage-2 trial waits for
the stage-1 trial it builds on, finished trials are reused, and the report draws them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rellax.precision import cpu_model
from training.study.tune import Trial, TuneConfig, run
from training.tables import table_rows

TRIALS = (
    Trial("s1", 1, lr=1e-2, batch_size=4, epochs=2, k=3, n_rows=8),
    Trial("s2-over-s1", 2, lr=1e-2, batch_size=4, epochs=1, k=3, n_rows=8, over="s1", prompts="subr"),
    Trial("s2-joint", 2, lr=1e-2, batch_size=4, epochs=1, k=3, n_rows=8, over="s1", train_lora=True),
)


@pytest.fixture(scope="module")
def tune(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, din_dir: Path) -> TuneConfig:
    import shutil

    root = tmp_path_factory.mktemp("tune")
    # Its own copy of the session's DIN, recorded as trained with the default recipe (no rows held
    # out), so `ensure_din` takes it as it is: neither retrained here nor changed under other tests.
    shutil.copytree(din_dir, root / "din")
    (root / "din" / "metrics.json").write_text(json.dumps({"config": {"holdout_fewshot": []}}))
    return TuneConfig(
        results=root / "docs" / "results" / "tune",
        runs=root / "runs",
        trials=TRIALS,
        budget_min=0.0,  # every trial ends after its first optimizer step
        valid_rows=24,
        evals=2,
        micro_batch=4,
        model_dir=tiny_model_dir,
        din_dir=root / "din",
        index_dir=root / "index",
    )


def test_stage2_trials_wait_for_their_stage1_trial(tune: TuneConfig) -> None:
    from dataclasses import replace

    status = run(replace(tune, only=("s2-over-s1",)))
    assert status == {"s1": "not selected", "s2-over-s1": "waiting", "s2-joint": "not selected"}
    assert not (tune.results / "s2-over-s1.json").exists()


def test_trials_end_at_their_budget_and_are_reused(tune: TuneConfig) -> None:
    assert run(tune) == {"s1": "ran", "s2-over-s1": "ran", "s2-joint": "ran"}
    s1 = json.loads((tune.results / "s1.json").read_text())
    # 16 prompts / batch 4 x 2 epochs = 8 planned steps; the budget ended training after the first,
    # with a validation there, so the curve has step 0 and step 1.
    assert s1["steps"] == 1 and s1["examples"] == 4
    assert [p["step"] for p in s1["curve"]] == [0, 1]
    # training seconds on the curve (a tiny step can round to 0.0), never more than the run's total
    assert s1["curve"][0]["seconds"] == 0.0 and 0.0 <= s1["curve"][1]["seconds"] <= s1["fit_seconds"]
    assert s1["trial"]["target_modules"] == ["q_proj", "v_proj"] and s1["device"].startswith("cpu/")
    assert s1["cpu"] == cpu_model() and "[" in s1["cpu"]  # the processor and its native-bf16 flags
    over = json.loads((tune.results / "s2-over-s1.json").read_text())
    joint = json.loads((tune.results / "s2-joint.json").read_text())
    assert over["examples"] == 4 and over["trial"]["prompts"] == "subr"
    # A, B train too in the joint trial: 2 layers x (q: A 8x64, B 64x8; v: A 8x64, B 32x8, 2 KV heads)
    assert joint["trainable_params"] - over["trainable_params"] == 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8))
    before = {p.name: p.read_text() for p in tune.results.glob("s*.json")}
    assert run(tune) == {"s1": "done", "s2-over-s1": "done", "s2-joint": "done"}
    assert {p.name: p.read_text() for p in tune.results.glob("s*.json")} == before


def test_the_report_draws_the_trials(tune: TuneConfig, tmp_path: Path) -> None:
    from training.study.tune_report import tune_section

    run(tune)
    din = json.loads((tune.results / "tune.json").read_text())["din_valid_auc"]
    lines = tune_section(tune.results, tmp_path)
    text = "\n".join(lines)
    assert "## Recipe trials" in text and (tmp_path / "tune_trials.png").stat().st_size > 0
    assert [row[0] for row in table_rows(text)[1:]] == ["s1", "s2-joint", "s2-over-s1"]
    assert 0.0 < din < 1.0 and f"DIN's validation AUC on the same rows: {din:.4f}" in text
    # The reading the recipe rests on: text alone vs DIN's signal, each against its yardstick.
    s1 = json.loads((tune.results / "s1.json").read_text())
    gain = s1["best_valid_auc"] - s1["start_valid_auc"]
    assert (
        f"- Text only (the 1 stage-1 trials): the largest gain over a trial's own start is {gain:+.4f}"
        in text
    )
    aucs = {
        n: json.loads((tune.results / f"{n}.json").read_text())["best_valid_auc"]
        for n in ("s2-joint", "s2-over-s1")
    }
    best = max(aucs, key=aucs.__getitem__)
    assert f"- With DIN's signal (the 2 stage-2 and one-stage trials): best `{best}`" in text
    assert f"DIN on the same rows {din:.4f} (" in text
    status = json.loads((tune.results / "tune.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for p in tune.results.glob("*.json"):  # the same trials, a status measured on other rows
        (other / p.name).write_text(p.read_text())
    (other / "tune.json").write_text(json.dumps({**status, "valid_rows": 512}))
    assert "DIN's validation AUC" not in "\n".join(tune_section(other, tmp_path))
    # Which machine ran each trial: samples/s compare only within one.
    assert f"Machines (seconds and samples/s compare only within one): {cpu_model()}: s1, s2-joint" in text
    older = json.loads((other / "s1.json").read_text())
    del older["cpu"]  # a trial recorded before the CPU was
    (other / "s1.json").write_text(json.dumps(older))
    native = "native bf16" if older["native_bf16"] else "no native bf16"
    assert f"model not recorded ({native}): s1" in "\n".join(tune_section(other, tmp_path))


def test_stage2_builds_on_kept_weights_when_the_cache_lost_them(tune: TuneConfig) -> None:
    """A later session's empty cache: the stage-1 trial's committed weights are copied back, and
    only when those are gone too is it trained again."""
    import shutil
    from dataclasses import replace

    run(tune)
    kept = tune.results / "s1"
    assert (kept / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (tune.results / "s2-over-s1" / "stage2.safetensors").exists()
    run_id = json.loads((kept / "metrics.json").read_text())["run_id"]
    shutil.rmtree(tune.runs)
    (tune.results / "s2-over-s1.json").unlink()
    only = replace(tune, only=("s2-over-s1",))
    assert run(only)["s2-over-s1"] == "ran" and run(only)["s1"] == "done"
    restored = json.loads((tune.runs / "s1" / "metrics.json").read_text())
    over = json.loads((tune.runs / "s2-over-s1" / "metrics.json").read_text())
    assert restored["run_id"] == run_id and over["stage1_run_id"] == run_id  # built on the kept run

    s1_record = (tune.results / "s1.json").read_text()
    shutil.rmtree(tune.runs)
    shutil.rmtree(kept)
    (tune.results / "s2-over-s1.json").unlink()
    status = run(only)
    assert status["s1"] == "ran" and status["s2-over-s1"] == "ran"
    retrained = json.loads((kept / "metrics.json").read_text())["run_id"]
    assert retrained != run_id and (tune.results / "s1.json").read_text() != s1_record
    over = json.loads((tune.runs / "s2-over-s1" / "metrics.json").read_text())
    assert over["stage1_run_id"] == retrained


def test_weights_over_the_limit_are_kept_in_fp16(tune: TuneConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 2 with gates on every layer is 13 MB in fp32: the kept copy is fp16 (half the bytes),
    the record says so, the values round as fp16 does, and a restored run loads them."""
    import torch
    from safetensors.torch import load_file

    import training.llm.runs as runs_module
    import training.study.tune as tune_module

    run(tune)
    trial = next(t for t in TRIALS if t.name == "s2-joint")
    assert tune_module.restore_weights(tune, trial)  # an earlier test may have emptied the runs
    full = load_file(tune.runs / trial.name / "stage2.safetensors")
    size = (tune.runs / trial.name / "stage2.safetensors").stat().st_size
    monkeypatch.setattr(runs_module, "MAX_WEIGHTS_BYTES", size)  # the fp32 files no longer fit
    assert tune_module.keep_weights(tune, trial) == "float16"
    kept = load_file(tune.results / trial.name / "stage2.safetensors")
    assert kept.keys() == full.keys() and all(v.dtype == torch.float16 for v in kept.values())
    for k, v in full.items():
        torch.testing.assert_close(kept[k].float(), v, rtol=2**-11, atol=2**-24)
    monkeypatch.setattr(runs_module, "MAX_WEIGHTS_BYTES", 64)
    with pytest.raises(ValueError, match="even in fp16"):
        tune_module.keep_weights(tune, trial)
    assert not (tune.results / trial.name).exists()  # nothing half-kept


def test_the_repositorys_kept_weights_are_whole() -> None:
    """Every trial folder committed under docs/results/tune holds the weights a later trial or the
    demo builds on (a folder with only its metrics, e.g. weights left out by .gitignore, is useless),
    each within the 10 MB a run may take."""
    from training.llm.runs import MAX_WEIGHTS_BYTES, WEIGHTS

    root = Path(__file__).resolve().parents[1] / "docs" / "results" / "tune"
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        record = json.loads((root / f"{folder.name}.json").read_text())
        needed = WEIGHTS[record["trial"]["stage"]]
        missing = [name for name in needed if not (folder / name).exists()]
        assert not missing, f"{folder.name}: missing {missing}"
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size <= MAX_WEIGHTS_BYTES, f"{folder.name}: {size} bytes"


def test_the_demo_builds_its_bundle_from_the_best_kept_rellax_run(tune: TuneConfig, tmp_path: Path) -> None:
    """`make demo` in a clone: the committed ReLLaX run with the best valid AUC, a recipe trial or a
    study step (never the "+ DIN's logit" variant, which bundles do not serve, nor a step whose stage
    1 has another LoRA layout), restored from its kept weights alone, exports to a bundle that loads
    and scores with the run's K and run id."""
    import shutil

    import training.study.tune as tune_module
    from rellax.bundle import Bundle
    from rellax.entities import Profile
    from training.demo import _restore_study_run, best_study_run
    from training.llm.export import ExportConfig
    from training.llm.export import main as export

    run(tune)
    joint = next(t for t in TRIALS if t.name == "s2-joint")  # the one-stage trial: its own A, B
    tune_module.keep_weights(tune, joint)  # kept again: the fp16 test above may have removed it
    results = tmp_path / "results"
    shutil.copytree(tune.results, results / "tune")
    want = "s2-over-s1"  # made the best of the two ReLLaX trials, beaten only by the variant
    record = json.loads((results / "tune" / f"{want}.json").read_text())
    (results / "tune" / f"{want}.json").write_text(json.dumps({**record, "best_valid_auc": 0.9}))
    fake = {**record, "best_valid_auc": 0.99}
    fake["trial"] = {**fake["trial"], "name": "residual", "din_residual": True}
    (results / "tune" / "residual.json").write_text(json.dumps(fake))
    shutil.copytree(results / "tune" / want, results / "tune" / "residual")
    best = best_study_run(results)
    assert best is not None and (best.name, best.where, best.test_auc) == (want, "trial", None)
    assert best_study_run(tmp_path / "nothing") is None

    # A one-stage study step (its own A, B; stage 1 = the 0-step init the trials keep as s1-init)
    # with a higher valid AUC wins, and the demo reports its test AUC on the study's rows.
    shutil.copytree(results / "tune" / "s1", results / "tune" / "s1-init")
    shutil.copytree(results / "tune" / "s2-joint", results / "rellax-k3")
    step = {"step": "rellax-k3", "valid_auc": 0.95, "k": 3, "stage1": "s1-init", "one_stage": True,
            "device": "cpu/float32", "test": {"auc": 0.61}, "test_rows": 40}  # fmt: skip
    (results / "rellax-k3.json").write_text(json.dumps(step))
    (results / "rellax-merged.json").write_text(
        json.dumps({**step, "step": "rellax-merged", "valid_auc": 1.0})
    )
    best = best_study_run(results)
    assert best is not None and (best.name, best.where, best.test_auc, best.k) == (
        "rellax-k3",
        "step",
        0.61,
        3,
    )
    adapter = results / "tune" / "s1-init" / "adapter" / "adapter_config.json"
    layout = json.loads(adapter.read_text())
    adapter.write_text(json.dumps({**layout, "r": 4}))  # not the layout rellax-k3 was trained over
    assert best_study_run(results).name == want  # type: ignore[union-attr]
    adapter.write_text(json.dumps(layout))

    s1, s2 = _restore_study_run(best, tmp_path / "runs")
    meta = json.loads((s2 / "metrics.json").read_text())
    assert meta["config"]["stage1"] == str(s1)  # points at the restored stage 1, not the trainer's cache
    llmsrec = _random_llmsrec(tmp_path / "llmsrec", tune.model_dir)
    bundle = export(
        ExportConfig(
            stage2=s2,
            out=tmp_path / "bundle",
            din_dir=tune.din_dir,
            merged=False,
            model_dir=tune.model_dir,
            index_dir=tune.index_dir,
            llmsrec=llmsrec,
        )  # fmt: skip
    )
    assert bundle["training"]["stage2_run_id"] == meta["run_id"]
    assert bundle["training"]["llmsrec"]["test"] == {"ndcg@10": 0.5, "hr@10": 0.7, "n": 3}
    assert "llmsrec/items.hnsw" in bundle["files"]  # checksummed like every other part
    loaded = Bundle.load(tmp_path / "bundle")
    assert loaded.config.k == best.k
    item = sorted(loaded.items)[0]
    (p,) = loaded.score_prepared(loaded.prepare(Profile(), [], [item]))
    assert 0.0 < p < 1.0
    # LLM-SRec rides along over the same base; its user pass leaves ReLLaX's adapters as they were.
    from rellax.entities import HistoryEvent

    user = loaded.llmsrec.user_vector([HistoryEvent(item, 4.0, 880_000_000)])
    assert user.shape == (16,) and len(loaded.llmsrec.candidates(user, 5, exclude=[item])) == 5
    (again,) = loaded.score_prepared(loaded.prepare(Profile(), [], [item]))
    assert again == p


def _random_llmsrec(folder: Path, model_dir: Path) -> Path:
    """An untrained LLM-SRec folder over the tiny LLM, as `rellax train llmsrec` lays it out."""
    import numpy as np
    import torch

    from rellax.llmsrec import LLMSRec, LLMSRecRanker
    from rellax.sasrec import SASRec, SASRecConfig
    from training.llm.setup import load_base_lm

    lm, _ = load_base_lm(model_dir)
    ids = list(range(1, 1683))
    SASRec(SASRecConfig(len(ids), dim=8), SASRec.item_map(np.array(ids))).save(folder / "teacher")
    torch.manual_seed(0)
    model = LLMSRec(lm, cf_dim=8, out_dim=16)
    LLMSRecRanker.write(folder, model, ids, torch.randn(len(ids), 16), folder / "teacher", k=10)
    (folder / "metrics.json").write_text(json.dumps({
        "config": {"steps": 0}, "valid": {}, "test": {"ndcg@10": 0.5, "hr@10": 0.7, "n": 3},
        "train_seconds": 0.0, "examples": 0,
    }))  # fmt: skip
    return folder
