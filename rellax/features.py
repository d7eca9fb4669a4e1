"""From (user, history, candidates) to everything the LLM and DIN need: one path for training,
evaluation and serving (docs/design.md §2: train/serve skew is the classic bug of this field).

A `Featurizer` owns the catalogue, the item index (SUBR), the tokenizer and the frozen DIN. It
builds prompts with `rellax.prompt.build_prompt`, encodes DIN inputs with `rellax.din.encode_batch`,
and returns the DIN item embeddings behind each soft token. History entries whose item is not in the
catalogue cannot be written into a prompt and are skipped (the DIN never saw them either).
A candidate the user has already interacted with is left out of its own history (prompt, SUBR and
DIN alike): a training target never appears in the history before it, so serving must not show one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rellax.din import DIN, DINBatch, encode_batch
from rellax.domain import MOVIES, Domain
from rellax.entities import Item, Profile
from rellax.errors import UnknownItem
from rellax.item_index import ItemIndex
from rellax.prompt import Prompt, build_prompt
from rellax.subr import subr_positions_many

__all__ = ["Featurizer", "History", "Mode"]

Mode = Literal["recency", "subr"]


@dataclass(frozen=True, slots=True)
class History:
    """A user's history, oldest first: parallel item ids and ratings."""

    item_ids: Sequence[int]
    ratings: Sequence[float]

    def __len__(self) -> int:
        return len(self.item_ids)

    def without(self, item_id: int) -> History:
        """The history minus every interaction with `item_id` (itself when there is none)."""
        keep = [i for i, item in enumerate(self.item_ids) if int(item) != int(item_id)]
        if len(keep) == len(self):
            return self
        return History([int(self.item_ids[i]) for i in keep], [float(self.ratings[i]) for i in keep])


