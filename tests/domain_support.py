"""A small data set in a shape that is not MovieLens's, built in the test: books with a 0/1 `label`
instead of ratings, item text from `title` and `categories`, no `.user` file, string ids.

Each reader likes two of the six categories, so the label is learnable from (user, category).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["BOOKS_CONFIG", "write_books"]

CATEGORIES = ["mystery", "fantasy", "history", "poetry", "science", "travel"]
WORDS = ["Silent", "River", "Glass", "Winter", "Map", "Garden", "Iron", "Letters", "North", "Salt"]

BOOKS_CONFIG = """\
name = "books"
label_field = "label"
title_field = "title"
category_field = "categories"

[prompt]
noun = "book"
verb = "read"
verb_next = "read"
item_text = "Here is a {noun}. Its title is {title}. Its categories are {genre}."
"""


def write_books(folder: Path, *, users: int = 40, items: int = 60, per_user: int = 30, seed: int = 0) -> Path:
    """Write books.inter / books.item / dataset.toml into `folder` and return it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(items)]
    item_lines = ["item_id:token\ttitle:token_seq\tcategories:token_seq"]
    for i in range(items):
        title = f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7 + 3) % len(WORDS)]} {i}"
        second = CATEGORIES[(i + 2) % len(CATEGORIES)]
        item_lines.append(f"b{i:04d}\t{title}\t{cats[i]} {second}")
    inter_lines = ["user_id:token\titem_id:token\tlabel:float\ttimestamp:float"]
    t0 = 1_600_000_000
    for u in range(users):
        liked = set(rng.choice(len(CATEGORIES), size=2, replace=False).tolist())
        picks = rng.choice(items, size=per_user, replace=False)
        stamps = np.sort(rng.choice(200_000, size=per_user, replace=False)) + t0 + u * 37
        for i, ts in zip(picks, stamps, strict=True):
            like = CATEGORIES.index(cats[int(i)]) in liked
            label = int(like) if rng.random() > 0.1 else int(not like)
            inter_lines.append(f"u{u:03d}\tb{int(i):04d}\t{label}\t{int(ts)}")
    (folder / "books.item").write_text("\n".join(item_lines) + "\n", encoding="utf-8")
    (folder / "books.inter").write_text("\n".join(inter_lines) + "\n", encoding="utf-8")
    (folder / "dataset.toml").write_text(BOOKS_CONFIG, encoding="utf-8")
    return folder
