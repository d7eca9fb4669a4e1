"""DIN model code (rellax/din.py): shapes, masking, the attention formula, vocab and save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rellax.din import DIN, ActivationUnit, DINBatch, DINConfig, DINVocab, encode_batch
from rellax.entities import Profile
from rellax.errors import BundleError

GENRES = ["Action", "Comedy", "Drama"]
PROFILES = [Profile("male", "25-34", "engineer"), Profile("female", "18-24", "student")]


def _vocab() -> DINVocab:
    return DINVocab.build(
        user_ids=[10, 20, 30, 20],
        item_ids=range(100, 160),
        genres=GENRES,
        genders=["male", "female"],
        ages=["18-24", "25-34"],
        jobs=["engineer", "student"],
    )


def _model(vocab: DINVocab, seed: int = 0, **kw: object) -> DIN:
    torch.manual_seed(seed)
    model = DIN(DINConfig(**vocab.sizes(), **kw), vocab).eval()
    # Non-zero biases everywhere so that an unmasked padding token (ReLU(b_t) != 0) would show.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(-0.5, 0.5)
    return model


def _batch(vocab: DINVocab, lengths: tuple[int, ...] = (7, 40), max_history: int = 30) -> DINBatch:
    rng = np.random.default_rng(1)
    histories = [
        (list(rng.integers(100, 160, n)), list(rng.integers(1, 6, n).astype(float))) for n in lengths
    ]
    n = len(lengths)
    return encode_batch(
        vocab,
        user_ids=[10, 20, 30, 10][:n],
        profiles=(PROFILES * 2)[:n],
        item_ids=[101, 150, 120, 102][:n],
        item_genres=(GENRES * 2)[:n],
        histories=histories,
        max_history=max_history,
    )


def test_shapes_and_hidden_state() -> None:
    vocab = _vocab()
    model = _model(vocab)
    batch = _batch(vocab, lengths=(0, 3, 30, 45))
    logits, h = model.forward_with_hidden(batch)
    assert logits.shape == (4,) and h.shape == (4, 256)
    assert batch.hist_items.shape == batch.hist_ratings.shape == batch.hist_mask.shape == (4, 30)
    assert torch.isfinite(logits).all()
    # forward == forward_with_hidden, and h really is the output layer's input.
    assert torch.equal(model(batch), logits)
    torch.testing.assert_close(model.out(h).squeeze(-1), logits)
    assert model.item_embeddings(torch.tensor([[1, 2], [3, 0]])).shape == (2, 2, 64)
    assert len(batch.select(torch.tensor([0, 2]))) == 2


def test_padding_does_not_change_the_output() -> None:
    vocab = _vocab()
    model = _model(vocab)
    short = _batch(vocab, lengths=(7, 12), max_history=30)
    longer = _batch(vocab, lengths=(7, 12), max_history=50)  # same histories, 20 more pad columns
    assert longer.hist_mask.sum() == short.hist_mask.sum() == 19
    # A sum over extra exact zeros may be reduced in a different order: allow float rounding only.
    torch.testing.assert_close(model(longer), model(short), rtol=0, atol=1e-6)
    # Garbage in masked positions (real item ids and ratings) must not leak through either.
    dirty = short.select(slice(None))
    dirty.hist_items = torch.where(short.hist_mask, short.hist_items, torch.full_like(short.hist_items, 5))
    dirty.hist_ratings = torch.where(
        short.hist_mask, short.hist_ratings, torch.full_like(short.hist_ratings, 4)
    )
    assert not torch.equal(dirty.hist_items, short.hist_items)
    torch.testing.assert_close(model(dirty), model(short), rtol=0, atol=1e-6)
    # ... while unmasking them does change it (the test above can fail).
    dirty.hist_mask = torch.ones_like(dirty.hist_mask)
    assert (model(dirty) - model(short)).abs().max() > 1e-3


def test_attention_pooling_matches_a_manual_computation() -> None:
    torch.manual_seed(3)
    d, hidden = 4, (3, 2)
    unit = ActivationUnit(d, hidden).double()
    q = torch.randn(2, d, dtype=torch.float64)
    k = torch.randn(2, 3, d, dtype=torch.float64)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    pooled, weights = unit(q, k, mask)
    l1, l2 = unit.mlp[0], unit.mlp[2]
    for b in range(2):
        expect = torch.zeros(d, dtype=torch.float64)
        for j in range(3):
            x = torch.cat([q[b], k[b, j], q[b] - k[b, j], q[b] * k[b, j]])
            a = unit.out(torch.relu(l2(torch.relu(l1(x)))))[0]
            if mask[b, j]:
                expect += a * k[b, j]
                torch.testing.assert_close(weights[b, j], a)
            else:
                assert weights[b, j] == 0
        torch.testing.assert_close(pooled[b], expect)


def test_history_token_formula() -> None:
    vocab = _vocab()
    model = _model(vocab, embed_dim=8)
    items, ratings = torch.tensor([[3, 0]]), torch.tensor([[5, 0]])
    tokens = model.history_tokens(items, ratings)
    pair = torch.cat([model.item_emb.weight[3], model.rating_emb.weight[5]])
    torch.testing.assert_close(tokens[0, 0], torch.relu(model.token.weight @ pair + model.token.bias))


def test_encode_batch_keeps_the_last_items_left_padded() -> None:
    vocab = _vocab()
    items = list(range(100, 145))  # 45 items, oldest first
    ratings = [float(1 + i % 5) for i in range(45)]
    batch = encode_batch(vocab, [10, 10], PROFILES, [101, 101], ["Drama", "Drama"],
                         [(items, ratings), (items[:4], [4.6, 1.2, 0.0, 9.0])])  # fmt: skip
    assert batch.hist_items[0].tolist() == vocab.item_rows(items[-30:]).tolist()
    assert batch.hist_ratings[0].tolist() == [int(r) for r in ratings[-30:]]
    assert batch.hist_mask[0].all()
    # Short history: padding first, the most recent item in the last column; ratings rounded, clipped.
    assert batch.hist_mask[1].tolist() == [False] * 26 + [True] * 4
    assert batch.hist_items[1, :26].eq(0).all() and batch.hist_ratings[1, :26].eq(0).all()
    assert batch.hist_items[1, 26:].tolist() == vocab.item_rows(items[:4]).tolist()
    assert batch.hist_ratings[1, 26:].tolist() == [5, 1, 1, 5]
    with pytest.raises(ValueError, match="same length"):
        encode_batch(vocab, [10], PROFILES, [101], ["Drama"], [([], [])])


def test_vocab_rows_are_explicit_and_unknowns_map_to_zero() -> None:
    vocab = _vocab()
    assert vocab.users == {10: 1, 20: 2, 30: 3}
    assert vocab.items[100] == 1 and vocab.items[159] == 60
    assert vocab.sizes()["n_users"] == 4 and vocab.sizes()["n_items"] == 61
    assert vocab.rows("users", [20, 999]).tolist() == [2, 0]
    assert vocab.item_rows([159, -1]).tolist() == [60, 0]
    batch = encode_batch(vocab, [999], [Profile()], [7], ["Sci-Fi"], [([7, 100], [4.0, 3.0])])
    assert [int(getattr(batch, f)[0]) for f in ("user", "gender", "age", "job", "item", "genre")] == [0] * 6
    assert batch.hist_items[0, -2:].tolist() == [0, 1]
    # Row 0 is a zero embedding and gets no gradient, so a cold-start user scores on a fixed input.
    model = _model(vocab)
    model.train()
    assert model.item_embeddings(torch.tensor([0])).abs().sum() == 0
    model(batch).sum().backward()
    assert model.user_emb.weight.grad[0].abs().sum() == 0
    model.eval()
    assert torch.isfinite(model(batch)).all()


def test_vocab_json_round_trip() -> None:
    vocab = _vocab()
    data = json.loads(json.dumps(vocab.to_json()))
    assert data["users"] == [10, 20, 30]
    assert DINVocab.from_json(data) == vocab
    with pytest.raises(BundleError):
        DINVocab.from_json({**data, "format_version": 99})


def test_save_load_round_trip(tmp_path: Path) -> None:
    vocab = _vocab()
    model = _model(vocab, seed=5)
    batch = _batch(vocab, lengths=(0, 5, 30, 33))
    files = model.save(tmp_path / "din")
    assert set(files) == {"model.safetensors", "config.json", "vocab.json"}
    assert all(len(v) == 64 for v in files.values())
    loaded = DIN.load(tmp_path / "din")
    assert not loaded.training
    assert loaded.vocab == vocab and loaded.config == model.config
    a, ha = model.forward_with_hidden(batch)
    b, hb = loaded.forward_with_hidden(batch)
    assert torch.equal(a, b) and torch.equal(ha, hb)
    assert torch.equal(loaded.item_embeddings(torch.arange(61)), model.item_embeddings(torch.arange(61)))
    # A vocab that does not match the weights' tables is refused, not silently shifted.
    short_vocab = DINVocab.from_json({**vocab.to_json(), "items": list(range(100, 159))})
    (tmp_path / "din" / "vocab.json").write_text(json.dumps(short_vocab.to_json()))
    with pytest.raises(BundleError, match="sizes"):
        DIN.load(tmp_path / "din")
    (tmp_path / "din" / "vocab.json").unlink()
    with pytest.raises(BundleError, match="vocab.json"):
        DIN.load(tmp_path / "din")
