"""`rellax experiment ml100k`: the quality study of issue 6, as resumable steps.

Every model is scored on the same fixed, seeded test rows. Each step writes one JSON file into the
results folder (metrics, selection figures, training cost, and the per-row predictions, so paired
bootstrap intervals and the report can be recomputed without the models) and is skipped when that
file exists with the same inputs. LLM scoring is checkpointed every `chunk` rows and training
through the stage loops' own checkpoints, so a killed run (or a session ending) loses minutes, not
hours: run the same command again. `training.report` renders docs/results.md from the JSON files.

Steps, in order (a step needing an unfinished one waits for a later invocation). The order puts
the answers the conclusions rest on first: a CPU runs this over many sessions, and the K sweep
matters least.
  baselines            DIN, LR on one-hot fields, user/item mean prior, LR on prompt features
  zero-shot-recency    the base LLM, recency K prompts
  rella-n{N}           stage 1 on N few-shot rows (x2 prompts), for each N
  zero-shot-subr       the base LLM, SUBR K prompts (after the first N: a trained model says more)
  rellax / spa / cflora          stage 2 over the best stage-1 run (by valid AUC)
  rellax-random-init   stage 2 with the authors' random gate init
  rellax-merged        the rellax run with CFLoRA folded in at the mean gate (what vLLM serves)
  rella-k{K}           stage 1 at the best N with another K
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from index.item_index import ItemIndex
from rellax.assets import prepare_model
from rellax.cflora import cflora_modules
from rellax.device import resolve_device
from rellax.features import Featurizer, Mode
from rellax.logs import get_logger
from rellax.paths import cache_dir
from rellax.scorer import ScoringModel
from rellax.tokens import answer_token_ids
from training.fewshot import eval_rows
from training.llm_data import Catalogue, LLMExample, build_examples
from training.llm_loop import LoopConfig
from training.llm_setup import default_index_dir, load_base_lm, load_din, load_or_build_index, score_examples
from training.metrics import ctr_metrics

__all__ = ["ExperimentConfig", "plan", "progress", "run"]

log = get_logger(__name__)

STAGE2_STEPS = ("rellax", "spa", "cflora", "rellax-random-init")


@dataclass
class ExperimentConfig:
    """What the study runs. Defaults are the issue's plan; a GPU (`RELLAX_DEVICE`, auto = cuda when torch
    sees one) or a patient CPU runs them all."""

    results: Path = Path("docs/results")
    runs: Path = field(default_factory=lambda: cache_dir("runs") / "ml100k")
    test_rows: int = 5000
    test_seed: int = 1234
    k: int = 15
    n_values: tuple[int, ...] = (1024, 4096)
    k_sweep: tuple[int, ...] = (5, 30)
    valid_rows: int = 512
    stage1_lr: float = 1e-3
    stage2_lr: float = 3e-4
    batch_size: int = 64
    micro_batch: int = 8
    evals_per_epoch: int = 4  # validation points per run: the learning curves' resolution
    chunk: int = 128  # LLM test rows scored between checkpoints
    only: tuple[str, ...] = ()  # run just these steps (names as in `plan`); the rest stay pending
    model_dir: Path | None = None
    din_dir: Path = field(default_factory=lambda: cache_dir("crm") / "din")
    index_dir: Path | None = None
    max_seconds: float | None = None  # stop starting new chunks/steps after this long

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def plan(cfg: ExperimentConfig) -> list[str]:
    """Step names in run order."""
    first, *more = [f"rella-n{n}" for n in cfg.n_values]
    steps = ["baselines", "zero-shot-recency", first, "zero-shot-subr", *more]
    steps += [*STAGE2_STEPS, "rellax-merged"]
    return steps + [f"rella-k{k}" for k in cfg.k_sweep if k != cfg.k]


def partial_scores_path(folder: Path, model_id: str, rows_hash: str) -> Path:
    """Where a model's finished scoring chunks live: named by model and rows, so a retrained model (a
    new run id) or another row set never inherits them."""
    return folder / f"partial-{model_id}-{rows_hash}.npz"


def load_partial_scores(path: Path) -> tuple[np.ndarray, float]:
    """(scores so far, seconds spent on them); empty and 0 s when nothing is scored yet."""
    if not path.exists():
        return np.zeros(0, dtype=np.float64), 0.0
    with np.load(path) as found:
        return found["p"], float(found["seconds"])


class _Context:
    """What every step shares: data, fixed rows, the base model factory, and the results folder."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        from training.datasets import load_dataset

        self.cfg = cfg
        self.data, self.samples, self.manifest = load_dataset()
        self.catalogue = Catalogue.from_tables(self.data)
        self.rows = eval_rows(self.samples, "test", cfg.test_rows, seed=cfg.test_seed)
        self.labels = self.samples.label[self.rows].astype(np.int64)
        self.rows_hash = hashlib.sha256(self.rows.astype(np.int64).tobytes()).hexdigest()[:16]
        self.model_dir = prepare_model(cfg.model_dir)
        self.index_dir = cfg.index_dir or default_index_dir()
        self.started = time.monotonic()
        cfg.results.mkdir(parents=True, exist_ok=True)

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

    def base(self) -> tuple[Any, Any, Any]:
        """A fresh base LLM (each step injects its own adapters), its tokenizer, the item index."""
        lm, tok = load_base_lm(self.model_dir)
        return lm, tok, load_or_build_index(self.index_dir, lm, tok, self.catalogue)

    def item_index(self) -> Any:
        return (
            self.base()[2] if not (self.index_dir / "meta.json").exists() else ItemIndex.load(self.index_dir)
        )

    def loop(self, lr: float) -> LoopConfig:
        cfg = self.cfg
        return LoopConfig(
            lr=lr, batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, evals_per_epoch=cfg.evals_per_epoch
        )

    def examples(
        self, tok, index, din, k: int, mode: Mode, spa: bool, with_din: bool, desc: str
    ) -> list[LLMExample]:  # noqa: ANN001
        featurizer = Featurizer(tok, self.catalogue.items, index, din, k=k, spa=spa)
        pairs = [(int(r), mode) for r in self.rows]
        return build_examples(featurizer, self.catalogue, self.samples, pairs, with_din=with_din, desc=desc)

    def score(
        self, name: str, model: ScoringModel, examples: Sequence[LLMExample], model_id: str
    ) -> tuple[np.ndarray, float]:
        """P(yes) for every test example and the scoring seconds, resumable chunk by chunk: the seconds
        count every session's chunks, not only the last session's (they are saved with the scores)."""
        partial = partial_scores_path(self.cfg.runs / name, model_id, self.rows_hash)
        partial.parent.mkdir(parents=True, exist_ok=True)
        done, seconds = load_partial_scores(partial)
        while len(done) < len(examples):
            if self.out_of_time():
                raise TimeoutError(f"{name}: {len(done)}/{len(examples)} rows scored; run again to resume")
            t = time.perf_counter()
            chunk = examples[len(done) : len(done) + self.cfg.chunk]
            done = np.concatenate([done, score_examples(model, chunk)])
            seconds += time.perf_counter() - t
            np.savez(partial, p=done, seconds=seconds)
            log.info("scored", step=name, rows=len(done), of=len(examples))
        return done, seconds

    def llm_payload(self, p: np.ndarray, seconds: float, **extra: Any) -> dict[str, Any]:
        return {
            "test": ctr_metrics(self.labels, p),
            "score_seconds": round(seconds, 1),
            **extra,
            "predictions": [round(float(x), 6) for x in p],
        }


