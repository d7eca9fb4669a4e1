"""A candidate's P(yes) does not depend on what else is in its request or model batch (issue 15).

Through the real bundle path (SUBR, prompt, DIN h, SPA, exact CFLoRA), on the tiny bundle: one user,
a candidate scored alone, beside one other candidate, and inside a 50-candidate request (whose
prompts have other lengths, so the batch is padded wider and split into length buckets). Only float
noise of the compute dtype may differ, with a bound per dtype:
- fp32: 1e-5. Different batch shapes pick different GEMM blockings; fp32 accumulates in another order
  and that moves the 7th significant digit (measured here: <= 4e-7).
- bf16 (only where the CPU has native bf16): 2e-3. The same reordering decides whether a product
  rounds up or down in bf16's 8-bit mantissa; the fp32 residual stream of `rellax.precision`'s recipe
  keeps that from compounding (the whole-model bf16 cast it replaced measured 7e-3 on SmolLM2).
"""

from __future__ import annotations

import numpy as np
import pytest
from service_support import tiny_bundle_path

from rellax.bundle import Bundle
from rellax.entities import HistoryEvent, Profile
from rellax.precision import cpu_supports_bf16

BOUNDS = {"float32": 1e-5, "bfloat16": 2e-3}
DTYPES = ["float32"] + (["bfloat16"] if cpu_supports_bf16() else [])


@pytest.fixture(scope="module", params=DTYPES)
def bundle(request: pytest.FixtureRequest) -> Bundle:
    return Bundle.load(tiny_bundle_path(), dtype=request.param)


def _scores(bundle: Bundle, history: list[HistoryEvent], candidates: list[int]) -> dict[int, float]:
    prepared = bundle.prepare(Profile("female", "25-34", "writer"), history, candidates, user_id="7")
    return dict(zip(candidates, bundle.score_prepared(prepared).tolist(), strict=True))


def test_a_candidate_scores_the_same_alone_in_a_pair_and_in_a_long_request(bundle: Bundle) -> None:
    rng = np.random.default_rng(3)
    items = sorted(bundle.items)
    seen = rng.choice(items[60:], 40, replace=False).tolist()
    history = [HistoryEvent(int(i), float(rng.integers(1, 6)), 1_000 + t) for t, i in enumerate(seen)]
    target, neighbour, crowd = items[0], items[1], items[2:50]
    alone = _scores(bundle, history, [target])[target]
    pair = _scores(bundle, history, [target, neighbour])
    many = _scores(bundle, history, [*crowd[:25], target, neighbour, *crowd[25:]])
    bound = BOUNDS[bundle.dtype]
    assert abs(pair[target] - alone) <= bound
    assert abs(many[target] - alone) <= bound
    assert abs(many[neighbour] - pair[neighbour]) <= bound
    spread = np.ptp(list(many.values()))
    assert spread > 100 * bound  # the candidates really score differently: the bound is not vacuous
