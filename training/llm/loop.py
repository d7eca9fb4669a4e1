"""The training loop both LLM stages share: answer-token cross-entropy, gradient accumulation over
length-bucketed micro-batches, a linear schedule, validation-AUC model selection, resumable
checkpoints. Stage recipes decide *what* trains; this decides nothing about the model.

Speed: on CPUs with native bf16 the frozen base runs in `rellax.precision`'s bf16 recipe (bf16
decoder linear weights, cast once; embeddings, norms, residual stream, adapters, gates and the
projector in fp32, under autocast) — the recipe the bundle is served in, so what validation selects
is what is served. Autocast over fp32 weights measured 1.45x slower (8.5 s vs 12.4 s per 8 x
330-token micro-batch) for its per-op weight casts; with the weights cast once it casts activations only.
Right padding with no attention mask (SDPA's mask-free causal kernel), and the full-vocabulary
head applied only at the answer positions (2 per prompt instead of ~350).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from rellax import precision
from rellax.errors import RunError
from rellax.logs import get_logger
from rellax.scorer import ScoringModel
from training.llm import distributed
from training.llm.config import LoopConfig
from training.llm.data import Batch, LLMExample, collate, length_sorted_chunks

__all__ = ["LoopConfig", "TrainResult", "answer_loss", "train_loop"]

log = get_logger(__name__)


@dataclass
class TrainResult:
    """What a stage reports: best validation AUC, its step, the curve and the speed."""

    best_valid_auc: float
    best_step: int
    curve: list[dict[str, float]] = field(default_factory=list)
    samples_per_s: float = 0.0  # training only: time in validation is not counted
    train_seconds: float = 0.0  # wall time of the loop, validation included
    fit_seconds: float = 0.0  # the same without validation: what the curve's "seconds" count
    steps: int = 0
    examples: int = 0
    device: str = ""  # where it trained, and the frozen base's dtype: "cpu/float32", "cuda:0/bfloat16"
    cpu: str = ""  # the processor (`precision.cpu_model`); "A + B" when a paused run resumed elsewhere
    world_size: int = 1  # processes (torchrun); examples, steps and samples/s count all of them

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def answer_loss(model: ScoringModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, decision loss): mean cross-entropy over all answer tokens, and over the
    first ("Yes"/"No") alone, detached.

    Full-vocab logits at the answer positions only. The "." after Yes/No is learnt at once, so the
    training loss sits near half the decision's: only the decision loss compares with LogLoss and
    the label entropy, and tells "not fitting the train rows" from "not generalising".
    With DIN offsets (a model trained as a correction to DIN) the loss is the decision's binary
    cross-entropy on sigmoid(logit_Yes - logit_No + DIN's logit): the two numbers coincide.
    """
    hidden = model.hidden_states(batch.input_ids, batch.soft_positions, batch.soft_vectors, batch.h)
    if batch.offsets is not None:  # a correction to DIN: P(yes) = sigmoid(margin + DIN's logit)
        last = hidden[batch.target_rows[batch.target_first], batch.target_cols[batch.target_first]]
        direction, bias = model.answer_direction()
        margin = last.float() @ direction + bias + batch.offsets
        loss = F.binary_cross_entropy_with_logits(margin, batch.labels)
        return loss, loss.detach()
    picked = hidden[batch.target_rows, batch.target_cols]  # (N, H)
    logits = model.lm.get_output_embeddings()(picked).float()
    per_token = F.cross_entropy(logits, batch.targets, reduction="none")
    return per_token.mean(), per_token.detach()[batch.target_first].mean()


