"""The quality study's harness end to end on a tiny random Llama (real ML-100K rows, real DIN code):
every step runs once and is reused after, LLM scoring resumes from its partial file, the stage-1
run the ablations build on is chosen on validation AUC, and the report is rendered from the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rellax.precision import cpu_model
from training.metrics import ctr_metrics
from training.tables import table_rows


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, din_dir: Path):  # noqa: ANN201
    import shutil

    from training.study.experiment import ExperimentConfig

    root = tmp_path_factory.mktemp("study")
    shutil.copytree(din_dir, root / "din")
    shutil.copytree(din_dir, root / "din-holdout")  # a bare model: taken as the hold-out DIN
    return ExperimentConfig(
        results=root / "docs" / "results",
        runs=root / "runs",
        test_rows=40,
        k=5,
        n_values=(8, 16),
        k_sweep=(3,),
        n_sweep=(24,),
        b_sweep=(16,),
        zero_shot=("recency", "subr"),
        valid_rows=24,
        stage1_lr=1e-2,
        stage2_lr=1e-2,
        batch_size=8,
        micro_batch=4,
        chunk=16,
        model_dir=tiny_model_dir,
        din_dir=root / "din",
        din_holdout=True,  # the wiring under test: LLM steps read it, the baselines score it too
        index_dir=root / "index",
    )


@pytest.fixture(scope="module")
def ran(study):  # noqa: ANN001, ANN201
    # A paused zero-shot-subr scoring: its first chunk already on disk, with a sentinel value.
    import hashlib

    from data.loading import load_dataset
    from training.fewshot import eval_rows
    from training.study.experiment import partial_scores_path, plan, run

    rows = eval_rows(load_dataset()[1], "test", study.test_rows, seed=study.test_seed)
    rows_hash = hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest()[:16]
    partial = partial_scores_path(study.runs / "zero-shot-subr", f"base-k{study.k}", rows_hash)
    partial.parent.mkdir(parents=True)
    np.savez(partial, p=np.full(study.chunk, 0.123), seconds=1000.0)  # an earlier session's chunk
    stale = partial_scores_path(study.runs / "zero-shot-recency", "another-model", rows_hash)
    stale.parent.mkdir(parents=True)
    np.savez(stale, p=np.full(study.chunk, 0.321), seconds=1000.0)  # never picked up
    status = run(study)
    return status, plan(study)


def _record(study, name: str) -> dict:  # noqa: ANN001
    return json.loads((study.results / f"{name}.json").read_text())


def test_every_step_runs_once_then_is_reused(study, ran) -> None:  # noqa: ANN001
    from training.study.experiment import run

    status, steps = ran
    assert steps == [
        "baselines",
        "zero-shot-recency",
        "zero-shot-subr",
        "rellax",
        "rella-n8",
        "rella-n16",
        "spa",
        "cflora",
        "rellax-random-init",
        "rellax-merged",
        "rellax-two-stage",
        "rellax-k3",
        "rellax-n24",
        "rellax-b16",
        "rellax-bf16",
    ]
    # rellax-bf16 reruns a ReLLaX that trained in fp32, on a native-bf16 CPU only: here rellax trained
    # in this CPU's own recipe, so the step waits (no native bf16) or has nothing to do (the test
    # below makes the case for a rerun).
    from rellax import precision

    rerun = "not needed" if precision.cpu_supports_bf16() else "waiting"
    assert status == dict.fromkeys(steps[:-1], "ran") | {"rellax-bf16": rerun}
    before = {name: (study.results / f"{name}.json").read_text() for name in steps[:-1]}
    assert run(study) == dict.fromkeys(steps[:-1], "done") | {"rellax-bf16": rerun}
    assert {name: (study.results / f"{name}.json").read_text() for name in steps[:-1]} == before


def test_scoring_resumed_from_the_partial_file(study, ran) -> None:  # noqa: ANN001
    p = np.asarray(_record(study, "zero-shot-subr")["predictions"])
    assert p.shape == (40,)
    np.testing.assert_allclose(p[: study.chunk], 0.123)  # kept, not recomputed
    assert not np.allclose(p[study.chunk :], 0.123)
    assert _record(study, "zero-shot-subr")["score_seconds"] >= 1000  # the earlier session's time counts
    assert _record(study, "zero-shot-recency")["score_seconds"] < 1000
    other = np.asarray(_record(study, "zero-shot-recency")["predictions"])
    assert not np.isclose(other, 0.321).any()  # another model's partial file is not this one's


def test_records_hold_metrics_predictions_and_training_facts(study, ran, ml100k_samples) -> None:  # noqa: ANN001
    from training.fewshot import eval_rows

    labels = ml100k_samples.label[eval_rows(ml100k_samples, "test", 40, seed=1234)]
    base = _record(study, "baselines")["models"]
    names = {"DIN", "DIN (hold-out)", "LR one-hot", "user+item mean prior", "LR on prompt features"}
    assert set(base) == names
    assert base["LR on prompt features"]["test"]["auc"] > 0.55  # the prompt's own stars carry signal
    assert base["LR on prompt features"]["trainable_params"] == 4  # three features and a bias
    assert base["DIN"]["trainable_params"] > base["LR one-hot"]["trainable_params"] > 0
    n_train = len(ml100k_samples.indices("train"))  # the fixture's DIN is untrained: no record of it
    assert all(m["train_examples"] == n_train for name, m in base.items() if not name.startswith("DIN"))
    for name in ("rella-n8", "spa", "cflora", "rellax", "rellax-merged"):
        r = _record(study, name)
        assert r["test"] == pytest.approx(ctr_metrics(labels, np.asarray(r["predictions"])), abs=1e-5)
        # Scored as bundles are served (fp32), also where training ran in the bf16 recipe.
        assert r["score_dtype"] == "float32", name
        assert r["trainable_params"] > 0 and r["samples_per_s"] > 0 and 0 <= r["valid_auc"] <= 1
        assert r["device"] in ("cpu/float32", "cpu/bfloat16")  # where it trained, recorded with it
        assert r["cpu"] == r["score_cpu"] == cpu_model()  # and on which CPU (speed depends on it)
    best = max(("rella-n8", "rella-n16"), key=lambda n: _record(study, n)["valid_auc"])
    for name in ("spa", "cflora", "rellax", "rellax-random-init", "rellax-k3"):  # one stage, largest N
        r = _record(study, name)
        assert r["one_stage"] and r["stage1"] == "s1-init" and r["n_rows"] == 16
    two = _record(study, "rellax-two-stage")
    assert not two["one_stage"] and two["stage1"] == best  # chosen on validation, never test
    assert _record(study, "rellax-k3")["k"] == 3
    # More rows at the K whose run validated best (never test): 24 rows, the one-stage recipe.
    longer = _record(study, "rellax-n24")
    best_k = max(("rellax", "rellax-k3"), key=lambda n: _record(study, n)["valid_auc"])
    assert longer["n_rows"] == 24 and longer["k"] == _record(study, best_k)["k"] and longer["one_stage"]
    assert longer["train_examples"] > _record(study, "rellax")["train_examples"]
    # Another optimizer batch at that K, on the same rows: half the optimizer steps of batch 8.
    wider = _record(study, "rellax-b16")
    assert wider["batch_size"] == 16 and wider["k"] == longer["k"] and wider["n_rows"] == 16
    assert wider["one_stage"] and _record(study, "rellax")["batch_size"] == 8
    steps = json.loads((study.runs / "rellax-b16" / "metrics.json").read_text())["result"]["steps"]
    assert steps == json.loads((study.runs / "rellax" / "metrics.json").read_text())["result"]["steps"] // 2
    # Every LLM step read the hold-out DIN, not the shared one.
    meta = json.loads((study.runs / "rellax" / "metrics.json").read_text())
    assert Path(meta["config"]["din_dir"]) == study.din_dir.parent / "din-holdout"
    exact, merged = _record(study, "rellax"), _record(study, "rellax-merged")
    # Folding the mean gate in is an approximation of per-instance gates: close after a short stage 2.
    assert merged["merged_from"] == "rellax" and merged["valid_auc"] == exact["valid_auc"]
    np.testing.assert_allclose(merged["predictions"], exact["predictions"], atol=0.05)
    assert exact["trainable_params"] > _record(study, "spa")["trainable_params"]  # gates + projector


def test_report_renders_from_the_json(study, ran) -> None:  # noqa: ANN001
    from training.study.report import render

    out = study.results.parent / "results.md"
    sasrec = {
        "n": 2,
        "hr@10": 0.5,
        "ndcg@10": 0.25,
        "hr@20": 1.0,
        "ndcg@20": 0.4,
        "seconds": 1.0,
        "ranks": [0, 12],
    }
    ranking = {"cases": 2, "negatives": 99, "seed": 0, "ndcg10_diffs": {}, "models": {"SASRec": sasrec}}
    (study.results / "ranking.json").write_text(json.dumps(ranking))  # `rellax experiment ranking`'s file
    try:
        text = render(study.results, out)
    finally:
        (study.results / "ranking.json").unlink()
    assert out.read_text() == text
    rows = {row[0]: row for row in table_rows(text)}
    assert "## Ranking" in text and rows["SASRec"][:4] == [
        "SASRec",
        "2",
        "0.5000",
        "0.2500",
    ]  # its own section
    for heading in ("## Main table", "## Ablation", "## K sweep", "## Paired bootstrap", "## Reading"):
        assert heading in text
    assert (study.results.parent / "learning_curves.png").stat().st_size > 1000
    assert "ReLLaX - DIN" in rows and "+SPA - ReLLa" in rows
    assert "ReLLaX K=3 - DIN" in rows and "ReLLaX K=3 - K=5" in rows  # the K sweep against the bar
    k = _record(study, "rellax-n24")["k"]
    assert "## N sweep" in text and f"K={k}, N=24" in rows and f"K={k}, N=16" in rows
    assert f"ReLLaX N=24 (K={k}) - DIN" in rows and f"ReLLaX N=24 - N=16 (K={k})" in rows
    assert "## Batch sweep" in text and f"K={k}, B=16" in rows and f"K={k}, B=8" in rows
    assert f"ReLLaX B=16 (K={k}) - DIN" in rows and f"ReLLaX B=16 - B=8 (K={k})" in rows
    assert "- ReLLaX >= DIN, for the ReLLaX run with the best valid AUC (" in text
    assert "Read a DIN retrained" not in text  # every step read the DIN the baselines scored
    chance = rows["zero-shot SUBR - chance"][1]  # its AUC - 0.5, exactly
    assert float(chance) == pytest.approx(_record(study, "zero-shot-subr")["test"]["auc"] - 0.5, abs=1e-4)
    assert "ReLLaX >= DIN on test AUC: " in text and "not measured yet" not in text
    assert "Not measured yet" not in text and "Not run yet" not in text
    from rellax import precision

    # Only the bf16 rerun can stay pending: on a CPU without native bf16 it waits for one.
    pending = [line for line in text.splitlines() if line.startswith("Pending steps")]
    assert [p.rpartition(": ")[2] for p in pending] == (
        [] if precision.cpu_supports_bf16() else ["rellax-bf16."]
    )
    assert "Against DIN, the paper (ML-1M, 13B LLM): zero-shot -0.0969" in text
    assert "- Curve, rella-n8: valid AUC" in text and "- Curve, rellax: valid AUC" in text
    assert "N=16,384 (x1 prompts) was not run" in text  # SUBR prompts only: one a row


def test_the_curve_reading_says_where_validation_peaked() -> None:
    from training.study.report import _curve_reading

    def run(aucs: list[float], n_rows: int = 1024) -> dict:
        curve = [{"step": i, "examples": 64 * i, "valid_auc": a} for i, a in enumerate(aucs)]
        return {"curve": curve, "n_rows": n_rows, "samples_per_s": 0.5}

    noisy = run([0.5147, 0.4803, 0.5153])  # rella-n1024's real shape: +0.0006 on 512 rows
    noisy["curve"][-1]["decision_loss"] = 0.7
    lines = _curve_reading(
        {
            "rella-n1024": run([0.5, 0.6, 0.7]),
            "spa": run([0.7, 0.8, 0.72]),
            "cflora": run([0.7, 0.69, 0.65]),
            "rellax": noisy,
        },
        valid_rows=512,
        label_rate=0.5,
    )
    assert "rella-n1024: valid AUC 0.5000 at the start, 0.7000 after 128 examples" in lines[0]
    assert "best at the last point" in lines[0]
    assert "peaked at 64 examples (0.8000), then fell" in lines[1]
    assert "never above its starting point" in lines[2]
    noise = "its best (0.5153) is within noise of its start (2 standard errors of a 512-row AUC: 0.051)"
    assert noise in lines[3]
    assert "still rising" not in lines[3]
    assert lines[3].endswith("Yes/No token 0.700 at the last point, against 0.693 for a constant prediction.")
    assert "Yes/No" not in lines[0]  # no decision loss recorded: nothing said
    assert lines[4].endswith("0.50 training samples/s it would take about 18 h of training on this machine.")


def test_only_runs_the_selected_steps_and_waits_for_what_they_need(study, tmp_path: Path) -> None:  # noqa: ANN001
    import dataclasses

    from training.study.experiment import plan, run

    cfg = dataclasses.replace(study, results=tmp_path / "results", only=("rellax-two-stage",))
    status = run(cfg)
    assert status["rellax-two-stage"] == "waiting"  # it needs the N sweep's selected run first
    assert {s for name, s in status.items() if name != "rellax-two-stage"} == {"not selected"}
    assert list(status) == plan(cfg)
    assert not list((tmp_path / "results").glob("rella*.json"))


def test_a_partial_study_renders_what_is_missing(study, ran, tmp_path: Path) -> None:  # noqa: ANN001
    """Only the baselines finished: the report shows them, says which targets and comparisons are
    not measured yet, and lists every pending step, instead of failing or inventing numbers."""
    import shutil

    from training.study.report import render

    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(study.results / "baselines.json", results)
    status = json.loads((study.results / "experiment.json").read_text())
    status["status"] = {name: ("ran" if name == "baselines" else "paused") for name in status["status"]}
    n8, n16 = _record(study, "rella-n8")["curve"], _record(study, "rella-n16")["curve"]
    status["progress"] = {  # one run paused mid-training, one trained and part-scored
        "rella-n8": {"curve": n8[:2], "trained": False},
        "rella-n16": {"curve": n16, "trained": True, "scored": 16},
    }
    (results / "experiment.json").write_text(json.dumps(status))
    text = render(results, tmp_path / "results.md")
    assert "## Learning curves" in text and (tmp_path / "learning_curves.png").stat().st_size > 1000
    start = f"valid AUC {n8[0]['valid_auc']:.4f} at the start"
    assert f"- Curve so far, rella-n8 (training, paused): {start}" in text
    assert f"{n8[1]['valid_auc']:.4f} after {n8[1]['examples']:,} examples" in text
    assert "- Curve so far, rella-n16 (trained, 16 of 40 test rows scored): valid AUC" in text
    rows = {row[0] for row in table_rows(text)}
    assert "rella-n8" not in rows  # a curve so far is no result: no table row, no test AUC
    assert "DIN" in rows and "LR on prompt features" in rows
    assert "DIN - LR on prompt features" in rows  # the one comparison that exists already
    assert "Not run yet." in text and "ReLLaX >= DIN on test AUC: not measured yet." in text
    pending = text.split("Pending steps")[1].split("\n")[0]
    assert "rellax-merged" in pending and "baselines" not in pending  # finished, though not "done" here
    assert "Not in this study's plan" not in text  # this study asked for recency and the hold-out DIN
    status["config"] = {**status["config"], "zero_shot": ["subr"], "din_holdout": False}
    (results / "experiment.json").write_text(json.dumps(status))
    text = render(results, tmp_path / "results.md")
    measured_later = text.split("Not measured yet: ")[1].split("\n")[0]
    unplanned = text.split("Not in this study's plan (the option that adds it): ")[1].split("\n")[0]
    assert "zero-shot SUBR - zero-shot recency (`--zero-shot recency`)" in unplanned
    assert "ReLLaX - DIN (hold-out, the DIN it reads) (`--din-holdout`)" in unplanned
    assert "recency" not in measured_later and "ReLLaX - DIN;" in measured_later  # planned, not run yet


def test_the_report_asks_what_rellax_adds_to_din() -> None:
    """A ReLLaX that copies DIN adds nothing when averaged with it; one that carries signal DIN
    lacks does, and the report tells the two apart with an interval."""
    from scipy.special import expit as sigmoid
    from sklearn.metrics import roc_auc_score

    from training.study.report import _beyond_din

    rng = np.random.default_rng(0)
    n = 2000
    a, b = rng.normal(size=n), rng.normal(size=n)  # two independent sources of the label
    labels = (a + b + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    din = {"test": {"auc": 0.0}, "predictions": sigmoid(a).tolist()}  # knows a only

    def records(llm: np.ndarray) -> dict:
        return {"DIN": din, "rellax": {"predictions": sigmoid(llm).tolist(), "valid_auc": 0.7}}

    copy = _beyond_din(records(a + 0.1 * rng.normal(size=n)), labels)
    assert len(copy) == 1 and copy[0].startswith("- What rellax adds to DIN (a diagnostic, not a model)")
    assert "correlates 0.99 with DIN's" in copy[0] and copy[0].endswith(": nothing beyond DIN.")
    other = _beyond_din(records(b), labels)[0]  # knows what DIN does not
    assert "correlates 0.0" in other or "correlates -0.0" in other
    assert other.endswith(": a gain beyond DIN.")
    gain = roc_auc_score(labels, a + b) - roc_auc_score(labels, a)  # the mean logit ranks as the sum
    assert f"the mean of the two logits - DIN {gain:+.4f} (95% interval [+0." in other


def test_a_target_whose_interval_includes_zero_is_not_called_met() -> None:
    """SUBR's +0.0053 over recency with interval [-0.0109, +0.0224] is no measured gain: the
    verdict says so, while a gain whose whole interval is above 0 (or a loss below it) stays plain."""
    from training.study.report import _verdict

    assert _verdict(0.0053, {"lo": -0.0109, "hi": 0.0224}).startswith("met on the point estimate only")
    assert "not significant" in _verdict(-0.01, {"lo": -0.03, "hi": 0.002})
    assert _verdict(0.03, {"lo": 0.01, "hi": 0.05}) == "met"
    assert _verdict(-0.27, {"lo": -0.29, "hi": -0.25}) == "missed"
    assert _verdict(0.01, None) == "met"  # no bootstrap for this pair: the point estimate is all we have


def test_progress_reads_unfinished_runs_from_their_checkpoints(study, ran, tmp_path: Path) -> None:  # noqa: ANN001
    """What a session leaves behind: a trained run's final curve and its scored-row count, a run
    paused mid-training's curve so far (curve.json beside the checkpoint); nothing for a run with
    no curve. A finished study records no progress at all."""
    import hashlib
    import shutil
    from dataclasses import replace

    from training.study.experiment import progress

    status = json.loads((study.results / "experiment.json").read_text())
    assert status["progress"] == {}  # every step has its JSON
    rows_hash = status["rows_hash"]
    trained = progress(study, rows_hash, ["rella-n8", "zero-shot-subr"])
    assert set(trained) == {"rella-n8"}  # zero-shot scoring has no curve
    assert trained["rella-n8"]["trained"] and trained["rella-n8"]["scored"] == 40
    assert trained["rella-n8"]["curve"] == _record(study, "rella-n8")["curve"]
    runs = tmp_path / "runs"
    (runs / "rella-n8").mkdir(parents=True)
    shutil.copy(study.runs / "rella-n8" / "curve.json", runs / "rella-n8")  # paused before metrics.json
    paused = progress(replace(study, runs=runs), rows_hash, ["rella-n8", "rella-n16"])
    assert paused == {"rella-n8": {"curve": trained["rella-n8"]["curve"], "trained": False}}
    other = hashlib.sha256(b"other rows").hexdigest()[:16]  # scored on other rows: none of it counts
    assert progress(study, other, ["rella-n8"])["rella-n8"]["scored"] == 0


def test_a_fresh_cache_resumes_from_the_committed_weights(study, ran, tmp_path: Path) -> None:  # noqa: ANN001
    """Every training step leaves its trainable weights beside its JSON; a machine with none of the
    run folders re-runs only the unfinished steps, building them on those committed weights: the
    merged model and the two-stage run come out as on the machine that trained them."""
    import dataclasses
    import shutil

    from training.llm.runs import WEIGHTS
    from training.study.experiment import run

    trained = [("rella-n8", 1), ("rella-n16", 1), ("rellax", 2), ("spa", 2), ("rellax-two-stage", 2)]
    for name, stage in trained:
        assert all((study.results / name / f).exists() for f in WEIGHTS[stage][:2]), name
    results = tmp_path / "results"
    shutil.copytree(study.results, results)
    for name in ("rellax-merged", "rellax-two-stage"):
        (results / f"{name}.json").unlink()
    shutil.rmtree(results / "rellax-two-stage")
    cfg = dataclasses.replace(study, results=results, runs=tmp_path / "empty-runs")
    status = run(cfg)
    assert {n for n, s in status.items() if s == "ran"} == {"rellax-merged", "rellax-two-stage"}
    assert status["rellax"] == "done" and not (cfg.runs / "spa").exists()  # nothing else re-ran
    for name in ("rellax-merged", "rellax-two-stage"):
        again, before = _record(cfg, name), _record(study, name)
        np.testing.assert_allclose(again["predictions"], before["predictions"], atol=1e-5)


def test_the_report_flags_comparisons_across_training_dtypes() -> None:
    """A run trained in fp32 beside one trained in the bf16 recipe is not a like-for-like ablation:
    the report says which comparisons mix the two."""
    from training.study.report import _mixed_dtypes

    records = {
        "rellax": {"device": "cpu/float32"},
        "cflora": {"device": "cpu/bfloat16"},
        "spa": {"device": "cpu/float32"},
        "DIN": {},
    }
    labels = ("ReLLaX - CFLoRA only (what SPA adds)", "ReLLaX - SPA only (what CFLoRA adds)", "ReLLaX - DIN")
    diffs = {label: {} for label in labels}
    assert _mixed_dtypes(records, diffs) == [
        "ReLLaX - CFLoRA only (what SPA adds) (rellax float32, cflora bfloat16)"
    ]


def test_a_fp32_rellax_is_rerun_in_bf16_and_compared_like_for_like(
    study, ran, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """The ablations trained in the bf16 recipe, ReLLaX in fp32 on another machine: rellax-bf16
    retrains it in bf16 and the report repeats each mixed comparison with it (and says what the
    recipe's dtype alone does). Where the CPU lacks native bf16 the step waits instead of running
    emulated bf16 (~400x slower): forced here to the native case, on the tiny model."""
    import dataclasses
    import shutil

    from rellax import precision
    from training.study.experiment import run
    from training.study.report import render

    results = tmp_path / "results"
    shutil.copytree(study.results, results)
    for name, device in (("rellax", "cpu/float32"), ("cflora", "cpu/bfloat16"), ("spa", "cpu/bfloat16")):
        record = json.loads((results / f"{name}.json").read_text())
        record["device"] = device  # as the records of two machines would say
        (results / f"{name}.json").write_text(json.dumps(record))
    cfg = dataclasses.replace(study, results=results, only=("rellax-bf16",))
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    assert run(cfg)["rellax-bf16"] == "waiting"  # no native bf16: not run emulated
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert run(cfg)["rellax-bf16"] == "ran"
    rerun = json.loads((results / "rellax-bf16.json").read_text())
    assert rerun["device"] == "cpu/bfloat16" and rerun["score_dtype"] == "float32"
    assert rerun["k"] == study.k and rerun["n_rows"] == _record(study, "rellax")["n_rows"]
    rows = {row[0]: row for row in table_rows(render(results, tmp_path / "results.md"))}
    assert "rellax-bf16" in rows  # the ablation table
    assert "ReLLaX bf16 recipe - fp32 recipe (same run otherwise)" in rows
    for label in ("ReLLaX - CFLoRA only (what SPA adds)", "ReLLaX - SPA only (what CFLoRA adds)"):
        assert f"{label}, bf16 rerun" in rows
    assert "ReLLaX - DIN, bf16 rerun" not in rows  # DIN has no recipe dtype: nothing was mixed
    # The baselines' DIN retrained after a lost cache: the steps that read the earlier one say so.
    base = json.loads((results / "baselines.json").read_text())
    din = rerun["din"]
    assert din["sha256"] == base["models"]["DIN (hold-out)"]["sha256"]  # the one the LLM steps read
    assert din["test_auc"] == pytest.approx(base["models"]["DIN (hold-out)"]["test"]["auc"], abs=1e-6)
    for name in ("DIN", "DIN (hold-out)"):
        base["models"][name]["sha256"] = "0" * 16
    (results / "baselines.json").write_text(json.dumps(base))
    text = render(results, tmp_path / "results.md")
    mixed = next(line for line in text.splitlines() if line.startswith("Trained in different dtypes"))
    assert "ReLLaX - CFLoRA only (what SPA adds) (rellax float32, cflora bfloat16)" in mixed
    assert "bf16 recipe - fp32 recipe" not in mixed  # that one measures the dtype, by design
    drift = next(line for line in text.splitlines() if line.startswith("Read a DIN retrained"))
    assert f"rellax-bf16 (DIN {din['sha256'][:8]}, test AUC {din['test_auc']:.4f})" in drift
