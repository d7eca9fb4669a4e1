"""Deep Interest Network (docs/design.md §6): the frozen conventional CTR model (CRM) of ReLLaX.

Fields (one 64-d embedding each): user id, gender, age bucket, job, the data set's own profile
fields (`extra`: none for MovieLens), target item id, target genre, and the last `max_history`
history items with their ratings. With d = `embed_dim`:

    t_j  = ReLU(W_t [e_item(x_j); e_rating(r_j)] + b_t)                  history token j,   (d,)
    q    = e_item(target)                                                 query,             (d,)
    a_j  = MLP_a([q; t_j; q - t_j; q * t_j])                              activation unit,   scalar
    p    = sum_j m_j * a_j * t_j                                          pooled interest,   (d,)
    h    = MLP_3x256([e_user; e_gender; e_age; e_job; e_extra..; q; e_genre; p])  final hidden, (256,)
    logit = w_o . h + b_o

As in the DIN paper the weights a_j are *not* softmax-normalised, so the pooled vector keeps the
intensity of the user's interest, padding (m_j = 0) contributes exactly nothing, and an empty
history pools to zero instead of NaN.

Frozen after training, the model serves three roles: its item-id embeddings feed SPA
(`item_embeddings`), its hidden state h feeds the CFLoRA gates (`forward_with_hidden`), and its own
CTR is the degraded-mode score. Every table keeps an explicit id -> row map (`DINVocab`); row 0 is
padding *and* unknown, its embedding is held at zero, so a cold-start user or an unseen item scores
through the same path with a zero id embedding.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rellax.entities import Profile
from rellax.errors import BundleError

__all__ = ["ActivationUnit", "DIN", "DINBatch", "DINConfig", "DINVocab", "encode_batch"]

VOCAB_FIELDS = ("users", "items", "genres", "genders", "ages", "jobs")
WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE = "model.safetensors", "config.json", "vocab.json"
FORMAT_VERSION = 1


@dataclass
class DINVocab:
    """Explicit value -> row maps for every categorical table; row 0 means unknown (or padding).

    Rows are assigned 1..n in sorted order of the values, so the same values always give the same
    rows (docs/design.md §3: the original code had an off-by-one here, hence no implicit `id - 1`).
    """

    users: dict[int, int] = field(default_factory=dict)
    items: dict[int, int] = field(default_factory=dict)
    genres: dict[str, int] = field(default_factory=dict)
    genders: dict[str, int] = field(default_factory=dict)
    ages: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    extra: dict[str, dict[str, int]] = field(default_factory=dict)  # profile field -> value -> row

    @classmethod
    def build(
        cls,
        user_ids: Iterable[int],
        item_ids: Iterable[int],
        genres: Iterable[str],
        genders: Iterable[str],
        ages: Iterable[str],
        jobs: Iterable[str],
        extra: dict[str, Iterable[str]] | None = None,
    ) -> DINVocab:
        """Number the distinct values of each table from 1 (duplicates are fine)."""

        def rows(values: Iterable[Any], cast: type) -> dict:
            return {v: r for r, v in enumerate(sorted({cast(v) for v in values}), start=1)}

        return cls(
            users=rows(user_ids, int),
            items=rows(item_ids, int),
            genres=rows(genres, str),
            genders=rows(genders, str),
            ages=rows(ages, str),
            jobs=rows(jobs, str),
            extra={name: rows(values, str) for name, values in (extra or {}).items()},
        )

    def extra_rows(self, profiles: Sequence[Profile]) -> np.ndarray:
        """(B, fields) rows of the extra profile fields, in the vocab's field order; unknown -> 0."""
        out = np.zeros((len(profiles), len(self.extra)), dtype=np.int64)
        for j, (name, mapping) in enumerate(self.extra.items()):
            out[:, j] = [mapping.get(p.value(name), 0) for p in profiles]
        return out

    def rows(self, table: str, values: Iterable[Any]) -> np.ndarray:
        """Rows of `values` in `table` (one of VOCAB_FIELDS) as int64; unknown values give 0."""
        mapping: dict = getattr(self, table)
        cast = int if table in ("users", "items") else str
        return np.fromiter((mapping.get(cast(v), 0) for v in values), dtype=np.int64)

    def item_rows(self, item_ids: Iterable[int]) -> np.ndarray:
        """Item-id rows (for `DIN.item_embeddings`); unknown items give 0."""
        return self.rows("items", item_ids)

    def sizes(self) -> dict[str, int]:
        """Embedding-table sizes for `DINConfig`, row 0 included."""
        sizes: dict[str, Any] = {f"n_{name}": len(getattr(self, name)) + 1 for name in VOCAB_FIELDS}
        if self.extra:  # absent for data without extra fields, so their config.json stays as it was
            sizes["n_extra"] = tuple(len(mapping) + 1 for mapping in self.extra.values())
        return sizes

    def to_json(self) -> dict:
        """Values listed in row order (row = list index + 1): JSON-safe, no pickles."""
        out: dict[str, Any] = {"format_version": FORMAT_VERSION}
        for name in VOCAB_FIELDS:
            mapping: dict = getattr(self, name)
            out[name] = [v for v, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        if self.extra:
            out["extra"] = {
                name: [v for v, _ in sorted(m.items(), key=lambda kv: kv[1])]
                for name, m in self.extra.items()
            }
        return out

    @classmethod
    def from_json(cls, data: dict) -> DINVocab:
        if data.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"DIN vocab format_version {data.get('format_version')!r} != {FORMAT_VERSION}")
        cast = {"users": int, "items": int}
        return cls(
            **{
                name: {cast.get(name, str)(v): r for r, v in enumerate(data[name], start=1)}
                for name in VOCAB_FIELDS
            },
            extra={
                name: {str(v): r for r, v in enumerate(values, start=1)}
                for name, values in data.get("extra", {}).items()
            },
        )


