"""The item catalogue as unit vectors plus an hnswlib graph over them (docs/design.md §4).

Row r of `vectors` belongs to item `item_ids[r]`; the hnswlib labels are those rows. The id -> row
map is explicit (a sorted copy of the ids and `np.searchsorted`), never "id minus one": the
original ReLLa code has an off-by-one exactly there.

On disk (`save`/`load`), nothing is pickled:
  vectors.safetensors  `vectors` (N, D) float32, `item_ids` (N,) int64, and the PCA (`pca_mean`,
                       `pca_components`) so new items can be projected into the same space
  item_ids.json        the id map as a list in row order (readable without numpy)
  hnsw.bin             hnswlib's own index file (space "ip", labels = rows)
  meta.json            format version, dims, hnsw parameters, how the vectors were made

This is the serving-time half (format, loading, lookups, knn: numpy, hnswlib, safetensors; no torch).
Building an index from the LLM's item embeddings is offline work: `index.build.build_item_index`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
from safetensors.numpy import load_file, save_file

from rellax.assets import file_sha256
from rellax.errors import BundleError, UnknownItem

__all__ = [
    "FORMAT_VERSION",
    "ItemIndex",
    "fit_pca",
    "l2_normalise",
]

FORMAT_VERSION = 1
FILES = {
    "vectors": "vectors.safetensors",
    "ids": "item_ids.json",
    "hnsw": "hnsw.bin",
    "meta": "meta.json",
}
# Graph degree and build beam: recall@30 >= 0.99 on filtered history searches (tests, benchmark)
# at a build cost of a few seconds per 10k items.
DEFAULT_M = 32
DEFAULT_EF_CONSTRUCTION = 200
# Query beam; raised to k when k is larger. Filtered searches keep walking until `ef` allowed items
# are found, so this also bounds how far a search wanders through rows outside the history.
DEFAULT_EF = 128


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so inner product = cosine similarity."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("cannot normalise zero or non-finite vectors")
    return x / norms


def fit_pca(raw: np.ndarray, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean (H,), components (d, H), explained variance ratio) with d = min(dim, H, N).

    Centring matters more than the reduction: mean-pooled LLM states share a large common
    direction, and without removing it every pair of items looks alike (cosine near 1).
    """
    from sklearn.decomposition import PCA  # sklearn import is slow; only builds need it

    n, h = raw.shape
    d = min(dim, h, n)
    # With more items than dims, an eigendecomposition of the (H, H) covariance is several times
    # faster than the SVD of (N, H) and, in float64, as accurate for the components we keep.
    solver = "covariance_eigh" if n >= h else "full"
    pca = PCA(n_components=d, svd_solver=solver, random_state=seed).fit(raw.astype(np.float64))
    return (
        pca.mean_.astype(np.float32),
        pca.components_.astype(np.float32),
        float(pca.explained_variance_ratio_.sum()),
    )


