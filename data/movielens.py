"""MovieLens: the bundled ML-100K (RecBole atomic files, read through `read_dataset` like any data
set) and an importer that converts ML-1M's `.dat` layout into atomic files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from data.config import CONFIG_FILE, ML100K
from data.dataset import Dataset, read_dataset
from rellax.entities import AGE_BUCKETS, JOBS
from rellax.errors import DataError

__all__ = ["ML1M_CONFIG", "convert_ml1m", "load_ml100k"]

# The converted ML-1M files already hold prompt text (male/female, age buckets, job names).
ML1M_CONFIG = """\
name = "ml-1m"
category_field = "genre"
gender_field = "gender"
age_field = "age"
job_field = "job"

[prompt]
noun = "movie"
verb = "watched"
verb_next = "watch"
kind = "film"
rating = "stars"
item_text = "Here is a {noun}. Its title is {title}. The {noun}'s genre is {genre}."
"""


def load_ml100k(folder: Path) -> Dataset:
    """RecBole's ml-100k.{user,item,inter} under the bundled config (the ReLLa protocol's fields)."""
    return read_dataset(folder, ML100K)


def _read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path} does not exist")
    frame = pd.read_csv(
        path, sep="::", engine="python", names=names, dtype=str, encoding="latin-1", keep_default_na=False
    )
    ragged = frame[names[-1]].isna() | (frame[names[-1]] == "")
    if ragged.any():
        line = int(ragged.to_numpy().nonzero()[0][0]) + 1
        raise DataError(f"{path}: line {line} has the wrong number of fields (want {len(names)})")
    return frame


def convert_ml1m(source: Path, target: Path) -> Path:
    """Write ML-1M's users.dat / movies.dat / ratings.dat as atomic files + dataset.toml in `target`."""
    u = _read_dat(source / "users.dat", ["user_id", "gender", "age", "job", "zip"])
    m = _read_dat(source / "movies.dat", ["item_id", "title", "genres"])
    r = _read_dat(source / "ratings.dat", ["user_id", "item_id", "rating", "timestamp"])
    target.mkdir(parents=True, exist_ok=True)
    users = pd.DataFrame(
        {
            "user_id:token": u.user_id,
            "gender:token": u.gender.map({"M": "male", "F": "female"}).fillna("unknown"),
            "age:token": u.age.astype(int).map(AGE_BUCKETS).fillna("unknown"),
            "job:token": u.job.astype(int).map(dict(enumerate(JOBS))).fillna("unknown"),
        }
    )
    # ML-1M titles carry the year: "Toy Story (1995)" -> "Toy Story", as in ML-100K.
    items = pd.DataFrame(
        {
            "item_id:token": m.item_id,
            "title:token_seq": m.title.str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True).str.strip(),
            "genre:token_seq": m.genres.str.replace("|", " ", regex=False),
        }
    )
    inter = r.rename(columns=lambda c: f"{c}:float" if c in ("rating", "timestamp") else f"{c}:token")
    for name, frame in (("user", users), ("item", items), ("inter", inter)):
        frame.to_csv(target / f"ml-1m.{name}", sep="\t", index=False, quoting=3)
    (target / CONFIG_FILE).write_text(ML1M_CONFIG, encoding="utf-8")
    return target
