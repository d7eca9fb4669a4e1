"""`rellax experiment ml100k`: the quality study, as resumable steps (issue 16 §2).

Every model is scored on the same fixed, seeded test rows (2,000 of the test split: LLM scoring
costs about 0.35 s a row on 2 cores, and every model, DIN and the baselines included, is scored
on those same rows). Each step writes one JSON file into the results folder (metrics, selection
figures, training cost, device and dtype, and the per-row predictions, so paired bootstrap
intervals and the report can be recomputed without the models) and is skipped when that file
exists with the same rows. LLM scoring is checkpointed every `chunk` rows and training through the
stage loops' own checkpoints, so a killed run (or a session ending) loses minutes, not hours: run
the same command again. A finished training step's trainable weights (LoRA, SPA, gates; at most
10 MB, fp16 when larger) go beside its JSON in `results/<step>/`: a step that builds on it (the
merged model, the two-stage variant) restores them on a machine whose cache is empty.

The recipe is the tuning trials' (`rellax experiment tune`, docs/results.md): batch 8, lr 1e-3
with warmup, one epoch over N = 1,024 rows, SUBR prompts only, K = 5, q/v LoRA, and stage 2 as
the one-stage variant (LoRA A, B trained with the SPA projector and gates from step 0). Every step
trains on the same 1,024 prompts, so an ablation differs from ReLLa in its modules only. Each step
fits in about 90 minutes on a 2-core fp32 machine (about half that with native bf16).

Steps, in order (a step needing an unfinished one waits for a later invocation). The order puts
the answers the conclusions rest on first.
  baselines            DIN (and the hold-out DIN, when the LLM steps read it), LR one-hot, mean
                       prior, LR on prompt features
  zero-shot-recency    the base LLM on recency / SUBR K prompts (each `--zero-shot` mode; both by
  zero-shot-subr       default: the paper's claim that SUBR helps even without training)
  rellax               ReLLaX, one stage: LoRA + SPA + CFLoRA gates (identity init)
  rella-n{N}           ReLLa: LoRA only (stage 1), the same prompts
  spa / cflora         LoRA + SPA only / LoRA + gates only
  rellax-random-init   ReLLaX with the authors' random gate init
  rellax-merged        the rellax run with CFLoRA folded in at the mean gate (what vLLM serves)
  rellax-two-stage     the paper's two stages: SPA + gates over the ReLLa run, A and B frozen
  rellax-k{K}          ReLLaX at another K
  rellax-n{N}          ReLLaX on N training rows, at the K whose run has the best valid AUC (waits
                       for the K sweep): does more data close the gap to DIN?
  rellax-b{B}          ReLLaX at optimizer batch B, at the K whose run has the best valid AUC (the
                       recipe trials' batch-16 run came within 0.002 of DIN's valid AUC)
  rellax-bf16          `rellax` retrained in the bf16 recipe, where it trained in fp32 (another
                       machine) and this CPU has native bf16: the one-stage ablations trained in
                       bf16, so the within-family comparisons need a like-for-like ReLLaX
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rellax import precision
from rellax.assets import prepare_model
from rellax.device import resolve_device
from rellax.features import Featurizer, Mode
from rellax.item_index import ItemIndex
from rellax.logs import get_logger
from rellax.scorer import ScoringModel
from rellax.tokens import answer_token_ids
from training.crm.crm import ensure_din
from training.fewshot import eval_rows
from training.llm.data import Catalogue, LLMExample
from training.llm.harness import (
    load_mean_gates,
    load_partial_scores,
    merged_at_mean_gates,
    row_examples,
    score_resumably,
)
from training.llm.loop import LoopConfig
from training.llm.runs import keep_weights, restore_weights
from training.llm.setup import default_index_dir, din_checksum, load_base_lm, load_din, load_or_build_index
from training.metrics import ctr_metrics
from training.study.config import ExperimentConfig, is_batch_step
from training.study.tune import DIN_HOLDOUT

__all__ = ["ExperimentConfig", "plan", "progress", "run"]

log = get_logger(__name__)

STAGE2_STEPS = ("rellax", "spa", "cflora", "rellax-random-init")  # the one-stage runs, over s1-init
# Test rows are scored in the dtype bundles are served in (`RELLAX_DTYPE=auto`: fp32), whatever the
# CPU: on a native-bf16 CPU training may run in the bf16 recipe (faster, recorded as `device`), but
# a figure in the report must describe the model as served, and every step the same way.
SCORE_DTYPE = precision.name(precision.resolve("auto"))
S1_INIT = "s1-init"  # a 0-step stage-1 run: the seeded LoRA init (B = 0) the one-stage runs start from


def plan(cfg: ExperimentConfig) -> list[str]:
    """Step names in run order."""
    zero_shot = [f"zero-shot-{mode}" for mode in cfg.zero_shot]
    steps = ["baselines", *zero_shot, "rellax", *(f"rella-n{n}" for n in cfg.n_values)]
    steps += [s for s in STAGE2_STEPS if s != "rellax"] + ["rellax-merged", "rellax-two-stage"]
    steps += [f"rellax-k{k}" for k in cfg.k_sweep if k != cfg.k]
    steps += [f"rellax-n{n}" for n in cfg.n_sweep if n != max(cfg.n_values)]
    steps += [f"rellax-b{b}" for b in cfg.b_sweep if b != cfg.batch_size]
    return steps + (["rellax-bf16"] if cfg.bf16_rerun else [])


def partial_scores_path(folder: Path, model_id: str, rows_hash: str, dtype: str = SCORE_DTYPE) -> Path:
    """Where a model's finished scoring chunks live: named by model, dtype and rows, so a retrained
    model (a new run id), another dtype or another row set never inherits them."""
    return folder / f"partial-{model_id}-{dtype}-{rows_hash}.npz"


class _Context:
    """What every step shares: data, fixed rows, the base model factory, and the results folder."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        from data.loading import load_dataset

        self.cfg = cfg
        self.data, self.samples, self.manifest = load_dataset()
        self.catalogue = Catalogue.from_tables(self.data)
        self.rows = eval_rows(self.samples, "test", cfg.test_rows, seed=cfg.test_seed)
        self.labels = self.samples.label[self.rows].astype(np.int64)
        self.rows_hash = hashlib.sha256(self.rows.astype(np.int64).tobytes()).hexdigest()[:16]
        self.model_dir = prepare_model(cfg.model_dir)
        self.index_dir = cfg.index_dir or default_index_dir(cfg.model_dir)
        self.din_dir = cfg.din_dir.parent / f"{cfg.din_dir.name}-holdout" if cfg.din_holdout else cfg.din_dir
        self.started = time.monotonic()
        cfg.results.mkdir(parents=True, exist_ok=True)
        # Trained when missing (the hold-out one leaves out every N the study and the trials train
        # on); a recorded one must be the DIN asked for; a bare model (made by hand) is taken as is.
        for folder, held in ((cfg.din_dir, ()), (self.din_dir, DIN_HOLDOUT if cfg.din_holdout else ())):
            if (folder / "metrics.json").exists() or not (folder / "model.safetensors").exists():
                ensure_din(folder, holdout_fewshot=held)

    @property
    def deadline(self) -> float | None:
        """`time.monotonic()` past which training and scoring pause (resumably)."""
        limit = self.cfg.max_seconds
        return None if limit is None else self.started + limit

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def result(self, name: str) -> dict[str, Any] | None:
        path = self.cfg.results / f"{name}.json"
        if not path.exists():
            return None
        found = json.loads(path.read_text())
        return found if found.get("rows_hash") == self.rows_hash else None

    def save(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        payload = {"step": name, "rows_hash": self.rows_hash, "test_rows": len(self.rows), **payload}
        (self.cfg.results / f"{name}.json").write_text(json.dumps(payload, indent=1))
        models = payload.get("models", {name: payload})  # the baselines step holds several models
        aucs = {m: round(r["test"]["auc"], 4) for m, r in models.items() if "test" in r}
        log.info("experiment step done", step=name, test_auc=aucs)
        return payload

    @functools.cached_property
    def din_facts(self) -> dict[str, Any]:
        """Which DIN the LLM steps read: its weights' checksum and its AUC on the fixed test rows. A
        DIN retrained on another machine differs in the last digits (BLAS kernels differ), so a step
        records the one it read and the report can say when that is not the DIN row's."""
        from training.llm.evaluate import din_predictions

        p = din_predictions(load_din(self.din_dir), self.catalogue, self.samples, self.rows)
        return {"sha256": din_checksum(self.din_dir), "test_auc": ctr_metrics(self.labels, p)["auc"]}

    def base(self) -> tuple[Any, Any, Any]:
        """A fresh base LLM (each step injects its own adapters), its tokenizer, the item index."""
        lm, tok = load_base_lm(self.model_dir, bf16=SCORE_DTYPE == "bfloat16")
        return lm, tok, load_or_build_index(self.index_dir, lm, tok, self.catalogue, self.manifest)

    def item_index(self) -> Any:
        return (
            self.base()[2] if not (self.index_dir / "meta.json").exists() else ItemIndex.load(self.index_dir)
        )

    def loop(self, lr: float, bf16: bool | None = None, batch_size: int | None = None) -> LoopConfig:
        cfg = self.cfg
        batch = batch_size or cfg.batch_size
        return LoopConfig(
            lr=lr,
            epochs=cfg.epochs,
            batch_size=batch,
            micro_batch=min(cfg.micro_batch, batch),
            evals_per_epoch=cfg.evals_per_epoch,
            bf16=bf16,
        )

    def keep(self, name: str, stage: int) -> str:
        """Commit-ready copy of a finished run's trainable weights in `results/<name>/`."""
        return keep_weights(self.cfg.runs / name, self.cfg.results / name, stage)

    def run_dir(self, name: str, stage: int) -> Path:
        """A finished run's folder with its weights, copied back from `results/<name>/` when the
        cache lost them (a fresh machine resuming the study)."""
        folder = self.cfg.runs / name
        if not restore_weights(folder, self.cfg.results / name, stage):
            raise FileNotFoundError(f"{name}: no trained weights in {folder} or {self.cfg.results / name}")
        return folder

    def s1_init(self) -> Path:
        """The 0-step stage-1 run (seeded LoRA init, B = 0) every one-stage run starts from: made in
        seconds, so it is never committed."""
        from training.llm.stage1 import Stage1Config
        from training.llm.stage1 import main as train

        cfg = self.cfg
        out = cfg.runs / S1_INIT
        loop = LoopConfig(lr=cfg.stage1_lr, epochs=0, batch_size=cfg.batch_size, micro_batch=cfg.micro_batch)
        train(Stage1Config(out=out, model_dir=cfg.model_dir, index_dir=self.index_dir, k=cfg.k, loop=loop))
        return out

    def examples(
        self, tok, index, din, k: int, mode: Mode, spa: bool, with_din: bool, desc: str
    ) -> list[LLMExample]:  # noqa: ANN001
        featurizer = Featurizer(
            tok, self.catalogue.items, index, din, k=k, spa=spa, domain=self.catalogue.domain
        )
        return row_examples(
            featurizer, self.catalogue, self.samples, self.rows, mode, with_din=with_din, desc=desc
        )

    def score(
        self, name: str, model: ScoringModel, examples: Sequence[LLMExample], model_id: str
    ) -> tuple[np.ndarray, float]:
        """P(yes) for every test example and the scoring seconds, resumable chunk by chunk: the seconds
        count every session's chunks, not only the last session's (they are saved with the scores)."""
        computed = precision.name(precision.compute_dtype(model.lm))
        if computed != SCORE_DTYPE:  # what llm_payload records must be what the scores came from
            raise RuntimeError(f"{name}: scoring in {computed}, the study scores in {SCORE_DTYPE}")
        partial = partial_scores_path(self.cfg.runs / name, model_id, self.rows_hash)
        return score_resumably(model, examples, partial, self.cfg.chunk, self.deadline, name)

    def llm_payload(self, p: np.ndarray, seconds: float, **extra: Any) -> dict[str, Any]:
        return {
            "test": ctr_metrics(self.labels, p),
            "score_seconds": round(seconds, 1),
            "score_dtype": SCORE_DTYPE,
            "score_cpu": precision.cpu_model(),  # the machine that finished the scoring (speed depends on it)
            **extra,
            "predictions": [round(float(x), 6) for x in p],
        }


def _stage1(ctx: _Context, name: str, n: int, k: int) -> dict[str, Any]:
    from training.llm.evaluate import stage1_model
    from training.llm.stage1 import Stage1Config
    from training.llm.stage1 import main as train

    cfg = ctx.cfg
    s1cfg = Stage1Config(
        out=cfg.runs / name,
        model_dir=cfg.model_dir,
        index_dir=ctx.index_dir,
        n_rows=n,
        k=k,
        valid_rows=cfg.valid_rows,
        prompts=cfg.prompts,  # type: ignore[arg-type]
        loop=ctx.loop(cfg.stage1_lr),
    )
    trained = train(s1cfg, deadline=ctx.deadline)
    weights_dtype = ctx.keep(name, 1)
    lm, tok, index = ctx.base()
    model = stage1_model(lm, tok, s1cfg.out)
    examples = ctx.examples(tok, index, None, k, "subr", False, False, f"{name} prompts")
    p, seconds = ctx.score(name, model, examples, model_id=trained["run_id"])
    facts = _training_facts(trained)
    return ctx.llm_payload(p, seconds, **facts, n_rows=n, k=k, run=name, weights_dtype=weights_dtype)


def _training_facts(metrics: dict[str, Any]) -> dict[str, Any]:
    r = metrics["result"]
    return {
        "valid_auc": r["best_valid_auc"],
        "best_step": r["best_step"],
        "curve": r["curve"],
        "train_seconds": round(r["train_seconds"], 1),
        "samples_per_s": round(r["samples_per_s"], 3),
        "train_examples": r["examples"],
        "trainable_params": metrics["trainable_params"],
        "run_id": metrics.get("run_id"),
        "device": r.get("device", ""),
        "cpu": r.get("cpu", ""),
    }


def _best_stage1(ctx: _Context) -> dict[str, Any] | None:
    """The stage-1 run with the best *validation* AUC among the N sweep (never test)."""
    found = [ctx.result(f"rella-n{n}") for n in ctx.cfg.n_values]
    found = [f for f in found if f is not None]
    if len(found) < len(ctx.cfg.n_values):
        return None
    return max(found, key=lambda f: f["valid_auc"])


def _best_k(ctx: _Context) -> int | None:
    """The K of the ReLLaX run (main K or the K sweep) with the best *validation* AUC; None until
    every one of them has finished."""
    names = ["rellax", *(f"rellax-k{k}" for k in ctx.cfg.k_sweep if k != ctx.cfg.k)]
    found = [ctx.result(n) for n in names]
    if any(f is None for f in found):
        return None
    return int(max(found, key=lambda f: f["valid_auc"])["k"])  # type: ignore[index]


class NotNeeded(Exception):
    """A planned step that has nothing to do in this study (its status says why, never pending)."""


def _no_bf16_rerun(ctx: _Context) -> str | None:
    """Why `rellax-bf16` cannot run (yet) here, or None when it should; NotNeeded when `rellax`
    trained in the bf16 recipe itself."""
    main = ctx.result("rellax")
    if main is None:
        return "the rellax step has not finished"
    if main.get("device", "").endswith("/bfloat16"):
        raise NotNeeded("rellax trained in the bf16 recipe already: nothing to rerun")
    if resolve_device().type == "cpu" and not precision.cpu_supports_bf16():
        return "this CPU has no native bf16 (emulated bf16 is ~400x slower)"
    return None


def _stage2(
    ctx: _Context,
    name: str,
    k: int,
    over: dict[str, Any] | None = None,
    n: int | None = None,
    bf16: bool | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """A ReLLaX-family run and its test scores: one stage over s1-init (LoRA trained too) on `n`
    rows (default: the largest N), or, with `over` (a finished stage-1 step), the paper's stage 2
    over it with A and B frozen. `bf16` forces the training recipe's dtype (default: the CPU's),
    `batch_size` the examples per optimizer step (default: the study's)."""
    from training.llm.stage2 import Stage2Config
    from training.llm.stage2 import main as train

    cfg = ctx.cfg
    mode = "rellax" if name.startswith("rellax") else name
    stage1 = ctx.s1_init() if over is None else ctx.run_dir(over["step"], 1)
    s2cfg = Stage2Config(
        stage1=stage1,
        out=cfg.runs / name,
        din_dir=ctx.din_dir,
        model_dir=cfg.model_dir,
        index_dir=ctx.index_dir,
        mode=mode,  # type: ignore[arg-type]
        gate_init="random" if name == "rellax-random-init" else "identity",
        n_rows=(n or max(cfg.n_values)) if over is None else over["n_rows"],  # one stage: the largest N
        k=k,
        valid_rows=cfg.valid_rows,
        prompts=cfg.prompts,  # type: ignore[arg-type]
        train_lora=over is None,
        loop=ctx.loop(cfg.stage2_lr, bf16, batch_size),
    )
    trained = train(s2cfg, deadline=ctx.deadline)
    weights_dtype = ctx.keep(name, 2)
    model, tok, index, din = _load_stage2(ctx, s2cfg.out)
    examples = ctx.examples(tok, index, din, k, "subr", model.spa is not None, True, f"{name} prompts")
    p, seconds = ctx.score(name, model, examples, model_id=trained["run_id"])
    facts = _training_facts(trained)
    extra = {
        "one_stage": over is None,
        "stage1": S1_INIT if over is None else over["step"],
        "din": ctx.din_facts,
        "batch_size": s2cfg.loop.batch_size,
    }
    return ctx.llm_payload(
        p, seconds, **facts, n_rows=s2cfg.n_rows, k=k, run=name, weights_dtype=weights_dtype, **extra
    )


def _load_stage2(ctx: _Context, folder: Path) -> tuple:
    """A finished stage-2 run as a scoring model. Its stage-1 run is found by name in this study's
    runs (re-made or restored when missing), never by the path recorded on another machine."""
    from training.llm.stage2 import load_stage2_run

    meta = json.loads((folder / "metrics.json").read_text())
    stage1_name = Path(meta["config"]["stage1"]).name
    stage1 = ctx.s1_init() if stage1_name == S1_INIT else ctx.run_dir(stage1_name, 1)
    lm, tok, index = ctx.base()
    din = load_din(ctx.din_dir)  # what every LLM step of this study trains over
    model, _ = load_stage2_run(folder, lm, tok, din.config.embed_dim, stage1=stage1)
    return model, tok, index, din


def _merged(ctx: _Context, exact: dict[str, Any]) -> dict[str, Any]:
    """The rellax run served the vLLM way: W0 + s·B·Ḡᵀ·A, gates off, on the same rows."""
    folder = ctx.run_dir(exact["step"], 2)
    model, tok, index, din = _load_stage2(ctx, folder)
    examples = ctx.examples(tok, index, din, exact["k"], "subr", True, True, "rellax-merged prompts")
    with merged_at_mean_gates(model, load_mean_gates(folder)):
        p, seconds = ctx.score("rellax-merged", model, examples, model_id=f"merged-{exact['run_id']}")
    keep = (
        "valid_auc",
        "trainable_params",
        "train_seconds",
        "samples_per_s",
        "n_rows",
        "k",
        "run",
        "device",
        "cpu",
    )
    return ctx.llm_payload(p, seconds, **{k: exact[k] for k in keep if k in exact}, merged_from="rellax")


def _zero_shot(ctx: _Context, name: str, mode: Mode) -> dict[str, Any]:
    lm, tok, index = ctx.base()
    model = ScoringModel(lm, *answer_token_ids(tok))
    examples = ctx.examples(tok, index, None, ctx.cfg.k, mode, False, False, f"{name} prompts")
    p, seconds = ctx.score(name, model, examples, model_id=f"base-k{ctx.cfg.k}")
    return ctx.llm_payload(p, seconds, k=ctx.cfg.k, trainable_params=0, train_examples=0)


def _step(ctx: _Context, name: str) -> dict[str, Any] | None:
    """Run one step; None when it must wait for a step that is not finished yet."""
    cfg = ctx.cfg
    if name == "baselines":
        from training.study.prompt_features import baseline_predictions

        return ctx.save(name, baseline_predictions(ctx, cfg.k))
    if name.startswith("zero-shot-"):
        return ctx.save(name, _zero_shot(ctx, name, name.removeprefix("zero-shot-")))  # type: ignore[arg-type]
    if name.startswith("rella-n"):
        return ctx.save(name, _stage1(ctx, name, int(name.removeprefix("rella-n")), cfg.k))
    if name in STAGE2_STEPS:
        return ctx.save(name, _stage2(ctx, name, cfg.k))
    if name.startswith("rellax-k"):
        return ctx.save(name, _stage2(ctx, name, int(name.removeprefix("rellax-k"))))
    if name.startswith("rellax-n") or is_batch_step(name):
        k = _best_k(ctx)
        if k is None:
            log.info("waiting for the K sweep", step=name)
            return None
        size = int(name.removeprefix("rellax-n").removeprefix("rellax-b"))
        sized = {"n": size} if name.startswith("rellax-n") else {"batch_size": size}
        return ctx.save(name, _stage2(ctx, name, k, **sized))
    if name == "rellax-bf16":
        why = _no_bf16_rerun(ctx)
        if why:
            log.info("waiting", step=name, why=why)
            return None
        return ctx.save(name, _stage2(ctx, name, cfg.k, bf16=True))
    if name == "rellax-merged":
        exact = ctx.result("rellax")
        return None if exact is None else ctx.save(name, _merged(ctx, exact))
    if name == "rellax-two-stage":
        best = _best_stage1(ctx)
        if best is None:
            log.info("waiting for the stage-1 run", step=name)
            return None
        return ctx.save(name, _stage2(ctx, name, cfg.k, over=best))
    raise ValueError(f"unknown step {name!r}")


def run(cfg: ExperimentConfig) -> dict[str, str]:
    """Run every unfinished step of the plan (or of `cfg.only`); returns {step: state}, state one of
    done (found), ran, waiting (needs an unfinished step or another CPU), paused (out of time), not
    selected, not needed (nothing to do in this study)."""
    torch.manual_seed(0)
    ctx = _Context(cfg)
    status: dict[str, str] = {}
    for name in plan(cfg):
        if ctx.result(name) is not None:
            status[name] = "done"
            continue
        if cfg.only and name not in cfg.only:
            status[name] = "not selected"
            continue
        if ctx.out_of_time():
            status[name] = "paused"
            continue
        try:
            status[name] = "ran" if _step(ctx, name) is not None else "waiting"
        except NotNeeded as why:
            log.info("not needed", step=name, why=str(why))
            status[name] = "not needed"
        except TimeoutError as stop:
            log.info("paused", step=name, why=str(stop))
            status[name] = "paused"
    payload = {
        "config": cfg.to_json(),
        "device": str(resolve_device()),
        "rows_hash": ctx.rows_hash,
        "status": status,
    }
    unfinished = [n for n, state in status.items() if state not in ("done", "ran", "not needed")]
    payload["progress"] = progress(cfg, ctx.rows_hash, unfinished)
    (cfg.results / "experiment.json").write_text(json.dumps(payload, indent=1))
    return status


def progress(cfg: ExperimentConfig, rows_hash: str, unfinished: Sequence[str]) -> dict[str, Any]:
    """Where each unfinished training run stands: its validation curve so far (from the checkpoint's
    curve.json), or once trained its final curve and how many test rows are scored. Saved with the status
    so the committed report shows a run spanning sessions before it finishes; never a result."""
    out: dict[str, Any] = {}
    for name in unfinished:
        folder = cfg.runs / name
        if (folder / "metrics.json").exists():  # trained: its final curve, and the scoring so far
            metrics = json.loads((folder / "metrics.json").read_text())
            scores, _ = load_partial_scores(partial_scores_path(folder, metrics.get("run_id"), rows_hash))
            scored = len(scores)
            out[name] = {"curve": metrics["result"]["curve"], "trained": True, "scored": scored}
        elif (folder / "curve.json").exists():
            out[name] = {"curve": json.loads((folder / "curve.json").read_text()), "trained": False}
    return out
