"""The ReLLa sample protocol (docs/design.md §3) on a hand-made log and on ML-100K."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.config import load_config
from data.dataset import Dataset, ml100k_age_bucket, read_dataset
from data.movielens import convert_ml1m, load_ml100k
from data.samples import build_samples, load_or_build_samples
from rellax.errors import DataError


def _log(rows: list[tuple[int, int, float, int]]) -> Dataset:
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return Dataset(pd.DataFrame(), pd.DataFrame(), inter, ())


def test_hand_made_log_gives_exact_samples_and_split() -> None:
    # user 1: 8 events at t=1..8; user 2: 7 events at t=1..7 (interleaved); user 2's t=3 has two items.
    rows = [(1, 100 + t, float(1 + t % 5), t) for t in range(1, 9)]
    rows += [(2, 200 + t, 4.0, t) for t in range(1, 7)] + [(2, 199, 2.0, 3)]
    s = build_samples(_log(rows), min_history=5)
    # global order: (ts, user, item). user 1 samples: positions 5,6,7 -> items 106,107,108 (t=6,7,8);
    # user 2 sequence: 201,202,199,203,204,205,206 -> sample at pos 5 (205, t=5), pos 6 (206, t=6).
    got = [(s.user_id(i), int(s.item_id[i]), int(s.hist_len[i])) for i in range(len(s))]
    assert got == [(2, 205, 5), (1, 106, 5), (2, 206, 6), (1, 107, 6), (1, 108, 7)]
    assert s.history(2)[0].tolist() == [201, 202, 199, 203, 204, 205]
    assert s.history(1, last=2)[0].tolist() == [104, 105]
    assert s.label.tolist() == [int(r > 3) for r in s.rating]
    # 5 samples, 8:1:1 with floors -> 4 / 0 / 1
    assert s.split.tolist() == [0, 0, 0, 0, 2]


def test_split_sizes_follow_floor_rule() -> None:
    rows = [(u, 1000 * u + t, 5.0, t) for u in range(1, 4) for t in range(20)]
    s = build_samples(_log(rows), min_history=5)
    n = len(s)
    assert n == 45
    assert [len(s.indices(x)) for x in ("train", "valid", "test")] == [36, 4, 5]


def test_ml100k_protocol(ml100k: Dataset, ml100k_samples) -> None:  # noqa: ANN001
    s = ml100k_samples
    assert len(s) == 95285
    assert [len(s.indices(x)) for x in ("train", "valid", "test")] == [76228, 9528, 9529]
    assert (s.hist_len >= 5).all()
    assert np.all(np.diff(s.timestamp) >= 0)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(s), 300, replace=False):
        items, _, ts = s.history(int(i))
        assert len(items) == s.hist_len[i]
        assert (ts <= s.timestamp[i]).all()
        assert s.item_id[i] not in items[-1:]  # ML-100K has no repeated (user, item)
    assert s.timestamp[s.indices("test")].min() >= s.timestamp[s.indices("train")].max()
    assert s.timestamp[s.indices("valid")].min() >= s.timestamp[s.indices("train")].max()


def test_ml100k_tables(ml100k: Dataset) -> None:
    assert len(ml100k.users) == 943 and len(ml100k.items) == 1682 and len(ml100k.interactions) == 100000
    toy = ml100k.items.set_index("item_id").loc[1]
    assert (toy.title, toy.genre) == ("Toy Story", "Animation")
    assert set(ml100k.users.gender) == {"male", "female"}
    assert ml100k.profile(1).age == "18-24"
    assert [ml100k_age_bucket(a) for a in (7, 18, 24, 25, 49, 50, 56, 73)] == [
        "under 18", "18-24", "18-24", "25-34", "45-49", "50-55", "above 56", "above 56",
    ]  # fmt: skip


def test_samples_cache_round_trip(ml100k: Dataset, tmp_path: Path) -> None:
    a, manifest = load_or_build_samples(ml100k, tmp_path)
    b, manifest2 = load_or_build_samples(ml100k, tmp_path)
    assert manifest == manifest2
    assert manifest["splits"]["train"]["count"] == 76228
    assert np.array_equal(a.item_id, b.item_id) and np.array_equal(a.seq_item, b.seq_item)


def _ml1m(folder: Path) -> Dataset:
    """ML-1M .dat files through the importer (to atomic files) and the one atomic reader."""
    target = convert_ml1m(folder, folder / "atomic")
    return read_dataset(target, load_config(target))


def test_ml1m_layout(tmp_path: Path) -> None:
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n", encoding="latin-1")
    (tmp_path / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Café (1999)::Drama\n", encoding="latin-1"
    )
    (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n2::2::3::978300761\n", encoding="latin-1")
    data = _ml1m(tmp_path)
    assert data.users.to_dict("records")[0] == {
        "user_id": 1,
        "gender": "female",
        "age": "under 18",
        "job": "K-12 student",
    }
    assert data.items.title.tolist() == ["Toy Story", "Café"]
    assert data.items.genre.tolist() == ["Animation", "Drama"]
    (tmp_path / "ratings.dat").write_text("1::1::5\n", encoding="latin-1")
    with pytest.raises(DataError, match="ratings.dat: line 1"):
        _ml1m(tmp_path)


def test_missing_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_ml100k(tmp_path)
