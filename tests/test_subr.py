"""SUBR and recency: exact vs a brute-force reference, hnsw recall on real ML-100K histories."""

from __future__ import annotations

import numpy as np
import pytest

from rellax.errors import UnknownItem
from rellax.item_index import ItemIndex, fit_pca
from rellax.subr import recency_positions, subr_positions, subr_positions_many

KS = (15, 30)


def reference_positions(index: ItemIndex, history: np.ndarray, candidate: int, k: int) -> np.ndarray:
    """Brute force in float64 with its own id map: argsort of cosine, later position wins ties."""
    row_of = {int(item): row for row, item in enumerate(index.item_ids)}
    v = index.vectors.astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sims = v[[row_of[int(i)] for i in history]] @ v[row_of[int(candidate)]]
    order = sorted(range(len(history)), key=lambda p: (-sims[p], -p))
    return np.array(sorted(order[:k]), dtype=np.int64)


def reference_sims(index: ItemIndex, history: np.ndarray, candidate: int) -> np.ndarray:
    v = index.vectors.astype(np.float64)
    return v[index.rows(history)] @ v[index.rows([candidate])[0]]


def assert_same_up_to_float_ties(got: np.ndarray, want: np.ndarray, sims: np.ndarray, k: int) -> None:
    """Equal selections, except that positions whose similarity sits within 1e-6 of the k-th value
    (float32 vs float64 rounding decides those) may swap."""
    assert list(got) == sorted(got) and len(got) == len(want) == min(k, len(sims))
    differ = np.setxor1d(got, want)
    if len(differ):
        kth = np.sort(sims)[::-1][k - 1]
        assert np.all(np.abs(sims[differ] - kth) <= 1e-6), (got, want)


@pytest.fixture(scope="module")
def random_index() -> ItemIndex:
    rng = np.random.default_rng(7)
    ids = rng.choice(10**6, size=2000, replace=False)
    return ItemIndex.from_vectors(ids, rng.standard_normal((2000, 32)))


# -- exact ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_history", [1, 14, 15, 40, 300, 499, 500, 1999, 3000])
def test_exact_equals_brute_force_on_random_vectors(random_index: ItemIndex, n_history: int) -> None:
    """Short histories take the gather path, long ones the whole-catalogue product: both are checked."""
    rng = np.random.default_rng(n_history)
    for _ in range(5):
        history = rng.choice(random_index.item_ids, size=n_history, replace=True)  # repeats included
        candidate = int(rng.choice(random_index.item_ids))
        for k in (1, *KS):
            got = subr_positions(random_index, history, candidate, k)
            np.testing.assert_array_equal(got, reference_positions(random_index, history, candidate, k))


def test_result_is_chronological_and_holds_the_most_similar(random_index: ItemIndex) -> None:
    rng = np.random.default_rng(3)
    history = rng.choice(random_index.item_ids, size=200, replace=False)
    candidate = int(history[17])  # the candidate itself sits at position 17: the best match
    got = subr_positions(random_index, history, candidate, 15)
    assert np.all(np.diff(got) > 0) and 17 in got
    sims = reference_sims(random_index, history, candidate)
    assert sims[got].min() >= np.delete(sims, got).max()


def test_repeated_items_tie_and_the_latest_copies_win(random_index: ItemIndex) -> None:
    a, b, c = (int(i) for i in random_index.item_ids[:3])
    history = [a, b, a, c, a, b]
    for method in ("exact", "hnsw"):
        np.testing.assert_array_equal(subr_positions(random_index, history, a, 2, method), [2, 4])
        np.testing.assert_array_equal(subr_positions(random_index, history, a, 3, method), [0, 2, 4])


def test_hnsw_maps_distinct_rows_back_to_every_position(random_index: ItemIndex) -> None:
    """200 distinct items, each three times: hnsw finds rows, the answer must be positions."""
    rng = np.random.default_rng(11)
    distinct = rng.choice(random_index.item_ids, size=200, replace=False)
    assert len(distinct) > random_index.ef  # so the filtered graph search really runs
    history = rng.permutation(np.repeat(distinct, 3))
    hits = []
    for candidate in (int(c) for c in distinct[:20]):
        copies = np.flatnonzero(history == candidate)
        # The candidate's own copies tie at similarity 1: the latest ones win, all three fit in 3.
        np.testing.assert_array_equal(subr_positions(random_index, history, candidate, 2, "hnsw"), copies[1:])
        np.testing.assert_array_equal(subr_positions(random_index, history, candidate, 3, "hnsw"), copies)
        for k in (10, 30):
            hnsw = subr_positions(random_index, history, candidate, k, "hnsw")
            assert len(hnsw) == k and np.all(np.diff(hnsw) > 0) and set(copies) <= set(hnsw)
            hits.append(len(np.intersect1d(hnsw, subr_positions(random_index, history, candidate, k))) / k)
    assert np.mean(hits) >= 0.99


@pytest.mark.parametrize("method", ["exact", "hnsw"])
def test_k_at_or_above_the_history_length_returns_it_all(random_index: ItemIndex, method: str) -> None:
    history = random_index.item_ids[[4, 9, 4, 2]]
    for k in (4, 5, 100):
        np.testing.assert_array_equal(subr_positions(random_index, history, int(history[0]), k, method),
                                      [0, 1, 2, 3])  # fmt: skip
    assert subr_positions(random_index, [], int(history[0]), 5, method).shape == (0,)
    assert subr_positions(random_index, history, int(history[0]), 0, method).shape == (0,)


