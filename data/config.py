"""A data set's config: which columns mean what, the label rule, the split, and the prompt's words.

It lives beside the atomic files as `dataset.toml` (every key optional); flags can override it. The
defaults describe a plain RecBole data set; `ML100K` is the bundled Dataset-100K's config, and
reproduces the ReLLa protocol and prompt exactly.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rellax.domain import Domain, RatingDisplay
from rellax.errors import DataError

__all__ = ["CONFIG_FILE", "ML100K", "DatasetConfig", "PromptWords", "load_config"]

CONFIG_FILE = "dataset.toml"


class PromptWords(BaseModel):
    """The `[prompt]` table: what the prompt calls an item and how it shows a rating."""

    model_config = ConfigDict(extra="forbid")

    noun: str = "item"
    plural: str | None = Field(default=None, description="Default: noun + 's'.")
    verb: str = "interacted with"
    verb_next: str = "interact with"
    kind: str | None = Field(default=None, description="LLM-SRec's 'a comedy film'; default: the noun.")
    rating: RatingDisplay | None = Field(
        default=None, description="stars / label / none; default: label data -> label, else stars."
    )
    item_text: str = "Here is a {noun}. Its title is {title}. Its category is {genre}."


class DatasetConfig(BaseModel):
    """How to read one data set's atomic files (`NAME.inter`, `NAME.item`, optional `NAME.user`)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="File stem NAME; default: the folder's name.")
    user_field: str = "user_id"
    item_field: str = "item_id"
    time_field: str = "timestamp"
    rating_field: str = "rating"
    label_field: str | None = Field(default=None, description="A 0/1 column of .inter instead of a rating.")
    rating_threshold: float = Field(default=3.0, description="label = rating > threshold.")
    title_field: str = "title"
    category_field: str | None = Field(
        default=None, description="An .item column whose first token is the item's category (DIN, SUBR)."
    )
    gender_field: str | None = None
    age_field: str | None = None
    job_field: str | None = None
    profile_fields: list[str] = Field(
        default_factory=list,
        description="More .user columns of the profile (categorical), in order: each is a sentence of the "
        "prompt and an embedding of DIN.",
    )
    profile_preset: Literal["none", "movielens"] = Field(
        default="none", description="movielens: M/F -> male/female, ages in years -> ML-1M buckets."
    )
    split_field: str | None = Field(
        default=None, description="An .inter column of train/valid/test: keep the data's own split."
    )
    on_duplicate: Literal["error", "keep_first"] = Field(
        default="error", description="Rows repeating (user, item, timestamp): refuse, or keep the first."
    )
    min_history: int = Field(default=5, ge=0)
    prompt: PromptWords = Field(default_factory=PromptWords)

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        columns = {self.user_field, self.gender_field, self.age_field, self.job_field}
        clash = [name for name in self.profile_fields if name in columns]
        if clash:
            raise ValueError(f"profile_fields: {clash} are the user id / gender / age / job columns")
        self.domain()  # the rest (a bad template, a repeated or non-identifier field) fails here, named
        return self

    def stem(self, folder: Path) -> str:
        return self.name or folder.name

    def profile_slots(self) -> tuple[str, ...]:
        return tuple(
            slot
            for slot, column in (
                ("gender", self.gender_field),
                ("job", self.job_field),
                ("age", self.age_field),
            )
            if column
        )

    def domain(self) -> Domain:
        """The prompt's words for this data set."""
        words = self.prompt
        rating = words.rating or ("label" if self.label_field else "stars")
        return Domain(
            noun=words.noun,
            plural=words.plural or f"{words.noun}s",
            verb=words.verb,
            verb_next=words.verb_next,
            kind=words.kind or words.noun,
            rating=rating,
            profile=self.profile_slots(),
            item_text=words.item_text,
            extra_profile=tuple(self.profile_fields),
        )

    def fingerprint(self) -> str:
        """The settings that change the samples (not the wording), for the samples' cache key."""
        # Profile columns do not change the samples; left out when empty so that configs from before
        # the key existed keep their cache key.
        keys = self.model_dump(
            exclude={"prompt", "name"} | (set() if self.profile_fields else {"profile_fields"})
        )
        return json.dumps(keys, sort_keys=True)


ML100K = DatasetConfig(
    name="ml-100k",
    title_field="movie_title",
    category_field="class",
    gender_field="gender",
    age_field="age",
    job_field="occupation",
    profile_preset="movielens",
    prompt=PromptWords(
        noun="movie",
        verb="watched",
        verb_next="watch",
        kind="film",
        rating="stars",
        item_text="Here is a {noun}. Its title is {title}. The {noun}'s genre is {genre}.",
    ),
)


def load_config(folder: Path, overrides: dict[str, Any] | None = None) -> DatasetConfig:
    """`folder/dataset.toml` (when present) with `overrides` on top; errors name the file and key."""
    path = folder / CONFIG_FILE
    values: dict[str, Any] = {}
    if path.exists():
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise DataError(f"{path}: {err}") from err
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return DatasetConfig.model_validate(values)
    except ValidationError as err:
        where = path if path.exists() else "dataset config"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        raise DataError(f"{where}: {problems}") from err
