"""A data set as three typed tables, read from RecBole atomic files under a `DatasetConfig`.

The tables every later step sees (docs/design.md §3), whatever the domain:
  users:        user_id:int, gender:str, age:str, job:str        ("unknown" where the data has none)
                [, one str column per `profile_fields` entry, named as in .user]
  items:        item_id:int, title:str, genre:str                 (genre = first token of the category)
  interactions: user_id:int, item_id:int, rating:float, timestamp:int[, split:int8]

Ids that are all decimal integers keep their value (ML-100K's ids are the ids you serve); other
ids (strings) are numbered 1..N in sorted order, and `user_keys` / `item_keys` map back. Data with
a 0/1 label column gets rating 5 for a positive and 1 for a negative, so label = rating > 3 holds for
every data set and DIN's rating embedding tells the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data.atomic import AtomicTable, read_atomic
from data.config import DatasetConfig
from rellax.domain import Domain
from rellax.entities import AGE_BUCKETS, Item, Profile
from rellax.errors import DataError

__all__ = ["SPLIT_NAMES", "Dataset", "ml100k_age_bucket", "read_dataset"]

SPLIT_NAMES = ("train", "valid", "test")
_POSITIVE, _NEGATIVE = 5.0, 1.0


@dataclass(frozen=True)
class Dataset:
    """The three tables of a data set, the files they came from and the config that read them."""

    users: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame
    sources: tuple[Path, ...]
    config: DatasetConfig = field(default_factory=DatasetConfig)
    name: str = "dataset"
    user_keys: dict[int, str] | None = None  # internal id -> the data's own id, when they differ
    item_keys: dict[int, str] | None = None

    @property
    def label_threshold(self) -> float:
        """label = rating > this; label data is stored as ratings 5 / 1, hence 3."""
        return 3.0 if self.config.label_field else self.config.rating_threshold

    @property
    def domain(self) -> Domain:
        return self.config.domain()

    def profile(self, user_id: int) -> Profile:
        rows = self.users.loc[self.users.user_id == user_id]
        return Profile() if rows.empty else _profile(rows.iloc[0], self.config.profile_fields)

    def profiles(self) -> dict[int, Profile]:
        """Every user's profile, by internal user id: what prompts, DIN and the service read."""
        fields = self.config.profile_fields
        return {int(row.user_id): _profile(row, fields) for _, row in self.users.iterrows()}

    def item_records(self) -> list[Item]:
        return [Item(int(r.item_id), str(r.title), str(r.genre)) for r in self.items.itertuples()]

    def user_key(self, user_id: int) -> str:
        """The data's own id of an internal user id (what the service is called with)."""
        return self.user_keys[user_id] if self.user_keys else str(user_id)


def _profile(row: pd.Series, extra_fields: list[str]) -> Profile:
    extra = tuple((name, str(row[name])) for name in extra_fields)
    return Profile(gender=str(row.gender), age=str(row.age), job=str(row.job), extra=extra)


def ml100k_age_bucket(age: int) -> str:
    """Map an ML-100K age in years onto the ML-1M bucket text."""
    for lower, code in ((56, 56), (50, 50), (45, 45), (35, 35), (25, 25), (18, 18)):
        if age >= lower:
            return AGE_BUCKETS[code]
    return AGE_BUCKETS[1]


def _first_token(text: object) -> str:
    parts = str(text).split() if isinstance(text, str) and text.strip() else []
    return parts[0] if parts else "unknown"


def _ids(tables: list[tuple[AtomicTable, str]], kind: str) -> tuple[dict[str, int], dict[int, str] | None]:
    """token -> internal int id over every table that names this kind of id."""
    tokens: set[str] = set()
    for table, column in tables:
        values = table.frame[column].str.strip()
        empty = (values == "").to_numpy().nonzero()[0]
        if len(empty):
            raise DataError(f"{table.where(int(empty[0]))}, field {column!r}: empty {kind} id")
        tokens.update(values)
    if all(t.isascii() and t.isdigit() and 0 < len(t) <= 9 for t in tokens):
        return {t: int(t) for t in tokens}, None
    ordered = sorted(tokens)
    return {t: i for i, t in enumerate(ordered, 1)}, {i: t for i, t in enumerate(ordered, 1)}


