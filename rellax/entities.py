"""Plain records shared by training and serving: a profile, an item, one history event."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AGE_BUCKETS", "JOBS", "HistoryEvent", "Item", "Profile"]

# MovieLens-1M age codes -> the bucket text of the prompt (docs/design.md §3).
AGE_BUCKETS: dict[int, str] = {
    1: "under 18",
    18: "18-24",
    25: "25-34",
    35: "35-44",
    45: "45-49",
    50: "50-55",
    56: "above 56",
}

# MovieLens-1M occupation codes 0..20.
JOBS: list[str] = [
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
]


@dataclass(frozen=True, slots=True)
class Profile:
    """A user's profile in prompt terms. `gender` is "male", "female" or "unknown"; `extra` holds
    the data set's own profile fields beyond these three (`profile_fields` of its config), as
    (field, value) pairs."""

    gender: str = "unknown"
    age: str = "unknown"
    job: str = "unknown"
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # One order whatever the source (a data set's config order, a JSON object, a Redis hash):
        # two profiles with the same fields compare and hash equal. Prompts follow the domain's own
        # field order (Domain.extra_profile), never this one.
        object.__setattr__(self, "extra", tuple(sorted((str(k), str(v)) for k, v in self.extra)))

    def value(self, name: str) -> str:
        """One extra field's value; "unknown" where the profile does not have it."""
        return next((v for k, v in self.extra if k == name), "unknown")


@dataclass(frozen=True, slots=True)
class Item:
    """A catalogue item: `title` without the year, `genre` is the first genre."""

    item_id: int
    title: str
    genre: str


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One past interaction of a user."""

    item_id: int
    rating: float
    timestamp: int
