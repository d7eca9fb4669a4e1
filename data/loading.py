"""One entry point for 'the data set': bundled ML-100K by default, ML-1M when a folder is given."""

from __future__ import annotations

from pathlib import Path

from data.movielens import MovieLens, load_ml1m, load_ml100k
from data.samples import Samples, load_or_build_samples
from rellax.assets import movielens_100k_dir
from rellax.paths import cache_dir

__all__ = ["load_dataset"]


def load_dataset(ml1m: Path | None = None) -> tuple[MovieLens, Samples, dict]:
    """Tables, cached samples and their manifest."""
    data = load_ml1m(ml1m) if ml1m else load_ml100k(movielens_100k_dir())
    samples, manifest = load_or_build_samples(data, cache_dir("samples"))
    return data, samples, manifest