def _read_interactions(folder: Path, stem: str, config: DatasetConfig) -> tuple[AtomicTable, DatasetConfig]:
    """`NAME.inter`, or RecBole's per-split benchmark files `NAME.{train,valid,test}.inter` (their
    split is then kept, as `split_field` would)."""
    whole = folder / f"{stem}.inter"
    splits = [folder / f"{stem}.{name}.inter" for name in SPLIT_NAMES]
    if not whole.exists() and all(p.exists() for p in splits):
        tables = [read_atomic(p) for p in splits]
        stacked = AtomicTable.concat([t for t in tables if t is not None], "split", list(SPLIT_NAMES))
        return stacked, config.model_copy(update={"split_field": "split"})
    table = read_atomic(whole)
    assert table is not None
    return table, config


def read_dataset(folder: Path, config: DatasetConfig) -> Dataset:
    """Read and check `folder/NAME.{inter,item,user}`; raises DataError naming file, line and field."""
    stem = config.stem(folder)
    inter, config = _read_interactions(folder, stem, config)
    item = read_atomic(folder / f"{stem}.item")
    user = read_atomic(folder / f"{stem}.user", required=False)
    assert inter is not None and item is not None
    score = config.label_field or config.rating_field
    inter.require(
        config.user_field, config.item_field, config.time_field, score, why="ids, time and rating/label"
    )
    if config.split_field:
        inter.require(config.split_field, why="split_field")
    item.require(config.item_field, config.title_field, why="item id and title")
    if config.category_field:
        item.require(config.category_field, why="category_field")
    slots = [c for c in (config.gender_field, config.age_field, config.job_field) if c]
    profile_columns = [*slots, *config.profile_fields]
    if profile_columns and user is None:
        raise DataError(
            f"{folder / f'{stem}.user'} does not exist, but the config names profile fields {profile_columns}"
        )
    if user is not None:
        user.require(config.user_field, *profile_columns, why="user id and profile fields")

    item_ids, item_keys = _ids([(item, config.item_field)], "item")
    unknown = ~inter.frame[config.item_field].str.strip().isin(item_ids.keys())
    if unknown.any():
        row = int(unknown.to_numpy().nonzero()[0][0])
        raise DataError(
            f"{inter.where(row)}, field {config.item_field!r}: item "
            f"{inter.frame[config.item_field].iloc[row]!r} is not in {item.path.name} "
            f"({int(unknown.sum())} such row(s))"
        )
    dup_items = item.frame[config.item_field].str.strip().duplicated()
    if dup_items.any():
        row = int(dup_items.to_numpy().nonzero()[0][0])
        raise DataError(f"{item.where(row)}, field {config.item_field!r}: item listed twice")
    user_tables = [(inter, config.user_field)] + ([(user, config.user_field)] if user is not None else [])
    user_ids, user_keys = _ids(user_tables, "user")

    interactions = _interactions(inter, config, user_ids, item_ids)
    items = pd.DataFrame(
        {
            "item_id": item.frame[config.item_field].str.strip().map(item_ids).astype("int64"),
            "title": item.frame[config.title_field].str.strip(),
            "genre": (
                item.frame[config.category_field].map(_first_token)
                if config.category_field
                else pd.Series("unknown", index=item.frame.index)
            ),
        }
    )
    empty_title = (items.title == "").to_numpy().nonzero()[0]
    if len(empty_title):
        row = int(empty_title[0])
        raise DataError(f"{item.where(row)}, field {config.title_field!r}: empty title")
    users = _users(user, inter, config, user_ids)
    # user, item, inter: the order the samples' source hash has always read them in
    inter_paths = tuple(path for path, _ in inter.parts) or (inter.path,)
    sources = ((user.path,) if user is not None else ()) + (item.path, *inter_paths)
    return Dataset(users, items, interactions, sources, config, stem, user_keys, item_keys)


