"""`rellax experiment ranking`: the rankers on the same sampled candidates (issue 17).

Test cases come from `training.ranking` (per test user, the first liked item against 99 seeded
never-seen negatives). SASRec, LLM-SRec and DIN each score every candidate of every case; the JSON
keeps each model's per-case rank of the positive, so paired bootstrap intervals on NDCG@10 need no
model. The shuffle diagnostic permutes every history (seeded) at test time and reports the
relative NDCG@10 drop of the two sequential models: how much of what they learnt is the order.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rellax.logs import get_logger
from rellax.paths import cache_dir
from training.ranking import RankingCase, rank_metrics, ranking_cases, ranks

__all__ = ["RankingConfig", "paired_ndcg_diff", "run"]

log = get_logger(__name__)


@dataclass
class RankingConfig:
    out: Path = Path("docs/results/ranking.json")
    sasrec_dir: Path = field(default_factory=lambda: cache_dir("sasrec") / "ml100k")
    llmsrec_dir: Path | None = field(default_factory=lambda: cache_dir("llmsrec") / "ml100k")
    din_dir: Path = field(default_factory=lambda: cache_dir("crm") / "din")
    model_dir: Path | None = None
    seed: int = 0
    shuffle_seed: int = 1


def _ndcg(r: np.ndarray, k: int = 10) -> np.ndarray:
    return np.where(r < k, 1.0 / np.log2(r + 2), 0.0)


def paired_ndcg_diff(ra: np.ndarray, rb: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """NDCG@10(a) - NDCG@10(b) over the same cases, with a 95% paired bootstrap interval."""
    d = _ndcg(np.asarray(ra)) - _ndcg(np.asarray(rb))
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    return {
        "diff": float(d.mean()),
        "lo": float(np.quantile(boots, 0.025)),
        "hi": float(np.quantile(boots, 0.975)),
    }


def _shuffled(cases: list[RankingCase], seed: int) -> list[RankingCase]:
    rng = np.random.default_rng(seed)
    out = []
    for c in cases:
        order = rng.permutation(len(c.history))
        # Dates keep their slots (the prompt still reads oldest first): only which item sits where moves.
        out.append(replace(c, history=c.history[order], ratings=c.ratings[order]))
    return out


def _din_scores(din_dir: Path, samples, data, cases: list[RankingCase]) -> np.ndarray:  # noqa: ANN001
    from rellax.entities import Profile
    from rellax.features import Featurizer, History
    from training.llm_data import Catalogue
    from training.llm_setup import load_din

    catalogue = Catalogue.from_tables(data)
    featurizer = Featurizer(None, catalogue.items, None, load_din(din_dir), k=0, spa=False)  # type: ignore[arg-type]
    rows = []
    for c in cases:
        history = History(c.history.tolist(), c.ratings.tolist())
        n = len(c.candidates)
        batch = featurizer.din_batch(
            [c.user_id] * n,
            [catalogue.profiles.get(c.user_id, Profile())] * n,
            c.candidates.tolist(),
            [history] * n,
        )
        rows.append(featurizer.din_outputs(batch)[0])
    return np.stack(rows)


def run(cfg: RankingConfig) -> dict[str, Any]:
    """Score the test cases with every ranker there is a model for; write and return the JSON."""
    from rellax.sasrec import SASRec
    from training.datasets import load_dataset
    from training.sasrec import score_cases

    data, samples, _ = load_dataset()
    catalogue = data.items.item_id.to_numpy()
    cases = ranking_cases(samples, "test", catalogue, seed=cfg.seed)
    shuffled = _shuffled(cases, cfg.shuffle_seed)
    models: dict[str, dict[str, Any]] = {}

    def record(
        name: str, scores: np.ndarray, seconds: float, shuffled_scores: np.ndarray | None = None
    ) -> None:
        entry: dict[str, Any] = {
            **rank_metrics(scores),
            "seconds": round(seconds, 1),
            "ranks": ranks(scores).tolist(),
        }
        if shuffled_scores is not None:
            sh = rank_metrics(shuffled_scores)
            entry["shuffled"] = sh
            entry["shuffle_drop"] = (entry["ndcg@10"] - sh["ndcg@10"]) / max(entry["ndcg@10"], 1e-12)
        models[name] = entry
        log.info("ranking", model=name, ndcg10=round(entry["ndcg@10"], 4), hr10=round(entry["hr@10"], 4))

    started = time.perf_counter()
    record("DIN", _din_scores(cfg.din_dir, samples, data, cases), time.perf_counter() - started)
    sasrec = SASRec.load(cfg.sasrec_dir)
    started = time.perf_counter()
    record("SASRec", score_cases(sasrec, cases), time.perf_counter() - started, score_cases(sasrec, shuffled))
    if cfg.llmsrec_dir is not None and (cfg.llmsrec_dir / "llmsrec.safetensors").exists():
        record("LLM-SRec", *_llmsrec_scores(cfg, sasrec, data, cases, shuffled))
    comparisons = {
        f"{a} - {b}": paired_ndcg_diff(
            np.array(models[a]["ranks"]), np.array(models[b]["ranks"]), seed=cfg.seed
        )
        for a, b in (("LLM-SRec", "SASRec"), ("LLM-SRec", "DIN"), ("SASRec", "DIN"))
        if a in models and b in models
    }
    result = {
        "cases": len(cases),
        "negatives": 99,
        "seed": cfg.seed,
        "models": models,
        "ndcg10_diffs": comparisons,
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=1))
    return result


def _llmsrec_scores(
    cfg: RankingConfig, sasrec, data, cases, shuffled
) -> tuple[np.ndarray, float, np.ndarray]:  # noqa: ANN001
    from safetensors.torch import load_file

    from rellax.assets import prepare_model
    from rellax.llmsrec import LLMSRec
    from training.llm_data import Catalogue
    from training.llm_setup import load_base_lm
    from training.llmsrec import WEIGHTS_FILE, rank_cases

    meta = json.loads((cfg.llmsrec_dir / "metrics.json").read_text())
    lm, tokenizer = load_base_lm(prepare_model(cfg.model_dir))
    model = LLMSRec(lm, cf_dim=sasrec.config.dim, out_dim=int(meta["config"]["out_dim"]))
    found = model.load_state_dict(load_file(cfg.llmsrec_dir / WEIGHTS_FILE), strict=False)
    if found.unexpected_keys or any(not k.startswith("lm.") for k in found.missing_keys):
        raise ValueError(f"{cfg.llmsrec_dir}: weights do not fit LLM-SRec ({found})")
    model.eval()
    items = Catalogue.from_tables(data).items
    k = int(meta["config"]["k"])
    started = time.perf_counter()
    scores, _ = rank_cases(model, sasrec, tokenizer, items, cases, k)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        shuffled_scores, _ = rank_cases(model, sasrec, tokenizer, items, shuffled, k)
    return scores, seconds, shuffled_scores
