"""LLM-SRec's prompts and model on a tiny random Llama over the real tokenizer: read-out positions in
padded batches, what trains and what stays frozen, and the loss terms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rellax import precision
from rellax.entities import Item
from rellax.llmsrec import LLMSRec, llmsrec_loss
from rellax.prompt import build_item_prompt, build_user_prompt
from rellax.tokens import HIST_TOKEN, TARGET_TOKEN, add_soft_tokens
from training.tables import table_rows

ITEMS = [
    Item(i, t, g) for i, (t, g) in enumerate([("Heat", "Action"), ("Babe", "Comedy"), ("M*A*S*H", "War")], 1)
]


def test_user_and_item_prompts_place_one_soft_token_per_item_and_end_on_the_read_out(soft_tokenizer) -> None:  # noqa: ANN001
    hist_id, target_id = add_soft_tokens(soft_tokenizer)
    history = [(ITEMS[i % 3], 880000000 + 86400 * i) for i in range(14)]
    user = build_user_prompt(soft_tokenizer, history, k=10)
    assert user.hist_item_ids == [ITEMS[i % 3].item_id for i in range(4, 14)]  # the last 10, oldest first
    assert [user.input_ids[p] for p in user.hist_positions] == [hist_id] * 10
    assert user.target_position == len(user.input_ids) - 1 and user.input_ids[-1] == target_id
    assert user.text.startswith("A user watched these movies, oldest first:\n1997-11-24: Babe [hist]\n")
    assert "1997-12-03: Babe [hist]\n" in user.text and user.text.count(HIST_TOKEN) == 10
    assert user.input_ids == soft_tokenizer(user.text, add_special_tokens=False)["input_ids"]
    empty = build_user_prompt(soft_tokenizer, [], k=10)
    assert empty.hist_positions == [] and empty.input_ids[-1] == target_id
    item = build_item_prompt(soft_tokenizer, ITEMS[2])
    assert (
        item.target_item_id == 3
        and item.input_ids[-1] == target_id
        and "M*A*S*H [hist], a war film" in item.text
    )
    assert item.hist_item_ids == [3] and [item.input_ids[p] for p in item.hist_positions] == [hist_id]
    with pytest.raises(ValueError, match="placeholder"):
        build_item_prompt(soft_tokenizer, Item(9, f"Evil {TARGET_TOKEN}", "Drama"))


@pytest.fixture
def model(soft_tokenizer, tiny_llama) -> LLMSRec:  # noqa: ANN001
    add_soft_tokens(soft_tokenizer, tiny_llama)
    torch.manual_seed(0)
    return LLMSRec(tiny_llama, cf_dim=8, out_dim=16)


def test_read_out_is_the_same_alone_and_in_a_padded_batch(model: LLMSRec, soft_tokenizer) -> None:  # noqa: ANN001
    """Prompts of different lengths in one right-padded batch give each the vector it gets alone:
    the read-out position is each row's own and the mask keeps padding out."""
    histories = [[(ITEMS[i % 3], 880000000 + i) for i in range(n)] for n in (1, 6, 10)]
    prompts = [build_user_prompt(soft_tokenizer, h) for h in histories]
    assert len({len(p.input_ids) for p in prompts}) == 3
    embs = [torch.randn(len(p.hist_positions), 8) for p in prompts]
    with torch.no_grad():
        together = model.user_vectors(prompts, embs)
        alone = torch.cat([model.user_vectors([p], [e]) for p, e in zip(prompts, embs, strict=True)])
        item_embs = torch.randn(len(ITEMS), 8)
        items = model.item_vectors([build_item_prompt(soft_tokenizer, it) for it in ITEMS], item_embs)
        prompts_1 = [[build_item_prompt(soft_tokenizer, it)] for it in ITEMS]
        items_alone = torch.cat(
            [model.item_vectors(p, item_embs[n : n + 1]) for n, p in enumerate(prompts_1)]
        )
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(items, items_alone, atol=1e-5, rtol=1e-4)
    # The SASRec embeddings reach the vector: change one and the user's vector moves.
    embs[2][0] += 1.0
    with torch.no_grad():
        moved = model.user_vectors(prompts[2:], embs[2:])
    assert not torch.allclose(moved, together[2:])


