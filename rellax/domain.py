"""The words a data set's prompts use: what an item is called, how a rating reads, which profile
fields exist. One `Domain` drives the CTR prompt, SUBR's item text and LLM-SRec's prompts, so a
book or product catalogue gets its own wording without a code change (docs/design.md §5).

The defaults are Dataset's, and reproduce the ReLLa prompt word for word.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from rellax.entities import Item

__all__ = ["MOVIES", "PROFILE_SLOTS", "Domain", "RatingDisplay"]

RatingDisplay = Literal["stars", "label", "none"]
PROFILE_SLOTS = ("gender", "job", "age")


@dataclass(frozen=True, slots=True)
class Domain:
    """Prompt wording of one data set.

    Attributes:
        noun / plural: what an item is ("movie" / "movies", "book" / "books").
        verb: the past tense of consuming one ("watched", "read", "bought").
        verb_next: its base form, for LLM-SRec's "will ... next" ("watch").
        kind: the word after the category in LLM-SRec's item prompt ("a comedy film").
        rating: how a history entry shows its rating: "stars" ("(4 stars)"), "label" ("(liked)" /
            "(disliked)", for data with a 0/1 label instead of a rating) or "none".
        profile: the profile fields the prompt shows, in the order gender, job, age; without
            "gender" the prompt says "the user" instead of a pronoun.
        item_text: SUBR's item description; `{noun}`, `{title}` and `{genre}` (the item's category)
            are filled in.
        extra_profile: the data set's own profile fields after those, in order; each reads
            "<Possessive> <field, underscores as spaces> is <value>." ("Her country is France.").
    """

    noun: str = "movie"
    plural: str = "movies"
    verb: str = "watched"
    verb_next: str = "watch"
    kind: str = "film"
    rating: RatingDisplay = "stars"
    profile: tuple[str, ...] = PROFILE_SLOTS
    item_text: str = "Here is a {noun}. Its title is {title}. The {noun}'s genre is {genre}."
    extra_profile: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rating not in ("stars", "label", "none"):
            raise ValueError(f"rating must be 'stars', 'label' or 'none', got {self.rating!r}")
        unknown = [p for p in self.profile if p not in PROFILE_SLOTS]
        if unknown:
            raise ValueError(f"profile fields {unknown} are not among {list(PROFILE_SLOTS)}")
        object.__setattr__(self, "profile", tuple(p for p in PROFILE_SLOTS if p in self.profile))
        object.__setattr__(self, "extra_profile", tuple(self.extra_profile))
        bad = [f for f in self.extra_profile if f in PROFILE_SLOTS or not f.isidentifier()]
        if bad or len(set(self.extra_profile)) < len(self.extra_profile):
            raise ValueError(
                f"profile_fields: {list(self.extra_profile)} must be distinct column names "
                f"(letters, digits, _) other than {list(PROFILE_SLOTS)}"
            )
        try:
            self.item_text.format(noun="n", title="t", genre="g")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"item_text may use only {{noun}}, {{title}} and {{genre}}: {self.item_text!r} ({err})"
            ) from err

    def describe(self, item: Item) -> str:
        """SUBR's text for one item."""
        return self.item_text.format(noun=self.noun, title=item.title, genre=item.genre)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["profile"] = list(self.profile)
        data["extra_profile"] = list(self.extra_profile)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Domain:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown domain keys {unknown}; known: {sorted(known)}")
        values = dict(data)
        for key in ("profile", "extra_profile"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


MOVIES = Domain()