def _stage1(ctx: _Context, name: str, n: int, k: int) -> dict[str, Any]:
    from training.evaluate import stage1_model
    from training.stage1 import Stage1Config
    from training.stage1 import main as train

    cfg = ctx.cfg
    s1cfg = Stage1Config(
        out=cfg.runs / name,
        model_dir=cfg.model_dir,
        index_dir=ctx.index_dir,
        n_rows=n,
        k=k,
        valid_rows=cfg.valid_rows,
        loop=ctx.loop(cfg.stage1_lr),
    )
    trained = train(s1cfg, deadline=ctx.deadline)
    lm, tok, index = ctx.base()
    model = stage1_model(lm, tok, s1cfg.out)
    examples = ctx.examples(tok, index, None, k, "subr", False, False, f"{name} prompts")
    p, seconds = ctx.score(name, model, examples, model_id=trained["run_id"])
    return ctx.llm_payload(p, seconds, **_training_facts(trained), n_rows=n, k=k, run=str(s1cfg.out))


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
    }


def _best_stage1(ctx: _Context) -> dict[str, Any] | None:
    """The stage-1 run with the best *validation* AUC among the N sweep (never test)."""
    found = [ctx.result(f"rella-n{n}") for n in ctx.cfg.n_values]
    found = [f for f in found if f is not None]
    if len(found) < len(ctx.cfg.n_values):
        return None
    return max(found, key=lambda f: f["valid_auc"])