@dataclass
class DINConfig:
    """Hyper-parameters and table sizes (sizes include row 0; take them from `DINVocab.sizes()`)."""

    embed_dim: int = 64
    hidden: tuple[int, ...] = (256, 256, 256)
    dropout: float = 0.1
    max_history: int = 30
    n_ratings: int = 6  # rows 0 (padding) and 1..5
    attention_hidden: tuple[int, ...] = (80, 40)  # the DIN paper's activation unit
    n_users: int = 1
    n_items: int = 1
    n_genres: int = 1
    n_genders: int = 1
    n_ages: int = 1
    n_jobs: int = 1
    n_extra: tuple[int, ...] = ()  # one table per extra profile field (DINVocab.extra's order)

    def to_json(self) -> dict:
        data = asdict(self)
        if not self.n_extra:  # as before the field existed: the same bytes, the same checksums
            del data["n_extra"]
        return {"format_version": FORMAT_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict) -> DINConfig:
        if data.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"DIN config format_version {data.get('format_version')!r} != {FORMAT_VERSION}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)


@dataclass
class DINBatch:
    """Row tensors for B (user, candidate) pairs. History tensors are (B, L), left-padded: the most
    recent history item is always in column L - 1 and padding (row 0, mask False) comes first."""

    user: torch.Tensor  # (B,) int64
    gender: torch.Tensor  # (B,)
    age: torch.Tensor  # (B,)
    job: torch.Tensor  # (B,)
    extra: torch.Tensor  # (B, extra fields) int64; (B, 0) for data without them
    item: torch.Tensor  # (B,)
    genre: torch.Tensor  # (B,)
    hist_items: torch.Tensor  # (B, L) int64
    hist_ratings: torch.Tensor  # (B, L) int64, 1..5, 0 = padding
    hist_mask: torch.Tensor  # (B, L) bool

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def select(self, index: torch.Tensor | slice) -> DINBatch:
        """The sub-batch at `index` (rows), e.g. a shuffled minibatch of a whole split."""
        return DINBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> DINBatch:
        return DINBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def encode_batch(
    vocab: DINVocab,
    user_ids: Sequence[int],
    profiles: Sequence[Profile],
    item_ids: Sequence[int],
    item_genres: Sequence[str],
    histories: Sequence[tuple[Sequence[int], Sequence[float]]],
    max_history: int = 30,
) -> DINBatch:
    """Turn raw ids into rows. Histories are oldest first; the last `max_history` are kept and
    left-padded. Ratings are rounded and clipped to 1..5 (0 is reserved for padding)."""
    n = len(item_ids)
    if not (len(user_ids) == len(profiles) == len(item_genres) == len(histories) == n):
        raise ValueError("encode_batch: all per-sample sequences must have the same length")
    hist_items = np.zeros((n, max_history), dtype=np.int64)
    hist_ratings = np.zeros((n, max_history), dtype=np.int64)
    lookup = vocab.items
    for b, (items, ratings) in enumerate(histories):
        items, ratings = list(items)[-max_history:], list(ratings)[-max_history:]
        if len(items) != len(ratings):
            raise ValueError(f"history {b}: {len(items)} items but {len(ratings)} ratings")
        if not items:
            continue
        k = len(items)
        hist_items[b, max_history - k :] = [lookup.get(int(i), 0) for i in items]
        hist_ratings[b, max_history - k :] = np.clip(np.rint(np.asarray(ratings, dtype=np.float64)), 1, 5)
    mask = np.zeros((n, max_history), dtype=bool)
    lengths = np.fromiter((min(len(h[0]), max_history) for h in histories), dtype=np.int64, count=n)
    mask[np.arange(max_history)[None, :] >= max_history - lengths[:, None]] = True

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a)

    return DINBatch(
        user=t(vocab.rows("users", user_ids)),
        gender=t(vocab.rows("genders", (p.gender for p in profiles))),
        age=t(vocab.rows("ages", (p.age for p in profiles))),
        job=t(vocab.rows("jobs", (p.job for p in profiles))),
        extra=t(vocab.extra_rows(profiles)),
        item=t(vocab.rows("items", item_ids)),
        genre=t(vocab.rows("genres", item_genres)),
        hist_items=t(hist_items),
        hist_ratings=t(hist_ratings),
        hist_mask=t(mask),
    )


