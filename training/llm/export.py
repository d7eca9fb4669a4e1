"""`rellax export`: a trained run -> a bundle the service loads (issue 3 §6), plus the merged
checkpoint for vLLM (W0 + s·B·Ḡᵀ·A, docs/design.md §8) with the price of merging measured on validation.

The base LLM is loaded in fp32 here, so the bundle keeps the original weights bit for bit; the
service picks its compute dtype at load time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file

from data.loading import artefact_dir, check_same_data, load_dataset
from rellax import precision
from rellax.assets import DEFAULT_MODEL_NAME, file_sha256, prepare_model
from rellax.bundle_format import BundleConfig, write_bundle, write_merged
from rellax.features import Featurizer
from rellax.logs import get_logger
from training.fewshot import eval_rows
from training.llm.data import Catalogue
from training.llm.harness import load_mean_gates, merged_at_mean_gates, row_examples, score_examples
from training.llm.setup import default_index_dir, load_base_lm, load_din, load_or_build_index
from training.llm.stage1 import lora_targets
from training.llm.stage2 import load_stage2_run
from training.metrics import ctr_metrics

__all__ = ["ExportConfig", "main"]

log = get_logger(__name__)


@dataclass
class ExportConfig:
    stage2: Path = field(default_factory=lambda: artefact_dir("runs", "demo") / "stage2")
    out: Path = field(default_factory=lambda: artefact_dir("bundles", "demo"))
    din_dir: Path = field(default_factory=lambda: artefact_dir("crm", "din"))
    eval_json: Path | None = None
    merged: bool = True
    merged_valid_rows: int = 256
    model_dir: Path | None = None
    index_dir: Path | None = None
    llmsrec: Path | None = (
        None  # a `rellax train llmsrec` output over the same base LLM: served beside ReLLaX
    )


def main(cfg: ExportConfig) -> dict[str, Any]:
    meta = json.loads((cfg.stage2 / "metrics.json").read_text())
    mode, s2cfg, s1cfg = meta["stage"], meta["config"], meta["stage1_config"]
    if s2cfg.get("din_residual"):
        raise ValueError(
            f"{cfg.stage2} was trained as a correction to DIN's logit (din_residual), a study variant "
            "beyond the paper; bundles serve ReLLaX itself"
        )
    data, samples, manifest = load_dataset()
    check_same_data("the stage-2 run", cfg.stage2, meta.get("data"), manifest)
    catalogue = Catalogue.from_tables(data)
    model_dir = prepare_model(cfg.model_dir)
    lm, tokenizer = load_base_lm(model_dir, bf16=False, device="cpu")  # a bundle is written from the CPU
    index = load_or_build_index(
        cfg.index_dir or default_index_dir(cfg.model_dir), lm, tokenizer, catalogue, manifest
    )
    din = load_din(cfg.din_dir, manifest)
    model, _ = load_stage2_run(cfg.stage2, lm, tokenizer, din.config.embed_dim)
    config = BundleConfig(
        k=int(s2cfg["k"]),
        mode="subr",
        spa=model.spa is not None,
        gated=mode in ("cflora", "rellax"),
        r=int(s1cfg["r"]),
        alpha=float(s1cfg["alpha"]),
        dropout=float(s1cfg["dropout"]),
        target_modules=lora_targets(s1cfg),
        # label data is stored as ratings 5 / 1 (data.dataset): events must be one of the two
        rating_step=4.0 if data.config.label_field else 1.0,
    )
    metrics: dict[str, Any] = {
        "valid_auc_exact": meta["result"]["best_valid_auc"],
        "valid_auc_exact_device": meta["result"].get("device"),  # "cpu/bfloat16": where and in what dtype
    }
    if cfg.eval_json and cfg.eval_json.exists():
        metrics["eval"] = json.loads(cfg.eval_json.read_text())
    base_sha = (
        file_sha256(model_dir / "model.safetensors") if (model_dir / "model.safetensors").exists() else None
    )
    extra = {
        "base_model": {
            "name": DEFAULT_MODEL_NAME if cfg.model_dir is None else str(cfg.model_dir),
            "sha256": base_sha,
        },
        # samples_sha256 covers every sample and its split assignment: the split hash.
        "data": {k: manifest.get(k) for k in ("source_hash", "samples_sha256", "splits")},
        "training": {
            "crm": _crm_config(cfg.din_dir),
            "stage1": s1cfg,
            "stage2": s2cfg,
            "mode": mode,
            "stage2_run_id": meta.get("run_id"),
        },
    }
    if cfg.llmsrec is not None:
        trained = json.loads((cfg.llmsrec / "metrics.json").read_text())
        extra["training"]["llmsrec"] = {  # type: ignore[index]
            "config": trained["config"], "valid": trained["valid"], "test": trained["test"],
            "train_seconds": trained["train_seconds"], "examples": trained["examples"],
        }  # fmt: skip
    if cfg.merged:
        merged_info = _export_merged(cfg, model, tokenizer, catalogue, samples, index, din, config)
        metrics.update(merged_info.pop("metrics"))
        extra["merged"] = merged_info
    manifest_out = write_bundle(
        cfg.out,
        lm=model.lm,
        tokenizer=tokenizer,
        din=din,
        items=list(catalogue.items.values()),
        item_index=index,
        config=config,
        spa=model.spa,
        metrics=metrics,
        extra=extra,
        llmsrec=cfg.llmsrec,
        domain=catalogue.domain,
        item_keys=data.item_keys,
    )
    log.info("bundle written", out=str(cfg.out), model_version=manifest_out["model_version"])
    return manifest_out


def _crm_config(din_dir: Path) -> dict[str, Any] | None:
    """The DIN recipe's config from its metrics.json (None for a DIN made elsewhere)."""
    metrics = din_dir / "metrics.json"
    return json.loads(metrics.read_text()).get("config") if metrics.exists() else None


