"""Where a prompt's tokens go, and what capping item titles would save.

    .venv/bin/python benchmarks/prompt_tokens.py [--prompts 400]

Training and scoring cost grows with prompt tokens, so a title cap is worth a trial only if
titles are a large share of them. Measured on the real ML-100K catalogue and user profiles with
SmolLM2's tokenizer: title lengths, prompt lengths at K = 5, 10, 15 (real users' recency prompts),
the titles' share, and the tokens a cap of 8 / 12 / 16 title tokens would remove.
Writes benchmarks/results/prompt_tokens.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import save  # noqa: E402
from data.loading import load_dataset  # noqa: E402
from rellax.assets import prepare_model  # noqa: E402
from rellax.entities import Profile  # noqa: E402
from rellax.prompt import build_prompt  # noqa: E402
from training.llm.data import Catalogue  # noqa: E402
from training.tables import markdown_table  # noqa: E402

CAPS = (8, 12, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=400, help="test rows per K")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    data, samples, _ = load_dataset()
    catalogue = Catalogue.from_tables(data)
    tok = AutoTokenizer.from_pretrained(prepare_model(None))
    lens = {i: len(tok(it.title, add_special_tokens=False).input_ids) for i, it in catalogue.items.items()}
    title = np.array(list(lens.values()))
    users = data.users.set_index("user_id")
    rows = np.random.default_rng(0).choice(samples.indices("test"), args.prompts, replace=False)
    per_k = {}
    for k in (5, 10, 15):
        total, titles, saved = [], [], {c: [] for c in CAPS}
        for r in rows:
            items, ratings = samples.history(int(r))[:2]
            uid = samples.user_id(int(r))
            u = users.loc[uid] if uid in users.index else None
            profile = Profile(*(str(u[f]) for f in ("gender", "age", "job"))) if u is not None else Profile()
            hist = [(catalogue.items[int(i)], float(x)) for i, x in zip(items, ratings, strict=True)]
            cand = catalogue.items[int(samples.item_id[r])]
            p = build_prompt(tok, profile, hist, cand, k=k, mode="recency", spa=False)
            shown = [lens[int(i)] for i in p.hist_item_ids] + [lens[int(cand.item_id)]]
            total.append(len(p.input_ids))
            titles.append(sum(shown))
            for c in CAPS:
                saved[c].append(sum(max(0, n - c) for n in shown))
        t = float(np.mean(total))
        per_k[k] = {
            "prompt_tokens": round(t, 1),
            "title_tokens": round(float(np.mean(titles)), 1),
            "title_share": round(float(np.mean(titles)) / t, 4),
            "saved_by_cap": {c: round(float(np.mean(saved[c])) / t, 4) for c in CAPS},
        }
    result = {
        "titles": {
            "n": len(title),
            "mean_tokens": round(float(title.mean()), 2),
            "p90_tokens": float(np.percentile(title, 90)),
            "max_tokens": int(title.max()),
            "cut_by_cap": {c: round(float((title > c).mean()), 4) for c in CAPS},
        },
        "per_k": per_k,
        "prompts": args.prompts,
    }
    lines = [
        "# Prompt tokens and title caps (ML-100K, SmolLM2 tokenizer)",
        "",
        f"Titles: {len(title):,}, mean {title.mean():.2f} tokens (year stripped), p90 "
        f"{np.percentile(title, 90):.0f}, max {title.max()}.",
        "",
        markdown_table(
            ("K", "prompt tokens", "title tokens", "title share", "saved by cap 8", "cap 12", "cap 16"),
            [
                (k, r["prompt_tokens"], r["title_tokens"], f"{r['title_share']:.1%}",
                 *(f"{r['saved_by_cap'][cap]:.1%}" for cap in (8, 12, 16)))
                for k, r in per_k.items()
            ],
            align="rrrrrrr",
        ),
    ]  # fmt: skip
    lines += ["", f"{args.prompts} real test rows per K (recency prompts, no SPA placeholders)."]
    save(ROOT / "benchmarks" / "results", "prompt_tokens", result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