def test_only_the_small_modules_train_and_every_loss_term_pulls(model: LLMSRec, soft_tokenizer) -> None:  # noqa: ANN001
    prompts = [
        build_user_prompt(soft_tokenizer, [(ITEMS[i % 3], 880000000 + i) for i in range(n)]) for n in (2, 5)
    ]
    embs = [torch.randn(len(p.hist_positions), 8) for p in prompts]
    user = model.user_vectors(prompts, embs)
    items = model.item_vectors(
        [build_item_prompt(soft_tokenizer, ITEMS[i % 3]) for i in range(8)], torch.randn(8, 8)
    ).view(2, 4, -1)
    terms = llmsrec_loss(user, items, torch.randn(2, 8), model.f_cf)
    assert set(terms) == {"loss", "retrieval", "distill", "uniform"}
    torch.testing.assert_close(terms["loss"], terms["retrieval"] + terms["distill"] + terms["uniform"])
    assert 0 <= terms["distill"] <= 4 and terms["uniform"] <= 0  # log of a mean of exp(-t d^2) <= 0
    terms["loss"].backward()
    assert all(p.grad is None for p in model.lm.parameters())  # the LLM is frozen
    trained = model.trainable()
    assert {n.split(".")[0] for n in trained} == {
        "hist_proj",
        "user_out",
        "item_out",
        "f_user",
        "f_item",
        "f_cf",
    }
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
    # Retrieval: a user vector equal to its positive's, negatives orthogonal, is a near-zero loss.
    pos = torch.eye(16)[None, :4] * 20  # (1, 4, 16)
    near = llmsrec_loss(pos[:, 0], pos, torch.zeros(1, 8), model.f_cf)["retrieval"]
    assert near < 1e-6


