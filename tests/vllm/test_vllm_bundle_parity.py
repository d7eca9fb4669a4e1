"""A bundle's merged export in vLLM against the bundle's own torch model merged at the same Ḡ.

End to end through the real bundle code: `make_tiny_bundle` -> `Bundle.load` -> `write_merged` (+ the
`merged/` extras `rellax export` writes) -> `Bundle.prepare` for a cold user and a user with a
history (SUBR prompts, SPA vectors, DIN gate inputs) -> P(yes) from
  * torch: every CFLoRA layer merged in place at Ḡ (`CFLoRALinear.merge`), fp32, `score_prepared`;
  * vLLM: `VllmBackend.from_bundle` on `merged/`, fp32, soft tokens as `prompt_embeds`.
Both must agree within 1e-3, and the case is built so that a backend that dropped the SPA vectors or
served a checkpoint merged at another G (I, say) would miss by more than that.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from rellax.bundle import Bundle, Prepared
from rellax.entities import HistoryEvent, Profile
from rellax.model_input import ModelInput

pytestmark = pytest.mark.vllm

TOL = 1e-3  # fp32 vLLM on the merged export vs the fp32 torch runtime on the same weights
MAX_MODEL_LEN = 512  # the prompts below are ~120-200 tokens
CANDIDATES = [5, 12, 33, 101]
HISTORY = [HistoryEvent(i, float(1 + i % 5), 1_000 + i) for i in (3, 17, 29, 44, 58, 71, 90)]


@dataclass(frozen=True)
class Case:
    """The bundle (its model merged in place at Ḡ), the prepared inputs and torch's answers."""

    bundle: Bundle
    prepared: list[Prepared]
    torch_merged: np.ndarray  # P(yes), CFLoRA merged at Ḡ, SPA vectors injected
    torch_zero_soft: np.ndarray  # the same with every SPA vector replaced by zeros
    torch_identity: np.ndarray  # the same weights merged at G = I instead of Ḡ
    torch_exact: np.ndarray  # exact CFLoRA: each input's own gate G(h), before any merge


def _vllm_sized_llama_config(real: Any) -> Any:
    """`LlamaConfig` with head size 32 and wide weights, for `make_tiny_bundle` to build its LM with.

    vLLM's CPU attention supports head sizes >= 32; the tiny bundle's Llama has 4 heads of 16, which
    the engine refuses. 2 query heads and 1 KV head of 32 keep every weight shape (q 64x64, k/v 32x64).
    std 0.3 instead of 0.02 spreads P(yes) over prompts: near 0.5 everywhere, a wrong row or a dropped
    soft vector would hide inside the tolerance (the same reason as the conftest's `merged_dir`).
    """

    def build(**kwargs: Any) -> Any:
        heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
        return real(**{**kwargs, **heads, "initializer_range": 0.3})

    return build


