"""One entry point for 'the data set': the bundled ML-100K by default, else a folder of RecBole
atomic files (with its `dataset.toml`) or of ML-1M `.dat` files (converted to atomic files once).

The data set in use is the `source` argument, else `RELLAX_DATASET`, else the bundled ML-100K;
every artefact built from it is keyed by `dataset_key` so two data sets never share a cache entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import structlog

from data.config import load_config
from data.dataset import Dataset, read_dataset
from data.movielens import convert_ml1m, load_ml100k
from data.samples import Samples, load_or_build_samples
from rellax.assets import movielens_100k_dir
from rellax.errors import DataError
from rellax.paths import cache_dir

__all__ = [
    "BUNDLED_KEY",
    "artefact_dir",
    "check_same_data",
    "current_key",
    "default_index_dir",
    "dataset_key",
    "dataset_source",
    "load_dataset",
    "read_source",
]

BUNDLED_KEY = "ml100k"  # the bundled data set's key: the cache layout it has always had
log = structlog.get_logger(__name__)


def dataset_source(source: Path | str | None = None) -> Path | None:
    """The folder in use: `source`, else `RELLAX_DATASET`, else None (the bundled ML-100K)."""
    value = source if source is not None else os.environ.get("RELLAX_DATASET") or None
    return Path(value).expanduser() if value else None


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def read_source(source: Path | str | None = None) -> Dataset:
    """The tables of the data set in use (see `dataset_source`)."""
    folder = dataset_source(source)
    if folder is None:
        return load_ml100k(movielens_100k_dir())
    if not folder.is_dir():
        raise DataError(f"data set folder {folder} does not exist")
    if any(folder.glob("*.inter")):
        return read_dataset(folder, load_config(folder))
    dat = [folder / n for n in ("users.dat", "movies.dat", "ratings.dat")]
    if all(p.exists() for p in dat):
        target = cache_dir("datasets") / f"ml-1m-{_digest(dat)[:12]}"
        if not (target / "ml-1m.inter").exists():
            convert_ml1m(folder, target)
        return read_dataset(target, load_config(target))
    raise DataError(f"{folder}: no RecBole atomic files (NAME.inter, NAME.item) and no ML-1M .dat files")


def dataset_key(data: Dataset) -> str:
    """Cache key of a data set: `ml100k` for the bundled one, else its name and a content hash."""
    if data.sources and data.sources[0].parent == movielens_100k_dir() and data.name == "ml-100k":
        return BUNDLED_KEY
    return f"{data.name}-{_digest(list(data.sources))[:12]}"


@functools.lru_cache(maxsize=8)
def _key_of(source: str | None) -> str:
    return dataset_key(read_source(source))


def current_key() -> str:
    """The key of the data set in use (`RELLAX_DATASET` or the bundled ML-100K)."""
    source = dataset_source()
    return _key_of(str(source) if source else None)


def artefact_dir(kind: str, bundled: str, key: str | None = None) -> Path:
    """Where an artefact of the data set in use lives: `cache/<kind>/<bundled>` for the bundled
    ML-100K (the layout it has always had), `cache/<kind>/<key>` for any other data set."""
    key = key or current_key()
    return cache_dir(kind) / (bundled if key == BUNDLED_KEY else key)


def default_index_dir(model_dir: Path | None = None) -> Path:
    """The item index of the data set in use, embedded by the default LLM or by `model_dir`."""
    folder = artefact_dir("index", "ml100k")
    if model_dir is None:
        return folder
    tag = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:8]
    return folder.with_name(f"{folder.name}-{Path(model_dir).name}-{tag}")


def check_same_data(what: str, path: Path, recorded: dict | None, manifest: dict) -> None:
    """Refuse to build on an artefact made from other data: compare its recorded source hash."""
    if not recorded or not recorded.get("source_hash"):
        return  # older artefacts recorded none: nothing to compare
    if recorded["source_hash"] != manifest["source_hash"]:
        raise DataError(
            f"{what} at {path} was built from another data set "
            f"({recorded.get('dataset', 'unknown')}, source {recorded['source_hash'][:12]}) than the one in "
            f"use ({manifest.get('dataset')}, source {manifest['source_hash'][:12]}): rebuild it for this "
            "data set or point RELLAX_DATASET / --dataset at the data it came from"
        )


def recorded_data(path: Path) -> dict | None:
    """The `data` record of an artefact's metrics.json / meta.json, when it has one."""
    for name in ("metrics.json", "meta.json", "run.json"):
        if (path / name).exists():
            data = json.loads((path / name).read_text()).get("data")
            if isinstance(data, dict):
                return data
    return None


def load_dataset(source: Path | str | None = None) -> tuple[Dataset, Samples, dict]:
    """Tables, cached samples and their manifest (which names the data set and its key)."""
    data = read_source(source)
    samples, manifest = load_or_build_samples(data, cache_dir("samples"))
    manifest = {**manifest, "dataset": data.name, "dataset_key": dataset_key(data)}
    log.info(
        "data set",
        dataset=data.name,
        key=manifest["dataset_key"],
        source=str(data.sources[0].parent) if data.sources else None,
        samples=len(samples),
    )
    return data, samples, manifest
