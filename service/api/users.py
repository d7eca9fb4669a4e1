"""User state: ingest events, set a profile, read back the stored history (debugging)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.api.items import resolve_item_keys
from service.deps import BundleDep, StoreDep
from service.errors import InvalidRequest, LimitExceeded
from service.schemas import (
    EventsRequest,
    EventsResponse,
    HistoryResponse,
    ProfileIn,
    StoredEvent,
)

__all__ = ["router"]

router = APIRouter(prefix="/users", tags=["users"])

UserPath = Annotated[
    str,
    Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$", description="Your user id."),
]


@router.post("/{user_id}/events", response_model=EventsResponse)
async def add_events(
    user_id: UserPath, body: EventsRequest, store: StoreDep, bundle: BundleDep
) -> EventsResponse:
    """Append interactions; replaying an event stores it once; the newest RELLAX_HISTORY_CAP are kept.

    Ratings must lie on the loaded bundle's scale (MovieLens: whole stars 1-5): the prompt writes
    them as stars and DIN embeds them, so an off-scale value would be silently rounded or clipped.
    Nothing is stored when any event is rejected.
    """
    item_ids: list[int] = []
    for n, event in enumerate(body.events):
        if (problem := bundle.config.rating_error(event.rating)) is not None:
            raise LimitExceeded(f"events.{n}.rating: {problem}", param=f"events.{n}.rating")
        if event.item_key is not None:
            item_ids += resolve_item_keys(bundle, [event.item_key], param=f"events.{n}.item_key")
        else:
            item_ids.append(event.item_id)  # type: ignore[arg-type] - one of the two is set
    added, stored = await store.append(user_id, body.to_events(item_ids))
    return EventsResponse(user_id=user_id, received=len(body.events), added=added, history_len=stored)


@router.put("/{user_id}/profile", response_model=ProfileIn)
async def put_profile(user_id: UserPath, body: ProfileIn, store: StoreDep, bundle: BundleDep) -> ProfileIn:
    """Set the user's profile (gender, age, job, and the data set's own fields in `extra`) as the
    prompt will state it.

    The age must be one the bundle's DIN knows (MovieLens: the ML-1M buckets) or "unknown": the
    prompt states it as written and DIN embeds it, so a value from another scale would read right
    and be embedded as unknown. An `extra` field the data set does not have would never reach the
    prompt or DIN: refused, naming it."""
    known = bundle.profile_values("ages")
    if known is not None and body.age != "unknown" and body.age not in known:
        shown = ", ".join(repr(v) for v in known[:20])
        message = f"age: {body.age!r} is not an age this bundle knows ({shown}, or 'unknown')"
        raise InvalidRequest(message, param="age")
    fields = bundle.featurizer.domain.extra_profile
    for name in body.extra:
        if name not in fields:
            has = f"its fields: {', '.join(fields)}" if fields else "it has none"
            message = f"extra.{name}: not a profile field of this bundle's data set ({has})"
            raise InvalidRequest(message, param=f"extra.{name}")
    await store.set_profile(user_id, body.to_profile())
    return body


@router.get("/{user_id}/history", response_model=HistoryResponse)
async def get_history(user_id: UserPath, store: StoreDep) -> HistoryResponse:
    """The stored events (oldest first) and profile of a user."""
    state = await store.fetch(user_id)
    return HistoryResponse(
        user_id=user_id,
        cold_start=state.cold_start and state.profile is None,
        profile=ProfileIn.from_profile(state.profile) if state.profile else None,
        events=[
            StoredEvent(item_id=e.item_id, rating=e.rating, timestamp=e.timestamp) for e in state.history
        ],  # fmt: skip
    )
