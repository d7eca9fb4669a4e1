"""The scorer runtime: two-row head == full-vocab softmax, batch independence, bucketing, precision."""

from __future__ import annotations

import contextlib
import copy
import random

import numpy as np
import pytest
import torch

from rellax.cflora import gate_context, inject_cflora
from rellax.entities import Item, Profile
from rellax.prompt import Prompt, build_prompt
from rellax.scorer import Scorer, ScoringModel, length_buckets
from rellax.spa import SPAProjector, inject_soft_tokens
from rellax.tokens import add_soft_tokens, answer_token_ids

EMBED_DIM, GATE_DIM = 8, 16


def _prompts(tok, spa: bool, n: int = 7) -> list[Prompt]:  # noqa: ANN001
    rng = random.Random(0)
    history = [(Item(i, f"Movie number {i}", "Drama"), float(rng.randint(1, 5))) for i in range(1, 30)]
    profiles = [Profile("male", "18-24", "writer"), Profile("female", "above 56", "other")]
    return [  # different k and titles: different lengths, in no particular order
        build_prompt(
            tok, profiles[i % 2], history, Item(100 + i, "Target " * (1 + i % 3), "Drama"),
            k=rng.choice([2, 9, 5, 14]), mode="recency", spa=spa,
        )
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture()
def scoring(tiny_llama, soft_tokenizer) -> ScoringModel:  # noqa: ANN001
    add_soft_tokens(soft_tokenizer, tiny_llama)
    torch.manual_seed(0)
    return ScoringModel(tiny_llama, *answer_token_ids(soft_tokenizer), spa=SPAProjector(EMBED_DIM, 64))


def _gated(scoring: ScoringModel) -> ScoringModel:
    inject_cflora(scoring.lm, dropout=0.0, gate_dim=GATE_DIM)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial adapter and gate: B != 0, G(h) != I
        for name, p in scoring.lm.named_parameters():
            if "lora_B" in name or "gate" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return scoring


def _naive_p_yes(scoring: ScoringModel, prompt: Prompt, vectors: torch.Tensor | None, h) -> float:  # noqa: ANN001
    """The reference: the full LM, one prompt, full-vocabulary logits, softmax over the two answers."""
    ids = torch.tensor([prompt.input_ids])
    embeds = scoring.lm.get_input_embeddings()(ids)
    if vectors is not None:
        embeds = inject_soft_tokens(embeds, [prompt.soft_positions], [scoring.spa(vectors)])
    with torch.no_grad(), gate_context(scoring.lm, h) if h is not None else contextlib.nullcontext():
        logits = scoring.lm(inputs_embeds=embeds).logits[0, -1]
    assert logits.shape[0] == scoring.lm.config.vocab_size
    return torch.softmax(logits[[scoring.yes_id, scoring.no_id]], dim=0)[0].item()


@pytest.mark.parametrize("variant", ["text", "spa", "spa+cflora"])
def test_p_yes_equals_full_vocab_softmax(scoring, soft_tokenizer, variant: str) -> None:  # noqa: ANN001
    assert (scoring.yes_id, scoring.no_id) == (10539, 5230)  # the answer ids the prompt tests pin
    spa = variant != "text"
    if variant == "spa+cflora":
        _gated(scoring)
    prompts = _prompts(soft_tokenizer, spa=spa)
    din = torch.randn(200, EMBED_DIM)
    vectors = [din[p.soft_item_ids] for p in prompts] if spa else None
    h = torch.randn(len(prompts), GATE_DIM) if variant == "spa+cflora" else None
    got = Scorer(scoring, dtype=torch.float32).score(prompts, vectors, h)
    with torch.no_grad():
        expected = [
            _naive_p_yes(
                scoring, p, None if vectors is None else vectors[i], None if h is None else h[i : i + 1]
            )
            for i, p in enumerate(prompts)
        ]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.std(got) > 1e-4  # the prompts really score differently


def test_alone_equals_inside_a_padded_batch(scoring, soft_tokenizer) -> None:  # noqa: ANN001
    _gated(scoring)
    prompts = _prompts(soft_tokenizer, spa=True, n=9)
    assert len({len(p.input_ids) for p in prompts}) >= 3  # really padded batches
    din = torch.randn(200, EMBED_DIM)
    vectors = [din[p.soft_item_ids] for p in prompts]
    h = torch.randn(len(prompts), GATE_DIM)
    scorer = Scorer(scoring, dtype=torch.float32)
    batched = scorer.score(prompts, vectors, h, max_batch=16)
    alone = np.array(
        [
            scorer.score([p], [v], h[i : i + 1])[0]
            for i, (p, v) in enumerate(zip(prompts, vectors, strict=True))
        ]
    )
    np.testing.assert_allclose(batched, alone, atol=1e-4, rtol=0)
    # and bucketed into small batches, results still come back in input order
    np.testing.assert_allclose(
        scorer.score(prompts, vectors, h, max_batch=2, max_tokens=10_000), alone, atol=1e-4
    )


def test_length_buckets_cover_everything_longest_first() -> None:
    lengths = [5, 50, 7, 300, 50, 1, 120, 9, 9]
    batches = list(length_buckets(lengths, max_batch=3, max_tokens=200))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * lengths[b[0]] <= 200  # a single over-long prompt still runs
    assert [len(b) for b in batches] == [1, 1, 3, 3, 1]
    with pytest.raises(ValueError):
        next(length_buckets([3], max_batch=0, max_tokens=10))


def test_margin_guards(scoring, soft_tokenizer) -> None:  # noqa: ANN001
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="right padding"):
        scoring.logit_margin(ids, torch.tensor([[0, 1, 1]]))
    prompts = _prompts(soft_tokenizer, spa=True, n=1)
    with pytest.raises(ValueError, match="soft_vectors"):
        Scorer(scoring, dtype=torch.float32).score(prompts)
    text_prompts = _prompts(soft_tokenizer, spa=False, n=1)
    with pytest.raises(ValueError, match="no placeholders"):
        Scorer(scoring, dtype=torch.float32).score(text_prompts, [torch.zeros(0, EMBED_DIM)])


