"""Two honest baselines for the CTR task, fitted on train and judged in the same harness as DIN.

1. `LogisticBaseline`: logistic regression on one-hot user id, item id, gender, age, job and genre
   (no history). C is picked on the valid split from a small grid.
2. `RatingPrior`: score = smoothed mean train rating of the user + smoothed mean train rating of the
   item, each shrunk toward the global mean with k pseudo-ratings (unseen ids score the global
   mean). k is picked on valid; a 1-D logistic (Platt) calibration fitted on *leave-one-out* train
   scores turns the score into a probability, so LogLoss is meaningful and not fitted on a leak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder

from data.dataset import Dataset
from data.samples import Samples
from rellax.entities import Profile
from training.metrics import ctr_metrics

__all__ = ["Fields", "LogisticBaseline", "RatingPrior", "fields_for", "run_baselines"]

CATEGORICAL = ("user_id", "item_id", "gender", "age", "job", "genre")


@dataclass
class Fields:
    """Per-sample columns of one split (all arrays of length n)."""

    user_id: np.ndarray
    item_id: np.ndarray
    gender: np.ndarray
    age: np.ndarray
    job: np.ndarray
    genre: np.ndarray
    rating: np.ndarray
    label: np.ndarray
    index: np.ndarray  # positions in `Samples`
    extra: np.ndarray  # (n, fields) str: the data set's own profile fields (`extra_names`); (n, 0) if none
    extra_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.label)

    def select(self, mask: np.ndarray) -> Fields:
        """The rows where `mask` is true (or at the given positions), every column alike."""
        arrays = [name for name in self.__dataclass_fields__ if name != "extra_names"]
        return Fields(**{name: getattr(self, name)[mask] for name in arrays}, extra_names=self.extra_names)

    def profiles(self) -> list[Profile]:
        """Each row's profile, extra fields included (what DIN encodes)."""
        return [
            Profile(g, a, j, tuple(zip(self.extra_names, map(str, x), strict=True)))
            for g, a, j, x in zip(self.gender, self.age, self.job, self.extra, strict=True)
        ]

    def categorical(self) -> np.ndarray:
        """(n, 6 + extra fields) object array of the one-hot fields, for `OneHotEncoder`."""
        columns = [getattr(self, name).astype(str) for name in CATEGORICAL]
        return np.column_stack([*columns, self.extra.astype(str)]).astype(object)


def fields_for(data: Dataset, samples: Samples, split: str) -> Fields:
    """Join samples of `split` with the users and items tables (unknown user/item -> "unknown")."""
    idx = samples.indices(split)
    user_ids = samples.user_ids[samples.user_row[idx]]
    users = data.users.set_index("user_id")
    genre_of = dict(zip(data.items.item_id.astype(int), data.items.genre.astype(str), strict=True))

    def profile_col(name: str) -> np.ndarray:
        return users[name].reindex(user_ids).fillna("unknown").astype(str).to_numpy()

    item_ids = samples.item_id[idx]
    names = tuple(data.config.profile_fields)
    extra = np.column_stack([profile_col(n) for n in names]) if names else np.empty((len(idx), 0), object)
    return Fields(
        user_id=user_ids,
        item_id=item_ids,
        gender=profile_col("gender"),
        age=profile_col("age"),
        job=profile_col("job"),
        genre=np.array([genre_of.get(int(i), "unknown") for i in item_ids], dtype=object),
        rating=samples.rating[idx].astype(np.float64),
        label=samples.label[idx].astype(np.int64),
        index=idx,
        extra=extra,
        extra_names=names,
    )


@dataclass
class LogisticBaseline:
    """One-hot features -> sklearn LogisticRegression; C picked on valid AUC."""

    c_grid: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    encoder: OneHotEncoder | None = None
    model: LogisticRegression | None = None
    params: dict = field(default_factory=dict)
    n_params: int = 0  # fitted weights, for the study's cost columns

    def fit(self, train: Fields, valid: Fields) -> LogisticBaseline:
        self.encoder = OneHotEncoder(handle_unknown="ignore", dtype=np.float64)
        x_train = self.encoder.fit_transform(train.categorical())
        x_valid = self.encoder.transform(valid.categorical())
        best = (-1.0, None, None)
        for c in self.c_grid:
            model = LogisticRegression(C=c, solver="liblinear", max_iter=1000).fit(x_train, train.label)
            auc = ctr_metrics(valid.label, model.predict_proba(x_valid)[:, 1])["auc"]
            if auc > best[0]:
                best = (auc, c, model)
        self.model = best[2]
        self.params = {"C": best[1], "features": int(x_train.shape[1])}
        self.n_params = int(self.model.coef_.size + self.model.intercept_.size)
        return self

    def predict_proba(self, f: Fields) -> np.ndarray:
        if self.model is None or self.encoder is None:
            raise RuntimeError("LogisticBaseline.fit first")
        return self.model.predict_proba(self.encoder.transform(f.categorical()))[:, 1]