def test_recency_takes_the_last_k() -> None:
    np.testing.assert_array_equal(recency_positions(10, 3), [7, 8, 9])
    np.testing.assert_array_equal(recency_positions(2, 5), [0, 1])
    assert recency_positions(0, 5).shape == (0,)
    with pytest.raises(ValueError):
        recency_positions(5, -1)


@pytest.mark.parametrize("method", ["exact", "hnsw"])
def test_unknown_ids_are_named(random_index: ItemIndex, method: str) -> None:
    known = [int(i) for i in random_index.item_ids[:30]]
    unknown = [i for i in (10**6 + 1, 10**6 + 2) if i not in set(random_index.item_ids.tolist())]
    with pytest.raises(UnknownItem) as err:
        subr_positions(random_index, [*known, unknown[0]], unknown[1], 5, method)
    assert err.value.item_ids == unknown
    with pytest.raises(UnknownItem) as err:
        subr_positions(random_index, known, unknown[1], 100, method)  # even when k covers it all
    assert err.value.item_ids == [unknown[1]]
    with pytest.raises(UnknownItem):
        subr_positions_many(random_index, known, [known[0], unknown[0]], 5)


def test_bad_arguments_are_refused(random_index: ItemIndex) -> None:
    history = random_index.item_ids[:10]
    with pytest.raises(ValueError, match="method"):
        subr_positions(random_index, history, int(history[0]), 3, "faiss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k"):
        subr_positions(random_index, history, int(history[0]), -1)
    with pytest.raises(TypeError):
        subr_positions(random_index, history.astype(float), int(history[0]), 3)


def test_many_candidates_equal_one_at_a_time(random_index: ItemIndex) -> None:
    rng = np.random.default_rng(5)
    for n_history in (50, 800):
        history = rng.choice(random_index.item_ids, size=n_history)
        candidates = rng.choice(random_index.item_ids, size=25)
        many = subr_positions_many(random_index, history, candidates, 15)
        assert len(many) == 25
        for candidate, got in zip(candidates, many, strict=True):
            np.testing.assert_array_equal(got, subr_positions(random_index, history, int(candidate), 15))
    assert [list(p) for p in subr_positions_many(random_index, history[:3], candidates[:2], 15)] == [
        [0, 1, 2],
        [0, 1, 2],
    ]


# -- real ML-100K histories ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k_index(tokenizer) -> ItemIndex:  # noqa: ANN001
    """ML-100K items in a SmolLM2 space: mean of the model's input token embeddings of each item text,
    PCA to 512, L2-normalised: the real build path minus the 30 transformer layers.

    Why not the final-layer vectors: their forward pass over 1,682 items takes minutes on a 2-core
    CPU, beyond this suite's budget. These vectors keep what matters for retrieval tests (real
    titles and genres, shared words, identical vectors for items with identical text, 512 dims);
    benchmarks/subr.py measures recall on the real `rellax index build` vectors.
    """
    from safetensors import safe_open

    from data.loading import load_dataset
    from index.embed import item_text
    from rellax.assets import prepare_model

    data, _, _ = load_dataset()
    items = data.item_records()
    with safe_open(str(prepare_model() / "model.safetensors"), "np") as weights:
        table = weights.get_tensor("model.embed_tokens.weight").astype(np.float32)
    raw = np.stack([table[tokenizer(item_text(it), add_special_tokens=False)["input_ids"]].mean(0)
                    for it in items])  # fmt: skip
    mean, components, _ = fit_pca(raw, 512)
    return ItemIndex.from_vectors([it.item_id for it in items], (raw - mean) @ components.T)


@pytest.fixture(scope="module")
def ml100k_pairs() -> list[tuple[np.ndarray, int]]:
    """400 (history, candidate) test-split samples, with a share of long histories."""
    from data.loading import load_dataset

    _, samples, _ = load_dataset()
    rng = np.random.default_rng(0)
    test = samples.indices("test")
    long = test[samples.hist_len[test] > 300]
    picks = np.concatenate([rng.choice(test, 250, replace=False), rng.choice(long, 150, replace=False)])
    return [(samples.history(int(i))[0], int(samples.item_id[i])) for i in picks]


def test_exact_equals_brute_force_on_ml100k(ml100k_index: ItemIndex, ml100k_pairs) -> None:  # noqa: ANN001
    assert ml100k_index.dim == 512 and len(ml100k_index) == 1682
    for history, candidate in ml100k_pairs[::4]:
        sims = reference_sims(ml100k_index, history, candidate)
        for k in KS:
            got = subr_positions(ml100k_index, history, candidate, k)
            want = reference_positions(ml100k_index, history, candidate, k)
            assert_same_up_to_float_ties(got, want, sims, k)


def test_hnsw_recall_against_exact_on_ml100k(ml100k_index: ItemIndex, ml100k_pairs) -> None:  # noqa: ANN001
    lengths = np.array([len(h) for h, _ in ml100k_pairs])
    # Histories longer than the query beam (ef) are where hnsw approximates: make sure they are tested.
    assert (lengths > 2 * ml100k_index.ef).sum() >= 150
    for k in KS:
        hits = []
        for history, candidate in ml100k_pairs:
            exact = subr_positions(ml100k_index, history, candidate, k, "exact")
            hnsw = subr_positions(ml100k_index, history, candidate, k, "hnsw")
            assert list(hnsw) == sorted(hnsw) and len(hnsw) == min(k, len(history))
            hits.append(len(np.intersect1d(exact, hnsw)) / len(exact))
        assert np.mean(hits) >= 0.99, (k, np.mean(hits))
