"""SASRec (LLM-SRec's teacher) and the sampled-candidate ranking protocol, on real ML-100K."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rellax.sasrec import SASRec, SASRecConfig
from training.llmsrec.ranking import rank_metrics, ranking_cases, ranks


def test_rank_metrics_on_a_hand_example() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # rank 0
            [0.5, 0.6, 0.1],  # rank 1
            [0.3, 0.3, 0.9],  # a tie counts against the positive: rank 2
        ]
    )
    np.testing.assert_array_equal(ranks(scores), [0, 1, 2])
    m = rank_metrics(scores, ks=(1, 2))
    assert m["n"] == 3 and m["hr@1"] == pytest.approx(1 / 3) and m["hr@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / np.log2(3)) / 3)
    assert rank_metrics(np.ones((5, 100)))["hr@10"] == 0.0  # a constant scorer earns nothing


def test_ranking_cases_hold_one_unseen_positive_and_99_never_seen_negatives(ml100k_samples) -> None:  # noqa: ANN001
    s = ml100k_samples
    catalogue = np.unique(s.seq_item)
    cases = ranking_cases(s, "test", catalogue, seed=3)
    again = ranking_cases(s, "test", catalogue, seed=3)  # seeded: the same candidates every time
    assert all(np.array_equal(a.candidates, b.candidates) for a, b in zip(cases, again, strict=True))
    other = ranking_cases(s, "test", catalogue, seed=4)
    assert not all(np.array_equal(a.candidates, b.candidates) for a, b in zip(cases, other, strict=True))
    assert len({c.user_id for c in cases}) == len(cases) > 100
    for c in cases:
        row = int(s.user_row[c.sample])
        everything = set(s.seq_item[s.seq_ptr[row] : s.seq_ptr[row + 1]].tolist())
        assert s.split[c.sample] == 2 and s.label[c.sample] == 1 and c.candidates[0] == s.item_id[c.sample]
        assert len(c.candidates) == 100 and len(set(c.candidates.tolist())) == 100
        assert not everything & set(c.candidates[1:].tolist())  # no negative the user ever touched
        np.testing.assert_array_equal(c.history, s.history(c.sample)[0])
        # the case is the user's first liked test sample
        earlier = [i for i in s.indices("test") if s.user_row[i] == row and s.label[i] == 1 and i < c.sample]
        assert not earlier


def _tiny(n_items: int = 30, max_len: int = 16) -> SASRec:
    torch.manual_seed(0)
    return SASRec(
        SASRecConfig(n_items, dim=16, max_len=max_len), {i: i for i in range(1, n_items + 1)}
    ).eval()


def test_sasrec_is_causal_and_a_users_vector_does_not_depend_on_its_batch() -> None:
    model = _tiny()
    seq = model.encode([[3, 7, 9, 12, 4]])
    changed = seq.clone()
    changed[0, -1] = 20  # only the newest item differs
    with torch.no_grad():
        a, b = model(seq), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # earlier positions never see later items
    assert not torch.allclose(a[:, -1], b[:, -1])
    assert torch.all(a[0, :-5] == 0)  # padded positions are zeroed
    histories = [[3, 7, 9, 12, 4], [1, 2], list(range(1, 25))]  # the last is cut to the newest 16
    with torch.no_grad():
        together = model.user_vector(model.encode(histories))
        alone = torch.cat([model.user_vector(model.encode([h])) for h in histories])
        cut = model.user_vector(model.encode([list(range(9, 25))]))
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(together[2:], cut, atol=1e-6, rtol=0)
    assert model.rows([5, 999]) == [5, 0]  # an item training never saw is padding


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _tiny()
    model.items = {i * 10: i for i in range(1, 31)}
    model.save(tmp_path)
    again = SASRec.load(tmp_path)
    seq = model.encode([[10, 20, 300]])
    with torch.no_grad():
        torch.testing.assert_close(again.user_vector(seq), model.user_vector(seq))
    assert again.items == model.items and again.config == model.config
    (tmp_path / "sasrec.json").unlink()
    from rellax.errors import BundleError

    with pytest.raises(BundleError, match=r"sasrec\.json"):
        SASRec.load(tmp_path)


@pytest.mark.slow
def test_sasrec_learns_ml100k_next_items(tmp_path: Path) -> None:
    """Ten epochs on the train period: valid NDCG@10 far above a random ranker's (~0.045 for 1 in
    100; its standard error on ~190 users is ~0.02), the best evaluation kept, and the saved model
    reproduces the recorded test figures. ~1 min on two cores (sequences cut to the newest 50)."""
    from data.loading import load_dataset
    from training.llmsrec.sasrec import SASRecTrainConfig, main, score_cases, train_sequences

    data, samples, _ = load_dataset()
    seqs = train_sequences(samples)
    for u in (0, 100, 500):  # a prefix of the user's sequence
        lo = int(samples.seq_ptr[u])
        np.testing.assert_array_equal(seqs[u], samples.seq_item[lo : lo + len(seqs[u])])
    for split, inside in (("train", True), ("valid", False), ("test", False)):  # nothing after train
        for i in samples.indices(split)[::500]:
            n_train = len(seqs[int(samples.user_row[i])])
            assert (int(samples.hist_len[i]) < n_train) == inside, (split, i)
    cfg = SASRecTrainConfig(
        out=tmp_path / "sasrec", max_epochs=10, eval_every=5, max_len=50
    )  # 50: ~2x faster
    result = main(cfg)
    assert [h["epoch"] for h in result["history"]] == [5, 10]
    assert result["valid"]["ndcg@10"] == max(h["ndcg@10"] for h in result["history"]) > 0.15
    assert result["test"]["ndcg@10"] > 0.15 and result["test"]["hr@10"] > 0.3
    model = SASRec.load(cfg.out)
    catalogue = data.items.item_id.to_numpy()
    again = rank_metrics(score_cases(model, ranking_cases(samples, "test", catalogue, seed=0)))
    assert again == pytest.approx(result["test"])


def test_the_cascade_reorders_the_first_stages_top_m_only() -> None:
    from training.llmsrec.ranking_eval import cascade_scores

    first = np.array([[0.1, 0.9, 0.5, 0.7, 0.3]])  # first-stage order: 1, 3, 2, 4, 0
    second = [np.array([0.2, 0.8, 0.6])]  # second stage's scores of items 1, 3, 2 (top-3 order)
    out = cascade_scores(first, second, m=2)  # only items 1, 3 are re-scored: 3 beats 1
    assert list(np.argsort(-out[0], kind="stable")) == [3, 1, 2, 4, 0]
    out3 = cascade_scores(first, second, m=3)  # 3 (0.8), 2 (0.6), 1 (0.2), then 4, 0
    assert list(np.argsort(-out3[0], kind="stable")) == [3, 2, 1, 4, 0]
    assert ranks(out3)[0] == 4  # the positive (item 0) is last either way
    # m = all: the second stage's order; m = 0: the first stage's
    assert list(np.argsort(-cascade_scores(first, [np.array([5, 4, 3, 2, 1.0])], m=5)[0])) == [1, 3, 2, 4, 0]
    assert list(np.argsort(-cascade_scores(first, [np.array([])], m=0)[0], kind="stable")) == [1, 3, 2, 4, 0]


def test_rellax_ranks_the_candidates_the_service_would_score(tmp_path: Path) -> None:
    """ReLLaX as a ranker goes through the bundle's own prepare + score path: each case's scores
    equal scoring its candidates one by one, and the cascade's top-M call scores only those."""
    from rellax.bundle import Bundle
    from rellax.entities import HistoryEvent, Profile
    from training.llm.tiny_bundle import make_tiny_bundle
    from training.llmsrec.ranking import RankingCase
    from training.llmsrec.ranking_eval import kept_rellax_scores, rellax_scores

    bundle = Bundle.load(make_tiny_bundle(tmp_path / "bundle"))
    rng = np.random.default_rng(0)
    ids = np.arange(1, 121)
    cases = [
        RankingCase(0, u, rng.choice(ids, 12, replace=False), rng.integers(1, 6, 12).astype(float),
                    np.arange(12) + 880_000_000, rng.choice(ids, 8, replace=False))
        for u in (3, 7)
    ]  # fmt: skip
    profiles = {3: Profile("male", "25-34", "writer")}
    scores = rellax_scores(bundle, profiles, cases)
    assert [s.shape for s in scores] == [(8,), (8,)]
    c = cases[0]
    events = [
        HistoryEvent(int(i), float(r), int(t)) for i, r, t in zip(c.history, c.ratings, c.times, strict=True)
    ]
    one = [
        bundle.score_prepared(bundle.prepare(profiles[3], events, [int(x)], user_id=3))[0]
        for x in c.candidates[:3]
    ]
    np.testing.assert_allclose(scores[0][:3], one, atol=1e-5)
    top = rellax_scores(bundle, profiles, cases, [np.array([2, 0]), np.array([5])])
    np.testing.assert_allclose(top[0], scores[0][[2, 0]], atol=1e-5)
    assert top[1].shape == (1,)

    # Kept as they come (an hour of CPU on the real cases): a second call reads, not scores — shown
    # by a planted value coming back — and a case whose candidates changed is scored again.
    kept, seconds = kept_rellax_scores(bundle, profiles, cases, tmp_path / "kept", every=1)
    np.testing.assert_allclose(kept, np.stack(scores), atol=1e-5)
    assert seconds > 0
    (path,) = (tmp_path / "kept").glob("rellax-*.npz")
    with np.load(path) as z:
        planted = {k: z[k].copy() for k in z.files}
    planted["scores"][0, 0] = 42.0
    np.savez(path, **planted)
    moved = [cases[0], replace(cases[1], candidates=cases[1].candidates[::-1].copy())]
    again, _ = kept_rellax_scores(bundle, profiles, moved, tmp_path / "kept")
    assert again[0, 0] == 42.0
    np.testing.assert_allclose(again[1], scores[1][::-1], atol=1e-5)