class Featurizer:
    """Prompts, DIN batches and soft-token embeddings for (user, candidate) pairs.

    Args:
        tokenizer: the scoring LLM's tokenizer, soft tokens added.
        items: the catalogue by item id.
        item_index: item vectors for SUBR.
        din: the frozen DIN (vocab attached), or None for text-only use.
        k: history items shown per prompt.
        spa: write `[hist]`/`[target]` placeholders.
        domain: the data set's prompt wording (MovieLens's by default).
    """

    def __init__(
        self,
        tokenizer,  # noqa: ANN001 - transformers tokenizer
        items: Mapping[int, Item],
        item_index: ItemIndex,
        din: DIN | None,
        *,
        k: int,
        spa: bool,
        domain: Domain = MOVIES,
    ) -> None:
        self.tokenizer, self.items, self.item_index, self.din = tokenizer, items, item_index, din
        self.k, self.spa, self.domain = k, spa, domain

    def known_history(self, history: History) -> History:
        """The entries whose item is in the catalogue, order kept."""
        keep = [i for i, item in enumerate(history.item_ids) if int(item) in self.items]
        if len(keep) == len(history):
            return history
        return History([int(history.item_ids[i]) for i in keep], [float(history.ratings[i]) for i in keep])

    def check_candidates(self, candidate_ids: Sequence[int]) -> None:
        unknown = [int(c) for c in candidate_ids if int(c) not in self.items]
        if unknown:
            raise UnknownItem(unknown)

    def prompts(
        self,
        profile: Profile,
        history: History,
        candidate_ids: Sequence[int],
        mode: Mode,
        k: int | None = None,
        spa: bool | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[Prompt]:
        """One prompt per candidate for one user; SUBR runs as one matrix product for all of them.

        With `timings`, adds the seconds spent in "subr" and in "prompt" (rendering + tokens).
        """
        started = time.perf_counter()
        self.check_candidates(candidate_ids)
        k = self.k if k is None else k
        spa = self.spa if spa is None else spa
        history = self.known_history(history)
        seen = {int(i) for i in history.item_ids}
        # Candidates outside the history share one SUBR matrix product; one the user already
        # interacted with gets its own history without it (rare: re-scoring a seen item).
        shared = [int(c) for c in candidate_ids if int(c) not in seen]
        own = {int(c): history.without(c) for c in candidate_ids if int(c) in seen}
        picks: dict[int, np.ndarray] = {}
        if mode == "subr" and len(history) > k and shared:
            many = subr_positions_many(self.item_index, history.item_ids, shared, k)
            picks = {c: p for c, p in zip(shared, many, strict=True)}
        for c, hist_c in own.items():
            if mode == "subr" and len(hist_c) > k:
                picks[c] = subr_positions_many(self.item_index, hist_c.item_ids, [c], k)[0]
        subr_done = time.perf_counter()

        def subr(_hist: Sequence[int], candidate_id: int, _k: int) -> np.ndarray:
            return picks[int(candidate_id)]

        def entries(hist: History) -> list[tuple[Item, float]]:
            return [(self.items[int(i)], float(r)) for i, r in zip(hist.item_ids, hist.ratings, strict=True)]

        shared_entries = entries(history)
        prompts = [
            build_prompt(
                self.tokenizer,
                profile,
                entries(own[int(c)]) if int(c) in own else shared_entries,
                self.items[int(c)],
                k=k,
                mode=mode,
                spa=spa,
                subr=subr,
                domain=self.domain,
            )
            for c in candidate_ids
        ]
        if timings is not None:
            timings["subr"] = timings.get("subr", 0.0) + subr_done - started
            timings["prompt"] = timings.get("prompt", 0.0) + time.perf_counter() - subr_done
        return prompts

    def din_batch(
        self,
        user_ids: Sequence[int | None],
        profiles: Sequence[Profile],
        candidate_ids: Sequence[int],
        histories: Sequence[History],
    ) -> DINBatch:
        """DIN inputs for B pairs (the last `max_history` known history items of each, candidate left out)."""
        din = self._require_din()
        # Serving passes one history object for all of a user's candidates: filter it once, and
        # copy it only for a candidate that is in it.
        by_history: dict[int, tuple[History, set[int]]] = {}
        known = []
        for h, c in zip(histories, candidate_ids, strict=True):
            if id(h) not in by_history:
                kept = self.known_history(h)
                by_history[id(h)] = kept, {int(i) for i in kept.item_ids}
            kept, seen = by_history[id(h)]
            known.append(kept.without(c) if int(c) in seen else kept)
        return encode_batch(
            din.vocab,
            [-1 if u is None else int(u) for u in user_ids],
            profiles,
            [int(c) for c in candidate_ids],
            [self.items[int(c)].genre for c in candidate_ids],
            [(h.item_ids, h.ratings) for h in known],
            max_history=din.config.max_history,
        )

    @torch.no_grad()
    def din_outputs(self, batch: DINBatch) -> tuple[np.ndarray, torch.Tensor]:
        """(DIN's own P(click) (B,) float64, h (B, d_h) float32) with the DIN in eval mode."""
        din = self._require_din()
        if din.training:  # eval() walks every submodule: ~0.5 ms a request when done unconditionally
            din.eval()
        logits, h = din.forward_with_hidden(batch)
        return torch.sigmoid(logits).double().numpy(), h.float()

    @torch.no_grad()
    def soft_embeddings(self, prompts: Sequence[Prompt]) -> list[torch.Tensor]:
        """Per prompt, the DIN item embeddings (n_i, E) of its soft tokens, in placeholder order."""
        din = self._require_din()
        return [
            din.item_embeddings(torch.from_numpy(din.vocab.item_rows(p.soft_item_ids))).float()
            for p in prompts
        ]

    def _require_din(self) -> DIN:
        if self.din is None or self.din.vocab is None:
            raise ValueError("this featurizer has no DIN (with vocab): DIN inputs, h and SPA need it")
        return self.din