@dataclass
class RatingPrior:
    """score = smoothed user mean + smoothed item mean (train ratings); Platt-calibrated."""

    k_grid: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    k: float = 10.0
    global_mean: float = 0.0
    n_params: int = 0
    user_stats: dict[int, tuple[float, int]] = field(default_factory=dict)
    item_stats: dict[int, tuple[float, int]] = field(default_factory=dict)
    calibration: LogisticRegression | None = None
    params: dict = field(default_factory=dict)

    @staticmethod
    def _stats(ids: np.ndarray, ratings: np.ndarray) -> dict[int, tuple[float, int]]:
        keys, inverse = np.unique(ids, return_inverse=True)
        sums = np.bincount(inverse, weights=ratings)
        counts = np.bincount(inverse)
        return {int(k): (float(s), int(n)) for k, s, n in zip(keys, sums, counts, strict=True)}

    def _side(self, stats: dict, ids: np.ndarray, own: np.ndarray | None) -> np.ndarray:
        """Smoothed mean per id; `own` (train ratings) removes each sample's own rating (LOO)."""
        s = np.array([stats.get(int(i), (0.0, 0))[0] for i in ids])
        n = np.array([stats.get(int(i), (0.0, 0))[1] for i in ids], dtype=np.float64)
        if own is not None:
            s, n = s - own, n - 1
        return (s + self.k * self.global_mean) / (n + self.k)

    def score(self, f: Fields, leave_one_out: bool = False) -> np.ndarray:
        own = f.rating if leave_one_out else None
        return self._side(self.user_stats, f.user_id, own) + self._side(self.item_stats, f.item_id, own)

    def fit(self, train: Fields, valid: Fields) -> RatingPrior:
        self.global_mean = float(train.rating.mean())
        self.user_stats = self._stats(train.user_id, train.rating)
        self.item_stats = self._stats(train.item_id, train.rating)
        best = (-1.0, self.k)
        for k in self.k_grid:
            self.k = k
            auc = ctr_metrics(valid.label, _squash(self.score(valid)))["auc"]
            if auc > best[0]:
                best = (auc, k)
        self.k = best[1]
        loo = self.score(train, leave_one_out=True).reshape(-1, 1)
        self.calibration = LogisticRegression().fit(loo, train.label)
        self.params = {"k": self.k, "global_mean": round(self.global_mean, 4)}
        # Fitted numbers: one mean per user and per item, the global mean, k, and Platt's two.
        self.n_params = len(self.user_stats) + len(self.item_stats) + 4
        return self

    def predict_proba(self, f: Fields) -> np.ndarray:
        if self.calibration is None:
            raise RuntimeError("RatingPrior.fit first")
        return self.calibration.predict_proba(self.score(f).reshape(-1, 1))[:, 1]


def _squash(score: np.ndarray) -> np.ndarray:
    """Any monotone map into (0, 1) is enough for AUC while picking k."""
    return 1.0 / (1.0 + np.exp(-(score - score.mean())))


def run_baselines(train: Fields, valid: Fields, test: Fields) -> dict:
    """Fit both baselines; {name: {"valid", "test" (metrics), "params", "fit_seconds", "test_probs"}}."""
    out: dict = {}
    for name, model in (("lr", LogisticBaseline()), ("prior", RatingPrior())):
        start = time.perf_counter()
        model.fit(train, valid)
        out[name] = {
            "fit_seconds": round(time.perf_counter() - start, 2),
            "valid": ctr_metrics(valid.label, model.predict_proba(valid)),
            "test": ctr_metrics(test.label, p_test := model.predict_proba(test)),
            "params": model.params,
            "n_params": model.n_params,
            "test_probs": p_test,
        }
    return out