def _mlp(sizes: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ActivationUnit(nn.Module):
    """DIN's local activation unit: a_j = MLP([q; k_j; q - k_j; q * k_j]) -> scalar, then masked
    weighted sum pooling (no softmax, as in the paper).

    The first layer W = [W_q | W_k | W_d | W_p] acting on the concatenation is computed as
    (W_q + W_d) q + (W_k - W_d) k_j + W_p (q * k_j): the same function, but the query term is
    computed once per sample instead of once per history item, which halves the unit's cost.
    """

    def __init__(self, dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("the activation unit needs at least one hidden layer")
        self.dim = dim
        self.mlp = _mlp([4 * dim, *hidden])
        self.out = nn.Linear(hidden[-1], 1)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, d), keys (B, L, d), mask (B, L) bool -> pooled (B, d), weights (B, L) (0 at pads)."""
        first: nn.Linear = self.mlp[0]
        w_q, w_k, w_d, w_p = first.weight.split(self.dim, dim=1)
        pre = (
            (query @ (w_q + w_d).T + first.bias).unsqueeze(1)
            + keys @ (w_k - w_d).T
            + (query.unsqueeze(1) * keys) @ w_p.T
        )
        weights = self.out(self.mlp[1:](pre)).squeeze(-1)
        weights = weights * mask.to(weights.dtype)
        return torch.einsum("bl,bld->bd", weights, keys), weights


class DIN(nn.Module):
    """Deep Interest Network; see the module docstring for the formulas."""

    def __init__(self, config: DINConfig, vocab: DINVocab | None = None) -> None:
        super().__init__()
        if config.embed_dim <= 0 or not config.hidden:
            raise ValueError(f"DINConfig needs embed_dim > 0 and hidden layers, got {config}")
        self.config, self.vocab = config, vocab
        d = config.embed_dim

        def table(n: int) -> nn.Embedding:
            # Row 0 (unknown / padding) stays zero and gets no gradient.
            return nn.Embedding(max(n, 1), d, padding_idx=0)

        self.user_emb, self.item_emb = table(config.n_users), table(config.n_items)
        self.genre_emb, self.gender_emb = table(config.n_genres), table(config.n_genders)
        self.age_emb, self.job_emb = table(config.n_ages), table(config.n_jobs)
        self.rating_emb = table(config.n_ratings)
        self.token = nn.Linear(2 * d, d)
        self.attention = ActivationUnit(d, config.attention_hidden)
        self.mlp = _mlp([(7 + len(config.n_extra)) * d, *config.hidden], config.dropout)
        self.out = nn.Linear(config.hidden[-1], 1)
        # Created last: without extra fields nothing changes (no parameters, the same random draws).
        self.extra_emb = nn.ModuleList(table(n) for n in config.n_extra)
        self._init_embeddings()

    def _init_embeddings(self) -> None:
        # Small embeddings keep the unnormalised attention sum (up to 30 terms) well-scaled at step 0.
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.05)
                with torch.no_grad():
                    module.weight[0].zero_()

    def item_embeddings(self, item_rows: torch.Tensor) -> torch.Tensor:
        """Item-id embedding lookup, (...) -> (..., embed_dim); row 0 gives zeros. Feeds SPA."""
        return self.item_emb(item_rows)

    def history_tokens(self, hist_items: torch.Tensor, hist_ratings: torch.Tensor) -> torch.Tensor:
        """(B, L) rows -> (B, L, d) tokens ReLU(W_t [e_item; e_rating] + b_t)."""
        pair = torch.cat([self.item_emb(hist_items), self.rating_emb(hist_ratings)], dim=-1)
        return torch.relu(self.token(pair))

    def forward_with_hidden(self, batch: DINBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits (B,), h (B, hidden[-1]): the output layer's input, i.e. the last MLP activation
        (after its dropout, which is the identity in eval mode). h feeds the CFLoRA gates
        (docs/design.md §6)."""
        query = self.item_emb(batch.item)
        keys = self.history_tokens(batch.hist_items, batch.hist_ratings)
        pooled, _ = self.attention(query, keys, batch.hist_mask)
        x = torch.cat(
            [
                self.user_emb(batch.user),
                self.gender_emb(batch.gender),
                self.age_emb(batch.age),
                self.job_emb(batch.job),
                *(emb(batch.extra[:, j]) for j, emb in enumerate(self.extra_emb)),
                query,
                self.genre_emb(batch.genre),
                pooled,
            ],
            dim=-1,
        )
        h = self.mlp(x)
        return self.out(h).squeeze(-1), h

    def forward(self, batch: DINBatch) -> torch.Tensor:
        """-> logits (B,); P(click) = sigmoid(logit)."""
        return self.forward_with_hidden(batch)[0]

    def save(self, folder: Path | str) -> dict[str, str]:
        """Write safetensors weights, config.json and vocab.json; return {file name: sha256}."""
        from safetensors.torch import save_file

        if self.vocab is None:
            raise ValueError("DIN.save needs a vocab (the id -> row maps travel with the weights)")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt", "model": "DIN"})
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2))
        (folder / VOCAB_FILE).write_text(json.dumps(self.vocab.to_json()))
        return {
            name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE)
        }

    @classmethod
    def load(cls, folder: Path | str) -> DIN:
        """Rebuild a saved model (eval mode) with its `.vocab`; BundleError if a file is missing."""
        from safetensors.torch import load_file

        folder = Path(folder)
        missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE) if not (folder / n).exists()]
        if missing:
            raise BundleError(f"{folder}: DIN file(s) missing: {missing}")
        config = DINConfig.from_json(json.loads((folder / CONFIG_FILE).read_text()))
        vocab = DINVocab.from_json(json.loads((folder / VOCAB_FILE).read_text()))
        sizes = {name: getattr(config, name) for name in vocab.sizes()}
        if sizes != vocab.sizes():
            # A vocab that does not match the tables would shift every id by some rows, silently.
            raise BundleError(f"{folder}: config table sizes {sizes} != vocab sizes {vocab.sizes()}")
        model = cls(config, vocab)
        try:
            model.load_state_dict(load_file(folder / WEIGHTS_FILE))
        except RuntimeError as exc:  # missing/unexpected keys or shape mismatches
            raise BundleError(f"{folder}: DIN weights do not match config.json: {exc}") from exc
        return model.eval()
