"""Plain CSV exports -> RecBole atomic files: the shortest way from what a team already has
(an interactions table and an items table) to a data set rellax reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rellax.errors import DataError

__all__ = ["csv_to_atomic"]


def _read(path: Path, needed: list[str], what: str) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path} does not exist")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} for the {what}; found {list(frame.columns)}")
    bad = frame.apply(lambda col: col.str.contains(r"[\t\n]", regex=True)).to_numpy().nonzero()
    if len(bad[0]):
        row, col = int(bad[0][0]), frame.columns[int(bad[1][0])]
        raise DataError(
            f"{path}: line {row + 2}, field {col!r}: tabs and newlines cannot go into atomic files"
        )
    return frame


def csv_to_atomic(
    interactions: Path,
    items: Path,
    out: Path,
    *,
    name: str,
    noun: str = "item",
    verb: str = "interacted with",
    verb_next: str | None = None,
    label: bool = False,
    category: str | None = None,
) -> Path:
    """Write `out/NAME.inter`, `out/NAME.item` and a starter `out/dataset.toml`.

    `interactions` needs columns user_id, item_id, timestamp and rating (or label with `label=True`);
    `items` needs item_id and title, plus the `category` column when given.
    """
    score = "label" if label else "rating"
    inter = _read(interactions, ["user_id", "item_id", score, "timestamp"], "interactions")
    catalogue = _read(items, ["item_id", "title", *([category] if category else [])], "items")
    out.mkdir(parents=True, exist_ok=True)
    inter = inter[["user_id", "item_id", score, "timestamp"]].rename(
        columns={"user_id": "user_id:token", "item_id": "item_id:token", score: f"{score}:float",
                 "timestamp": "timestamp:float"}
    )  # fmt: skip
    columns = {"item_id": "item_id:token", "title": "title:token_seq"}
    if category:
        columns[category] = f"{category}:token_seq"
    catalogue = catalogue[list(columns)].rename(columns=columns)
    inter.to_csv(out / f"{name}.inter", sep="\t", index=False, quoting=3)
    catalogue.to_csv(out / f"{name}.item", sep="\t", index=False, quoting=3)
    lines = [f'name = "{name}"']
    if label:
        lines.append('label_field = "label"')
    if category:
        lines.append(f'category_field = "{category}"')
    lines += ["", "[prompt]", f'noun = "{noun}"', f'verb = "{verb}"']
    if verb_next:
        lines.append(f'verb_next = "{verb_next}"')
    (out / "dataset.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
