"""`rellax experiment tune`: short training trials under one fixed time budget each (issue 16 §1).

The study's recipe (1 epoch, batch 64) left stage 1 at chance; a probe showed stage 2 learning DIN's
signal within 32 small-batch steps. The trials measure what a CPU-hour buys: each trains for at most
`budget_s` seconds of training (validation not counted; on 2 cores, ~15-20 minutes) and records
validation AUC on the same fixed rows against examples seen and training seconds. The recipe is
chosen by valid AUC per CPU-hour, never on test.

Each trial is a stage-1 or stage-2 run of the real trainers in its own folder under `runs` that ends
at its epochs or its budget (`train_loop(fit_budget_s=...)`: validated there, best state kept), and
writes one JSON into `results` (config, curve, cost, device); a finished trial is skipped, and one
cut by the session's end (`max_seconds`) resumes from its checkpoint with what is left of its
budget (the loop counts training seconds across sessions). A stage-2 trial trains over the stage-1
trial it names (`over`): it waits until that one is done. `training.study.report` draws the trials' table
and plot from those files.

A finished trial's trainable weights (LoRA adapter, or SPA + gates) go beside its JSON in
`results/<trial>/` (a few MB, committed), so a stage-2 trial can build on a stage-1 trial trained in
another session or on another machine; only when they are nowhere is the stage-1 trial trained again
(and its record replaced by the new run's).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rellax.device import resolve_device
from rellax.logs import get_logger
from rellax.precision import cpu_supports_bf16
from training.llm import runs
from training.llm.loop import LoopConfig
from training.study.tune_config import DIN_HOLDOUT, TRIALS, Trial, TuneConfig

__all__ = ["TRIALS", "Trial", "TuneConfig", "keep_weights", "restore_weights", "run"]

log = get_logger(__name__)


def _loop(cfg: TuneConfig, trial: Trial) -> LoopConfig:
    prompts = trial.n_rows * (1 if trial.stage == 2 and trial.prompts == "subr" else 2)
    steps = max(1, trial.epochs * -(-prompts // trial.batch_size))
    return LoopConfig(
        lr=trial.lr,
        epochs=trial.epochs,
        batch_size=trial.batch_size,
        micro_batch=min(cfg.micro_batch, trial.batch_size),
        warmup_ratio=trial.warmup_ratio,
        evals_per_epoch=max(1, -(-min(cfg.evals, steps) // max(1, trial.epochs))),
    )


def _stage_config(cfg: TuneConfig, trial: Trial):  # noqa: ANN202 - Stage1Config | Stage2Config
    from training.llm.stage1 import Stage1Config
    from training.llm.stage2 import Stage2Config

    common = dict(
        model_dir=cfg.model_dir,
        index_dir=cfg.index_dir,
        n_rows=trial.n_rows,
        k=trial.k,
        valid_rows=cfg.valid_rows,
        loop=_loop(cfg, trial),
    )
    if trial.stage == 1:
        return Stage1Config(out=cfg.runs / trial.name, target_modules=trial.target_modules, **common)
    return Stage2Config(
        stage1=cfg.runs / str(trial.over),
        out=cfg.runs / trial.name,
        din_dir=din_dir(cfg, trial),
        mode=trial.mode,
        prompts=trial.prompts,
        train_lora=trial.train_lora,
        din_residual=trial.din_residual,
        **common,
    )


def din_dir(cfg: TuneConfig, trial: Trial) -> Path:
    """The frozen DIN folder a trial reads: the shared one, or the hold-out one beside it."""
    return cfg.din_dir if trial.din == "din" else cfg.din_dir.parent / trial.din


def _record(cfg: TuneConfig, trial: Trial, metrics: dict[str, Any]) -> dict[str, Any]:
    """The trial's JSON: what it is, its curve, what it cost, where it ran."""
    result = metrics["result"]
    curve = result["curve"]
    best = max(curve, key=lambda p: p["valid_auc"])
    return {
        "trial": {**asdict(trial), "target_modules": list(trial.target_modules)},
        "budget_s": cfg.budget_s,
        "valid_rows": cfg.valid_rows,
        "steps": result["steps"],
        "examples": result["examples"],
        "curve": curve,
        "best_valid_auc": best["valid_auc"],
        "best_examples": best["examples"],
        "best_seconds": best.get("seconds", 0.0),
        "start_valid_auc": curve[0]["valid_auc"],
        "fit_seconds": round(result.get("fit_seconds", 0.0), 1),
        "train_seconds": round(result["train_seconds"], 1),
        "samples_per_s": round(result["samples_per_s"], 3),
        "trainable_params": metrics["trainable_params"],
        "device": result.get("device", ""),
        "cpu": result.get("cpu", ""),
        "native_bf16": cpu_supports_bf16(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def din_valid_auc(cfg: TuneConfig) -> float:
    """The frozen DIN's AUC on the trials' validation rows: the line stage 2 is to reach."""
    from data.loading import load_dataset
    from training.fewshot import eval_rows
    from training.llm.data import Catalogue
    from training.llm.evaluate import din_predictions
    from training.llm.setup import load_din
    from training.metrics import ctr_metrics

    data, samples, _ = load_dataset()
    rows = eval_rows(samples, "valid", cfg.valid_rows)
    p = din_predictions(load_din(cfg.din_dir), Catalogue.from_tables(data), samples, rows)
    return ctr_metrics(samples.label[rows], p)["auc"]


def keep_weights(cfg: TuneConfig, trial: Trial) -> str:
    """Copy the finished trial's trainable weights to `results/<trial>/` (`runs.keep_weights`)."""
    return runs.keep_weights(cfg.runs / trial.name, cfg.results / trial.name, trial.stage)


def restore_weights(cfg: TuneConfig, trial: Trial) -> bool:
    """Make `runs/<trial>/` hold the trial's weights (`runs.restore_weights`)."""
    return runs.restore_weights(cfg.runs / trial.name, cfg.results / trial.name, trial.stage)


def run(cfg: TuneConfig) -> dict[str, str]:
    """Run every unfinished trial (of `cfg.only`, if set) in order; {trial: state}, state one of
    done (found), ran, waiting (its stage-1 trial is not done), paused (session time), not selected."""
    from training.crm.crm import ensure_din
    from training.llm.stage1 import main as stage1
    from training.llm.stage2 import main as stage2

    cfg.results.mkdir(parents=True, exist_ok=True)
    ensure_din(cfg.din_dir)
    if any(t.din == "din-holdout" and (not cfg.only or t.name in cfg.only) for t in cfg.trials):
        ensure_din(cfg.din_dir.parent / "din-holdout", holdout_fewshot=DIN_HOLDOUT)
    by_name = {trial.name: trial for trial in cfg.trials}
    deadline = None if cfg.max_seconds is None else time.monotonic() + cfg.max_seconds
    status: dict[str, str] = {}

    def train(trial: Trial) -> bool:
        """Train `trial` to its epochs or budget and record it; False when the session's end paused it."""
        stage = stage1 if trial.stage == 1 else stage2
        try:  # ends at its epochs or its budget; past the session's deadline it pauses, resumably
            metrics = stage(_stage_config(cfg, trial), deadline=deadline, fit_budget_s=cfg.budget_s)
        except TimeoutError as paused:
            log.info("trial paused", trial=trial.name, why=str(paused))
            return False
        record = _record(cfg, trial, metrics)
        record["weights_dtype"] = keep_weights(cfg, trial)
        (cfg.results / f"{trial.name}.json").write_text(json.dumps(record, indent=1))
        log.info("trial done", trial=trial.name, best_valid_auc=round(record["best_valid_auc"], 4))
        return True

    for trial in cfg.trials:
        out = cfg.results / f"{trial.name}.json"
        if out.exists():
            status.setdefault(trial.name, "done")
        elif cfg.only and trial.name not in cfg.only:
            status[trial.name] = "not selected"
        elif trial.stage == 2 and not (cfg.results / f"{trial.over}.json").exists():
            status[trial.name] = "waiting"
        elif deadline is not None and time.monotonic() > deadline:
            status[trial.name] = "paused"
        else:
            base = by_name.get(str(trial.over))
            if base is not None and not restore_weights(cfg, base):
                log.warning("the stage-1 trial's weights are lost; training it again", trial=base.name)
                if not train(base):
                    status[trial.name] = "paused"
                    continue
                status[base.name] = "ran"
            status[trial.name] = "ran" if train(trial) else "paused"
    summary = {
        "device": str(resolve_device()),
        "budget_s": cfg.budget_s,
        "valid_rows": cfg.valid_rows,
        "din_valid_auc": din_valid_auc(cfg),
        "status": status,
    }
    (cfg.results / "tune.json").write_text(json.dumps(summary, indent=1))
    return status
