"""The DIN recipe (training/crm/crm.py), its baselines and metrics, and `rellax train crm` on ML-100K."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from rellax.din import DIN, encode_batch
from rellax.entities import Profile
from training.crm.baselines import Fields, LogisticBaseline, RatingPrior, fields_for
from training.crm.crm import CRMRecipe, load_config
from training.metrics import ctr_metrics, paired_bootstrap_auc_diff


def test_ctr_metrics_on_a_hand_example() -> None:
    m = ctr_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m["auc"] == pytest.approx(0.75)
    assert m["logloss"] == pytest.approx(
        -(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4
    )
    assert m["accuracy"] == pytest.approx(0.75) and m["n"] == 4
    # A certain mistake is clipped to 1e-7, not an infinite loss.
    assert ctr_metrics([1, 0], [0.0, 0.0])["logloss"] == pytest.approx(-math.log(1e-7) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        ctr_metrics([1, 1], [0.2, 0.3])


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    good = np.clip(y * 0.6 + rng.random(2000) * 0.4, 0, 1)
    noise = rng.random(2000)
    same = paired_bootstrap_auc_diff(y, good, good, n_boot=200)
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0
    d = paired_bootstrap_auc_diff(y, good, noise, n_boot=200, seed=1)
    assert d["diff"] == pytest.approx(ctr_metrics(y, good)["auc"] - ctr_metrics(y, noise)["auc"])
    assert 0 < d["lo"] < d["diff"] < d["hi"]
    assert d == paired_bootstrap_auc_diff(y, good, noise, n_boot=200, seed=1)


def test_paired_ndcg_interval() -> None:
    from training.llmsrec.ranking_eval import paired_ndcg_diff

    rng = np.random.default_rng(0)
    worse = rng.integers(0, 100, 300)
    better = np.maximum(worse - 20, 0)  # the positive ranked 20 places higher in every case
    same = paired_ndcg_diff(worse, worse)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    d = paired_ndcg_diff(better, worse)
    assert 0 < d["lo"] < d["diff"] < d["hi"] and d == paired_ndcg_diff(better, worse)
    assert paired_ndcg_diff(worse, better)["hi"] < 0


def _fields(users: list[int], items: list[int], ratings: list[float]) -> Fields:
    n = len(users)
    other = np.array(["x"] * n, dtype=object)
    r = np.array(ratings)
    return Fields(
        np.array(users), np.array(items), other, other, other, other, r, (r > 3).astype(int), np.arange(n),
        np.empty((n, 0), dtype=object),
    )  # fmt: skip


def test_rating_prior_is_smoothed_user_plus_item_mean() -> None:
    train = _fields([1, 1, 2, 2, 2], [10, 11, 10, 11, 12], [5, 4, 1, 2, 4])
    prior = RatingPrior(k_grid=(2.0,)).fit(train, _fields([1, 2], [12, 10], [5, 1]))
    g = 16 / 5
    assert prior.global_mean == pytest.approx(g)
    test = _fields([1, 99], [12, 98], [4, 4])
    user1, item12 = (9 + 2 * g) / (2 + 2), (4 + 2 * g) / (1 + 2)
    np.testing.assert_allclose(prior.score(test), [user1 + item12, 2 * g])  # unseen ids -> global mean
    # Leave-one-out on train removes each sample's own rating: user 1 / item 10 for sample 0.
    loo0 = (4 + 2 * g) / (1 + 2) + (1 + 2 * g) / (1 + 2)
    assert prior.score(train, leave_one_out=True)[0] == pytest.approx(loo0)
    # Probabilities are a 1-D logistic map of the score (fitted on the LOO train scores).
    a, b = prior.calibration.coef_[0, 0], prior.calibration.intercept_[0]
    np.testing.assert_allclose(prior.predict_proba(test), 1 / (1 + np.exp(-(a * prior.score(test) + b))))


def test_logistic_baseline_learns_an_item_effect() -> None:
    rng = np.random.default_rng(0)
    items = rng.integers(0, 20, 4000)
    ratings = np.where(items < 10, 5.0, 1.0)  # items 0..9 are liked
    f = _fields(list(rng.integers(0, 50, 4000)), list(items), list(ratings))
    lr = LogisticBaseline(c_grid=(1.0,)).fit(f, f)
    assert lr.params["features"] == 20 + 50 + 4  # one-hots: items, users, and 4 constant fields
    assert ctr_metrics(f.label, lr.predict_proba(f))["auc"] > 0.99


def test_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    cfg = load_config(overrides=["lr=2e-3", "hidden=[8, 8]"], max_epochs=2)
    assert cfg.lr == 0.002 and cfg.hidden == (8, 8) and cfg.max_epochs == 2 and cfg.embed_dim == 64
    with pytest.raises(ValueError, match="invalid CRMConfig config: unknown key.*epochs.*foo"):
        load_config(overrides=["epochs=3", "foo=1"])
    with pytest.raises(ValueError) as exc:
        load_config(overrides=["lr=abc", "patience=0", "dropout=1.5"])
    assert all(s in str(exc.value) for s in ("lr='abc'", "patience=0", "dropout=1.5"))


def test_recipe_is_deterministic_and_vocab_comes_from_train_only() -> None:
    overrides = ["max_epochs=1", "max_steps_per_epoch=3", "baselines=false"]
    runs = []
    for _ in range(2):
        recipe = CRMRecipe()
        recipe.setup(load_config(overrides=overrides))
        recipe.train()
        runs.append(recipe)
    a, b = runs
    assert a.history == b.history and a.history[0]["valid"]["auc"] > 0.5
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    train_users = set(a.fields["train"].user_id.tolist())
    assert set(a.vocab.users) == train_users
    # Most ML-100K test samples come from users who joined after the train period: they get row 0.
    unknown = np.mean(a.batches["test"].user.numpy() == 0)
    assert unknown == pytest.approx(np.mean([u not in train_users for u in a.fields["test"].user_id]))
    assert unknown > 0.5


@pytest.mark.slow
def test_train_crm_command_on_ml100k(tmp_path: Path) -> None:
    """The real command on the full ML-100K train split. Two epochs at most keep it near a minute on
    two idle cores; in earlier full runs valid AUC peaked at epoch 2 (0.744) and fell after."""
    from training.cli import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "din"
    result = CliRunner().invoke(app, ["train", "crm", "--out", str(out), "--epochs", "2", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in ("DIN", "LR", "prior", "test AUC"))

    metrics = json.loads((out / "metrics.json").read_text())
    din, lr, prior = (
        metrics["din"]["test"],
        metrics["baselines"]["lr"]["test"],
        metrics["baselines"]["prior"]["test"],
    )
    assert din["n"] == lr["n"] == prior["n"] == 9529
    assert 0.72 < din["auc"] < 0.85
    assert 0.65 < lr["auc"] < din["auc"] and 0.65 < prior["auc"] < din["auc"]
    assert din["logloss"] < min(lr["logloss"], prior["logloss"])
    # The lead is not bootstrap noise on these 9,529 test samples.
    assert all(d["lo"] > 0 for d in metrics["din_minus_baseline_test_auc"].values())
    assert 1 <= metrics["epochs"] <= 2 and metrics["train_seconds"] > 0
    assert metrics["config"]["max_epochs"] == 2

    # The saved model, reloaded and fed through encode_batch from raw ids, predicts the same.
    model = DIN.load(out)
    from data.loading import load_dataset

    data, samples, _ = load_dataset()
    test = fields_for(data, samples, "test")
    batch = encode_batch(
        model.vocab,
        test.user_id,
        [Profile(g, a, j) for g, a, j in zip(test.gender, test.age, test.job, strict=True)],
        test.item_id,
        test.genre,
        [samples.history(int(i), last=30)[:2] for i in test.index],
    )
    with torch.no_grad():
        probs = torch.cat(
            [torch.sigmoid(model(batch.select(slice(s, s + 8192)))) for s in range(0, len(batch), 8192)]
        )
    np.testing.assert_array_equal(probs.numpy(), np.load(out / "test_probs.npy"))
    assert ctr_metrics(test.label, probs.numpy())["auc"] == pytest.approx(din["auc"], abs=1e-6)


def test_holdout_leaves_the_llm_rows_out_of_dins_training(tmp_path: Path) -> None:
    """The LLM's few-shot rows (every N asked for) are gone from DIN's train split and nothing else
    is; an existing DIN trained on another hold-out is refused, not reused or overwritten."""
    from training.crm.crm import ensure_din, holdout_rows
    from training.fewshot import fewshot_rows

    recipe, full = CRMRecipe(), CRMRecipe()
    recipe.setup(load_config(holdout_fewshot=(256, 1024), baselines=False))
    full.setup(load_config(baselines=False))
    held = holdout_rows(recipe.samples, (256, 1024))
    expected = np.union1d(fewshot_rows(recipe.samples, 256), fewshot_rows(recipe.samples, 1024))
    np.testing.assert_array_equal(held, expected)
    kept = recipe.fields["train"].index
    assert not np.isin(held, kept).any()
    np.testing.assert_array_equal(kept, np.setdiff1d(full.fields["train"].index, held))
    assert len(kept) == len(full.fields["train"]) - len(held) and 1024 <= len(held) <= 1280
    i = int(np.searchsorted(full.fields["train"].index, kept[100]))  # columns stay aligned
    assert recipe.fields["train"].item_id[100] == full.fields["train"].item_id[i]
    assert recipe.fields["train"].label[100] == full.fields["train"].label[i]
    # valid and test are untouched
    np.testing.assert_array_equal(recipe.fields["test"].index, full.fields["test"].index)

    out = tmp_path / "din"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"")
    (out / "metrics.json").write_text(json.dumps({"config": {"holdout_fewshot": [256]}}))
    assert ensure_din(out, holdout_fewshot=(256,))["config"]["holdout_fewshot"] == [256]
    with pytest.raises(ValueError, match=r"held out the few-shot rows of N=\[256\], not N=\[\]"):
        ensure_din(out)