class ItemIndex:
    """Catalogue vectors (L2-normalised, float32) with an explicit id -> row map and an hnswlib graph.

    Build one with `ItemIndex.from_vectors` (any vectors) or `index.build.build_item_index` (from an
    LLM, offline).
    Thread-safety: lookups and `knn` only read, except that `knn` raises the query beam to k when k
    exceeds it; use one `k` per process (the service does) or set `ef` up front.
    """

    def __init__(
        self,
        item_ids: np.ndarray,
        vectors: np.ndarray,
        hnsw: hnswlib.Index,
        meta: dict[str, Any] | None = None,
        pca: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if item_ids.ndim != 1 or vectors.ndim != 2 or len(item_ids) != len(vectors):
            raise ValueError(f"need item_ids (N,) and vectors (N, D); got {item_ids.shape}, {vectors.shape}")
        if len(item_ids) == 0:
            raise ValueError("an item index needs at least one item")
        if len(np.unique(item_ids)) != len(item_ids):
            raise ValueError("item ids must be unique")
        if hnsw.get_current_count() != len(item_ids) or hnsw.dim != vectors.shape[1]:
            raise ValueError(
                f"hnsw index holds {hnsw.get_current_count()} x {hnsw.dim}, vectors are {vectors.shape}"
            )
        self.item_ids = item_ids
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.meta = dict(meta or {})
        self.pca = pca
        self._hnsw = hnsw
        self._order = np.argsort(item_ids, kind="stable")
        self._sorted_ids = item_ids[self._order]

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_vectors(
        cls,
        item_ids: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        *,
        m: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int = DEFAULT_EF,
        seed: int = 0,
        num_threads: int = 1,
        meta: dict[str, Any] | None = None,
        pca: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> ItemIndex:
        """Normalise `vectors` and build the hnswlib graph (labels = rows).

        `num_threads=1` makes the graph, hence every hnsw result, reproducible for a given seed;
        raise it for catalogues large enough that build time matters.
        """
        unit = l2_normalise(vectors)
        n, d = unit.shape
        hnsw = hnswlib.Index(space="ip", dim=d)
        hnsw.init_index(max_elements=max(n, 1), ef_construction=ef_construction, M=m, random_seed=seed)
        hnsw.add_items(unit, np.arange(n), num_threads=num_threads)
        hnsw.set_ef(ef)
        meta = {**(meta or {}), "dim": d, "count": n, "hnsw": {"M": m, "ef_construction": ef_construction,
                                                                 "ef": ef, "seed": seed}}  # fmt: skip
        return cls(np.asarray(item_ids), unit, hnsw, meta, pca)

    # -- lookups ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def rows(self, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of `item_ids` (same shape, int64). Raises `UnknownItem` naming every unknown id."""
        ids = np.asarray(item_ids)
        if ids.size == 0:
            return np.zeros(ids.shape, dtype=np.int64)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"item ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos_clipped = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos_clipped] == ids
        if not found.all():
            unknown = ids[~found].ravel()
            raise UnknownItem([int(i) for i in dict.fromkeys(unknown.tolist())])
        return self._order[pos_clipped]

    def vector(self, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Unit vectors of `item_ids`, shape ids.shape + (D,)."""
        return self.vectors[self.rows(item_ids)]

    def project(self, raw: np.ndarray) -> np.ndarray:
        """Map raw LLM vectors (.., H) into the index space with the stored PCA, L2-normalised.

        Lets a new item be scored against this catalogue without rebuilding it.
        """
        if self.pca is None:
            raise ValueError("this index was built without a PCA; it cannot project raw vectors")
        mean, components = self.pca
        return l2_normalise((np.asarray(raw, dtype=np.float32) - mean) @ components.T)

    @property
    def ef(self) -> int:
        return int(self._hnsw.ef)

    @ef.setter
    def ef(self, value: int) -> None:
        self._hnsw.set_ef(int(value))

    def knn(
        self, query_vectors: np.ndarray, k: int, filter_rows: np.ndarray | Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k rows by inner product: (rows (Q, k) int64, similarities (Q, k) float32).

        `filter_rows` restricts the search to those rows (hnswlib's filtered search: the graph is
        walked through all rows but only allowed ones enter the result). k must not exceed the
        number of allowed rows.
        """
        queries = np.atleast_2d(np.asarray(query_vectors, dtype=np.float32))
        allowed = None
        n_allowed = len(self)
        if filter_rows is not None:
            allowed = frozenset(np.asarray(filter_rows, dtype=np.int64).tolist())
            n_allowed = len(allowed)
        if not 1 <= k <= n_allowed:
            raise ValueError(f"k={k} must be in [1, {n_allowed}] (rows searchable)")
        if self._hnsw.ef < k:
            self._hnsw.set_ef(k)
        labels, distances = self._hnsw.knn_query(
            queries, k=k, num_threads=1, filter=None if allowed is None else allowed.__contains__
        )
        # hnswlib's "ip" distance is 1 - <q, v>.
        return labels.astype(np.int64), (1.0 - distances).astype(np.float32)

    # -- persistence ------------------------------------------------------------------------------

    def save(self, folder: Path) -> dict[str, str]:
        """Write the index files into `folder`; returns {file name: sha256} for a bundle manifest."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"vectors": self.vectors, "item_ids": self.item_ids}
        if self.pca is not None:
            tensors["pca_mean"], tensors["pca_components"] = self.pca
        save_file(tensors, str(folder / FILES["vectors"]))
        (folder / FILES["ids"]).write_text(json.dumps({"item_ids": self.item_ids.tolist()}))
        self._hnsw.save_index(str(folder / FILES["hnsw"]))
        meta = {**self.meta, "format_version": FORMAT_VERSION, "dim": self.dim, "count": len(self),
                "files": dict(FILES)}  # fmt: skip
        (folder / FILES["meta"]).write_text(json.dumps(meta, indent=2))
        return {name: file_sha256(folder / name) for name in FILES.values()}

    @classmethod
    def load(cls, folder: Path, expected_sha256: dict[str, str] | None = None) -> ItemIndex:
        """Read an index written by `save`; checks checksums when given, and that the parts agree."""
        folder = Path(folder)
        expected = expected_sha256 or {}
        for name in FILES.values():
            if not (folder / name).exists():
                raise BundleError(f"item index at {folder} lacks {name}")
            if name in expected and file_sha256(folder / name) != expected[name]:
                raise BundleError(f"{folder / name} does not match its recorded sha256")
        meta = json.loads((folder / FILES["meta"]).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"item index format {meta.get('format_version')}, expected {FORMAT_VERSION}")
        tensors = load_file(str(folder / FILES["vectors"]))
        vectors, item_ids = tensors["vectors"], tensors["item_ids"]
        listed = json.loads((folder / FILES["ids"]).read_text())["item_ids"]
        if listed != item_ids.tolist():
            raise BundleError(f"{FILES['ids']} and {FILES['vectors']} disagree on the id map")
        hnsw = hnswlib.Index(space="ip", dim=vectors.shape[1])
        hnsw.load_index(str(folder / FILES["hnsw"]), max_elements=max(len(item_ids), 1))
        hnsw.set_ef(int(meta.get("hnsw", {}).get("ef", DEFAULT_EF)))
        pca = (tensors["pca_mean"], tensors["pca_components"]) if "pca_mean" in tensors else None
        try:
            return cls(item_ids, vectors, hnsw, meta, pca)
        except ValueError as exc:
            raise BundleError(f"item index at {folder} is inconsistent: {exc}") from exc
