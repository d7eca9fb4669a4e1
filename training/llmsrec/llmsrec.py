"""`rellax train llmsrec`: LLM-SRec over the frozen SmolLM2, distilling a trained SASRec (issue 17).

Examples: from each user's train-period sequence (`training.llmsrec.sasrec.train_sequences`), a seeded
position t: the user prompt shows the 10 items before t (dates, titles, `[hist]` tokens carrying
SASRec's item embeddings), the positive is item t, 3 negatives are items the user never touched,
and the teacher's user vector is SASRec's over the items before t. A step takes `batch_size`
examples; every item prompt of the step (positives and negatives) runs through the LLM too, since
f_item and `[ItemOut]` train. Adam on the small modules only.

Every `eval_every` steps (and at the end) the catalogue's item vectors are computed once and the
validation cases (`training.llmsrec.ranking`) are ranked by user . item; the best NDCG@10 is kept. A
checkpoint (trainable weights, optimizer, step, RNG state) is written at each evaluation, so a
killed run resumes there. The output folder holds `llmsrec.safetensors` (trainable weights),
`item_vectors.safetensors` (the whole catalogue, from the selected weights), the teacher's files
(it feeds `[hist]` at serving time) and metrics.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rellax import precision
from rellax.assets import file_sha256
from rellax.entities import Item
from rellax.llmsrec import SASREC_FILES, WEIGHTS, LLMSRec, LLMSRecRanker, llmsrec_loss, recent_history
from rellax.logs import get_logger
from rellax.prompt import build_item_prompt, build_user_prompt
from rellax.sasrec import SASRec
from training.llmsrec.config import LLMSRecConfig
from training.llmsrec.ranking import RankingCase, rank_metrics, ranking_cases
from training.llmsrec.sasrec import train_sequences

__all__ = ["LLMSRecConfig", "catalogue_vectors", "keep", "main", "restore", "user_vectors"]

log = get_logger(__name__)


def _history(items: dict[int, Item], ids: np.ndarray, times: np.ndarray, k: int) -> list[tuple[Item, int]]:
    return recent_history(items, zip(ids.tolist(), times.tolist(), strict=True), k)


def user_vectors(
    model: LLMSRec,
    sasrec: SASRec,
    tokenizer,
    items: dict[int, Item],
    cases: list[RankingCase],
    k: int,
    batch: int = 32,
) -> torch.Tensor:  # noqa: ANN001
    """(n, D) LLM-SRec user vectors of ranking cases (no grad), one LLM pass per user."""
    out = []
    with torch.no_grad():
        for s in range(0, len(cases), batch):
            chunk = cases[s : s + batch]
            hists = [_history(items, c.history, c.times, k) for c in chunk]
            prompts = [build_user_prompt(tokenizer, h, k=k) for h in hists]
            embs = [
                sasrec.item_vectors(torch.tensor(sasrec.rows([it.item_id for it, _ in h]), dtype=torch.long))
                for h in hists
            ]
            out.append(model.user_vectors(prompts, embs))
    return torch.cat(out)


def item_embeddings(sasrec: SASRec, item_ids: list[int]) -> torch.Tensor:
    """(n, cf_dim) SASRec item embeddings (an item SASRec never saw: its zero padding row)."""
    return sasrec.item_vectors(torch.tensor(sasrec.rows(item_ids), dtype=torch.long))


def catalogue_vectors(
    model: LLMSRec,
    sasrec: SASRec,
    tokenizer,  # noqa: ANN001
    items: dict[int, Item],
    only: set[int] | None = None,
    batch: int = 64,
) -> dict[int, torch.Tensor]:
    """Item id -> (D,) vector for the catalogue (or the `only` ids): computed once, then any user
    ranks any list of them."""
    ids = sorted(items if only is None else only & items.keys())
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for s in tqdm(range(0, len(ids), batch), desc="item vectors", unit="batch", leave=False):
            chunk = ids[s : s + batch]
            vecs = model.item_vectors(
                [build_item_prompt(tokenizer, items[i]) for i in chunk], item_embeddings(sasrec, chunk)
            )
            out.update(zip(chunk, vecs, strict=True))
    return out


def rank_cases(
    model: LLMSRec,
    sasrec: SASRec,
    tokenizer,  # noqa: ANN001
    items: dict[int, Item],
    cases: list[RankingCase],
    k: int,
    vectors: dict[int, torch.Tensor] | None = None,
) -> tuple[np.ndarray, dict[int, torch.Tensor]]:
    """(n, candidates) scores of the cases, and the item vectors they came from (the candidates', or
    the given `vectors`: one catalogue pass costs minutes on a CPU, so it is not repeated)."""
    if vectors is None:
        vectors = catalogue_vectors(
            model, sasrec, tokenizer, items, only={int(i) for c in cases for i in c.candidates}
        )
    users = user_vectors(model, sasrec, tokenizer, items, cases, k)
    zero = torch.zeros_like(next(iter(vectors.values())))
    cand = torch.stack([torch.stack([vectors.get(int(i), zero) for i in c.candidates]) for c in cases])
    return torch.einsum("bd,bcd->bc", users, cand).numpy(), vectors


def main(cfg: LLMSRecConfig, deadline: float | None = None) -> dict[str, Any]:
    """Train (resuming a checkpoint in `cfg.out`), select on valid NDCG@10, save; returns metrics.
    Past `deadline` (`time.monotonic()`) it stops at the next evaluation, checkpoint kept, with
    TimeoutError: the same call later goes on from there."""
    from data.loading import load_dataset
    from rellax.assets import prepare_model
    from training.llm.data import Catalogue
    from training.llm.setup import load_base_lm

    data, samples, _ = load_dataset()
    items = Catalogue.from_tables(data).items
    catalogue = np.array(sorted(items))
    sasrec = SASRec.load(cfg.sasrec_dir)
    sasrec.requires_grad_(False)
    lm, tokenizer = load_base_lm(prepare_model(cfg.model_dir))
    torch.manual_seed(cfg.seed)
    model = LLMSRec(lm, cf_dim=sasrec.config.dim, out_dim=cfg.out_dim)
    params = model.trainable()
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    seqs = train_sequences(samples)
    users = [u for u, s in enumerate(seqs) if len(s) >= 2]
    seen = [
        set(samples.seq_item[samples.seq_ptr[u] : samples.seq_ptr[u + 1]].tolist()) for u in range(len(seqs))
    ]
    times = [samples.seq_ts[samples.seq_ptr[u] : samples.seq_ptr[u] + len(seqs[u])] for u in range(len(seqs))]
    valid = ranking_cases(samples, "valid", catalogue, seed=cfg.seed)[: cfg.valid_users]
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt = cfg.out / "checkpoint.pt"
    step, best, history, seconds = 0, -1.0, [], 0.0
    best_state: dict[str, torch.Tensor] | None = None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)  # tensors, numbers, strings: no pickled objects
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        step, best, history, seconds, best_state = (
            state[k] for k in ("step", "best", "history", "seconds", "best_state")
        )
        log.info("llmsrec.resumed", step=step)

    def evaluate() -> None:
        nonlocal best, best_state
        model.eval()
        scores, _ = rank_cases(model, sasrec, tokenizer, items, valid, cfg.k)
        metrics = rank_metrics(scores)
        history.append({"step": step, **metrics})
        if metrics["ndcg@10"] > best:
            best, best_state = metrics["ndcg@10"], {n: p.detach().clone() for n, p in params.items()}
        log.info(
            "llmsrec.eval", step=step, ndcg10=round(metrics["ndcg@10"], 4), hr10=round(metrics["hr@10"], 4)
        )
        torch.save(
            {"trainable": {n: p.detach() for n, p in params.items()}, "optimizer": opt.state_dict(),
             "rng": rng.bit_generator.state, "step": step, "best": best, "history": history,
             "seconds": seconds, "best_state": best_state},
            ckpt,
        )  # fmt: skip

    if step == 0 and not history:
        evaluate()
    bar = tqdm(total=cfg.steps, initial=step, desc="LLM-SRec", unit="step")
    while step < cfg.steps:
        model.train()
        started = time.perf_counter()
        picked = rng.choice(users, size=cfg.batch_size)
        prompts, embs, cf, cands = [], [], [], []
        for u in picked:
            t = int(rng.integers(1, len(seqs[u])))
            hist = _history(items, seqs[u][:t], times[u][:t], cfg.k)
            prompts.append(build_user_prompt(tokenizer, hist, k=cfg.k))
            embs.append(
                sasrec.item_vectors(
                    torch.tensor(sasrec.rows([it.item_id for it, _ in hist]), dtype=torch.long)
                )
            )
            cf.append(sasrec.user_vector(sasrec.encode([seqs[u][:t]]))[0])
            negs: list[int] = []
            while len(negs) < cfg.negatives:
                c = int(rng.choice(catalogue))
                if c not in seen[u] and c not in negs:
                    negs.append(c)
            cands.append([int(seqs[u][t]), *negs])
        user = model.user_vectors(prompts, embs)
        flat_ids = [i for row in cands for i in row]
        flat = [build_item_prompt(tokenizer, items[i]) for i in flat_ids]
        item = model.item_vectors(flat, item_embeddings(sasrec, flat_ids)).view(
            len(picked), 1 + cfg.negatives, -1
        )
        terms = llmsrec_loss(user, item, torch.stack(cf), model.f_cf)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        step += 1
        seconds += time.perf_counter() - started
        bar.update(1)
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in terms.items()})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate()
            if deadline is not None and time.monotonic() > deadline and step < cfg.steps:
                bar.close()
                raise TimeoutError(f"LLM-SRec paused at step {step}/{cfg.steps}; run again to resume")
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best_state[n])
    model.eval()
    test_cases = ranking_cases(samples, "test", catalogue, seed=cfg.seed)[: cfg.test_users]
    vectors = catalogue_vectors(model, sasrec, tokenizer, items)  # all of it: candidate generation serves any
    scores, _ = rank_cases(model, sasrec, tokenizer, items, test_cases, cfg.k, vectors=vectors)
    ids = sorted(vectors)
    LLMSRecRanker.write(cfg.out, model, ids, torch.stack([vectors[i] for i in ids]), cfg.sasrec_dir, cfg.k)
    result = {
        "valid": max(history, key=lambda h: h["ndcg@10"]),
        "test": rank_metrics(scores),
        "test_scores": scores.round(5).tolist(),
        "history": history,
        "train_seconds": round(seconds, 1),
        "examples": step * cfg.batch_size,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "trainable_params": int(sum(p.numel() for p in params.values())),
        # the frozen base's dtype (bf16 by itself on a native-bf16 CPU): item vectors and test scores
        # were computed in it, where a bundle's user pass runs in the served dtype
        "dtype": precision.name(precision.compute_dtype(lm)),
        "cpu": precision.cpu_model(),  # train_seconds compare only within one kind of machine
    }
    (cfg.out / "metrics.json").write_text(json.dumps(result, indent=1))
    ckpt.unlink(missing_ok=True)
    if cfg.keep is not None:
        keep(cfg.out, cfg.keep)
    log.info("llmsrec.done", out=str(cfg.out), test_ndcg10=round(result["test"]["ndcg@10"], 4))
    return result


# A finished run's trained parts: LLM-SRec's small modules and its SASRec teacher (~3 MB of
# safetensors). The item vectors and their index are outputs of these over the base LLM, rebuilt
# by `restore` in one catalogue pass, so they are not kept.
KEPT_FILES = ("llmsrec.json", WEIGHTS, *SASREC_FILES)


def keep(run: Path, dest: Path) -> None:
    """Copy a finished run's trained parts and its metrics (without per-case scores) to `dest`, e.g.
    docs/results/llmsrec, so `make demo` on a fresh machine serves this run instead of a demo-size one."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        shutil.copy2(run / name, dest / name)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("test_scores", None)
    (dest / "metrics.json").write_text(json.dumps(metrics, indent=1))


def restore(kept: Path, out: Path, model_dir: Path | None = None) -> dict[str, Any]:
    """A run folder (what `LLMSRecRanker.load` reads) from `keep`'s files over the base LLM: the
    catalogue's item vectors and their index recomputed; returns the kept metrics."""
    from data.loading import load_dataset
    from rellax.assets import prepare_model
    from training.llm.data import Catalogue
    from training.llm.setup import load_base_lm

    data, _, _ = load_dataset()
    items = Catalogue.from_tables(data).items
    lm, tokenizer = load_base_lm(prepare_model(model_dir))
    model, config = LLMSRecRanker.load_model(kept, lm)
    model.eval()
    vectors = catalogue_vectors(model, SASRec.load(kept), tokenizer, items)
    ids = sorted(vectors)
    LLMSRecRanker.write(out, model, ids, torch.stack([vectors[i] for i in ids]), kept, int(config["k"]))
    metrics = json.loads((kept / "metrics.json").read_text())
    metrics["restored_from"] = {"folder": str(kept), "weights_sha256": file_sha256(kept / WEIGHTS)}
    metrics["dtype"] = precision.name(precision.compute_dtype(lm))  # of the item vectors made here
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("llmsrec.restored", kept=str(kept), out=str(out))
    return metrics