def _export_merged(cfg, model, tokenizer, catalogue, samples, index, din, config) -> dict[str, Any]:  # noqa: ANN001
    """Write merged/ and measure validation AUC exact vs merged on the same rows."""
    g_bars = load_mean_gates(cfg.stage2)
    out = cfg.out / "merged"
    scaling = config.alpha / config.r
    checksums = write_merged(out, model.lm, tokenizer, g_bars, scaling)
    # The projector travels with merged/ but in a subfolder: without a shard index, vLLM loads every
    # *.safetensors at the top of the dir as model weights (an SPA file there fails start-up with
    # "no module or parameter named 'fc1'"). The service itself projects with the bundle's own copy.
    extras: dict[str, Any] = {"soft_token_ids": tokenizer.convert_tokens_to_ids(["[hist]", "[target]"])}
    if model.spa is not None:
        (out / "rellax").mkdir(exist_ok=True)
        spa_state = {k: v.detach().float().contiguous() for k, v in model.spa.state_dict().items()}
        save_file(spa_state, out / "rellax" / "spa.safetensors")
        extras["spa"] = "rellax/spa.safetensors"
    (out / "rellax_merged.json").write_text(json.dumps(extras))
    featurizer = Featurizer(
        tokenizer, catalogue.items, index, din, k=config.k, spa=config.spa, domain=catalogue.domain
    )
    rows = eval_rows(samples, "valid", cfg.merged_valid_rows)
    examples = row_examples(
        featurizer, catalogue, samples, rows, "subr", with_din=True, desc="merged-vs-exact prompts"
    )
    labels = np.array([e.label for e in examples])
    exact = ctr_metrics(labels, score_examples(model, examples))["auc"]
    with merged_at_mean_gates(model, g_bars):
        merged = ctr_metrics(labels, score_examples(model, examples))["auc"]
    return {
        "path": "merged",
        "files": checksums,
        "metrics": {
            "valid_auc_exact_subset": exact,
            "valid_auc_merged_subset": merged,
            "merged_valid_rows": int(len(rows)),
            "merged_vs_exact_dtype": precision.name(precision.compute_dtype(model.lm)),
        },
    }