def _widen_adapters(bundle: Bundle, seed: int = 0) -> None:
    """Redraw CFLoRA B and the gates' last layer larger, in memory: the tiny bundle's 0.02 makes G(h)
    nearly I for every h and the adapter a small change, so merging at Ḡ, at I or not at all would
    give nearly the same scores and the test could not tell a wrong merge from the right one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bundle.scorer.model.lm.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            elif name.endswith("gate.3.weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def _mean_gates(bundle: Bundle, n: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    """Ḡ per gated layer: the mean of G(h) over random DIN states (training would average real ones)."""
    from rellax.cflora import gate_matrices

    h = torch.randn(n, bundle.config.gate_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return {name: G.mean(dim=0) for name, G in gate_matrices(bundle.scorer.model.lm, h).items()}


def _write_merged_export(bundle: Bundle, g_bars: dict[str, torch.Tensor]) -> None:
    """`merged/` as `training.llm.export._export_merged` writes it: the checkpoint + the soft-token ids.

    Nothing else there may end in .safetensors: without a shard index vLLM loads every such file of
    the dir as model weights (an SPA copy there once made start-up fail on its `fc1`).
    """
    from rellax.bundle_format import write_merged

    tokenizer, out = bundle.featurizer.tokenizer, bundle.path / "merged"
    write_merged(out, bundle.scorer.model.lm, tokenizer, g_bars, bundle.config.alpha / bundle.config.r)
    (out / "rellax_merged.json").write_text(
        json.dumps({"soft_token_ids": tokenizer.convert_tokens_to_ids(["[hist]", "[target]"])})
    )
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]


def _zero_soft(prepared: list[Prepared]) -> list[ModelInput]:
    return [
        ModelInput(m.input_ids, m.soft_positions, np.zeros_like(m.soft_vectors), m.gate_h)
        for m in (p.model_input for p in prepared)
    ]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    import transformers

    from rellax.cflora import cflora_modules
    from training.llm.tiny_bundle import make_tiny_bundle

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers, "LlamaConfig", _vllm_sized_llama_config(transformers.LlamaConfig))
        path = make_tiny_bundle(tmp_path_factory.mktemp("parity") / "bundle")
    bundle = Bundle.load(path, dtype="float32")
    lm = bundle.scorer.model.lm
    assert lm.config.head_dim == 32 and bundle.scorer.dtype == torch.float32
    assert bundle.config.spa and bundle.config.gated  # soft vectors and gates both reach the inputs

    _widen_adapters(bundle)
    g_bars = _mean_gates(bundle)
    _write_merged_export(bundle, g_bars)  # from the unmerged weights: write_merged adds s·B·Ḡᵀ·A itself

    prepared = bundle.prepare(Profile(), [], CANDIDATES[:3]) + bundle.prepare(
        Profile("female", "25-34", "writer"), HISTORY, CANDIDATES, user_id=7
    )
    assert all(p.model_input.soft_vectors is not None for p in prepared)
    assert {len(p.model_input.soft_positions) for p in prepared} == {1, 1 + bundle.k}  # cold: [target] only

    torch_exact = bundle.score_prepared(prepared)
    modules = cflora_modules(lm)
    for module in modules.values():
        module.merge(torch.eye(bundle.config.r))
    torch_identity = bundle.score_prepared(prepared)
    for name, module in modules.items():
        module.unmerge()
        module.merge(g_bars[name])
    # Merged layers ignore the gate inputs, so this is the merged model whatever gate_h says.
    torch_merged = bundle.score_prepared(prepared)
    torch_zero_soft = bundle.score_inputs(_zero_soft(prepared))
    return Case(bundle, prepared, torch_merged, torch_zero_soft, torch_identity, torch_exact)


@pytest.fixture(scope="module")
def engine(case: Case) -> Iterator[Any]:
    """The bundle's vLLM backend, fp32, started once for this module and closed after it."""
    from service.backends.vllm_backend import VllmBackend

    settings = type("Settings", (), {"dtype": "float32"})()
    backend = VllmBackend.from_bundle(
        case.bundle, settings, kv_cache_memory_bytes=64 << 20, max_model_len=MAX_MODEL_LEN
    )
    assert backend.model_dir == case.bundle.path / "merged"
    asyncio.run(backend.start())
    try:
        yield backend
    finally:
        asyncio.run(backend.close())


def test_the_case_can_tell_right_from_wrong(case: Case) -> None:
    """Without these margins the parity below would pass for a backend that ignored the SPA vectors
    or served weights merged at another G: each moves some score by more than TOL (the vectors by a
    few TOL, a merge at I by a hundred); and merging at Ḡ is not the exact model either."""
    assert np.ptp(case.torch_merged) > 100 * TOL, case.torch_merged
    # Zeroed vectors are what dropping them amounts to here (the placeholder rows are zero).
    assert np.max(np.abs(case.torch_zero_soft - case.torch_merged)) > 3 * TOL
    assert np.max(np.abs(case.torch_identity - case.torch_merged)) > 100 * TOL
    assert np.max(np.abs(case.torch_exact - case.torch_merged)) > 10 * TOL


async def test_merged_export_in_vllm_matches_torch_merged_at_g_bar(case: Case, engine: Any) -> None:
    """Cold user and user with a history, soft vectors as prompt_embeds: vLLM == torch within 1e-3."""
    inputs = [p.model_input for p in case.prepared]
    got = await engine.score(inputs)
    assert got.shape == (len(inputs),)
    print(f"max |vllm - torch merged at G_bar| = {np.max(np.abs(got - case.torch_merged)):.3g}")
    np.testing.assert_allclose(got, case.torch_merged, atol=TOL, rtol=0)
    # The engine reads the vectors, not the placeholder rows: zeroing them moves its scores too, to
    # torch's zeroed ones.
    zeroed = await engine.score(_zero_soft(case.prepared))
    assert np.max(np.abs(zeroed - got)) > 3 * TOL
    np.testing.assert_allclose(zeroed, case.torch_zero_soft, atol=TOL, rtol=0)
