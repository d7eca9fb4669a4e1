"""LLM-SRec (docs/design.md §11): a frozen LLM reads a user's sequence, small modules learn to use it.

Trained: `hist_proj` (SASRec item embedding -> LLM width, written at each `[hist]` of the user
prompt and at the item's own `[hist]` in its item prompt), the learned `[UserOut]` / `[ItemOut]`
input vectors (written at the prompt's final `[target]`), and the heads f_user, f_item (LLM
width -> 128) and f_CF (SASRec width -> 128). The LLM's last-layer hidden state at the read-out
token, through f_user or f_item, is a user or item vector in one 128-d space; score = their dot
product. Item vectors do not depend on the user, so a
catalogue's are computed once and one LLM pass per user ranks any number of candidates.

Loss (the authors' code, weights 1:1:1): softmax retrieval over 1 positive + negatives
(unnormalised dot products), MSE between the L2-normalised f_user(h_U) and f_CF(SASRec user
vector), and a uniformity term (Wang & Isola) on the normalised user and item vectors.

Prompts are right-padded and run with an attention mask; the read-out position of each row is its
own (`Prompt.target_position`), so padding never moves what is read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rellax import precision
from rellax.cflora import adapters_disabled
from rellax.domain import MOVIES, Domain
from rellax.entities import HistoryEvent, Item
from rellax.errors import BundleError, UnknownItem
from rellax.prompt import Prompt, build_user_prompt
from rellax.sasrec import CONFIG_FILE, ITEMS_FILE, WEIGHTS_FILE, SASRec
from rellax.spa import inject_soft_tokens

__all__ = ["LLMSRec", "LLMSRecRanker", "llmsrec_loss", "recent_history"]

WEIGHTS, ITEM_VECTORS, HNSW = "llmsrec.safetensors", "item_vectors.safetensors", "items.hnsw"
HNSW_EF = 200  # query beam: recall@10 1.0 on 20 users x 1,682 items (tests/test_llmsrec.py)
SASREC_FILES = (WEIGHTS_FILE, CONFIG_FILE, ITEMS_FILE)


def recent_history(
    items: Mapping[int, Item], events: Iterable[tuple[int, int]], k: int
) -> list[tuple[Item, int]]:
    """The last k (item, unix time) of (item id, time) events the catalogue knows, oldest first:
    what the user prompt shows, in training and serving alike."""
    return [(items[int(i)], int(t)) for i, t in events if int(i) in items][-k:] if k > 0 else []


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class LLMSRec(nn.Module):
    def __init__(self, lm: nn.Module, cf_dim: int = 64, out_dim: int = 128) -> None:
        super().__init__()
        self.lm = lm
        for p in self.lm.parameters():
            p.requires_grad_(False)
        hidden = lm.config.hidden_size
        self.hist_proj = _mlp(cf_dim, hidden)
        self.user_out = nn.Parameter(torch.randn(hidden) * 0.02)
        self.item_out = nn.Parameter(torch.randn(hidden) * 0.02)
        self.f_user, self.f_item, self.f_cf = (
            _mlp(hidden, out_dim),
            _mlp(hidden, out_dim),
            _mlp(cf_dim, out_dim),
        )

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("lm.")}

    def _read(self, prompts: Sequence[Prompt], soft: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, H) last-layer hidden states at each prompt's read-out token (right padding + mask)."""
        device = self.user_out.device
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, : len(p.input_ids)] = torch.tensor(p.input_ids)
            mask[b, : len(p.input_ids)] = 1
        embeds = self.lm.get_input_embeddings()(ids)
        positions = [[*p.hist_positions, p.target_position] for p in prompts]
        embeds = inject_soft_tokens(embeds, positions, [v.to(embeds.dtype) for v in soft])
        # The frozen base alone: in a bundle the same LM carries ReLLaX's CFLoRA adapters.
        with precision.compute(self.lm), adapters_disabled(self.lm):
            hidden = self.lm.model(
                inputs_embeds=embeds, attention_mask=mask, use_cache=False
            ).last_hidden_state
        at = torch.tensor([p.target_position for p in prompts], device=device)
        return hidden[torch.arange(len(prompts), device=device), at].float()

    def user_vectors(
        self, prompts: Sequence[Prompt], hist_embeddings: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """(B, out_dim) from user prompts and, per prompt, its (n_i, cf_dim) SASRec item embeddings."""
        soft = [torch.cat([self.hist_proj(e.float()), self.user_out[None]]) for e in hist_embeddings]
        return self.f_user(self._read(prompts, soft))

    def item_vectors(self, prompts: Sequence[Prompt], item_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, out_dim) from item prompts and each item's (cf_dim,) SASRec embedding, (B, cf_dim):
        the collaborative signal reaches the item side too, through the same projector as `[hist]`."""
        soft = self.hist_proj(item_embeddings.float())
        return self.f_item(self._read(prompts, [torch.stack([e, self.item_out]) for e in soft]))


def _uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log E exp(-t ||x_i - x_j||^2) over pairs of L2-normalised rows (lower = more uniform)."""
    x = F.normalize(x, dim=-1)
    return torch.pdist(x).pow(2).mul(-t).exp().mean().log() if len(x) > 1 else x.new_zeros(())


def llmsrec_loss(
    user: torch.Tensor, items: torch.Tensor, cf_user: torch.Tensor, f_cf: nn.Module
) -> dict[str, torch.Tensor]:
    """user (B, D); items (B, 1 + n_neg, D) with the positive first; cf_user (B, cf_dim) SASRec's."""
    logits = torch.einsum("bd,bcd->bc", user, items)
    retrieval = F.cross_entropy(logits, torch.zeros(len(user), dtype=torch.long, device=user.device))
    distill = F.mse_loss(F.normalize(user, dim=-1), F.normalize(f_cf(cf_user), dim=-1))
    uniform = _uniformity(user) + _uniformity(items.reshape(-1, items.shape[-1]))
    return {
        "loss": retrieval + distill + uniform,
        "retrieval": retrieval,
        "distill": distill,
        "uniform": uniform,
    }


class LLMSRecRanker:
    """LLM-SRec at serving time: one user pass, then dot products with the stored item vectors.

    Folder layout (written by `LLMSRecRanker.write`, read by `load`; a bundle keeps it as `llmsrec/`):
    `llmsrec.json` (k, widths), `llmsrec.safetensors` (the trained small modules),
    `item_vectors.safetensors` (f_item of the whole catalogue), `items.hnsw` (hnswlib, inner
    product search over those vectors, for candidate generation) and the SASRec teacher's files (its item
    embeddings feed `[hist]`). The LLM is the caller's: a bundle passes the base it already holds
    (its CFLoRA adapters are switched off for this pass), so the service keeps one copy of the weights.
    """

    FILES = ("llmsrec.json", WEIGHTS, ITEM_VECTORS, HNSW, *SASREC_FILES)

    def __init__(
        self,
        model: LLMSRec,
        sasrec: SASRec,
        tokenizer,  # noqa: ANN001
        items: Mapping[int, Item],
        item_ids: np.ndarray,
        vectors: np.ndarray,
        hnsw,  # noqa: ANN001 - hnswlib.Index over `vectors` (labels = rows)
        k: int,
        domain: Domain = MOVIES,
    ) -> None:
        self.domain = domain
        self.model, self.sasrec, self.tokenizer, self.items, self.k = (
            model.eval(),
            sasrec,
            tokenizer,
            items,
            k,
        )
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.rows = {int(i): r for r, i in enumerate(self.item_ids)}
        self.hnsw = hnsw
        # adapters_disabled flips module state on the shared LM: one pass at a time.
        self._lock = threading.Lock()

    @staticmethod
    def write(
        folder: Path, model: LLMSRec, item_ids: Sequence[int], vectors: torch.Tensor, sasrec_dir: Path, k: int
    ) -> None:
        """Save a trained model's small modules, the catalogue's item vectors and their hnswlib index."""
        import shutil

        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {n: p.detach().float().contiguous() for n, p in model.trainable().items()}, folder / WEIGHTS
        )
        ids = torch.tensor(list(item_ids), dtype=torch.long)
        save_file({"item_ids": ids, "vectors": vectors.float().contiguous()}, folder / ITEM_VECTORS)
        _build_hnsw(vectors.float().numpy()).save_index(str(folder / HNSW))
        for name in SASREC_FILES:
            shutil.copy2(Path(sasrec_dir) / name, folder / name)
        cf_dim, out_dim = model.f_cf[0].in_features, model.f_user[-1].out_features
        (folder / "llmsrec.json").write_text(json.dumps({"k": k, "cf_dim": cf_dim, "out_dim": out_dim}))

    @classmethod
    def load(
        cls,
        folder: Path,
        lm: nn.Module,
        tokenizer,  # noqa: ANN001
        items: Mapping[int, Item],
        domain: Domain = MOVIES,
    ) -> LLMSRecRanker:
        """Read a folder written by `write` over `lm`; BundleError naming a missing or mismatched part."""
        import hnswlib
        from safetensors.torch import load_file

        folder = Path(folder)
        missing = [n for n in cls.FILES if not (folder / n).exists()]
        if missing:
            raise BundleError(f"{folder}: LLM-SRec file(s) missing: {missing}")
        model, config = cls.load_model(folder, lm)
        stored = load_file(folder / ITEM_VECTORS)
        ids, vectors = stored["item_ids"].numpy(), stored["vectors"].numpy()
        if len(ids) != len(vectors) or vectors.shape[1] != int(config["out_dim"]):
            raise BundleError(f"{folder / ITEM_VECTORS}: {len(ids)} ids for vectors {tuple(vectors.shape)}")
        hnsw = hnswlib.Index(space="l2", dim=vectors.shape[1] + 1)  # see _augment
        hnsw.load_index(str(folder / HNSW), max_elements=len(ids))
        hnsw.set_ef(HNSW_EF)  # a saved index does not keep its beam: hnswlib loads with ef = 10
        if hnsw.get_current_count() != len(ids):
            raise BundleError(f"{folder / HNSW} holds {hnsw.get_current_count()} items, vectors {len(ids)}")
        return cls(model, SASRec.load(folder), tokenizer, items, ids, vectors, hnsw, int(config["k"]), domain)

    @staticmethod
    def load_model(folder: Path, lm: nn.Module) -> tuple[LLMSRec, dict]:
        """The trained small modules of `folder` over `lm`, and its llmsrec.json; BundleError when
        the weights do not fit."""
        from safetensors.torch import load_file

        config = json.loads((Path(folder) / "llmsrec.json").read_text())
        model = LLMSRec(lm, cf_dim=int(config["cf_dim"]), out_dim=int(config["out_dim"]))
        result = model.load_state_dict(load_file(Path(folder) / WEIGHTS), strict=False)
        lacking = [n for n in result.missing_keys if not n.startswith("lm.")]
        if result.unexpected_keys or lacking:
            raise BundleError(
                f"{Path(folder) / WEIGHTS} does not fit LLM-SRec: {(result.unexpected_keys + lacking)[:3]}"
            )
        return model.to(next(lm.parameters()).device), config

    @torch.no_grad()
    def user_vector(self, history: Sequence[HistoryEvent]) -> np.ndarray:
        """(D,) float32: the user prompt over the last k events (oldest first) through the LLM."""
        shown = recent_history(self.items, ((e.item_id, e.timestamp) for e in history), self.k)
        prompt = build_user_prompt(self.tokenizer, shown, k=self.k, domain=self.domain)
        emb = self.sasrec.item_vectors(
            torch.tensor(self.sasrec.rows([it.item_id for it, _ in shown]), dtype=torch.long)
        )
        with self._lock:
            return self.model.user_vectors([prompt], [emb])[0].float().numpy()

    def scores(self, user: np.ndarray, item_ids: Sequence[int]) -> np.ndarray:
        """user . item for each id (float64, request order); an id without a vector raises UnknownItem."""
        unknown = [int(i) for i in item_ids if int(i) not in self.rows]
        if unknown:
            raise UnknownItem(unknown)
        rows = np.fromiter((self.rows[int(i)] for i in item_ids), dtype=np.int64, count=len(item_ids))
        return (self.vectors[rows] @ user.astype(np.float32)).astype(np.float64)

    def candidates(self, user: np.ndarray, n: int, exclude: Iterable[int] = ()) -> list[int]:
        """The top n item ids by user . item, none of `exclude`, best first: from the hnswlib index,
        or exactly (one small matrix product) when n is a large share of what may be returned, where
        a filtered graph walk can run out of neighbours."""
        banned = {self.rows[int(i)] for i in exclude if int(i) in self.rows}
        n = min(n, len(self.item_ids) - len(banned))
        if n <= 0:
            return []
        if 4 * n <= len(self.item_ids) - len(banned):
            if self.hnsw.ef < 2 * n:
                self.hnsw.set_ef(2 * n)
            try:
                query = np.append(user.astype(np.float32), np.float32(0))[None]  # see _augment
                labels, _ = self.hnsw.knn_query(query, k=n, num_threads=1, filter=lambda r: r not in banned)
                return [int(self.item_ids[r]) for r in labels[0]]
            except RuntimeError:  # hnswlib found fewer than n under the filter
                pass
        scores = self.vectors @ user.astype(np.float32)
        scores[list(banned)] = -np.inf
        return [int(self.item_ids[r]) for r in np.argsort(-scores, kind="stable")[:n]]


def _augment(vectors: np.ndarray) -> np.ndarray:
    """Maximum inner product search as nearest neighbours (Bachrach et al., 2014): append
    sqrt(R^2 - |v|^2), R the largest norm, so |q' - v'|^2 = |q|^2 + R^2 - 2 q.v for q' = (q, 0).
    hnswlib's "ip" space over raw, unnormalised vectors is no metric and its graph misses top items."""
    norms = np.linalg.norm(vectors, axis=1)
    extra = np.sqrt(np.maximum(norms.max() ** 2 - norms**2, 0.0))
    return np.hstack([vectors, extra[:, None]]).astype(np.float32)


def _build_hnsw(vectors: np.ndarray, seed: int = 0):  # noqa: ANN202 - hnswlib.Index
    """hnswlib (space "l2") over the augmented item vectors: the nearest are the top dot products."""
    import hnswlib

    index = hnswlib.Index(space="l2", dim=vectors.shape[1] + 1)
    index.init_index(max_elements=len(vectors), ef_construction=200, M=16, random_seed=seed)
    index.add_items(_augment(vectors), np.arange(len(vectors)), num_threads=1)  # one thread: reproducible
    index.set_ef(HNSW_EF)
    return index
