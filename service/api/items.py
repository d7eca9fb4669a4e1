"""The catalogue the loaded bundle scores: an item by id, or by the data set's own id (a data set
with string ids was numbered 1..N for the model; this is how a client maps back and forth)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from rellax.errors import UnknownItem
from service.deps import BundleDep
from service.errors import NotFound
from service.schemas import ErrorResponse, ItemInfo

__all__ = ["router"]

router = APIRouter(prefix="/items", tags=["items"])


def _info(bundle, item_id: int) -> ItemInfo:  # noqa: ANN001 - rellax.bundle.Bundle
    item = bundle.items.get(item_id)
    if item is None:
        raise UnknownItem([item_id])
    return ItemInfo(item_id=item_id, key=bundle.item_key(item_id), title=item.title, category=item.genre)


def resolve_item_keys(bundle, keys: list[str], param: str = "item_keys") -> list[int]:  # noqa: ANN001
    """Catalogue item ids for the data set's own ids, in order; a 404 naming every unknown key."""
    ids = [bundle.item_id_of(key) for key in keys]
    unknown = [key for key, item_id in zip(keys, ids, strict=True) if item_id is None]
    if unknown:
        raise NotFound(f"no item with key(s) {unknown[:20]} in this bundle's catalogue", param=param)
    return ids  # type: ignore[return-value] - no None left


@router.get(
    "",
    response_model=ItemInfo,
    responses={404: {"model": ErrorResponse, "description": "No item has this key; `param` is key."}},
)
async def item_by_key(
    bundle: BundleDep,
    key: Annotated[str, Query(min_length=1, max_length=256, description="The data set's own item id.")],
) -> ItemInfo:
    """The item whose own id (the `.item` file's id) is `key`."""
    item_id = bundle.item_id_of(key)
    if item_id is None:
        raise NotFound(f"no item with key {key!r} in this bundle's catalogue", param="key")
    return _info(bundle, item_id)


@router.get(
    "/{item_id}",
    response_model=ItemInfo,
    responses={404: {"model": ErrorResponse, "description": "Unknown item id, named in the message."}},
)
async def item_by_id(
    bundle: BundleDep, item_id: Annotated[int, Path(ge=1, le=2**31 - 1, description="Catalogue item id.")]
) -> ItemInfo:
    """One catalogue item: its title, category and the data set's own id."""
    return _info(bundle, item_id)