def _stage2(ctx: _Context, name: str, best: dict[str, Any]) -> dict[str, Any]:
    from training.stage2 import Stage2Config, build_stage2_model, load_stage2_weights
    from training.stage2 import main as train

    cfg = ctx.cfg
    mode = "rellax" if name.startswith("rellax") else name
    s2cfg = Stage2Config(
        stage1=Path(best["run"]),
        out=cfg.runs / name,
        din_dir=cfg.din_dir,
        model_dir=cfg.model_dir,
        index_dir=ctx.index_dir,
        mode=mode,  # type: ignore[arg-type]
        gate_init="random" if name == "rellax-random-init" else "identity",
        n_rows=best["n_rows"],
        k=best["k"],
        valid_rows=cfg.valid_rows,
        loop=ctx.loop(cfg.stage2_lr),
    )
    trained = train(s2cfg, deadline=ctx.deadline)
    model, tok, index, din = _load_stage2(ctx, s2cfg.out, build_stage2_model, load_stage2_weights)
    examples = ctx.examples(
        tok, index, din, best["k"], "subr", model.spa is not None, True, f"{name} prompts"
    )
    p, seconds = ctx.score(name, model, examples, model_id=trained["run_id"])
    facts = _training_facts(trained)
    return ctx.llm_payload(p, seconds, **facts, n_rows=best["n_rows"], k=best["k"], run=str(s2cfg.out))


def _load_stage2(ctx: _Context, folder: Path, build: Callable, load_weights: Callable) -> tuple:
    meta = json.loads((folder / "metrics.json").read_text())
    lm, tok, index = ctx.base()
    din = load_din(ctx.cfg.din_dir)
    lora = load_file(Path(meta["config"]["stage1"]) / "adapter" / "adapter_model.safetensors")
    model = build(lm, tok, lora, meta["stage1_config"], meta["stage"], din.config.embed_dim)
    load_weights(model, folder)
    return model, tok, index, din


def _merged(ctx: _Context, exact: dict[str, Any]) -> dict[str, Any]:
    """The rellax run served the vLLM way: W0 + s·B·Ḡᵀ·A, gates off, on the same rows."""
    from training.stage2 import build_stage2_model, load_stage2_weights

    folder = Path(exact["run"])
    model, tok, index, din = _load_stage2(ctx, folder, build_stage2_model, load_stage2_weights)
    g_bars = {k.removeprefix("lm."): v for k, v in load_file(folder / "gbar.safetensors").items()}
    for name, module in cflora_modules(model.lm).items():
        module.merge(g_bars[name] if module.gate is not None else None)
    examples = ctx.examples(tok, index, din, exact["k"], "subr", True, True, "rellax-merged prompts")
    p, seconds = ctx.score("rellax-merged", model, examples, model_id=f"merged-{exact['run_id']}")
    keep = ("valid_auc", "trainable_params", "train_seconds", "samples_per_s", "n_rows", "k", "run", "device")
    return ctx.llm_payload(p, seconds, **{k: exact[k] for k in keep}, merged_from="rellax")


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
        from training.prompt_features import baseline_predictions

        return ctx.save(name, baseline_predictions(ctx, cfg.k))
    if name.startswith("zero-shot-"):
        return ctx.save(name, _zero_shot(ctx, name, name.removeprefix("zero-shot-")))  # type: ignore[arg-type]
    if name.startswith("rella-n"):
        return ctx.save(name, _stage1(ctx, name, int(name.removeprefix("rella-n")), cfg.k))
    best = _best_stage1(ctx)
    if best is None:
        log.info("waiting for the stage-1 N sweep", step=name)
        return None
    if name.startswith("rella-k"):
        return ctx.save(name, _stage1(ctx, name, best["n_rows"], int(name.removeprefix("rella-k"))))
    if name in STAGE2_STEPS:
        return ctx.save(name, {**_stage2(ctx, name, best), "stage1_step": best["step"]})
    if name == "rellax-merged":
        exact = ctx.result("rellax")
        if exact is None:
            return None
        return ctx.save(name, _merged(ctx, exact))
    raise ValueError(f"unknown step {name!r}")


def run(cfg: ExperimentConfig) -> dict[str, str]:
    """Run every unfinished step of the plan (or of `cfg.only`); returns {step: state}, state one of
    done (found), ran, waiting (needs an unfinished step), paused (out of time), not selected."""
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
        except TimeoutError as stop:
            log.info("paused", step=name, why=str(stop))
            status[name] = "paused"
    payload = {
        "config": cfg.to_json(),
        "device": str(resolve_device()),
        "rows_hash": ctx.rows_hash,
        "status": status,
    }
    unfinished = [n for n, state in status.items() if state not in ("done", "ran")]
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
