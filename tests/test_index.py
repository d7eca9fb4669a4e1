"""index/ and the item index: item text, LLM embeddings (tiny random Llama), `rellax.item_index.ItemIndex`,
its files, `index.build.build_item_index` and the `rellax index build` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import index
from index.build import build_item_index
from index.embed import embed_texts, item_text, resolve_dtype
from rellax.entities import Item
from rellax.errors import BundleError, UnknownItem
from rellax.item_index import ItemIndex, fit_pca

TEXTS = [
    "Here is a movie. Its title is Toy Story. The movie's genre is Animation.",
    "A",
    "Here is a movie. Its title is Dr. Strangelove or: How I Learned to Stop Worrying. The genre is War.",
    "short text",
    "Here is a movie. Its title is Heat.",
    "Here is a movie. Its title is Heat.",  # a duplicate must get the same vector
    "one two three four five six seven eight nine ten eleven twelve",
]


def _reference_embedding(model: torch.nn.Module, tokenizer, text: str) -> np.ndarray:  # noqa: ANN001
    """One text alone, no padding: plain mean over its tokens of the post-norm final hidden state."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        hidden = model.model(input_ids=ids).last_hidden_state
        # Post-norm is what the LM head reads: pin it, so a pre-norm state cannot slip in.
        torch.testing.assert_close(model.lm_head(hidden), out.logits, rtol=0, atol=1e-5)
    return hidden[0].mean(dim=0).numpy()


def test_item_text_is_the_paper_template() -> None:
    item = Item(item_id=1, title="Toy Story", genre="Animation")
    assert item_text(item) == "Here is a movie. Its title is Toy Story. The movie's genre is Animation."


def test_embed_texts_is_the_masked_mean_of_each_text_alone(tiny_llama, tokenizer) -> None:
    got = embed_texts(tiny_llama, tokenizer, TEXTS, batch_size=3, dtype=torch.float32, progress=False)
    want = np.stack([_reference_embedding(tiny_llama, tokenizer, t) for t in TEXTS])
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[4], got[5], rtol=0, atol=1e-5)  # different batches, same text


def test_embed_texts_does_not_depend_on_batching(tiny_llama, tokenizer) -> None:
    runs = [
        embed_texts(tiny_llama, tokenizer, TEXTS, batch_size=b, dtype=torch.float32, progress=False)
        for b in (1, 2, 64)
    ]
    for other in runs[1:]:
        np.testing.assert_allclose(other, runs[0], rtol=0, atol=1e-5)


def test_embed_texts_bf16_autocast_stays_close_to_fp32(tiny_llama, tokenizer) -> None:
    fp32 = embed_texts(tiny_llama, tokenizer, TEXTS, dtype=torch.float32, progress=False)
    bf16 = embed_texts(tiny_llama, tokenizer, TEXTS, dtype=torch.bfloat16, progress=False)
    assert bf16.dtype == np.float32
    assert not np.array_equal(bf16, fp32)  # autocast really ran in bf16
    cos = (bf16 * fp32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() > 0.995


def test_resolve_dtype_prefers_bf16_only_where_the_cpu_has_it() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype(cpu, torch.float16) == torch.float16
    want = torch.bfloat16 if index.cpu_supports_bf16() else torch.float32
    assert resolve_dtype(cpu, None) == want
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert index.cpu_supports_bf16() == (" avx512_bf16" in flags or " amx_bf16" in flags)


def test_embed_texts_rejects_empty_text(tiny_llama, tokenizer) -> None:
    with pytest.raises(ValueError, match="position"):
        embed_texts(tiny_llama, tokenizer, ["fine", ""], progress=False)


# -- ItemIndex -----------------------------------------------------------------------------------


@pytest.fixture()
def random_index() -> ItemIndex:
    rng = np.random.default_rng(1)
    ids = rng.choice(100_000, size=300, replace=False)  # sparse, unordered ids: no "id - 1" maps
    return ItemIndex.from_vectors(ids, rng.standard_normal((300, 24)) * 3.0)


def test_rows_is_an_explicit_id_map(random_index: ItemIndex) -> None:
    ids = random_index.item_ids
    assert ids[0] != 0 and not np.all(np.diff(ids) > 0)
    picks = ids[[5, 0, 299, 5]]
    np.testing.assert_array_equal(random_index.rows(picks), [5, 0, 299, 5])
    np.testing.assert_array_equal(random_index.vector(picks), random_index.vectors[[5, 0, 299, 5]])
    assert random_index.rows([]).shape == (0,)


def test_rows_names_every_unknown_id(random_index: ItemIndex) -> None:
    known = int(random_index.item_ids[3])
    missing = [i for i in (100_001, 100_002, -1) if i not in set(random_index.item_ids.tolist())]
    with pytest.raises(UnknownItem) as err:
        random_index.rows([known, missing[0], missing[1], missing[0], missing[2]])
    assert err.value.item_ids == missing
    for i in missing:
        assert str(i) in str(err.value)


def test_vectors_are_unit_length(random_index: ItemIndex) -> None:
    assert random_index.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(random_index.vectors, axis=1), 1.0, atol=1e-6)


