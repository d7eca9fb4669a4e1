"""Samples -> LLM training/evaluation examples, through the same `Featurizer` the service uses.

An example is one (sample, retrieval mode) pair: its prompt, the answer tokens ("Yes."/"No."), and,
for stage 2, the frozen DIN's hidden state h and item embeddings behind the soft tokens. DIN outputs
are computed once per example set: the DIN is frozen, so recomputing them every step is waste.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data.dataset import Dataset
from data.samples import Samples
from rellax.domain import MOVIES, Domain
from rellax.entities import Item, Profile
from rellax.features import Featurizer, History, Mode
from rellax.prompt import Prompt, answer_ids

__all__ = ["Catalogue", "LLMExample", "build_examples", "collate"]


@dataclass(frozen=True)
class Catalogue:
    """Profiles and items by id, read once from the tables, and the data set's prompt wording."""

    profiles: dict[int, Profile]
    items: dict[int, Item]
    domain: Domain = MOVIES

    @classmethod
    def from_tables(cls, data: Dataset) -> Catalogue:
        return cls(data.profiles(), {item.item_id: item for item in data.item_records()}, data.domain)


@dataclass(frozen=True, slots=True)
class LLMExample:
    """One prompt of one sample. `soft` (n, E), `h` (d_h,) and `din_logit` (the frozen DIN's own
    logit, the offset of a model trained as a correction to DIN) are None when not used."""

    row: int
    mode: Mode
    prompt: Prompt
    answer: tuple[int, ...]
    label: int
    soft: torch.Tensor | None = None
    h: torch.Tensor | None = None
    din_logit: float | None = None

    def __len__(self) -> int:
        return len(self.prompt.input_ids) + len(self.answer)


def build_examples(
    featurizer: Featurizer,
    catalogue: Catalogue,
    samples: Samples,
    rows_modes: Sequence[tuple[int, Mode]],
    *,
    with_din: bool,
    din_logit: bool = False,
    desc: str = "prompts",
) -> list[LLMExample]:
    """Examples for (sample row, mode) pairs; `with_din` adds h and the soft-token embeddings,
    `din_logit` (with `with_din`) DIN's own logit."""
    tokenizer = featurizer.tokenizer
    answers = {1: tuple(answer_ids(tokenizer, 1)), 0: tuple(answer_ids(tokenizer, 0))}
    prompts: list[Prompt] = []
    histories: list[History] = []
    for row, mode in tqdm(rows_modes, desc=desc, unit="prompt", leave=False):
        items, ratings, _ = samples.history(row)
        history = History(items.tolist(), ratings.tolist())
        profile = catalogue.profiles.get(samples.user_id(row), Profile())
        prompts.append(featurizer.prompts(profile, history, [int(samples.item_id[row])], mode)[0])
        histories.append(history)
    soft: list[torch.Tensor | None] = [None] * len(prompts)
    hs: list[torch.Tensor | None] = [None] * len(prompts)
    offsets: list[float | None] = [None] * len(prompts)
    if with_din:
        rows = [row for row, _ in rows_modes]
        users = [samples.user_id(r) for r in rows]
        batch = featurizer.din_batch(
            users,
            [catalogue.profiles.get(u, Profile()) for u in users],
            [int(samples.item_id[r]) for r in rows],
            histories,
        )
        p_din, h = featurizer.din_outputs(batch)
        hs = list(h)
        if din_logit:  # float64 probabilities: the logit is exact to ~1e-12 for |logit| < 30
            offsets = (np.log(p_din) - np.log1p(-p_din)).tolist()
        if featurizer.spa:
            soft = featurizer.soft_embeddings(prompts)
    return [
        LLMExample(row, mode, p, answers[int(samples.label[row])], int(samples.label[row]), s, hh, o)
        for (row, mode), p, s, hh, o in zip(rows_modes, prompts, soft, hs, offsets, strict=True)
    ]


@dataclass
class Batch:
    """Right-padded prompt + answer ids and what the loss and the model need."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (N_answer_tokens,)
    target_rows: torch.Tensor  # (N,) batch row of each answer token
    target_cols: torch.Tensor  # (N,) position whose hidden state predicts it
    target_first: torch.Tensor  # (N,) bool: the answer's first token, the Yes/No decision
    soft_positions: list[list[int]]
    soft_vectors: list[torch.Tensor] | None
    h: torch.Tensor | None
    labels: torch.Tensor  # (B,) the click labels
    offsets: torch.Tensor | None  # (B,) DIN logits, for a model trained as a correction to DIN

    def to(self, device: torch.device) -> Batch:
        """The batch on the model's device (examples are built and kept on the CPU)."""
        return Batch(
            input_ids=self.input_ids.to(device),
            targets=self.targets.to(device),
            target_rows=self.target_rows.to(device),
            target_cols=self.target_cols.to(device),
            target_first=self.target_first.to(device),
            soft_positions=self.soft_positions,
            soft_vectors=None if self.soft_vectors is None else [v.to(device) for v in self.soft_vectors],
            h=None if self.h is None else self.h.to(device),
            labels=self.labels.to(device),
            offsets=None if self.offsets is None else self.offsets.to(device),
        )


def collate(examples: Sequence[LLMExample], pad_id: int) -> Batch:
    """Pad on the right (the scorer's convention: causal attention never sees the pads)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    rows, cols, targets, first = [], [], [], []
    for b, e in enumerate(examples):
        seq = [*e.prompt.input_ids, *e.answer]
        ids[b, : len(seq)] = torch.tensor(seq)
        n = len(e.prompt.input_ids)
        for j, tok in enumerate(e.answer):
            rows.append(b)
            cols.append(n - 1 + j)  # the state at position t predicts token t + 1
            targets.append(tok)
            first.append(j == 0)
    with_soft = any(e.prompt.soft_positions for e in examples)
    return Batch(
        input_ids=ids,
        targets=torch.tensor(targets),
        target_rows=torch.tensor(rows),
        target_cols=torch.tensor(cols),
        target_first=torch.tensor(first, dtype=torch.bool),
        soft_positions=[list(e.prompt.soft_positions) for e in examples],
        soft_vectors=[e.soft for e in examples] if with_soft else None,  # type: ignore[misc]
        h=torch.stack([e.h for e in examples]) if examples[0].h is not None else None,  # type: ignore[misc]
        labels=torch.tensor([e.label for e in examples], dtype=torch.float32),
        offsets=(
            torch.tensor([e.din_logit for e in examples], dtype=torch.float32)
            if examples[0].din_logit is not None
            else None
        ),
    )


def length_sorted_chunks(lengths: Sequence[int], size: int, seed: int) -> list[np.ndarray]:
    """Micro-batches of similar length (little padding), visited in a seeded random order."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    perm = np.random.default_rng(seed).permutation(len(chunks))
    return [chunks[i] for i in perm]