def _gated_inputs_and_fp32(scoring, soft_tokenizer) -> tuple:  # noqa: ANN001
    """Gated model, SPA prompts, DIN vectors and gate inputs, and the fp32 reference scores."""
    _gated(scoring)
    prompts = _prompts(soft_tokenizer, spa=True)
    din = torch.randn(200, EMBED_DIM)
    vectors = [din[p.soft_item_ids] for p in prompts]
    h = torch.randn(len(prompts), GATE_DIM)
    reference = Scorer(copy.deepcopy(scoring), dtype=torch.float32).score(prompts, vectors, h)
    return prompts, vectors, h, reference


@pytest.mark.parametrize("cast", [True, False])
def test_bf16_tracks_the_fp32_reference(scoring, soft_tokenizer, cast: bool) -> None:  # noqa: ANN001
    prompts, vectors, h, reference = _gated_inputs_and_fp32(scoring, soft_tokenizer)
    model = copy.deepcopy(scoring)
    got = Scorer(model, dtype=torch.bfloat16, cast=cast).score(prompts, vectors, h)
    in_bf16 = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    # cast: rellax.precision's recipe, the decoder's own linear weights only (q/k/v/o, gate/up/down;
    # CFLoRA's base_layer); embeddings, norms, CFLoRA A/B/gates and the SPA projector stay fp32.
    decoder_linears = {
        n for n, m in model.lm.model.layers.named_modules() if isinstance(m, torch.nn.Linear)
        and not {"lora_A", "lora_B", "gate"} & set(n.split("."))
    }  # fmt: skip
    assert len(decoder_linears) == 2 * 7
    assert in_bf16 == ({f"lm.model.layers.{n}.weight" for n in decoder_linears} if cast else set())
    # bf16 keeps 8 mantissa bits: ~0.4% per rounding, compounded over 2 layers of a random model
    np.testing.assert_allclose(got, reference, atol=2e-2, rtol=0)


def test_fp16_recipe_casts_like_bf16_and_tracks_fp32_closer(scoring, soft_tokenizer) -> None:  # noqa: ANN001
    """fp16 runs the same recipe (decoder linears only) with 11 significant bits to bf16's 8: on
    SmolLM2 that is what brings P(yes) within the 0.005 the service promises (README, "Numeric
    precision"), so here its error must be well below bf16's on the same prompts."""
    prompts, vectors, h, reference = _gated_inputs_and_fp32(scoring, soft_tokenizer)
    errors = {}
    for dtype in (torch.bfloat16, torch.float16):
        model = copy.deepcopy(scoring)
        got = Scorer(model, dtype=dtype).score(prompts, vectors, h)
        kinds = {n: p.dtype for n, p in model.named_parameters()}
        assert {n for n, k in kinds.items() if k == dtype} == {
            n for n, k in kinds.items() if k != torch.float32
        }  # one half-precision dtype, nothing else changed
        assert kinds["lm.model.layers.0.mlp.down_proj.weight"] == dtype
        assert all(k == torch.float32 for n, k in kinds.items() if "lora_" in n or n.startswith("spa."))
        errors[dtype] = float(np.abs(got - reference).max())
    assert errors[torch.float16] < 5e-3
    assert errors[torch.float16] < errors[torch.bfloat16] / 4, errors


def test_projected_vectors_score_like_raw_embeddings(scoring, soft_tokenizer) -> None:  # noqa: ANN001
    prompts = _prompts(soft_tokenizer, spa=True, n=3)
    din = torch.randn(200, EMBED_DIM)
    raw = [din[p.soft_item_ids] for p in prompts]
    scorer = Scorer(scoring, dtype=torch.float32)
    with torch.no_grad():
        projected = [scoring.spa(v).numpy() for v in raw]  # what a bundle hands to any backend
    np.testing.assert_allclose(
        scorer.score(prompts, projected, projected=True), scorer.score(prompts, raw), atol=1e-6, rtol=0
    )
