"""A candidate's P(yes) does not depend on what else is in its request or model batch, and a bundle
loads in the dtype asked for, its small trained modules untouched.

Through the real bundle path (SUBR, prompt, DIN h, SPA, exact CFLoRA), on the tiny bundle: one user,
a candidate scored alone, beside one other candidate, and inside a 50-candidate request (whose
prompts have other lengths, so the batch is padded wider and split into length buckets). Only float
noise of the compute dtype may differ, with a bound per dtype (for this 2-layer model; the measured
figures on SmolLM2-135M are in benchmarks/results/precision.md):
- fp32: 1e-5. Different batch shapes pick different GEMM blockings; fp32 accumulates in another order
  and that moves the 7th significant digit (measured here: <= 3e-8; on SmolLM2 <= 4e-7).
- fp16 (every CPU; native where it has AVX-512-FP16 / AMX-FP16): 1e-4, as bf16 below.
- bf16 (only where the CPU has native bf16): 1e-4 (measured here: <= 6e-8). The same reordering can
  decide whether a product rounds up or down in bf16's 8-bit mantissa, and a deep model compounds
  it: on SmolLM2 (30 layers) a candidate moved by up to 6.5e-3 between batches in bf16, which is one
  reason RELLAX_DTYPE=auto serves fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from service_support import tiny_bundle_path

from rellax.bundle import Bundle
from rellax.entities import HistoryEvent, Profile
from rellax.precision import cpu_supports_bf16

BOUNDS = {"float32": 1e-5, "bfloat16": 1e-4, "float16": 1e-4}
DTYPES = ["float32", "float16"] + (["bfloat16"] if cpu_supports_bf16() else [])


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
    assert spread > 10 * bound  # the candidates really score differently: the bound is not vacuous


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_auto_serves_fp32_and_half_precision_keeps_the_trained_modules_fp32(half: str) -> None:
    """RELLAX_DTYPE=auto is the fp32 reference; bf16 and fp16 cast only the decoder's linear weights:
    the SPA projector and CFLoRA's A, B and gates stay in the fp32 they were trained in."""
    assert Bundle.load(tiny_bundle_path(), dtype="auto").dtype == "float32"
    loaded = Bundle.load(tiny_bundle_path(), dtype=half)
    assert loaded.dtype == half
    model = loaded.scorer.model
    kinds = {n: p.dtype for n, p in model.named_parameters()}
    small = {n for n in kinds if n.startswith("spa.") or {"lora_A", "lora_B", "gate"} & set(n.split("."))}
    assert small and all(kinds[n] == torch.float32 for n in small)
    assert kinds["lm.model.embed_tokens.weight"] == kinds["lm.model.norm.weight"] == torch.float32
    assert kinds["lm.model.layers.0.mlp.down_proj.weight"] == getattr(torch, half)
    assert kinds["lm.model.layers.0.self_attn.q_proj.base_layer.weight"] == getattr(torch, half)


def test_chunked_forward_passes_score_like_one_pass(bundle: Bundle) -> None:
    """The torch backend runs a batch in length-sorted chunks (RELLAX_TORCH_ROWS): scores must not
    depend on the chunk size, and come back in input order."""
    rng = np.random.default_rng(4)
    items = sorted(bundle.items)
    history = [
        HistoryEvent(int(i), 4.0, 1_000 + t) for t, i in enumerate(rng.choice(items[60:], 30, replace=False))
    ]
    prepared = bundle.prepare(Profile(), history, items[:24], user_id="9")
    inputs = [p.model_input for p in prepared]
    assert len({len(x.input_ids) for x in inputs}) > 1  # lengths differ: chunks really sort and pad
    whole = bundle.score_inputs(inputs, max_rows=64)
    for rows in (1, 3, 8):
        np.testing.assert_allclose(
            bundle.score_inputs(inputs, max_rows=rows), whole, atol=BOUNDS[bundle.dtype]
        )
