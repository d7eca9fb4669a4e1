"""The scorer runtime: P(click) = P("Yes") for batches of prompts (docs/design.md §5, §8).

`ScoringModel` is the differentiable core shared by training and serving: the causal LM (CFLoRA
layers optional), the SPA projector (optional) and a two-row head. `Scorer` is the inference loop
around it: length-bucketed batches, `torch.inference_mode`, bf16 where the CPU has native bf16 (in
`rellax.precision`'s recipe: bf16 linear weights, fp32 residual stream, norms and small modules).

Why only two head rows: P(yes) = softmax(logit_Yes, logit_No)[Yes] = sigmoid(logit_Yes - logit_No),
and logit_Yes - logit_No = h_last · (w_Yes - w_No) (+ the bias difference, if the head has one).
The full-vocabulary head would cost 2·V·H FLOPs per prompt for two numbers.

Padding is on the right and no attention mask reaches the decoder: attention is causal, so a real
token never sees the pads after it, and positions 0..len-1 are already right. This keeps the exact
per-sample result batch-independent and lets SDPA take its mask-free causal kernel. The answer is
predicted at the last real position, len - 1.

Open for later, not done here: in recency mode every candidate of one user shares the prompt up to
the candidate's title (chat prefix, profile, history list), so its KV cache could be computed once
per user when re-ranking; in SUBR mode only the chat prefix and profile are shared, since the
history shown depends on the candidate. With CFLoRA gates on, G depends on the (user, candidate)
pair, so q/v of the shared prefix differ per candidate and prefix reuse is exact only when the
gates are off or merged. `Scorer.score` already groups work by length; a prefix-sharing path would
slot in as another batching strategy over the same `ScoringModel.hidden_states`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from rellax import precision
from rellax.cflora import gate_context
from rellax.spa import SPAProjector, inject_soft_tokens

__all__ = ["ScorableInput", "Scorer", "ScoringModel", "length_buckets"]


class ScorableInput(Protocol):
    """What `Scorer.score` reads from each input: a `rellax.prompt.Prompt` or a backend ModelInput."""

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def soft_positions(self) -> Sequence[int]: ...


class ScoringModel(nn.Module):
    """Causal LM + SPA + a two-row head; `logit_margin` is logit_Yes - logit_No at the last token.

    Args:
        lm: a Hugging Face causal LM with a decoder at `.model` (Llama family); CFLoRA layers may
            be injected; the soft tokens must be in its vocabulary (`rellax.tokens.add_soft_tokens`).
        yes_id, no_id: the answer token ids (`rellax.tokens.answer_token_ids`).
        spa: the SPA projector, or None when prompts carry no soft tokens.
    """

    def __init__(self, lm: nn.Module, yes_id: int, no_id: int, spa: SPAProjector | None = None) -> None:
        super().__init__()
        if getattr(lm.config, "final_logit_softcapping", None):
            raise ValueError("a soft-capped LM head is not linear: logit_Yes - logit_No needs a plain head")
        head = lm.get_output_embeddings()
        if head is None or not 0 <= min(yes_id, no_id) <= max(yes_id, no_id) < head.weight.shape[0]:
            raise ValueError(f"answer ids {yes_id}, {no_id} are not rows of the LM head")
        if spa is not None and spa.hidden != lm.config.hidden_size:
            raise ValueError(f"SPA projects to {spa.hidden}, the LM's hidden size is {lm.config.hidden_size}")
        self.lm, self.spa = lm, spa
        self.yes_id, self.no_id = int(yes_id), int(no_id)

    def answer_direction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_Yes - w_No, b_Yes - b_No) in fp32, read from the live LM head (two rows, never V)."""
        head = self.lm.get_output_embeddings()
        rows = head.weight[[self.yes_id, self.no_id]].float()
        bias = head.bias[[self.yes_id, self.no_id]].float() if head.bias is not None else rows.new_zeros(2)
        return rows[0] - rows[1], bias[0] - bias[1]

    def embed(
        self,
        input_ids: torch.Tensor,
        soft_positions: Sequence[Sequence[int]] | None = None,
        soft_vectors: Sequence[torch.Tensor] | None = None,
        projected: bool = False,
    ) -> torch.Tensor:
        """Token embeddings (B, T, H) with SPA(soft_vectors[i]) written at soft_positions[i].

        soft_vectors are per sample (n_i, E) DIN item embeddings, in placeholder order
        (`Prompt.soft_item_ids`); this model's projector maps them to H. With `projected`, they are
        already SPA outputs (n_i, H) (a bundle computes them once per candidate, for every backend)
        and are written as they are.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        if soft_positions is None or not any(len(p) for p in soft_positions):
            return embeds
        if soft_vectors is None or (self.spa is None and not projected):
            raise ValueError("prompts carry soft tokens: the model needs an SPA projector and soft_vectors")
        counts = [(len(p), len(v)) for p, v in zip(soft_positions, soft_vectors, strict=True)]
        if any(n != m for n, m in counts):
            raise ValueError(f"soft positions vs soft vectors per sample differ: {counts}")
        flat = torch.cat([torch.as_tensor(v) for v in soft_vectors]).to(embeds.device)
        if not projected:  # the projector may stay fp32 over a bf16 LM (trainers keep it so)
            flat = self.spa(flat.to(next(self.spa.parameters()).dtype))
        flat = flat.to(embeds.dtype)
        per_sample = torch.split(flat, [len(p) for p in soft_positions])
        return inject_soft_tokens(embeds, soft_positions, per_sample)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        soft_positions: Sequence[Sequence[int]] | None = None,
        soft_vectors: Sequence[torch.Tensor] | None = None,
        h: torch.Tensor | None = None,
        projected: bool = False,
    ) -> torch.Tensor:
        """Final (post-norm) hidden states (B, T, H) of right-padded `input_ids` (B, T).

        h (B, d_h) feeds the CFLoRA gates; leave it None for a model without gated layers. For
        training, take the states at the answer positions and apply `lm.get_output_embeddings()`
        there only: cross-entropy then needs full-vocabulary logits at a few positions, not all.
        """
        embeds = self.embed(input_ids, soft_positions, soft_vectors, projected)
        gates = gate_context(self.lm, h) if h is not None else contextlib.nullcontext()
        with gates, precision.compute(self.lm):  # gates computed above, in their own dtype
            out = self.lm.model(inputs_embeds=embeds, use_cache=False)
        return out.last_hidden_state

    def logit_margin(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        soft_positions: Sequence[Sequence[int]] | None = None,
        soft_vectors: Sequence[torch.Tensor] | None = None,
        h: torch.Tensor | None = None,
        projected: bool = False,
    ) -> torch.Tensor:
        """logit_Yes - logit_No (B,) in fp32 at each sample's last real token; P(yes) = sigmoid.

        Args:
            input_ids: (B, T) right-padded prompt ids.
            attention_mask: (B, T) 1 on real tokens, 0 on the right padding (it only gives lengths).
            soft_positions, soft_vectors: the SPA placeholders and their DIN embeddings, per sample.
            h: (B, d_h) gate inputs for CFLoRA, or None.
            projected: soft_vectors are SPA outputs already (see `embed`).
        """
        lengths = attention_mask.sum(dim=1)
        if (lengths < 1).any() or (attention_mask[:, :-1] < attention_mask[:, 1:]).any():
            raise ValueError(
                "attention_mask must be right padding: ones then zeros, at least one token per row"
            )
        hidden = self.hidden_states(input_ids, soft_positions, soft_vectors, h, projected)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]  # (B, H)
        direction, bias = self.answer_direction()
        return last.float() @ direction.to(last.device) + bias.to(last.device)


def length_buckets(lengths: Sequence[int], max_batch: int, max_tokens: int) -> Iterator[np.ndarray]:
    """Indices of `lengths` in batches: longest first, each at most `max_batch` rows and
    `max_tokens` padded tokens (a single longer prompt still gets a batch of its own)."""
    if max_batch < 1 or max_tokens < 1:
        raise ValueError(f"max_batch and max_tokens must be >= 1, got {max_batch}, {max_tokens}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    start = 0
    while start < len(order):
        width = int(lengths[order[start]])  # the longest of the batch: it sets the padded width
        size = max(1, min(max_batch, max_tokens // max(width, 1)))
        yield order[start : start + size]
        start += size


class Scorer:
    """Scores prompts with a `ScoringModel`: P(yes) per prompt, in input order.

    Args:
        model: the scoring model; put in eval mode here.
        dtype: compute dtype; None picks bf16 where the device has native bf16 and fp32 elsewhere
            (`rellax.precision.resolve_dtype`). fp32 is the numerically checked reference.
        cast: with a dtype other than the model's, put the LM in `rellax.precision`'s recipe for it
            in place (fastest: no per-call weight casts; what a server wants; the SPA projector and
            CFLoRA's modules keep their dtype); False runs everything under autocast instead and
            leaves the weights alone.
        pad_id: the id used for right padding; never attended to, so any valid id works.
        inference_mode: score under `torch.inference_mode` (serving); False uses `no_grad`, for a
            model that trains between calls (a validator under FSDP, whose all-gathered weights must
            not become inference tensors).
    """

    def __init__(
        self,
        model: ScoringModel,
        *,
        dtype: torch.dtype | None = None,
        cast: bool = True,
        pad_id: int = 0,
        inference_mode: bool = True,
    ) -> None:
        self.model = model.eval()
        self.inference_mode = inference_mode
        self.device = next(model.parameters()).device
        self.dtype = precision.resolve_dtype(self.device, dtype)
        self.pad_id = pad_id
        self.autocast = False
        if self.dtype != precision.compute_dtype(model.lm):
            if cast:
                precision.cast_for_compute(model.lm, self.dtype)
            else:
                self.autocast = True

    def score(
        self,
        prompts: Sequence[ScorableInput],
        soft_vectors: Sequence[np.ndarray | torch.Tensor] | None = None,
        h: np.ndarray | torch.Tensor | None = None,
        max_batch: int = 64,
        max_tokens: int = 16384,
        projected: bool = False,
        offsets: np.ndarray | Sequence[float] | None = None,
    ) -> np.ndarray:
        """P(yes) (N,) float64 for N prompts: sigmoid(logit_Yes - logit_No [+ offset]).

        Args:
            prompts: from `rellax.prompt.build_prompt`, or anything with `input_ids` and
                `soft_positions` (a backend's ModelInput).
            soft_vectors: per prompt, (n_i, E) DIN embeddings of `prompt.soft_item_ids`; needed
                exactly when the prompts were built with spa=True.
            h: (N, d_h) CFLoRA gate inputs, one row per prompt; None for an ungated model.
            max_batch, max_tokens: batch limits in rows and padded tokens.
            projected: soft_vectors are already SPA outputs (n_i, H) (see `ScoringModel.embed`).
            offsets: (N,) logits added to the margins before the sigmoid: DIN's own logit for a
                model trained as a correction to DIN (`din_residual`), else None.
        """
        with torch.inference_mode() if self.inference_mode else torch.no_grad():
            return self._score(prompts, soft_vectors, h, max_batch, max_tokens, projected, offsets)

    def _score(
        self,
        prompts: Sequence[ScorableInput],
        soft_vectors: Sequence[np.ndarray | torch.Tensor] | None,
        h: np.ndarray | torch.Tensor | None,
        max_batch: int,
        max_tokens: int,
        projected: bool,
        offsets: np.ndarray | Sequence[float] | None,
    ) -> np.ndarray:
        if offsets is not None and len(offsets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(offsets)} offsets")
        if soft_vectors is not None and len(soft_vectors) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(soft_vectors)} soft-vector blocks")
        if h is not None and len(h) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(h)} gate inputs")
        if soft_vectors is not None and not any(p.soft_positions for p in prompts):
            raise ValueError("soft_vectors given but the prompts have no placeholders (built with spa=False)")
        h_all = None if h is None else torch.as_tensor(h).to(self.device)
        out = np.empty(len(prompts), dtype=np.float64)
        lengths = [len(p.input_ids) for p in prompts]
        for idx in length_buckets(lengths, max_batch, max_tokens):
            batch = [prompts[i] for i in idx]
            ids = torch.full((len(batch), lengths[idx[0]]), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(batch):
                ids[row, : len(p.input_ids)] = torch.tensor(p.input_ids)
                mask[row, : len(p.input_ids)] = 1
            positions = [p.soft_positions for p in batch]
            vectors = None if soft_vectors is None else [torch.as_tensor(soft_vectors[i]) for i in idx]
            h_batch = None if h_all is None else h_all[torch.as_tensor(idx, device=self.device)]
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                margin = self.model.logit_margin(
                    ids.to(self.device), mask.to(self.device), positions, vectors, h_batch, projected
                )
            margin = margin.double().cpu()
            if offsets is not None:
                margin = margin + torch.as_tensor(np.asarray(offsets, dtype=np.float64)[idx])
            out[idx] = torch.sigmoid(margin).numpy()
        return out
