"""RecBole atomic files (`NAME.inter`, `NAME.item`, `NAME.user`): the recommender ecosystem's
common format, and the one format every data set enters rellax through.

An atomic file is tab-separated text whose header names each column with its type,
`name:type`, type one of RecBole's `token`, `token_seq`, `float`, `float_seq`. Values are read as
text and checked here, so a bad file fails with the file, line and field rather than deep inside
training (https://recbole.io/docs/user_guide/data/atomic_files.html).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rellax.errors import DataError

__all__ = ["TYPES", "AtomicTable", "read_atomic"]

TYPES = ("token", "token_seq", "float", "float_seq")


@dataclass(frozen=True)
class AtomicTable:
    """One atomic file: its columns as text (header types stripped), their types, and its path."""

    path: Path
    frame: pd.DataFrame
    types: dict[str, str]
    parts: tuple[tuple[Path, int], ...] = ()  # (file, first row) when stacked from several files

    def require(self, *columns: str, why: str = "") -> None:
        """Fail naming the file and the missing column(s)."""
        missing = [c for c in columns if c not in self.types]
        if missing:
            reason = f" ({why})" if why else ""
            raise DataError(
                f"{self.path}: missing required column(s) {missing}{reason}; "
                f"the header has {[f'{c}:{t}' for c, t in self.types.items()]}"
            )

    def where(self, row: int) -> str:
        """'FILE: line N' of data row `row` (line 1 is each file's header)."""
        path, start = next((p, s) for p, s in reversed(self.parts or ((self.path, 0),)) if s <= row)
        return f"{path}: line {row - start + 2}"

    @classmethod
    def concat(cls, tables: list[AtomicTable], column: str, values: list[str]) -> AtomicTable:
        """Tables with one header stacked into one, each row tagged `column` = its table's value."""
        first = tables[0]
        for t in tables[1:]:
            if t.types != first.types:
                raise DataError(
                    f"{t.path}: header {list(t.types)} differs from {first.path}'s {list(first.types)}"
                )
        frames, parts, start = [], [], 0
        for t, value in zip(tables, values, strict=True):
            frames.append(t.frame.assign(**{column: value}))
            parts.append((t.path, start))
            start += len(t.frame)
        frame = pd.concat(frames, ignore_index=True)
        return cls(first.path, frame, {**first.types, column: "token"}, tuple(parts))

    def floats(self, column: str) -> pd.Series:
        """A column as float, failing on the first value that is not a number."""
        values = pd.to_numeric(self.frame[column], errors="coerce")
        bad = values.isna() & (self.frame[column].str.strip() != "")
        empty = self.frame[column].str.strip() == ""
        first = (bad | empty).to_numpy().nonzero()[0]
        if len(first):
            row = int(first[0])
            raise DataError(
                f"{self.where(row)}, field {column!r}: {self.frame[column].iloc[row]!r} is not a number"
            )
        return values.astype(float)


def read_atomic(path: Path, *, required: bool = True) -> AtomicTable | None:
    """Read one atomic file; None when it is absent and not required."""
    if not path.exists():
        if required:
            raise DataError(f"{path} does not exist")
        return None
    with path.open(encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    types: dict[str, str] = {}
    for field in header:
        name, sep, kind = field.partition(":")
        if not sep or not name:
            raise DataError(
                f"{path}: line 1, field {field!r}: the header needs name:type (e.g. user_id:token)"
            )
        if kind not in TYPES:
            raise DataError(
                f"{path}: line 1, field {name!r}: unknown type tag {kind!r} (one of {list(TYPES)})"
            )
        if name in types:
            raise DataError(f"{path}: line 1, field {name!r}: the column appears twice")
        types[name] = kind
    # Read as text with no quoting (titles hold quotes); pandas reports ragged rows itself.
    try:
        frame = pd.read_csv(
            path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE, skiprows=1, header=None
        )
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame(columns=range(len(header)))
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: {err}") from err
    if frame.shape[1] != len(header):
        raise DataError(f"{path}: rows have {frame.shape[1]} fields, the header names {len(header)}")
    frame.columns = list(types)
    return AtomicTable(path, frame, types)