def _interactions(
    inter: AtomicTable, config: DatasetConfig, user_ids: dict[str, int], item_ids: dict[str, int]
) -> pd.DataFrame:
    x = inter.frame
    stamps = inter.floats(config.time_field)
    if config.label_field:
        labels = inter.floats(config.label_field)
        bad = (~labels.isin([0.0, 1.0])).to_numpy().nonzero()[0]
        if len(bad):
            row = int(bad[0])
            raise DataError(
                f"{inter.where(row)}, field {config.label_field!r}: "
                f"label {x[config.label_field].iloc[row]!r} is not 0 or 1"
            )
        rating = np.where(labels.to_numpy() > 0, _POSITIVE, _NEGATIVE)
    else:
        rating = inter.floats(config.rating_field).to_numpy()
    frame = pd.DataFrame(
        {
            "user_id": x[config.user_field].str.strip().map(user_ids).astype("int64"),
            "item_id": x[config.item_field].str.strip().map(item_ids).astype("int64"),
            "rating": rating.astype(float),
            "timestamp": stamps.astype("int64"),
        }
    )
    if config.split_field:
        names = x[config.split_field].str.strip()
        bad = (~names.isin(SPLIT_NAMES)).to_numpy().nonzero()[0]
        if len(bad):
            row = int(bad[0])
            raise DataError(
                f"{inter.where(row)}, field {config.split_field!r}: "
                f"{names.iloc[row]!r} is not one of {list(SPLIT_NAMES)}"
            )
        frame["split"] = names.map({n: i for i, n in enumerate(SPLIT_NAMES)}).astype("int8")
    dup = frame.duplicated(["user_id", "item_id", "timestamp"], keep="first").to_numpy()
    if dup.any():
        if config.on_duplicate == "error":
            row = int(dup.nonzero()[0][0])
            raise DataError(
                f"{inter.where(row)}: repeats (user, item, timestamp) of an "
                f'earlier row ({int(dup.sum())} such row(s)); set on_duplicate = "keep_first" in '
                "dataset.toml to drop them"
            )
        frame = frame.loc[~dup].reset_index(drop=True)
    return frame


def _users(
    user: AtomicTable | None, inter: AtomicTable, config: DatasetConfig, user_ids: dict[str, int]
) -> pd.DataFrame:
    ids = sorted(set(user_ids.values()))
    unknown = dict.fromkeys(("gender", "age", "job", *config.profile_fields), "unknown")
    if user is None:
        return pd.DataFrame({"user_id": ids, **unknown})
    u = user.frame
    out = pd.DataFrame({"user_id": u[config.user_field].str.strip().map(user_ids).astype("int64")})
    for slot, column in (
        ("gender", config.gender_field),
        ("age", config.age_field),
        ("job", config.job_field),
    ):
        values = u[column].str.strip() if column else pd.Series("", index=u.index)
        if config.profile_preset == "movielens" and slot == "gender":
            values = values.map({"M": "male", "F": "female"}).fillna("unknown")
        elif config.profile_preset == "movielens" and slot == "age":
            ages = user.floats(column) if column else None
            values = ages.astype(int).map(ml100k_age_bucket) if ages is not None else values
        out[slot] = values.where(values != "", "unknown")
    for name in config.profile_fields:
        values = u[name].astype(str).str.strip()
        out[name] = values.where(values != "", "unknown")
    missing = sorted(set(ids) - set(out.user_id))
    if missing:  # users with interactions but no .user row get an unknown profile
        extra = pd.DataFrame({"user_id": missing, **unknown})
        out = pd.concat([out, extra], ignore_index=True)
    return out
