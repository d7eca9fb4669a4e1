"""Request and response models of the HTTP API (pydantic v2).

Every field carries a description (it is the API documentation) and every model forbids unknown
fields: there is no compatibility to keep, and a typo such as `itemids` must fail loudly rather than
score nothing. Requests convert themselves into domain records; responses are built from them.
Limits that depend on settings (candidates per request) are checked by the scoring pipeline, which
answers the same 422 shape a static limit gives.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rellax.entities import HistoryEvent, Profile

__all__ = [
    "ErrorDetail",
    "ErrorResponse",
    "EventIn",
    "EventsRequest",
    "EventsResponse",
    "HealthResponse",
    "HistoryResponse",
    "ItemKey",
    "MAX_EVENTS",
    "ProfileIn",
    "ReadyResponse",
    "RerankRequest",
    "RerankResponse",
    "RerankedItem",
    "ScoreRequest",
    "ScoreResponse",
    "ScoredItem",
    "StoredEvent",
    "Timing",
    "UserId",
]

MAX_EVENTS = 1000  # events per ingest call; a bulk import uses `rellax load-history`

INT64_MAX = 2**63 - 1


def _user_id(value: object) -> object:
    """Ids are strings; a JSON integer in int64 range is taken as its decimal string.

    Floats (1.5), booleans and integers beyond int64 are rejected: pydantic's lax mode would turn
    them into strings such as "1.5" or "True" and score a user nobody has.
    """
    if isinstance(value, bool | float):
        raise ValueError("must be a string or an integer")
    if isinstance(value, int):
        if not 0 <= value <= INT64_MAX:
            raise ValueError(f"integer user ids must fit in int64 (0..{INT64_MAX})")
        return str(value)
    return value


def _item_id(value: object) -> object:
    """A JSON integer, or a string of decimal digits; never a bool (true is not item 1) or a float."""
    if isinstance(value, bool | float):
        raise ValueError("must be an integer")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit():
            raise ValueError("must be an integer (or a string of digits)")
        return int(value)
    return value


# User ids are opaque strings (integers are accepted and turned into strings): safe in a Redis key.
UserId = Annotated[
    str,
    BeforeValidator(_user_id),
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:@-]+$",
        description="Your user id: 1-64 characters of letters, digits and _ . : @ - (or an integer "
        "in int64 range, taken as its decimal string).",
        examples=["196"],
    ),
]
ItemId = Annotated[
    int,
    BeforeValidator(_item_id),
    Field(ge=1, le=2**31 - 1, description="Catalogue item id: an integer (a string of digits is accepted)."),
]
# The data set's own item ids (the `.item` file's, e.g. "B000FA64PK"): what a client of a catalogue
# with string ids sends instead of the integer ids; looked up in the loaded bundle's catalogue.
ItemKey = Annotated[
    str,
    Field(min_length=1, max_length=256, description="The data set's own item id (the .item file's id)."),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _duplicates(values: list) -> list:  # noqa: ANN001 - ints or strings
    seen: set = set()
    return sorted({v for v in values if v in seen or seen.add(v)})


class ScoreRequest(_Model):
    """Score candidates for one user: give `item_ids` (integers) or `item_keys` (your own ids)."""

    candidates_required: ClassVar[bool] = True  # /v1/rerank without candidates retrieves its own

    user_id: UserId
    item_ids: list[ItemId] | None = Field(
        None,
        min_length=1,
        description="Candidate item ids, no duplicates; at most RELLAX_MAX_CANDIDATES (default 200).",
        examples=[[50, 181, 258]],
    )
    item_keys: list[ItemKey] | None = Field(
        None,
        min_length=1,
        description="Instead of item_ids: the candidates by the data set's own item ids (string ids of "
        "your .item file), no duplicates. Unknown keys are a 404 naming them.",
        examples=[["B000FA64PK", "0316015849"]],
    )

    @field_validator("item_ids", "item_keys")
    @classmethod
    def _no_duplicates(cls, values: list | None, info: ValidationInfo) -> list | None:
        if values and (dups := _duplicates(values)):
            what = "item ids" if info.field_name == "item_ids" else "item keys"
            raise ValueError(f"duplicate {what} {dups[:20]}")
        return values

    @model_validator(mode="after")
    def _one_way_to_name_candidates(self) -> Self:
        if self.item_ids is not None and self.item_keys is not None:
            raise ValueError("give item_ids or item_keys, not both")
        if self.item_ids is None and self.item_keys is None and self.candidates_required:
            raise ValueError("item_ids (or item_keys) is required")
        return self


class RerankRequest(ScoreRequest):
    """Rank candidates (or, without item_ids, LLM-SRec's own retrieval) for one user, best first."""

    candidates_required: ClassVar[bool] = False

    item_ids: list[ItemId] | None = Field(  # type: ignore[assignment]
        None,
        min_length=1,
        description="Candidate item ids, no duplicates. Omit them to rank LLM-SRec's top n_candidates "
        "from the catalogue (items already in the history excluded). At most RELLAX_MAX_CANDIDATES "
        "for strategy rellax, RELLAX_MAX_RANK_CANDIDATES for llmsrec and cascade.",
        examples=[[50, 181, 258]],
    )
    strategy: Literal["rellax", "llmsrec", "cascade"] = Field(
        "rellax",
        description="rellax: ReLLaX scores every candidate. llmsrec: one LLM-SRec user pass, then a dot "
        "product per candidate. cascade: LLM-SRec ranks all, ReLLaX re-scores its top m.",
    )
    m: int | None = Field(
        None, ge=1, strict=True, description="Cascade only: how many to re-score (default RELLAX_CASCADE_M)."
    )
    n_candidates: int | None = Field(
        None, ge=1, strict=True,
        description="Without item_ids only: candidates to retrieve (default RELLAX_GENERATE_N).",
    )  # fmt: skip
    top_k: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Return only the best top_k items (omit it for all; null is an error).",
    )

    item_keys: list[ItemKey] | None = Field(  # type: ignore[assignment]
        None,
        min_length=1,
        description="Instead of item_ids: the candidates by the data set's own item ids, no duplicates.",
        examples=[["B000FA64PK", "0316015849"]],
    )

    @field_validator("top_k", "m", "n_candidates", "item_ids", "item_keys", mode="before")
    @classmethod
    def _no_null(cls, value: object) -> object:
        # Omitted means the default; an explicit null is a client bug that would silently change it.
        if value is None:
            raise ValueError("must not be null; omit the field for its default")
        return value