def test_knn_matches_brute_force_with_and_without_filter(random_index: ItemIndex) -> None:
    v = random_index.vectors
    queries = v[:20]
    rows, sims = random_index.knn(queries, 10)
    want = np.argsort(-(queries @ v.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, want, strict=True)])
    assert recall >= 0.99
    np.testing.assert_allclose(sims, np.take_along_axis(queries @ v.T, rows, axis=1), atol=1e-5)
    allowed = np.arange(0, 300, 7)
    rows, _ = random_index.knn(queries, 5, filter_rows=allowed)
    assert set(rows.ravel().tolist()) <= set(allowed.tolist())
    want = allowed[np.argsort(-(queries @ v[allowed].T), axis=1)[:, :5]]
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows, want, strict=True)]) >= 0.99
    with pytest.raises(ValueError, match="k="):
        random_index.knn(queries, len(allowed) + 1, filter_rows=allowed)


def test_save_load_round_trip_is_identical(random_index: ItemIndex, tmp_path: Path) -> None:
    from rellax.subr import subr_positions

    checksums = random_index.save(tmp_path)
    assert set(checksums) == {p.name for p in tmp_path.iterdir()}
    assert not any(p.suffix in {".pkl", ".pickle", ".pt"} for p in tmp_path.iterdir())
    loaded = ItemIndex.load(tmp_path, expected_sha256=checksums)
    np.testing.assert_array_equal(loaded.vectors, random_index.vectors)
    np.testing.assert_array_equal(loaded.item_ids, random_index.item_ids)
    assert json.loads((tmp_path / "item_ids.json").read_text())["item_ids"] == random_index.item_ids.tolist()
    q = random_index.vectors[:25]
    for a, b in zip(loaded.knn(q, 8), random_index.knn(q, 8), strict=True):
        np.testing.assert_array_equal(a, b)
    history = random_index.item_ids[np.random.default_rng(2).integers(0, 300, 120)]
    for cand in random_index.item_ids[:10]:
        for method in ("exact", "hnsw"):
            np.testing.assert_array_equal(
                subr_positions(loaded, history, cand, 15, method),
                subr_positions(random_index, history, cand, 15, method),
            )


def test_load_refuses_a_tampered_or_incomplete_index(random_index: ItemIndex, tmp_path: Path) -> None:
    checksums = random_index.save(tmp_path)
    ids = json.loads((tmp_path / "item_ids.json").read_text())
    ids["item_ids"][0] += 1
    (tmp_path / "item_ids.json").write_text(json.dumps(ids))
    with pytest.raises(BundleError, match="sha256"):
        ItemIndex.load(tmp_path, expected_sha256=checksums)
    with pytest.raises(BundleError, match="disagree"):
        ItemIndex.load(tmp_path)
    (tmp_path / "hnsw.bin").unlink()
    with pytest.raises(BundleError, match="hnsw.bin"):
        ItemIndex.load(tmp_path)


def _items(n: int) -> list[Item]:
    genres = ["Drama", "Comedy", "Action", "Horror"]
    return [Item(item_id=10 * i + 3, title=f"Film number {i}", genre=genres[i % 4]) for i in range(n)]


def test_build_item_index_pca_dims_and_projection(tiny_llama, tokenizer) -> None:
    items = _items(40)
    built = build_item_index(tiny_llama, tokenizer, items, dim=16, batch_size=8, dtype=torch.float32,
                             progress=False)  # fmt: skip
    assert built.dim == 16 and len(built) == 40 and built.meta["pca_dim"] == 16
    np.testing.assert_array_equal(built.item_ids, [it.item_id for it in items])
    raw = embed_texts(tiny_llama, tokenizer, [item_text(it) for it in items], dtype=torch.float32,
                      progress=False)  # fmt: skip
    # The stored PCA maps raw LLM vectors onto exactly the indexed vectors (new items can join).
    np.testing.assert_allclose(built.project(raw), built.vectors, atol=1e-5)
    # dims are capped by the number of items and by the hidden size.
    assert build_item_index(tiny_llama, tokenizer, items[:10], dim=512, progress=False).dim == 10
    mean, comps, _ = fit_pca(np.random.default_rng(0).standard_normal((100, 64)), 512)
    assert comps.shape == (64, 64) and mean.shape == (64,)


def test_index_package_stays_light() -> None:
    """index/ must not pull in training/, nor (like the serving-time item index and SUBR) torch."""
    code = (
        "import sys, index, rellax.item_index, rellax.subr, index.cli;"
        "bad = [m for m in ('training', 'torch', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_public_names_are_sorted_and_resolve() -> None:
    assert index.__all__ == sorted(index.__all__)
    for name in index.__all__:
        assert getattr(index, name) is not None
    with pytest.raises(AttributeError):
        _ = index.not_a_name


def test_cli_build_writes_a_loadable_index(tiny_llama, tokenizer, tmp_path: Path) -> None:
    """The real `rellax index build` on ML-100K, with the tiny Llama as its model to stay fast."""
    from typer.testing import CliRunner

    from cli.main import app

    model_dir, out = tmp_path / "model", tmp_path / "index"
    tiny_llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = CliRunner().invoke(app, ["index", "build", "--model-dir", str(model_dir), "--out", str(out),
                                      "--batch-size", "128"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1682 items" in result.output and str(out) in result.output
    loaded = ItemIndex.load(out)
    assert len(loaded) == 1682 and loaded.dim == 64  # min(512, hidden 64, 1682)
    assert loaded.meta["pca_dim"] == 64 and loaded.meta["hidden_size"] == 64
    assert loaded.rows([1])[0] == int(np.flatnonzero(loaded.item_ids == 1)[0])
