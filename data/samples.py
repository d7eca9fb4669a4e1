"""CTR samples under the ReLLa protocol (docs/design.md §3), built once and cached on disk.

Every interaction is a sample; its history is all of that user's earlier interactions in the global
order (timestamp, user id, item id). Samples with fewer than `min_history` history items are dropped;
the rest are split 8:1:1 in that same order. Histories are stored once per user (CSR) and each sample
keeps only its user row and history length, so a lifelong history costs no copies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.config import ML100K
from data.dataset import Dataset
from rellax.assets import file_sha256
from rellax.errors import DataError

__all__ = ["SPLITS", "Samples", "build_samples", "load_or_build_samples"]

SPLITS = ("train", "valid", "test")
_ARRAYS = (
    "user_ids",
    "seq_ptr",
    "seq_item",
    "seq_rating",
    "seq_ts",
    "user_row",
    "item_id",
    "rating",
    "label",
    "timestamp",
    "hist_len",
    "split",
)


@dataclass
class Samples:
    """All samples of a data set, in global time order.

    Per user row u: `user_ids[u]` is the original id; the user's interactions, in global order, are
    `seq_*[seq_ptr[u]:seq_ptr[u + 1]]`. Per sample i: `user_row[i]`, target `item_id[i]`, `rating[i]`,
    `label[i]` (rating > 3), `timestamp[i]`, `hist_len[i]` (its history = the first `hist_len[i]`
    interactions of the user), `split[i]` (0 train, 1 valid, 2 test).
    """

    user_ids: np.ndarray
    seq_ptr: np.ndarray
    seq_item: np.ndarray
    seq_rating: np.ndarray
    seq_ts: np.ndarray
    user_row: np.ndarray
    item_id: np.ndarray
    rating: np.ndarray
    label: np.ndarray
    timestamp: np.ndarray
    hist_len: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.item_id)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))

    def user_id(self, i: int) -> int:
        return int(self.user_ids[self.user_row[i]])

    def history(self, i: int, last: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(item ids, ratings, timestamps) of sample i's history, oldest first; `last` keeps the tail."""
        start = int(self.seq_ptr[self.user_row[i]])
        end = start + int(self.hist_len[i])
        if last is not None:
            start = max(start, end - last)
        return self.seq_item[start:end], self.seq_rating[start:end], self.seq_ts[start:end]

    def save(self, path: Path) -> None:
        np.savez_compressed(path, **{name: getattr(self, name) for name in _ARRAYS})

    @classmethod
    def load(cls, path: Path) -> Samples:
        with np.load(path) as data:
            return cls(**{name: data[name] for name in _ARRAYS})


def build_samples(data: Dataset, min_history: int = 5, ratios: tuple[int, int, int] = (8, 1, 1)) -> Samples:
    """Apply the protocol to a data set's interactions. Deterministic.

    With a `split` column (the data's own split, `split_field`) each sample keeps its row's split
    instead of the global 8:1:1 cut in time order.
    """
    x = data.interactions.sort_values(["timestamp", "user_id", "item_id"], kind="mergesort")
    users = np.asarray(x.user_id, dtype=np.int64)
    items = np.asarray(x.item_id, dtype=np.int64)
    ratings = np.asarray(x.rating, dtype=np.float32)
    stamps = np.asarray(x.timestamp, dtype=np.int64)

    user_ids, user_row_all = np.unique(users, return_inverse=True)
    # Stable sort by user keeps the global order inside each user's sequence.
    order = np.argsort(user_row_all, kind="stable")
    counts = np.bincount(user_row_all, minlength=len(user_ids))
    seq_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    # Position of every interaction inside its user's sequence = its history length.
    hist_len_all = np.empty(len(users), dtype=np.int64)
    for u in tqdm(range(len(user_ids)), desc="histories", unit="user", leave=False):
        rows = order[seq_ptr[u] : seq_ptr[u + 1]]
        hist_len_all[rows] = np.arange(len(rows))
    keep = hist_len_all >= min_history
    n = int(keep.sum())
    n_train = n * ratios[0] // sum(ratios)
    n_valid = n * ratios[1] // sum(ratios)
    if "split" in x.columns:
        split = np.asarray(x.split, dtype=np.int8)[keep]
    else:
        split = np.full(n, 2, dtype=np.int8)
        split[:n_train] = 0
        split[n_train : n_train + n_valid] = 1
    return Samples(
        user_ids=user_ids,
        seq_ptr=seq_ptr,
        seq_item=items[order],
        seq_rating=ratings[order],
        seq_ts=stamps[order],
        user_row=user_row_all[keep].astype(np.int64),
        item_id=items[keep],
        rating=ratings[keep],
        label=(ratings[keep] > getattr(data, "label_threshold", 3.0)).astype(np.int8),
        timestamp=stamps[keep],
        hist_len=hist_len_all[keep],
        split=split,
    )


def _source_hash(data: Dataset, min_history: int) -> str:
    digest = hashlib.sha256(f"v1:min_history={min_history}".encode())
    if data.config != ML100K:  # the bundled config keeps the key its cached samples have always had
        digest.update(data.config.fingerprint().encode())
    for path in data.sources:
        digest.update(path.name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _check_splits(data: Dataset, samples: Samples, min_history: int) -> None:
    """Refuse (before anything is written) a split the protocol cannot train or score on."""
    where = data.sources[0] if data.sources else "the data set"
    for name in SPLITS:
        idx = samples.indices(name)
        if len(idx) == 0:
            raise DataError(
                f"{where}: the {name} split has no samples (a sample needs >= {min_history} earlier items)"
            )
        if not samples.label[idx].any():
            raise DataError(f"{where}: the {name} split has no positives (label = rating > threshold)")


def load_or_build_samples(data: Dataset, cache: Path, min_history: int | None = None) -> tuple[Samples, dict]:
    """Samples from `cache/<source hash>/` when present, else built and saved with a manifest.

    `min_history` defaults to the data set's config (5, the protocol's).
    """
    min_history = data.config.min_history if min_history is None else min_history
    source_hash = _source_hash(data, min_history)
    folder = cache / source_hash[:16]
    path, manifest_path = folder / "samples.npz", folder / "manifest.json"
    if path.exists() and manifest_path.exists():
        return Samples.load(path), json.loads(manifest_path.read_text())
    samples = build_samples(data, min_history=min_history)
    _check_splits(data, samples, min_history)
    folder.mkdir(parents=True, exist_ok=True)
    samples.save(path)
    manifest = {
        "source_hash": source_hash,
        "sources": [str(p) for p in data.sources],
        "min_history": min_history,
        "samples_sha256": file_sha256(path),
        "users": len(samples.user_ids),
        "items": int(len(data.items)),  # kept for older readers: the catalogue's size
        "catalogue_items": int(len(data.items)),
        "items_with_interactions": int(data.interactions.item_id.nunique()),
        "dataset": getattr(data, "name", None),
        "interactions": int(len(data.interactions)),
        "splits": {
            name: {
                "count": int(len(idx := samples.indices(name))),
                "label_rate": round(float(samples.label[idx].mean()), 4) if len(idx) else None,
            }
            for name in SPLITS
        },
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return samples, manifest