class Timing(_Model):
    """Where the time of this request went, in milliseconds."""

    total_ms: float = Field(description="Wall time inside the service.")
    stages_ms: dict[str, float] = Field(
        description="Per stage: redis, prepare (= subr + crm + prompt, each also listed when the bundle "
        "reports it), queue_wait (waiting for other requests' batches, the batch window and the model "
        "thread), model (the model's time on the batches carrying this request's candidates)."
    )
    model_batches: int = Field(
        0, ge=0, description="Model batches that carried this request's candidates (RELLAX_MAX_BATCH each)."
    )


class ScoredItem(_Model):
    """One candidate's score."""

    item_id: int = Field(description="The candidate item id.")
    item_key: str = Field(description="The data set's own id of the item (the item id for integer ids).")
    p_click: float = Field(ge=0, le=1, description="P(click) = P('Yes') from the LLM (or DIN if degraded).")
    retrieved: list[int] = Field(description="History item ids shown to the model, in prompt order.")
    degraded: bool = Field(description="True when scored by the DIN fallback instead of the LLM.")


class ScoreResponse(_Model):
    """Scores in request order."""

    user_id: str = Field(description="The user scored.")
    model_version: str = Field(description="Version of the bundle that scored.")
    cold_start: bool = Field(description="True when the user has no stored history (empty-history prompt).")
    degraded: bool = Field(description="True when any score came from the DIN fallback.")
    items: list[ScoredItem] = Field(description="One entry per requested item id, in request order.")
    timing: Timing = Field(description="Latency breakdown.")