class _Loss(torch.nn.Module):
    """`answer_loss` as a module's forward, so DistributedDataParallel can wrap it: DDP hooks a
    module's forward to prepare each backward's gradient all-reduce."""

    def __init__(self, model: ScoringModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return answer_loss(self.model, batch)


def train_loop(
    model: ScoringModel,
    params: Mapping[str, torch.nn.Parameter],
    examples: Sequence[LLMExample],
    cfg: LoopConfig,
    evaluate: Callable[[], float],
    checkpoint: Path,
    pad_id: int,
    deadline: float | None = None,
    fit_budget_s: float | None = None,
) -> TrainResult:
    """Train `params` (all others must be frozen) on `examples`; keep the best on `evaluate()`.

    `checkpoint` (a file) is written after every optimizer step and read back on start, so a killed run
    resumes where it stopped. On return the model holds the best parameters seen. Past `deadline`
    (a `time.monotonic()` value) it stops after the next checkpoint and raises TimeoutError: a
    time-boxed session pauses a long run cleanly instead of being killed mid-step. With
    `fit_budget_s`, training *ends* (validated, best state kept, like a finished run) once that many
    training seconds (validation not counted, every session's) are spent: a tuning trial's budget.

    Under torchrun (`training.llm.distributed`) `cfg.batch_size` is per process: an optimizer step
    takes world_size x batch_size examples, the step's micro-batches dealt round-robin to the ranks,
    and DDP averages the gradients, so N processes at batch b take the steps one process takes at
    batch N*b (the same examples per step, summed in another order). Only rank 0 validates and writes
    the checkpoint; the clock-driven decisions (budget, deadline) are rank 0's, broadcast. With
    `cfg.fsdp` the frozen decoder layers are sharded instead (FSDP2) and the trained modules' gradients
    averaged by hand; every rank then validates, since each forward is a collective.
    """
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    micro_per_step = max(1, cfg.batch_size // cfg.micro_batch) * world  # every rank's, together
    lengths = [len(e) for e in examples]
    epochs_chunks = [
        length_sorted_chunks(lengths, cfg.micro_batch, cfg.seed + ep) for ep in range(cfg.epochs)
    ]
    micro_total = sum(len(c) for c in epochs_chunks)
    total_steps = math.ceil(micro_total / micro_per_step)
    eval_every = max(1, total_steps // max(1, cfg.evals_per_epoch * cfg.epochs))
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # transformers' linear warmup + decay. The runs committed under docs/results/ (study steps and
    # recipe trials) warmed up one step ahead of it, from lr/W instead of 0; the decay is the same.
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    device = next(iter(params.values())).device
    base_dtype = precision.compute_dtype(model.lm)
    loss_fn: torch.nn.Module = _Loss(model)
    fsdp = world > 1 and cfg.fsdp
    if fsdp:  # every rank keeps 1/world of each frozen layer, all-gathered for its forward/backward
        distributed.shard_frozen_layers(model.lm, set(params.values()))
    elif world > 1:  # DDP all-reduces the trainable parameters' gradients (the frozen base has none)
        from torch.nn.parallel import DistributedDataParallel

        loss_fn = DistributedDataParallel(loss_fn, find_unused_parameters=True, broadcast_buffers=False)
    # With FSDP every forward is collective (each layer's all-gather): all ranks validate together.
    validates = main or fsdp
    result = TrainResult(best_valid_auc=-1.0, best_step=0, world_size=world)
    best_state = {k: v.detach().clone() for k, v in params.items()}
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location=device)  # no pickled code
        saved_world = int(state["result"].get("world_size", 1))
        if saved_world != world:
            raise RunError(
                f"{checkpoint} was written by {saved_world} process(es), this run has {world}: an "
                f"optimizer step is world_size x batch_size examples, so resume with {saved_world} "
                "(--nproc) or start afresh (--force)"
            )
        for k, v in state["params"].items():
            params[k].data.copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        best_state, step = state["best_state"], state["step"]
        if "rng" in state:  # dropout masks continue where the killed run left off
            torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        result = TrainResult(**state["result"])
        log.info("resumed", checkpoint=str(checkpoint), step=step, world_size=world)
    result.device = f"{device}/{precision.name(base_dtype)}"
    here = torch.cuda.get_device_name(device) if device.type == "cuda" else precision.cpu_model()
    if here not in result.cpu.split(" + "):
        result.cpu = f"{result.cpu} + {here}" if result.cpu else here
    if step == 0 and result.best_valid_auc < 0:  # the starting point is a candidate too
        result.best_valid_auc = evaluate() if validates else 0.0
        result.curve.append({"step": 0, "examples": 0, "valid_auc": result.best_valid_auc, "seconds": 0.0})
    model.train()
    flat = [chunk for chunks in epochs_chunks for chunk in chunks]
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not main)
    started, seen, loss_ema, decision_ema = time.perf_counter(), 0, None, None
    validating = 0.0  # seconds spent in evaluate(): samples/s counts training only
    seconds_before = result.train_seconds  # a resumed run adds to the time its checkpoint recorded
    fit_before = result.fit_seconds
    while step < total_steps:
        chunk_ids = flat[step * micro_per_step : (step + 1) * micro_per_step]
        n_step = sum(len(c) for c in chunk_ids)  # the step's examples, over every rank
        first = step * micro_per_step
        mine = list(range(first + rank, first + len(chunk_ids), world))  # this rank's micro-batches
        weights = [len(flat[m]) / n_step * world for m in mine]
        # Every rank runs as many micro-batches as the busiest (FSDP's collectives pair up forward by
        # forward; DDP's all-reduce needs one backward at least): the extra ones count 0.
        while len(mine) < -(-len(chunk_ids) // world):
            mine, weights = [*mine, first], [*weights, 0.0]
        optimizer.zero_grad(set_to_none=True)
        for i, (m, weight) in enumerate(zip(mine, weights, strict=True)):
            # Dropout masks drawn from the micro-batch's own seed: the same masks on whichever rank
            # takes it, for any world size, and after a resume.
            torch.manual_seed(cfg.seed * 1_000_003 + m)
            batch = collate([examples[j] for j in flat[m]], pad_id).to(device)
            last = i == len(mine) - 1  # DDP all-reduces on the step's last backward only
            sync = loss_fn.no_sync() if world > 1 and not fsdp and not last else contextlib.nullcontext()
            with sync:
                loss, decision = loss_fn(batch)
                (loss * weight).backward()
            if weight == 0.0:  # a padding repeat: not an example of this step, not in the logged loss
                continue
            value, dvalue = loss.detach().item(), decision.item()  # this chunk's means
            loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
            decision_ema = dvalue if decision_ema is None else 0.9 * decision_ema + 0.1 * dvalue
        if fsdp:  # the trained modules are not FSDP's: average their gradients as DDP would
            distributed.average_gradients(params.values())
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        seen += n_step
        rate = seen / (time.perf_counter() - started - validating)
        if loss_ema is not None:  # None on a rank that has had only padding repeats so far
            bar.set_postfix(loss=f"{loss_ema:.4f}", decision=f"{decision_ema:.4f}", samples_s=f"{rate:.2f}")
        bar.update(1)
        fit_now = fit_before + (time.perf_counter() - started - validating)
        spent = fit_budget_s is not None and fit_now >= fit_budget_s and step < total_steps
        (spent,) = distributed.broadcast_flags(spent)
        if validates and (step % eval_every == 0 or step == total_steps or spent):
            model.eval()
            t_eval = time.perf_counter()
            auc = evaluate()
            validating += time.perf_counter() - t_eval
            model.train()
            examples_done = step * cfg.batch_size * world
            result.curve.append(
                {
                    "step": step,
                    "examples": examples_done,
                    "valid_auc": auc,
                    "loss": loss_ema,
                    "decision_loss": decision_ema,
                    # training seconds so far, every session's, validation excluded: AUC per CPU time
                    "seconds": round(fit_now, 1),
                }
            )
            log.info(
                "validation",
                step=step,
                valid_auc=round(auc, 4),
                loss=round(loss_ema or 0.0, 4),
                decision_loss=round(decision_ema or 0.0, 4),
            )
            if auc > result.best_valid_auc:
                result.best_valid_auc, result.best_step = auc, step
                best_state = {k: v.detach().clone() for k, v in params.items()}
        result.samples_per_s = rate
        result.train_seconds = seconds_before + (time.perf_counter() - started)
        result.fit_seconds = fit_before + (time.perf_counter() - started - validating)
        # Every step, not only after evaluations: on a CPU a step takes minutes, a save milliseconds.
        if main:
            _save_checkpoint(checkpoint, params, optimizer, scheduler, best_state, step, result)
        if spent:
            log.info("training budget spent", step=step, of=total_steps, fit_seconds=round(fit_now, 1))
            break
        past = deadline is not None and step < total_steps and time.monotonic() > deadline
        (past,) = distributed.broadcast_flags(past)  # rank 0's checkpoint is written: all pause
        if past:
            bar.close()
            raise TimeoutError(f"paused after step {step}/{total_steps}; run again to resume")
    bar.close()
    model.eval()
    for k, v in best_state.items():
        params[k].data.copy_(v)
    result.train_seconds = seconds_before + (time.perf_counter() - started)
    result.steps = step  # total_steps, or fewer when the budget ended training
    result.examples = sum(len(c) for c in flat[: step * micro_per_step])
    if seen:
        result.samples_per_s = seen / (time.perf_counter() - started - validating)
    return result


def _save_checkpoint(path: Path, params, optimizer, scheduler, best_state, step: int, result) -> None:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in params.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best_state": best_state,
            "step": step,
            "result": result.to_json(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        },
        tmp,
    )
    tmp.replace(path)
    (path.parent / "curve.json").write_text(json.dumps(result.curve, indent=2))
