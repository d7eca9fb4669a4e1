"""`rellax eval`: every mode on the same fixed, seeded rows of a split (issue 3 §5).

Modes: zero-shot recency and SUBR (the base LLM), rella (stage 1), spa / cflora / rellax (stage 2
runs, whichever exist), and the DIN on the same rows. AUC, LogLoss and accuracy per mode, written as
JSON and a markdown table. LLM modes run through the serving path (CFLoRA layers with stage-1 A/B),
so what is evaluated is what is served.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from data.loading import load_dataset
from rellax import precision
from rellax.assets import prepare_model
from rellax.cflora import inject_cflora, load_lora_weights
from rellax.features import Featurizer, Mode
from rellax.logs import get_logger
from rellax.scorer import ScoringModel
from rellax.tokens import answer_token_ids
from training.fewshot import eval_rows
from training.llm.config import EvalConfig
from training.llm.data import Catalogue
from training.llm.harness import row_examples, score_examples
from training.llm.setup import (
    default_index_dir,
    load_base_lm,
    load_din,
    load_or_build_index,
)
from training.llm.stage2 import load_stage2_run
from training.metrics import ctr_metrics
from training.tables import markdown_table

__all__ = ["EvalConfig", "din_predictions", "eval_markdown", "main"]

log = get_logger(__name__)


def stage1_model(lm, tokenizer, stage1: Path) -> ScoringModel:  # noqa: ANN001
    """The stage-1 model as served: CFLoRA layers without gates carrying the peft A and B."""
    cfg = json.loads((stage1 / "metrics.json").read_text())["config"]
    from training.llm.stage1 import lora_targets

    inject_cflora(
        lm, int(cfg["r"]), float(cfg["alpha"]), float(cfg["dropout"]), lora_targets(cfg), gate_dim=None
    )
    load_lora_weights(lm, load_file(stage1 / "adapter" / "adapter_model.safetensors"))
    yes, no = answer_token_ids(tokenizer)
    return ScoringModel(lm, yes, no)


def main(cfg: EvalConfig) -> dict[str, Any]:
    data, samples, manifest = load_dataset()
    catalogue = Catalogue.from_tables(data)
    rows = eval_rows(samples, cfg.split, cfg.n, seed=cfg.seed)
    labels = samples.label[rows].astype(np.int64)
    model_dir = prepare_model(cfg.model_dir)
    din = load_din(cfg.din_dir, manifest)
    dtype = precision.resolve(cfg.dtype)
    results: dict[str, dict[str, Any]] = {}
    preds: dict[str, np.ndarray] = {}

    def fresh():  # noqa: ANN202 - (lm, tokenizer, featurizer factory)
        lm, tok = load_base_lm(model_dir, bf16=dtype == torch.bfloat16)
        index = load_or_build_index(
            cfg.index_dir or default_index_dir(cfg.model_dir), lm, tok, catalogue, manifest
        )
        if dtype == torch.float16:  # after the index, which embeds in fp32 or bf16 only
            precision.cast_for_compute(lm, dtype)
        return lm, tok, index

    def run(  # noqa: ANN001
        name: str, model: ScoringModel, tok, index, mode: Mode, spa: bool, with_din: bool,
        residual: bool = False,
    ) -> None:  # fmt: skip
        t = time.perf_counter()
        featurizer = Featurizer(tok, catalogue.items, index, din, k=cfg.k, spa=spa, domain=catalogue.domain)
        examples = row_examples(
            featurizer, catalogue, samples, rows, mode, with_din=with_din, din_logit=residual,
            desc=f"{name} prompts",
        )  # fmt: skip
        p = score_examples(model, examples)
        preds[name] = p
        results[name] = {**ctr_metrics(labels, p), "seconds": round(time.perf_counter() - t, 1)}
        log.info("evaluated", mode=name, auc=round(results[name]["auc"], 4))

    if cfg.zero_shot:
        lm, tok, index = fresh()
        yes, no = answer_token_ids(tok)
        base = ScoringModel(lm, yes, no)
        run("zero-shot recency", base, tok, index, "recency", False, False)
        run("zero-shot SUBR", base, tok, index, "subr", False, False)
    if cfg.stage1 is not None and (cfg.stage1 / "metrics.json").exists():
        lm, tok, index = fresh()
        run("rella", stage1_model(lm, tok, cfg.stage1), tok, index, "subr", False, False)
    for mode, folder in cfg.stage2.items():
        if not (folder / "metrics.json").exists():
            continue
        lm, tok, index = fresh()
        model, meta = load_stage2_run(folder, lm, tok, din.config.embed_dim, mode=mode)
        residual = bool(meta["config"].get("din_residual", False))  # beyond the paper: + DIN's logit
        name = f"{mode} + DIN logit" if residual else mode
        run(name, model, tok, index, "subr", model.spa is not None, True, residual)
    din_pred = din_predictions(din, catalogue, samples, rows)
    preds["DIN"] = din_pred
    results["DIN"] = ctr_metrics(labels, din_pred)
    report = {
        "split": cfg.split,
        "rows": int(len(rows)),
        "seed": cfg.seed,
        "k": cfg.k,
        "dtype": precision.name(dtype),
        "label_rate": float(labels.mean()),
        "data_hash": manifest["source_hash"],
        "results": results,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "eval.json").write_text(json.dumps(report, indent=2))
    (cfg.out / "eval.md").write_text(eval_markdown(report))
    np.savez(
        cfg.out / "predictions.npz",
        rows=rows,
        labels=labels,
        **{k.replace(" ", "_"): v for k, v in preds.items()},
    )
    return report


def din_predictions(din, catalogue: Catalogue, samples, rows: np.ndarray) -> np.ndarray:  # noqa: ANN001
    from rellax.features import History

    featurizer = Featurizer(None, catalogue.items, None, din, k=0, spa=False)  # type: ignore[arg-type]
    users = [samples.user_id(int(r)) for r in rows]
    histories = [History(*(a.tolist() for a in samples.history(int(r))[:2])) for r in rows]
    from rellax.entities import Profile

    batch = featurizer.din_batch(
        users,
        [catalogue.profiles.get(u, Profile()) for u in users],
        [int(samples.item_id[r]) for r in rows],
        histories,
    )
    return featurizer.din_outputs(batch)[0]


def eval_markdown(report: Mapping[str, Any]) -> str:
    """The eval table: one row per mode."""
    head = (
        f"Evaluation on {report['rows']} {report['split']} rows (seed {report['seed']}, K={report['k']}, "
        f"{report.get('dtype', 'float32')}, label rate {report['label_rate']:.3f})"
    )
    cells = [
        (name, *(f"{m[key]:.4f}" for key in ("auc", "logloss", "accuracy")))
        for name, m in report["results"].items()
    ]
    return f"{head}\n\n{markdown_table(('mode', 'AUC', 'LogLoss', 'accuracy'), cells, align='lrrr')}\n"
