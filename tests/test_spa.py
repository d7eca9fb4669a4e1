"""SPA: soft vectors land at their placeholders, in order, and gradients reach the projector."""

from __future__ import annotations

import pytest
import torch

from rellax.cflora import adapter_params, set_trainable
from rellax.entities import Item, Profile
from rellax.prompt import build_prompt
from rellax.scorer import ScoringModel
from rellax.spa import SPAProjector, inject_soft_tokens
from rellax.tokens import add_soft_tokens, answer_token_ids

EMBED_DIM = 8


def test_inject_soft_tokens_positions_and_order() -> None:
    embeds = torch.randn(2, 6, 4)
    original = embeds.clone()
    v0, v1 = torch.randn(2, 4), torch.randn(1, 4)
    out = inject_soft_tokens(embeds, [[3, 1], [0]], [v0, v1])
    assert torch.equal(embeds, original)  # a new tensor, the input untouched
    assert torch.equal(out[0, 3], v0[0]) and torch.equal(out[0, 1], v0[1]) and torch.equal(out[1, 0], v1[0])
    untouched = torch.ones(2, 6, dtype=torch.bool)
    untouched[0, [1, 3]] = False
    untouched[1, 0] = False
    assert torch.equal(out[untouched], original[untouched])
    assert inject_soft_tokens(embeds, [[], []], [torch.empty(0, 4), torch.empty(0, 4)]) is embeds
    with pytest.raises(ValueError, match="vectors"):
        inject_soft_tokens(embeds, [[1], [0]], [v0, v1])
    with pytest.raises(ValueError, match="per sample"):
        inject_soft_tokens(embeds, [[1]], [v0])


def test_projector_shapes() -> None:
    spa = SPAProjector(embed_dim=EMBED_DIM, hidden=32)
    assert spa(torch.randn(5, EMBED_DIM)).shape == (5, 32)
    assert spa(torch.randn(2, 3, EMBED_DIM)).shape == (2, 3, 32)
    with pytest.raises(ValueError):
        SPAProjector(embed_dim=0)


@pytest.fixture()
def spa_model(tiny_llama, soft_tokenizer) -> ScoringModel:  # noqa: ANN001
    add_soft_tokens(soft_tokenizer, tiny_llama)
    torch.manual_seed(0)
    return ScoringModel(tiny_llama, *answer_token_ids(soft_tokenizer), spa=SPAProjector(EMBED_DIM, 64))


def _prompts(tok):  # noqa: ANN001, ANN202
    history = [(Item(i, f"Movie {i}", "Drama"), float(1 + i % 5)) for i in range(1, 9)]
    profile = Profile("male", "18-24", "writer")
    return [
        build_prompt(
            tok, profile, history, Item(40 + k, f"Target {k}", "Drama"), k=k, mode="recency", spa=True
        )
        for k in (3, 6)
    ]


def test_vectors_reach_the_decoder_at_their_positions(spa_model, soft_tokenizer) -> None:  # noqa: ANN001
    prompts = _prompts(soft_tokenizer)
    din = torch.randn(100, EMBED_DIM)
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, : len(p.input_ids)] = torch.tensor(p.input_ids)
        mask[row, : len(p.input_ids)] = 1
    seen = {}

    def capture(module, args, kwargs):  # noqa: ANN001, ANN202
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = spa_model.lm.model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            spa_model.logit_margin(
                ids, mask, [p.soft_positions for p in prompts], [din[p.soft_item_ids] for p in prompts]
            )
    finally:
        handle.remove()
    fed, table = seen["embeds"], spa_model.lm.get_input_embeddings().weight
    for row, p in enumerate(prompts):
        assert len(p.soft_positions) == len(p.hist_item_ids) + 1
        with torch.no_grad():
            expected = spa_model.spa(din[p.soft_item_ids])  # history items in text order, then the target
        torch.testing.assert_close(fed[row, p.soft_positions], expected, atol=1e-6, rtol=0)
        others = [t for t in range(len(p.input_ids)) if t not in set(p.soft_positions)]
        assert torch.equal(fed[row, others], table[ids[row, others]])


def test_gradients_flow_to_the_projector_only(spa_model, soft_tokenizer) -> None:  # noqa: ANN001
    set_trainable(spa_model, adapter_params(spa_model, "spa"))
    prompts = _prompts(soft_tokenizer)[:1]
    ids = torch.tensor([prompts[0].input_ids])
    margin = spa_model.logit_margin(
        ids,
        torch.ones_like(ids),
        [prompts[0].soft_positions],
        [torch.randn(len(prompts[0].soft_positions), EMBED_DIM)],
    )
    margin.sum().backward()
    grads = {n: p.grad for n, p in spa_model.named_parameters() if p.grad is not None}
    assert set(grads) == {"spa.fc1.weight", "spa.fc1.bias", "spa.fc2.weight", "spa.fc2.bias"}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