class RerankedItem(_Model):
    """One candidate with its rank and the model whose score placed it."""

    item_id: int = Field(description="The candidate item id.")
    item_key: str = Field(description="The data set's own id of the item (the item id for integer ids).")
    rank: int = Field(ge=1, description="1 = most likely click.")
    scored_by: Literal["rellax", "llmsrec", "din"] = Field(
        description="Whose score set the rank: rellax (P(click) from the LLM), llmsrec (the user . item dot "
        "product; with cascade, the candidates below the top m), din (the degraded fallback)."
    )
    p_click: float | None = Field(
        ge=0,
        le=1,
        description="P(click) from ReLLaX (or DIN if degraded); null when LLM-SRec alone scored it.",
    )
    llmsrec_score: float | None = Field(
        description="LLM-SRec's user . item dot product (strategies llmsrec and cascade); null otherwise."
    )
    retrieved: list[int] = Field(
        description="History item ids shown to the model that scored it, in prompt order."
    )
    degraded: bool = Field(description="True when scored by the DIN fallback instead of the LLM.")


class RerankResponse(_Model):
    """Candidates best first."""

    user_id: str = Field(description="The user scored.")
    model_version: str = Field(description="Version of the bundle that scored.")
    strategy: Literal["rellax", "llmsrec", "cascade"] = Field(description="The strategy that ranked.")
    generated: bool = Field(
        description="True when the candidates came from LLM-SRec's retrieval (no item_ids)."
    )
    cold_start: bool = Field(description="True when the user has no stored history.")
    degraded: bool = Field(description="True when any score came from the DIN fallback.")
    items: list[RerankedItem] = Field(
        description="Best first (with cascade: the re-scored top m by p_click, then the rest by "
        "llmsrec_score); ties keep request order."
    )
    timing: Timing = Field(description="Latency breakdown.")


class EventIn(_Model):
    """One interaction of the user; the item by `item_id` or by the data set's own `item_key`."""

    item_id: ItemId | None = Field(None, description="Catalogue item id (or give item_key).")
    item_key: ItemKey | None = Field(None, description="Instead of item_id: the data set's own item id.")
    rating: float = Field(
        strict=True,
        description="Explicit rating on the bundle's scale (MovieLens: whole stars 1-5; label = rating > 3). "
        "Checked against the loaded bundle's rating_min/rating_max/rating_step; a number, never a boolean "
        "or a string.",
    )
    timestamp: int = Field(ge=0, le=2**42, strict=True, description="Unix time in seconds (an integer).")

    @field_validator("rating", mode="before")
    @classmethod
    def _number(cls, rating: object) -> object:
        if isinstance(rating, bool) or not isinstance(rating, int | float):
            raise ValueError("must be a number")
        return float(rating)

    @model_validator(mode="after")
    def _one_item(self) -> Self:
        if (self.item_id is None) == (self.item_key is None):
            raise ValueError("give item_id or item_key (exactly one)")
        return self

    def to_event(self, item_id: int | None = None) -> HistoryEvent:
        """The stored event; `item_id` is the catalogue id an `item_key` resolved to."""
        resolved = self.item_id if item_id is None else item_id
        assert resolved is not None, "an item_key event needs its resolved item_id"
        return HistoryEvent(item_id=resolved, rating=self.rating, timestamp=self.timestamp)


class EventsRequest(_Model):
    """A batch of interactions; replaying an event is harmless (it is stored once)."""

    events: list[EventIn] = Field(
        min_length=1, max_length=MAX_EVENTS, description=f"1-{MAX_EVENTS} interactions, any order."
    )

    def to_events(self, item_ids: list[int] | None = None) -> list[HistoryEvent]:
        """The stored events; `item_ids` are the catalogue ids, one per event, where keys were given."""
        return [e.to_event(None if item_ids is None else item_ids[n]) for n, e in enumerate(self.events)]


class EventsResponse(_Model):
    """What the ingest did."""

    user_id: str = Field(description="The user written.")
    received: int = Field(description="Events in the request.")
    added: int = Field(description="Events that were new (replays are not counted).")
    history_len: int = Field(description="Events stored for the user after capping.")


