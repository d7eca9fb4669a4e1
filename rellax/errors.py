"""The rellax error tree, readable in one screen.

RellaxError
├── AssetError         a packaged asset (model wheel, data wheel) is missing or corrupt
├── BundleError        a bundle is missing a file, has a bad checksum or a wrong format version
├── DataError          an input table does not follow the expected layout
├── UnknownItem        an item id is not in the catalogue (carries the ids)
├── HistoryStoreError  the history store (Redis) cannot be reached or answered badly
├── BackendError       the scoring backend failed
└── RunError           a training run cannot go on as asked (a checkpoint from another world size)
"""

from __future__ import annotations

__all__ = [
    "AssetError",
    "BackendError",
    "BundleError",
    "DataError",
    "HistoryStoreError",
    "RellaxError",
    "RunError",
    "UnknownItem",
]


class RellaxError(Exception):
    """Base of every error rellax raises on purpose."""


class AssetError(RellaxError):
    """A packaged asset is missing or does not match its checksum."""


class BundleError(RellaxError):
    """A bundle cannot be loaded: missing file, checksum mismatch, format version."""


class DataError(RellaxError):
    """An input table does not follow the expected layout."""


class UnknownItem(RellaxError, KeyError):
    """One or more item ids are not in the catalogue."""

    def __init__(self, item_ids: list[int] | tuple[int, ...]) -> None:
        self.item_ids = list(item_ids)
        super().__init__(f"unknown item id(s): {self.item_ids}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return f"unknown item id(s): {self.item_ids}"


class HistoryStoreError(RellaxError):
    """The history store cannot be reached or answered badly."""


class BackendError(RellaxError):
    """The scoring backend failed."""


class RunError(RellaxError):
    """A training run cannot go on as asked: its checkpoint was written under another world size."""
