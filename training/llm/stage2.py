"""Stage 2, ReLLaX (docs/design.md §7): SPA projector and/or CFLoRA gates over the frozen stage-1 model.

The LLM, the stage-1 A and B, and the DIN are frozen. Modes (for the ablations):
  spa     - train the SPA projector only (prompts carry [hist]/[target]; gates absent, G = I)
  cflora  - train the gates only (text-only prompts)
  rellax  - train both
Each gate starts at G(h) = I, so step 0 is exactly the stage-1 model (our deliberate change from the
authors' random init; `gate_init="random"` reproduces theirs for the ablation). After training, Ḡ =
mean G(h) over the training instances is stored for the merged (vLLM) export.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from data.loading import check_same_data, load_dataset
from rellax.assets import prepare_model
from rellax.cflora import (
    adapter_params,
    cflora_modules,
    gate_matrices,
    inject_cflora,
    load_lora_weights,
    set_trainable,
)
from rellax.features import Featurizer
from rellax.scorer import ScoringModel
from rellax.spa import SPAProjector
from rellax.tokens import answer_token_ids
from training.fewshot import eval_rows, fewshot_rows, interleave_modes
from training.llm.config import Stage2Config, Stage2Mode
from training.llm.data import Catalogue, build_examples
from training.llm.harness import make_validator
from training.llm.loop import TrainResult, train_loop
from training.llm.runs import train_or_reuse
from training.llm.setup import default_index_dir, load_base_lm, load_din, load_or_build_index
from training.llm.stage1 import lora_targets

__all__ = [
    "Stage2Config",
    "Stage2Mode",
    "build_stage2_model",
    "load_stage2_run",
    "load_stage2_weights",
    "main",
]


def build_stage2_model(
    lm,
    tokenizer,
    lora_state: dict[str, torch.Tensor],
    stage1_cfg: dict,
    mode: str,  # noqa: ANN001
    embed_dim: int,
) -> ScoringModel:
    """Inject CFLoRA (gated unless mode='spa') with stage-1 A/B, add SPA (unless mode='cflora').

    Adapters and gates are kept in fp32 over the (possibly bf16) frozen base.
    """
    gated = mode in ("cflora", "rellax")
    inject_cflora(
        lm,
        int(stage1_cfg["r"]),
        float(stage1_cfg["alpha"]),
        float(stage1_cfg["dropout"]),
        lora_targets(stage1_cfg),
        gate_dim=256 if gated else None,
    )
    for module in cflora_modules(lm).values():
        module.lora_A.float()
        module.lora_B.float()
        if module.gate is not None:
            module.gate.float()
    load_lora_weights(lm, lora_state)
    device = next(lm.parameters()).device
    spa = SPAProjector(embed_dim, lm.config.hidden_size).to(device) if mode in ("spa", "rellax") else None
    yes, no = answer_token_ids(tokenizer)
    return ScoringModel(lm, yes, no, spa=spa)


def _randomise_gates(model: ScoringModel, seed: int) -> None:
    """The authors' init: the gate's last layer random like the others (G(h) far from I at step 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in cflora_modules(model.lm).values():
            if module.gate is not None:
                last = module.gate[-1]
                bound = 1.0 / last.in_features**0.5
                # Drawn on the CPU whatever the device: the same seed gives the same gates everywhere.
                last.weight.copy_(torch.empty(last.weight.shape).uniform_(-bound, bound, generator=g))
                last.bias.copy_(torch.empty(last.bias.shape).uniform_(-bound, bound, generator=g))


class Stage2Recipe:
    def setup(self, cfg: Stage2Config) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.loop.seed)  # adapter / gate / projector init and dropout: reproducible
        data, self.samples, self.data_manifest = load_dataset()
        self.catalogue = Catalogue.from_tables(data)
        lm, self.tokenizer = load_base_lm(prepare_model(cfg.model_dir), bf16=cfg.loop.bf16)
        index = load_or_build_index(
            cfg.index_dir or default_index_dir(cfg.model_dir),
            lm,
            self.tokenizer,
            self.catalogue,
            self.data_manifest,
        )
        self.din = load_din(cfg.din_dir, self.data_manifest)
        stage1_metrics = json.loads((cfg.stage1 / "metrics.json").read_text())
        check_same_data("the stage-1 run", cfg.stage1, stage1_metrics.get("data"), self.data_manifest)
        self.stage1_cfg = stage1_metrics["config"]
        self.stage1_run_id = stage1_metrics.get("run_id")
        lora_state = load_file(cfg.stage1 / "adapter" / "adapter_model.safetensors")
        self.model = build_stage2_model(
            lm, self.tokenizer, lora_state, self.stage1_cfg, cfg.mode, self.din.config.embed_dim
        )
        if cfg.gate_init == "random":
            _randomise_gates(self.model, cfg.loop.seed)
        spa_on = self.model.spa is not None
        self.featurizer = Featurizer(
            self.tokenizer,
            self.catalogue.items,
            index,
            self.din,
            k=cfg.k,
            spa=spa_on,
            domain=self.catalogue.domain,
        )
        rows = fewshot_rows(self.samples, cfg.n_rows, seed=cfg.loop.seed)
        pairs = interleave_modes(rows, cfg.loop.seed)
        if cfg.prompts == "subr":
            pairs = [(row, mode) for row, mode in pairs if mode == "subr"]
        self.examples = build_examples(
            self.featurizer, self.catalogue, self.samples, pairs, with_din=True, din_logit=cfg.din_residual
        )
        valid = eval_rows(self.samples, "valid", cfg.valid_rows)
        self.evaluate = make_validator(
            self.model, self.featurizer, self.catalogue, self.samples, valid, "subr", with_din=True,
            din_logit=cfg.din_residual,
        )  # fmt: skip
        names: dict[str, torch.nn.Parameter] = {}
        if cfg.mode in ("cflora", "rellax"):
            names |= adapter_params(self.model, "gates")
        if cfg.mode in ("spa", "rellax"):
            names |= adapter_params(self.model, "spa")
        if cfg.train_lora:
            names |= adapter_params(self.model, "lora")
        set_trainable(self.model, names)
        self.params = names

    def train(self, deadline: float | None = None, fit_budget_s: float | None = None) -> TrainResult:
        return train_loop(
            self.model,
            self.params,
            self.examples,
            self.cfg.loop,
            self.evaluate,
            self.cfg.out / "checkpoint.pt",
            pad_id=int(self.tokenizer.pad_token_id or 0),
            deadline=deadline,
            fit_budget_s=fit_budget_s,
        )

    @torch.no_grad()
    def mean_gates(self) -> dict[str, torch.Tensor]:
        """Ḡ per gated layer: the mean of G(h) over the training instances (docs/design.md §8)."""
        h = torch.stack([e.h for e in self.examples]).to(next(self.model.lm.parameters()).device)
        return {name: G.float().mean(dim=0) for name, G in gate_matrices(self.model.lm, h).items()}

    def save(self, result: TrainResult) -> dict[str, Any]:
        out = self.cfg.out
        out.mkdir(parents=True, exist_ok=True)
        trained = {k: v.detach().float().cpu().contiguous() for k, v in self.params.items()}
        save_file(trained, out / "stage2.safetensors")
        g_bars = self.mean_gates()
        if g_bars:
            save_file({k: v.cpu().contiguous() for k, v in g_bars.items()}, out / "gbar.safetensors")
        metrics = {
            "stage": self.cfg.mode,
            "result": result.to_json(),
            "config": self.cfg.to_json(),
            "stage1_config": self.stage1_cfg,
            "stage1_run_id": self.stage1_run_id,
            "run_id": uuid.uuid4().hex,  # the bundle and eval made from this run record it
            "trainable_params": sum(p.numel() for p in self.params.values()),
            "data": {k: self.data_manifest.get(k) for k in ("source_hash", "dataset", "dataset_key")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


def load_stage2_weights(model: ScoringModel, folder: Path) -> None:
    """Put a finished stage-2 run's trained tensors into a model built by `build_stage2_model`."""
    state = load_file(folder / "stage2.safetensors")
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise KeyError(f"stage-2 tensors without a parameter: {missing[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def load_stage2_run(
    run_dir: Path,
    lm,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    embed_dim: int,
    *,
    stage1: Path | None = None,
    mode: str | None = None,
) -> tuple[ScoringModel, dict[str, Any]]:
    """A finished stage-2 run rebuilt over `lm` as a scoring model, and its metrics.json.

    The stage-1 LoRA comes from `stage1` (default: the run dir its config recorded), the layout from
    `mode` (default: the stage the run trained), then the run's own tensors (`load_stage2_weights`).
    `embed_dim` is the frozen DIN's (SPA's input width).
    """
    meta = json.loads((run_dir / "metrics.json").read_text())
    stage1 = Path(meta["config"]["stage1"]) if stage1 is None else stage1
    lora = load_file(stage1 / "adapter" / "adapter_model.safetensors")
    model = build_stage2_model(
        lm, tokenizer, lora, meta["stage1_config"], meta["stage"] if mode is None else mode, embed_dim
    )
    load_stage2_weights(model, run_dir)
    return model, meta


def main(
    cfg: Stage2Config,
    force: bool = False,
    deadline: float | None = None,
    fit_budget_s: float | None = None,
) -> dict[str, Any]:
    """Train (or reuse a finished run in `cfg.out`) and return its metrics; past `deadline`
    (monotonic) training checkpoints and raises TimeoutError, and the same call resumes it. With
    `fit_budget_s` training ends after that many training seconds (`train_loop`), part of the run's key."""
    outputs = ["stage2.safetensors"]
    # A retrained stage 1 (new run id) makes a stage-2 run over it stale, whatever its own config.
    stage1_run = json.loads((cfg.stage1 / "metrics.json").read_text()).get("run_id")
    key = {k: v for k, v in cfg.to_json().items() if k not in ("out", "stage1")}
    key["stage1_run_id"] = stage1_run
    if not key["din_residual"]:  # runs made before the option existed keep their key
        del key["din_residual"]
    return train_or_reuse(
        Stage2Recipe(), cfg, key, outputs, [*outputs, "gbar.safetensors"],
        force=force, deadline=deadline, fit_budget_s=fit_budget_s,
    )  # fmt: skip