@pytest.fixture(scope="module")
def sasrec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised SASRec over the real train-period items (the teacher's wiring, not its
    quality, is under test here; tests/test_sasrec.py trains a real one)."""
    import numpy as np

    from data.loading import load_dataset
    from rellax.sasrec import SASRec, SASRecConfig
    from training.llmsrec.sasrec import train_sequences

    _, samples, _ = load_dataset()
    items = SASRec.item_map(np.concatenate(train_sequences(samples)))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sasrec")
    SASRec(SASRecConfig(len(items), dim=16), items).eval().save(folder)
    return folder


def test_training_runs_resumes_and_saves_the_catalogues_vectors(
    tiny_model_dir: Path, sasrec_dir: Path, din_dir: Path, tmp_path: Path
) -> None:
    """`rellax train llmsrec`'s recipe on the tiny Llama: a run paused at its first evaluation and
    resumed ends with the same weights as one that never stopped; the saved item vectors are the
    selected model's, and the test scores rank real cases."""
    import time

    from safetensors.torch import load_file

    from training.llmsrec.llmsrec import LLMSRecConfig, main

    def cfg(out: str) -> LLMSRecConfig:
        return LLMSRecConfig(
            out=tmp_path / out, sasrec_dir=sasrec_dir, model_dir=tiny_model_dir, steps=4, batch_size=2,
            eval_every=2, valid_users=12, test_users=20, out_dim=16,
        )  # fmt: skip

    straight = main(cfg("straight"))
    with pytest.raises(TimeoutError, match="paused at step 2/4"):
        main(cfg("paused"), deadline=time.monotonic())
    assert (tmp_path / "paused" / "checkpoint.pt").exists()
    resumed = main(cfg("paused"))
    assert not (tmp_path / "paused" / "checkpoint.pt").exists()
    assert [h["step"] for h in straight["history"]] == [0, 2, 4] == [h["step"] for h in resumed["history"]]
    a, b = (
        load_file(tmp_path / "straight" / "llmsrec.safetensors"),
        load_file(tmp_path / "paused" / "llmsrec.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["test"] == resumed["test"] and straight["test"]["n"] == 20
    vectors = load_file(tmp_path / "straight" / "item_vectors.safetensors")
    assert vectors["vectors"].shape == (len(vectors["item_ids"]), 16) and len(vectors["item_ids"]) == 1682
    assert (tmp_path / "straight" / "sasrec.safetensors").exists()  # the teacher travels with it
    assert straight["examples"] == 8 and straight["trainable_params"] > 0

    # Train/serve parity: the saved folder, loaded as the service loads it, scores a test case as
    # the training run's own evaluation did (same history, same candidates).
    import numpy as np

    from data.loading import load_dataset
    from rellax.assets import prepare_model
    from rellax.entities import HistoryEvent
    from rellax.llmsrec import LLMSRecRanker
    from training.llm.data import Catalogue
    from training.llm.setup import load_base_lm
    from training.llmsrec.ranking import ranking_cases

    data, samples, _ = load_dataset()
    items = Catalogue.from_tables(data).items
    lm, tokenizer = load_base_lm(prepare_model(tiny_model_dir))
    ranker = LLMSRecRanker.load(tmp_path / "straight", lm, tokenizer, items)
    case = ranking_cases(samples, "test", np.array(sorted(items)), seed=0)[0]
    history = [HistoryEvent(int(i), 4.0, int(t)) for i, t in zip(case.history, case.times, strict=True)]
    served = ranker.scores(ranker.user_vector(history), case.candidates.tolist())
    np.testing.assert_allclose(served, straight["test_scores"][0], atol=2e-5)
    assert straight["cpu"] == precision.cpu_model()  # the machine its train_seconds were measured on
    # What a clone keeps (docs/results/llmsrec: small modules + teacher, no item vectors or index)
    # and what `make demo` rebuilds from it: the same item vectors, a folder the service loads.
    from training.llmsrec.llmsrec import KEPT_FILES, keep, restore

    keep(tmp_path / "straight", tmp_path / "kept")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == sorted([*KEPT_FILES, "metrics.json"])
    restored = restore(tmp_path / "kept", tmp_path / "restored", model_dir=tiny_model_dir)
    assert "test_scores" not in restored and restored["test"] == straight["test"]
    again = load_file(tmp_path / "restored" / "item_vectors.safetensors")
    assert torch.equal(again["item_ids"], vectors["item_ids"])
    torch.testing.assert_close(again["vectors"], vectors["vectors"], atol=2e-5, rtol=0)
    back = LLMSRecRanker.load(tmp_path / "restored", lm, tokenizer, items)
    again_served = back.scores(back.user_vector(history), case.candidates.tolist())
    np.testing.assert_allclose(again_served, served, atol=2e-5)
    # Candidate generation: hnswlib's top 10 (history excluded) against the exact top 10.
    ids, recall = np.array(sorted(items)), []
    for c in ranking_cases(samples, "test", ids, seed=0)[:20]:
        u = ranker.user_vector(
            [HistoryEvent(int(i), 4.0, int(t)) for i, t in zip(c.history, c.times, strict=True)]
        )
        seen = set(c.history.tolist())
        exact = [int(i) for i in ids[np.argsort(-(ranker.vectors @ u), kind="stable")] if i not in seen][:10]
        got = ranker.candidates(u, 10, exclude=seen)
        assert len(got) == 10 and not seen & set(got)
        recall.append(len(set(got) & set(exact)) / 10)
    assert np.mean(recall) >= 0.95, recall  # 1.0 measured (a loaded index at hnswlib's ef=10: 0.92)

    # The rankers on the same cases: DIN, SASRec, this LLM-SRec; ranks kept for paired intervals.
    from dataclasses import replace

    import numpy as np

    from training.llmsrec.ranking_eval import RankingConfig, run

    out = tmp_path / "ranking.json"
    cfg = RankingConfig(
        out=out,
        sasrec_dir=sasrec_dir,
        llmsrec_dir=tmp_path / "straight",
        din_dir=din_dir,
        model_dir=tiny_model_dir,
        users=20,
    )
    result = run(cfg)
    assert set(result["models"]) == {"DIN", "SASRec", "LLM-SRec"} and result["cases"] == straight["test"]["n"]
    for name, m in result["models"].items():
        r = np.array(m["ranks"])
        assert len(r) == result["cases"] and m["ndcg@10"] == pytest.approx(
            np.where(r < 10, 1 / np.log2(r + 2), 0).mean()
        )
        assert ("shuffle_drop" in m) == (name != "DIN")
    assert result["models"]["LLM-SRec"]["ndcg@10"] == pytest.approx(
        straight["test"]["ndcg@10"]
    )  # the same scorer
    assert set(result["ndcg10_diffs"]) == {"LLM-SRec - SASRec", "LLM-SRec - DIN", "SASRec - DIN"}
    d = result["ndcg10_diffs"]["SASRec - DIN"]
    assert d["lo"] <= d["diff"] <= d["hi"]
    from training.study.report import ranking_section

    text = "\n".join(ranking_section(out))
    mine = result["models"]["LLM-SRec"]
    rows = {row[0]: row for row in table_rows(text)}
    assert rows["LLM-SRec"][:4] == ["LLM-SRec", "20", f"{mine['hr@10']:.4f}", f"{mine['ndcg@10']:.4f}"]
    assert "## Ranking" in text and "SASRec - DIN" in rows
    assert "Rankers not run yet: ReLLaX" in text

    # With a ReLLaX bundle (a tiny one over ML-100K's item ids): ReLLaX ranks a subset of the cases,
    # and the cascade re-scores LLM-SRec's top M of the same cases.
    from training.llm.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "bundle", n_items=1682)
    both = run(
        replace(
            cfg, out=tmp_path / "ranking-cascade.json", bundle=bundle, rellax_users=3, cascade_m=(2, 5, 10),
            kept=tmp_path / "kept",
        )
    )  # fmt: skip
    m = both["models"]
    assert m["ReLLaX"]["cases"] == 3 and len(m["ReLLaX"]["ranks"]) == 3
    assert m["ReLLaX"]["dtype"] == "float32" and m["ReLLaX"]["bundle"].startswith("rellax-")
    text = "\n".join(ranking_section(tmp_path / "ranking-cascade.json"))
    d10 = both["ndcg10_diffs"]["cascade M=10 - ReLLaX"]
    assert "cascade M=10 NDCG@10 within 0.01 of pure ReLLaX's: " in text
    assert f"{d10['diff']:+.4f} (95% interval [{d10['lo']:+.4f}, {d10['hi']:+.4f}]) on 3 users" in text
    assert f"bundle `{m['ReLLaX']['bundle']}` (K={m['ReLLaX']['k']}) scored in float32" in text
    assert len(m["cascade M=2"]["ranks"]) == len(m["cascade M=5"]["ranks"]) == 3
    first = np.array(m["LLM-SRec"]["ranks"][:3])
    for name, depth in (("cascade M=2", 2), ("cascade M=5", 5)):
        r = np.array(m[name]["ranks"])
        assert np.all((r < depth) == (first < depth))  # in the top M exactly when LLM-SRec put it there
        assert np.all(r[first >= depth] == first[first >= depth])  # below it, LLM-SRec's own rank
    assert {"cascade M=2 - ReLLaX", "cascade M=5 - ReLLaX"} <= set(both["ndcg10_diffs"])


def test_the_repositorys_kept_llmsrec_is_whole() -> None:
    """docs/results/llmsrec, which `make demo` serves on a fresh machine, holds every trained part
    `restore` needs (no item vectors or index: those are rebuilt), within the 10 MB a run may take."""
    from training.llm.runs import MAX_WEIGHTS_BYTES
    from training.llmsrec.llmsrec import KEPT_FILES

    folder = Path(__file__).resolve().parents[1] / "docs" / "results" / "llmsrec"
    if not folder.exists():
        pytest.skip("no LLM-SRec run committed")
    missing = [name for name in (*KEPT_FILES, "metrics.json") if not (folder / name).exists()]
    assert not missing, missing
    assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_WEIGHTS_BYTES
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test"]["n"] == 153 and "test_scores" not in metrics
