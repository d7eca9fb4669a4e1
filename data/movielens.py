"""MovieLens loaders: the bundled ML-100K (RecBole atomic files) and the ML-1M `.dat` layout.

Both return the same typed tables (DESIGN §3):
  users:        user_id:int, gender:str (male/female), age:str (ML-1M bucket text), job:str
  items:        item_id:int, title:str (no year), genre:str (first genre)
  interactions: user_id:int, item_id:int, rating:float, timestamp:int
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rellax.entities import AGE_BUCKETS, JOBS, Item, Profile
from rellax.errors import DataError

__all__ = ["MovieLens", "load_ml1m", "load_ml100k", "ml100k_age_bucket"]


@dataclass(frozen=True)
class MovieLens:
    """The three tables of a MovieLens data set plus the files they came from."""

    users: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame
    sources: tuple[Path, ...]

    def profile(self, user_id: int) -> Profile:
        row = self.users.loc[self.users.user_id == user_id].iloc[0]
        return Profile(gender=row.gender, age=row.age, job=row.job)

    def item_records(self) -> list[Item]:
        return [Item(int(r.item_id), str(r.title), str(r.genre)) for r in self.items.itertuples()]


def ml100k_age_bucket(age: int) -> str:
    """Map an ML-100K age in years onto the ML-1M bucket text."""
    for lower, code in ((56, 56), (50, 50), (45, 45), (35, 35), (25, 25), (18, 18)):
        if age >= lower:
            return AGE_BUCKETS[code]
    return AGE_BUCKETS[1]


def _first_genre(text: object) -> str:
    parts = str(text).split() if isinstance(text, str) and text.strip() else []
    return parts[0] if parts else "unknown"


def _check_columns(df: pd.DataFrame, needed: list[str], path: Path) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


def load_ml100k(folder: Path) -> MovieLens:
    """Read RecBole's ml-100k.{user,item,inter} (tab-separated, typed headers like `age:token`)."""
    paths = tuple(folder / f"ml-100k.{kind}" for kind in ("user", "item", "inter"))

    def read(path: Path) -> pd.DataFrame:
        if not path.exists():
            raise DataError(f"{path} does not exist")
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
        df.columns = [c.split(":")[0] for c in df.columns]
        return df

    u, i, x = (read(p) for p in paths)
    _check_columns(u, ["user_id", "age", "gender", "occupation"], paths[0])
    _check_columns(i, ["item_id", "movie_title", "class"], paths[1])
    _check_columns(x, ["user_id", "item_id", "rating", "timestamp"], paths[2])
    users = pd.DataFrame(
        {
            "user_id": u.user_id.astype(int),
            "gender": u.gender.map({"M": "male", "F": "female"}).fillna("unknown"),
            "age": u.age.astype(int).map(ml100k_age_bucket),
            "job": u.occupation.str.strip(),
        }
    )
    items = pd.DataFrame(
        {
            "item_id": i.item_id.astype(int),
            "title": i.movie_title.str.strip(),
            "genre": i["class"].map(_first_genre),
        }
    )
    interactions = pd.DataFrame(
        {
            "user_id": x.user_id.astype(int),
            "item_id": x.item_id.astype(int),
            "rating": x.rating.astype(float),
            "timestamp": x.timestamp.astype(float).astype("int64"),
        }
    )
    return MovieLens(users, items, interactions, paths)


def load_ml1m(folder: Path) -> MovieLens:
    """Read ML-1M's users.dat / movies.dat / ratings.dat (`::`-separated, latin-1)."""
    paths = tuple(folder / name for name in ("users.dat", "movies.dat", "ratings.dat"))
    for p in paths:
        if not p.exists():
            raise DataError(f"{p} does not exist")

    def read(path: Path, names: list[str]) -> pd.DataFrame:
        rows = [line.rstrip("\n").split("::") for line in path.read_text(encoding="latin-1").splitlines()]
        bad = [n for n, r in enumerate(rows, 1) if len(r) != len(names)]
        if bad:
            raise DataError(f"{path}: line {bad[0]} has the wrong number of fields (want {len(names)})")
        return pd.DataFrame(rows, columns=names)

    u = read(paths[0], ["user_id", "gender", "age", "job", "zip"])
    m = read(paths[1], ["item_id", "title", "genres"])
    r = read(paths[2], ["user_id", "item_id", "rating", "timestamp"])
    users = pd.DataFrame(
        {
            "user_id": u.user_id.astype(int),
            "gender": u.gender.map({"M": "male", "F": "female"}).fillna("unknown"),
            "age": u.age.astype(int).map(AGE_BUCKETS).fillna("unknown"),
            "job": u.job.astype(int).map(dict(enumerate(JOBS))).fillna("unknown"),
        }
    )
    # ML-1M titles carry the year: "Toy Story (1995)" -> "Toy Story", as in ML-100K.
    titles = m.title.str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True).str.strip()
    items = pd.DataFrame(
        {
            "item_id": m.item_id.astype(int),
            "title": titles,
            "genre": m.genres.str.split("|").str[0],
        }
    )
    interactions = pd.DataFrame(
        {
            "user_id": r.user_id.astype(int),
            "item_id": r.item_id.astype(int),
            "rating": r.rating.astype(float),
            "timestamp": r.timestamp.astype("int64"),
        }
    )
    return MovieLens(users, items, interactions, paths)
