"""Stage 1, ReLLa instruction tuning (docs/design.md §7): peft LoRA on q_proj/v_proj over few-shot prompts.

A recipe, not a framework: `setup(cfg)` builds data, model and validation; `train()` runs the shared
loop; `main(cfg)` writes the adapter and `metrics.json`. Each of the N few-shot rows is used twice,
with a recency prompt and a SUBR prompt, interleaved. Checkpoints are chosen on validation AUC, never
on test.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import torch

from data.loading import load_dataset
from rellax.assets import prepare_model
from rellax.features import Featurizer
from rellax.scorer import ScoringModel
from rellax.tokens import answer_token_ids
from training.fewshot import eval_rows, fewshot_rows, interleave_modes
from training.llm.config import Stage1Config
from training.llm.data import Catalogue, build_examples
from training.llm.harness import make_validator
from training.llm.loop import TrainResult, train_loop
from training.llm.runs import train_or_reuse
from training.llm.setup import default_index_dir, load_base_lm, load_or_build_index

__all__ = ["Stage1Config", "lora_targets", "main"]


def lora_targets(stage1_config: dict[str, Any]) -> tuple[str, ...]:
    """The modules a stage-1 run adapted, from its saved config (runs saved before the option: q, v)."""
    return tuple(stage1_config.get("target_modules", ("q_proj", "v_proj")))


class Stage1Recipe:
    def setup(self, cfg: Stage1Config) -> None:
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        torch.manual_seed(cfg.loop.seed)  # LoRA init and dropout: a run is reproducible from its config
        data, self.samples, self.data_manifest = load_dataset()
        self.catalogue = Catalogue.from_tables(data)
        model_dir = prepare_model(cfg.model_dir)
        lm, self.tokenizer = load_base_lm(model_dir, bf16=cfg.loop.bf16)
        index = load_or_build_index(
            cfg.index_dir or default_index_dir(cfg.model_dir),
            lm,
            self.tokenizer,
            self.catalogue,
            self.data_manifest,
        )
        self.featurizer = Featurizer(
            self.tokenizer,
            self.catalogue.items,
            index,
            None,
            k=cfg.k,
            spa=False,
            domain=self.catalogue.domain,
        )
        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            bias="none",
        )
        self.peft_model = get_peft_model(lm, lora)  # adapters stay fp32 over a bf16 base
        yes, no = answer_token_ids(self.tokenizer)
        self.model = ScoringModel(self.peft_model.get_base_model(), yes, no)
        rows = fewshot_rows(self.samples, cfg.n_rows, seed=cfg.loop.seed)
        pairs = interleave_modes(rows, cfg.loop.seed)
        if cfg.prompts == "subr":
            pairs = [(row, mode) for row, mode in pairs if mode == "subr"]
        self.examples = build_examples(self.featurizer, self.catalogue, self.samples, pairs, with_din=False)
        valid = eval_rows(self.samples, "valid", cfg.valid_rows)
        self.evaluate = make_validator(
            self.model, self.featurizer, self.catalogue, self.samples, valid, "subr", with_din=False
        )

    def train(self, deadline: float | None = None, fit_budget_s: float | None = None) -> TrainResult:
        params = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        return train_loop(
            self.model,
            params,
            self.examples,
            self.cfg.loop,
            self.evaluate,
            self.cfg.out / "checkpoint.pt",
            pad_id=int(self.tokenizer.pad_token_id or 0),
            deadline=deadline,
            fit_budget_s=fit_budget_s,
        )

    def save(self, result: TrainResult) -> dict[str, Any]:
        out = self.cfg.out
        # The soft-token rows were added before peft and never train: the adapter is A and B only.
        self.peft_model.save_pretrained(out / "adapter", save_embedding_layers=False)
        metrics = {
            "stage": "rella",
            "result": result.to_json(),
            "config": self.cfg.to_json(),
            "trainable_params": sum(p.numel() for p in self.peft_model.parameters() if p.requires_grad),
            "data": {k: self.data_manifest.get(k) for k in ("source_hash", "dataset", "dataset_key")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run_id": uuid.uuid4().hex,  # stage-2 runs over this one record it
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


def main(
    cfg: Stage1Config,
    force: bool = False,
    deadline: float | None = None,
    fit_budget_s: float | None = None,
) -> dict[str, Any]:
    """Train (or reuse a finished run in `cfg.out`) and return its metrics; past `deadline`
    (monotonic) training checkpoints and raises TimeoutError, and the same call resumes it. With
    `fit_budget_s` training ends after that many training seconds (`train_loop`), part of the run's key."""
    key = {k: v for k, v in cfg.to_json().items() if k != "out"}  # where it lives is not what it is
    if key["prompts"] == "mixed":  # runs made before the option existed keep their key
        del key["prompts"]
    return train_or_reuse(
        Stage1Recipe(), cfg, key, ["adapter"], ["adapter"],
        force=force, deadline=deadline, fit_budget_s=fit_budget_s,
    )  # fmt: skip