ProfileField = Annotated[
    str, StringConstraints(min_length=1, max_length=48, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
]
ProfileValue = Annotated[
    str, StringConstraints(min_length=1, max_length=48, pattern=r"^[A-Za-z0-9 /&'.+-]+$")
]


class ProfileIn(_Model):
    """A user's profile as the prompt states it."""

    gender: Literal["male", "female", "unknown"] = Field("unknown", description="Gender.")
    age: str = Field(
        "unknown",
        min_length=1,
        max_length=48,
        pattern=r"^[A-Za-z0-9 /&'.+-]+$",
        description="Age as the bundle's data set writes it, one of the values its DIN knows or 'unknown' "
        "(MovieLens: the ML-1M buckets 'under 18', '18-24', '25-34', '35-44', '45-49', '50-55', "
        "'above 56'); another value is a 422 listing the known ones.",
    )
    job: str = Field(
        "unknown",
        min_length=1,
        max_length=48,
        pattern=r"^[A-Za-z0-9 /&'.-]+$",
        description="Occupation in words, e.g. 'programmer'.",
    )
    extra: dict[ProfileField, ProfileValue] = Field(
        default_factory=dict,
        max_length=32,
        description="The data set's own profile fields (its `profile_fields`), by name, e.g. "
        "{'country': 'France'}; a name the bundle's data set does not have is a 422 listing those it has.",
    )

    def to_profile(self) -> Profile:
        extra = tuple(self.extra.items())  # Profile sorts them
        return Profile(gender=self.gender, age=self.age, job=self.job, extra=extra)

    @classmethod
    def from_profile(cls, profile: Profile) -> ProfileIn:
        return cls(gender=profile.gender, age=profile.age, job=profile.job, extra=dict(profile.extra))


class ItemInfo(_Model):
    """One catalogue item as the bundle knows it."""

    item_id: int = Field(description="The item id the API takes (candidates, events).")
    key: str = Field(description="The data set's own id for the item (the item id itself for integer ids).")
    title: str = Field(description="The title the prompt shows.")
    category: str = Field(description="The item's category (first token of the data set's category field).")


class StoredEvent(_Model):
    """One stored interaction, as the prompt and DIN read it."""

    item_id: int = Field(description="Catalogue item id.")
    rating: float = Field(description="The rating on the bundle's scale.")
    timestamp: int = Field(description="Unix time in seconds.")


class HistoryResponse(_Model):
    """A user's stored state, for debugging."""

    user_id: str = Field(description="The user.")
    cold_start: bool = Field(description="True when nothing is stored for the user.")
    profile: ProfileIn | None = Field(description="Stored profile, or null when none.")
    events: list[StoredEvent] = Field(description="Stored events, oldest first (at most RELLAX_HISTORY_CAP).")


class HealthResponse(_Model):
    """Liveness."""

    status: Literal["ok"] = Field(description="Always ok while the process answers.")


class ReadyResponse(_Model):
    """Readiness: each check and the overall verdict."""

    ready: bool = Field(description="True when every check passes.")
    checks: dict[str, bool] = Field(description="accepting (not draining), bundle, redis, canary, batcher.")
    model_version: str | None = Field(description="Loaded bundle version.")
    dtype: str | None = Field(
        None, description="Dtype the model computes in (RELLAX_DTYPE resolved): float32, bfloat16 or float16."
    )
    candidates_per_s: float | None = Field(
        None, description="Model candidates/s measured at start-up on one batch of real-sized prompts."
    )
    fits_in_deadline: int | None = Field(
        None, description="Candidates one request can have scored within RELLAX_DEADLINE_MS at that rate."
    )
    malloc_tuned: bool = Field(
        False,
        description="The process started with rellax's glibc malloc settings (faster CPU scoring; "
        "RELLAX_MALLOC_TUNING).",
    )


class ErrorDetail(_Model):
    """What went wrong, shaped like OpenAI's and vLLM's error body."""

    message: str = Field(description="Human-readable explanation naming the offending field or ids.")
    type: str = Field(description="Error class, e.g. invalid_request_error, overloaded, internal_error.")
    param: str | None = Field(None, description="The request field at fault, if any.")
    code: str | None = Field(None, description="Machine-readable reason, e.g. unknown_item.")
    error_id: str | None = Field(None, description="Id to find this error in the logs (5xx only).")


class ErrorResponse(_Model):
    """Body of every non-2xx response."""

    error: ErrorDetail = Field(description="The error.")
