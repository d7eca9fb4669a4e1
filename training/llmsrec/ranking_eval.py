"""`rellax experiment ranking`: the rankers on the same sampled candidates (issue 17).

Test cases come from `training.llmsrec.ranking` (per test user, the first liked item against 99 seeded
never-seen negatives). SASRec, LLM-SRec and DIN each score every candidate of every case; the JSON
keeps each model's per-case rank of the positive, so paired bootstrap intervals on NDCG@10 need no
model. The shuffle diagnostic permutes every history (seeded) at test time and reports the
relative NDCG@10 drop of the two sequential models: how much of what they learnt is the order.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rellax.logs import get_logger
from training.llmsrec.config import RankingConfig
from training.llmsrec.ranking import RankingCase, rank_metrics, ranking_cases, ranks

__all__ = [
    "RankingConfig",
    "cascade_scores",
    "kept_rellax_scores",
    "paired_ndcg_diff",
    "rellax_scores",
    "run",
]

log = get_logger(__name__)


def _ndcg(r: np.ndarray, k: int = 10) -> np.ndarray:
    return np.where(r < k, 1.0 / np.log2(r + 2), 0.0)


def paired_ndcg_diff(ra: np.ndarray, rb: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """NDCG@10(a) - NDCG@10(b) over the same cases, with a 95% paired bootstrap (percentile)
    interval from `scipy.stats.bootstrap`."""
    from scipy.stats import bootstrap

    a, b = _ndcg(np.asarray(ra)), _ndcg(np.asarray(rb))
    res = bootstrap(
        (a, b), lambda a, b, axis: a.mean(axis) - b.mean(axis), paired=True, n_resamples=n_boot,
        method="percentile", rng=np.random.default_rng(seed),
    )  # fmt: skip
    return {
        "diff": float((a - b).mean()),
        "lo": float(res.confidence_interval.low),
        "hi": float(res.confidence_interval.high),
    }


def rellax_scores(
    bundle, profiles: dict, cases: list[RankingCase], columns: list[np.ndarray] | None = None
) -> list[np.ndarray]:  # noqa: ANN001
    """P(click) from a ReLLaX bundle (what the service scores) for each case's candidates, or for the
    candidate positions `columns[i]` of case i only (the cascade's top M)."""
    from rellax.entities import HistoryEvent, Profile

    out = []
    for i, c in enumerate(cases):
        cols = np.arange(len(c.candidates)) if columns is None else columns[i]
        events = [
            HistoryEvent(int(it), float(r), int(t))
            for it, r, t in zip(c.history, c.ratings, c.times, strict=True)
        ]
        prepared = bundle.prepare(
            profiles.get(c.user_id, Profile()), events, c.candidates[cols].tolist(), user_id=c.user_id
        )
        # Chunks of 4 prompts, as the service's torch backend runs them (RELLAX_TORCH_ROWS): on a
        # 2-core CPU 64-row chunks scored ~1.1 candidates/s against ~1.7 (benchmarks/results/torch_rows.md).
        out.append(bundle.score_inputs([p.model_input for p in prepared], max_rows=4))
    return out


def _rellax_key(bundle) -> str:  # noqa: ANN001
    """What ReLLaX's scores depend on: the bundle's files but its LLM-SRec folder (a new LLM-SRec
    must not throw away an hour of ReLLaX scoring), its config and the dtype it is scored in."""
    files = {k: v for k, v in bundle.manifest["files"].items() if not k.startswith("llmsrec/")}
    blob = json.dumps([files, bundle.manifest["config"], bundle.dtype], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def kept_rellax_scores(
    bundle, profiles: dict, cases: list[RankingCase], folder: Path, every: int = 4
) -> tuple[np.ndarray, float]:  # noqa: ANN001
    """`rellax_scores` of every case and the seconds they took, kept in `folder` as they come and
    reused by case (user and candidates must match): all 153 test users cost ~22 min (bf16) to an hour
    (fp32) of 2-core CPU, so a paused or lost session goes on from the last kept case, and a new
    LLM-SRec re-scores nothing."""
    path = Path(folder) / f"rellax-{_rellax_key(bundle)}.npz"
    kept: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
    if path.exists():
        with np.load(path) as z:
            kept = {
                int(u): (c, s, float(t))
                for u, c, s, t in zip(z["users"], z["candidates"], z["scores"], z["seconds"], strict=True)
            }
    out: list[tuple[np.ndarray, np.ndarray, float] | None] = [
        kept[c.user_id] if c.user_id in kept and np.array_equal(kept[c.user_id][0], c.candidates) else None
        for c in cases
    ]
    todo = [i for i, s in enumerate(out) if s is None]
    log.info("ranking.rellax", cases=len(cases), kept=len(cases) - len(todo), path=str(path))

    def save() -> None:
        kept.update({cases[i].user_id: s for i, s in enumerate(out) if s is not None})
        users = sorted(kept)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(
            tmp,
            users=np.array(users),
            candidates=np.stack([kept[u][0] for u in users]),
            scores=np.stack([kept[u][1] for u in users]),
            seconds=np.array([kept[u][2] for u in users]),
        )
        os.replace(tmp, path)  # a kill mid-write leaves the previous file whole

    for n, i in enumerate(tqdm(todo, desc="ReLLaX ranking", unit="user"), 1):
        started = time.perf_counter()
        scores = rellax_scores(bundle, profiles, [cases[i]])[0]
        out[i] = (cases[i].candidates, scores, time.perf_counter() - started)
        if n % every == 0 or n == len(todo):
            save()
    done = [s for s in out if s is not None]
    return np.stack([s[1] for s in done]), sum(s[2] for s in done)


def cascade_scores(first: np.ndarray, second_top: list[np.ndarray], m: int) -> np.ndarray:
    """The cascade's order as scores: the first stage's top m (by `first`), re-ordered by the second
    stage's scores of them (`second_top[i]`, in the first stage's top order, at least m long), all
    above the rest, which keep the first stage's order. Ranks read off these as off any ranker's."""
    out = np.empty_like(first, dtype=np.float64)
    for i, row in enumerate(first):
        order = np.argsort(-row, kind="stable")
        top, rest = order[:m], order[m:]
        out[i, rest] = -np.arange(1, len(rest) + 1, dtype=np.float64)  # below 0, first stage's order
        out[i, top] = 1.0 + np.asarray(second_top[i][:m], dtype=np.float64)  # above 0, by the second stage
    return out


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
    from training.llm.data import Catalogue
    from training.llm.setup import load_din

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
    from data.loading import load_dataset
    from rellax.sasrec import SASRec
    from training.llmsrec.sasrec import score_cases

    data, samples, _ = load_dataset()
    catalogue = data.items.item_id.to_numpy()
    cases = ranking_cases(samples, "test", catalogue, seed=cfg.seed)[: cfg.users]
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
    llmsrec = None  # LLM-SRec's scores: the cascade's first stage
    if cfg.llmsrec_dir is not None and (cfg.llmsrec_dir / "llmsrec.safetensors").exists():
        llmsrec, seconds, shuffled_scores = _llmsrec_scores(cfg, sasrec, data, cases, shuffled)
        record("LLM-SRec", llmsrec, seconds, shuffled_scores)
    if cfg.bundle is not None:
        from rellax.bundle import Bundle
        from training.llm.data import Catalogue

        bundle, profiles = Bundle.load(cfg.bundle, dtype=cfg.dtype), Catalogue.from_tables(data).profiles
        n = len(cases) if cfg.rellax_users is None else min(cfg.rellax_users, len(cases))
        full, seconds = kept_rellax_scores(bundle, profiles, cases[:n], cfg.kept)
        record("ReLLaX", full, seconds)
        models["ReLLaX"].update(
            dtype=bundle.dtype, bundle=bundle.model_version, k=bundle.config.k, cases=n
        )  # fmt: skip
        if llmsrec is not None:
            # The cascade's second stage is ReLLaX on LLM-SRec's top M: the very scores ReLLaX gave those
            # candidates above (a score does not depend on its batch: tests/test_batch_invariance.py).
            # Its time is ReLLaX's share for M of the 100 candidates; benchmarks/rerank.py measures it.
            deepest = max(cfg.cascade_m)
            tops = [np.argsort(-row, kind="stable")[:deepest] for row in llmsrec[:n]]
            second = [full[i][top] for i, top in enumerate(tops)]
            for m in cfg.cascade_m:
                record(f"cascade M={m}", cascade_scores(llmsrec[:n], second, m), seconds * m / full.shape[1])
    comparisons = {
        f"{a} - {b}": paired_ndcg_diff(
            np.array(models[a]["ranks"]), np.array(models[b]["ranks"]), seed=cfg.seed
        )
        for a, b in (("LLM-SRec", "SASRec"), ("LLM-SRec", "DIN"), ("SASRec", "DIN"))
        if a in models and b in models
    }
    for name in [n for n in models if n.startswith("cascade")]:  # on the ReLLaX subset of cases
        n = models["ReLLaX"]["cases"]
        ra, rb = np.array(models[name]["ranks"]), np.array(models["ReLLaX"]["ranks"])
        comparisons[f"{name} - ReLLaX"] = paired_ndcg_diff(ra[:n], rb[:n], seed=cfg.seed)
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
    from rellax.assets import prepare_model
    from rellax.llmsrec import LLMSRecRanker
    from training.llm.data import Catalogue
    from training.llm.setup import load_base_lm
    from training.llmsrec.llmsrec import rank_cases

    lm, tokenizer = load_base_lm(prepare_model(cfg.model_dir))
    items = Catalogue.from_tables(data).items
    ranker = LLMSRecRanker.load(cfg.llmsrec_dir, lm, tokenizer, items)  # as the service loads it
    model, k = ranker.model, ranker.k
    started = time.perf_counter()
    scores, vectors = rank_cases(model, sasrec, tokenizer, items, cases, k)
    seconds = time.perf_counter() - started
    with torch.no_grad():  # the same candidates: their item vectors do not depend on the history
        shuffled_scores, _ = rank_cases(model, sasrec, tokenizer, items, shuffled, k, vectors=vectors)
    return scores, seconds, shuffled_scores
