"""The bundle at run time: `Bundle.load` verifies a bundle (`rellax.bundle_format`) and builds the
exact-mode runtime: `prepare` turns (profile, history, candidates) into model inputs through the same
`Featurizer` the trainers use, `score_inputs` runs them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from rellax import precision
from rellax.bundle_format import BundleConfig, verify
from rellax.cflora import inject_cflora
from rellax.din import DIN
from rellax.domain import MOVIES, Domain
from rellax.entities import HistoryEvent, Item, Profile
from rellax.errors import BundleError
from rellax.features import Featurizer, History
from rellax.item_index import ItemIndex
from rellax.llmsrec import LLMSRecRanker
from rellax.model_input import ModelInput
from rellax.prompt import Prompt
from rellax.scorer import Scorer, ScoringModel
from rellax.spa import SPAProjector
from rellax.tokens import answer_token_ids

__all__ = ["Bundle", "Prepared"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """One candidate ready to score, plus what the response reports about it."""

    item_id: int
    prompt: Prompt
    model_input: ModelInput
    retrieved: list[int]
    din_prob: float


class Bundle:
    """A loaded bundle: catalogue, index, DIN, tokenizer and the exact-mode scorer."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        featurizer: Featurizer,
        scorer: Scorer,
        llmsrec: LLMSRecRanker | None = None,
        item_keys: Mapping[int, str] | None = None,
    ) -> None:
        self.path, self.manifest = path, manifest
        self.config = BundleConfig.from_json(manifest["config"])
        self.featurizer, self.scorer = featurizer, scorer
        self.items: dict[int, Item] = dict(featurizer.items)
        self.llmsrec = llmsrec  # None: the bundle has no LLM-SRec (re-ranking by ReLLaX only)
        # The data set's own item ids where they are not the integer ids (string ids, numbered 1..N)
        self._keys = dict(item_keys or {})
        self._ids_by_key = {key: item_id for item_id, key in self._keys.items()}

    def item_key(self, item_id: int) -> str:
        """The data set's own id of a catalogue item."""
        return self._keys.get(item_id, str(item_id))

    def item_id_of(self, key: str) -> int | None:
        """The catalogue item id whose own id is `key`, or None."""
        if key in self._ids_by_key:
            return self._ids_by_key[key]
        if not self._keys and key.isascii() and key.isdigit() and int(key) in self.items:
            return int(key)
        return None

    def profile_values(self, field: str) -> list[str] | None:
        """The values of a profile field ("genders", "ages", "jobs") the bundle's DIN has rows for,
        sorted; None where the bundle has no DIN vocabulary to say."""
        din = self.featurizer.din
        vocab = getattr(din, "vocab", None)
        return None if vocab is None else sorted(getattr(vocab, field))

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def dtype(self) -> str:
        """The dtype the model computes in ("float32" / "bfloat16" / "float16"): `dtype="auto"` resolved."""
        return precision.name(self.scorer.dtype)

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @classmethod
    def load(cls, path: Path | str, dtype: str = "auto") -> Bundle:
        """Verify checksums, then load every part.

        dtype: "auto" (= float32, `rellax.precision.resolve`), "float32", "bfloat16" or "float16";
            bf16/fp16 are `rellax.precision`'s recipe (the SPA projector and CFLoRA gates stay fp32).
        """
        path = Path(path)
        manifest = verify(path)
        config = BundleConfig.from_json(manifest["config"])
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        lm = AutoModelForCausalLM.from_pretrained(path / "base", dtype=torch.float32)
        inject_cflora(lm, config.r, config.alpha, config.dropout, config.target_modules,
                      config.gate_dim if config.gated else None)  # fmt: skip
        _load_into(lm, load_file(path / "adapters.safetensors"), "adapters.safetensors")
        spa = None
        if config.spa:
            spa = SPAProjector(int(json.loads((path / "din" / "config.json").read_text())["embed_dim"]),
                               int(lm.config.hidden_size))  # fmt: skip
            _load_into(spa, load_file(path / "spa.safetensors"), "spa.safetensors", strict=True)
        din = DIN.load(path / "din").eval()
        records = json.loads((path / "items.json").read_text())
        items = {int(d["item_id"]): Item(int(d["item_id"]), d["title"], d["genre"]) for d in records}
        keys = {int(d["item_id"]): str(d["key"]) for d in records if "key" in d}
        index = ItemIndex.load(path / "index")
        yes, no = answer_token_ids(tokenizer)
        model = ScoringModel(lm, yes, no, spa=spa).eval()
        scorer = Scorer(model, dtype=precision.resolve(dtype), pad_id=int(tokenizer.pad_token_id or 0))
        domain = (
            Domain.from_json(json.loads((path / "domain.json").read_text()))
            if (path / "domain.json").exists()
            else MOVIES
        )
        featurizer = Featurizer(tokenizer, items, index, din, k=config.k, spa=config.spa, domain=domain)
        llmsrec = None
        if (path / "llmsrec").is_dir():  # after Scorer: it reads the base in the dtype the scorer set
            llmsrec = LLMSRecRanker.load(path / "llmsrec", lm, tokenizer, items, domain)
        return cls(path, manifest, featurizer, scorer, llmsrec, keys)

    def prepare(
        self,
        profile: Profile,
        history: Sequence[HistoryEvent],
        candidate_ids: Sequence[int],
        k: int | None = None,
        user_id: int | str | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[Prepared]:
        """SUBR + prompt + DIN (h, own CTR) + SPA vectors for each candidate of one user.

        Raises `UnknownItem` for candidates outside the catalogue. `user_id` feeds DIN's user
        embedding (unknown or non-numeric ids use the cold-start row). With `timings`, the seconds
        spent in "subr", "prompt" and "crm" (DIN + SPA vectors) are added to it.
        """
        f = self.featurizer
        f.check_candidates(candidate_ids)
        hist = History([e.item_id for e in history], [e.rating for e in history])
        prompts = f.prompts(profile, hist, candidate_ids, self.config.mode, k=k, timings=timings)
        started = time.perf_counter()
        uid = (
            int(user_id)
            if isinstance(user_id, int) or (isinstance(user_id, str) and user_id.isdigit())
            else None
        )
        n = len(candidate_ids)
        batch = f.din_batch([uid] * n, [profile] * n, candidate_ids, [hist] * n)
        din_probs, h = f.din_outputs(batch)
        vectors = self.project(f.soft_embeddings(prompts)) if self.config.spa else [None] * n
        gate_h = h.numpy() if self.config.gated else [None] * n
        if timings is not None:
            timings["crm"] = timings.get("crm", 0.0) + time.perf_counter() - started
        return [
            Prepared(
                item_id=int(c),
                prompt=p,
                model_input=ModelInput(p.input_ids, p.soft_positions, v, gate_h[i]),
                retrieved=list(p.hist_item_ids),
                din_prob=float(din_probs[i]),
            )
            for i, (c, p, v) in enumerate(zip(candidate_ids, prompts, vectors, strict=True))
        ]

    @torch.no_grad()
    def project(self, embeddings: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """SPA outputs (n_i, H) float32 for per-prompt DIN embeddings (n_i, E)."""
        spa = self.scorer.model.spa
        if spa is None:
            raise BundleError("this bundle has no SPA projector")
        if not embeddings:
            return []
        dtype = next(spa.parameters()).dtype
        # One projection for every prompt of the request, as training does (ScoringModel.embed):
        # eight small per-prompt calls cost ~3 ms of op overhead on a 2-core CPU, one costs ~0.4.
        flat = spa(torch.cat(list(embeddings)).to(dtype)).float().numpy()
        return np.split(flat, np.cumsum([len(e) for e in embeddings])[:-1])

    def score_inputs(self, inputs: Sequence[ModelInput], max_rows: int = 64) -> np.ndarray:
        """P(yes) for model inputs (exact CFLoRA with each input's own gate), in input order; the
        model runs length-sorted chunks of at most `max_rows` prompts (what a CPU's caches favour)."""
        if not inputs:
            return np.zeros(0)
        vectors = [mi.soft_vectors for mi in inputs] if any(mi.soft_positions for mi in inputs) else None
        gates = [mi.gate_h for mi in inputs]
        h = None if any(g is None for g in gates) else torch.from_numpy(np.stack(gates).astype(np.float32))
        return self.scorer.score(inputs, soft_vectors=vectors, h=h, projected=True, max_batch=max_rows)  # type: ignore[arg-type]

    def score_prepared(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """P(yes) for prepared candidates: the call the torch backend and the parity tests share."""
        return self.score_inputs([p.model_input for p in prepared])


def _load_into(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str, strict: bool = False
) -> None:
    result = module.load_state_dict(dict(state), strict=False)
    if result.unexpected_keys:
        raise BundleError(f"{name} has tensors the model lacks, e.g. {result.unexpected_keys[:3]}")
    wanted = [k for k in result.missing_keys if strict or ".lora_" in k or ".gate." in k]
    if wanted:
        raise BundleError(f"{name} lacks tensors, e.g. {wanted[:3]}")
