"""The training loss: cross-entropy on the answer tokens only, at the right positions, padding-proof."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rellax.entities import Item, Profile
from rellax.prompt import answer_ids, build_prompt
from rellax.scorer import ScoringModel
from rellax.tokens import answer_token_ids
from training.llm.data import LLMExample, collate
from training.llm.loop import answer_loss


def test_answer_loss_is_the_answer_tokens_cross_entropy(tokenizer, tiny_llama) -> None:  # noqa: ANN001
    history = [(Item(i, f"Movie {i}" + " long" * (i % 4), "Drama"), float(1 + i % 5)) for i in range(1, 20)]
    examples = []
    for i, k in enumerate((3, 11, 6)):  # different lengths: the batch is padded
        prompt = build_prompt(
            tokenizer, Profile("male", "18-24", "writer"), history, Item(100 + i, "Target", "Drama"),
            k=k, mode="recency", spa=False,
        )  # fmt: skip
        label = i % 2
        examples.append(LLMExample(i, "recency", prompt, tuple(answer_ids(tokenizer, label)), label))
    model = ScoringModel(tiny_llama, *answer_token_ids(tokenizer)).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        loss, decision = answer_loss(model, collate(examples, pad))
        # Reference: each example alone, unpadded, full-vocab log-softmax of the plain LM.
        first, rest = [], []
        for e in examples:
            ids = torch.tensor([[*e.prompt.input_ids, *e.answer]])
            logp = F.log_softmax(tiny_llama(input_ids=ids).logits[0].float(), dim=-1)
            n = len(e.prompt.input_ids)
            nll = [-logp[n - 1 + j, tok].item() for j, tok in enumerate(e.answer)]
            first.append(nll[0])
            rest.extend(nll[1:])
    assert len(examples[0].answer) == 2  # "Yes." / "No.": the decision token, then "."
    assert abs(decision.item() - sum(first) / len(first)) < 1e-4
    assert abs(loss.item() - (sum(first) + sum(rest)) / (len(first) + len(rest))) < 1e-4


def test_a_batch_moves_every_tensor_to_the_models_device(soft_tokenizer) -> None:  # noqa: ANN001
    """The loop moves each CPU-built batch to the model's device: a field left behind would meet GPU
    weights in the forward. "meta" stands in for a second device on a CPU-only machine."""
    history = [(Item(i, f"Movie {i}", "Drama"), 4.0) for i in range(1, 8)]
    prompt = build_prompt(
        soft_tokenizer, Profile("male", "18-24", "writer"), history, Item(100, "Target", "Drama"),
        k=3, mode="recency", spa=True,
    )  # fmt: skip
    soft = torch.randn(len(prompt.soft_positions), 4)
    example = LLMExample(
        0, "recency", prompt, tuple(answer_ids(soft_tokenizer, 1)), 1, soft=soft, h=torch.randn(6)
    )
    batch = collate([example, example], 0)
    moved = batch.to(torch.device("meta"))
    tensors = [moved.input_ids, moved.targets, moved.target_rows, moved.target_cols, moved.target_first]
    assert all(t.device.type == "meta" for t in [*tensors, *moved.soft_vectors, moved.h])
    assert moved.soft_positions == batch.soft_positions and moved.input_ids.shape == batch.input_ids.shape
    assert batch.input_ids.device.type == "cpu"  # a copy: the CPU batch is left as it was


def _examples(tokenizer, offsets: list[float] | None) -> list[LLMExample]:  # noqa: ANN001
    history = [(Item(i, f"Movie {i}" + " long" * (i % 4), "Drama"), float(1 + i % 5)) for i in range(1, 20)]
    examples = []
    for i, k in enumerate((3, 11, 6, 8)):
        prompt = build_prompt(
            tokenizer, Profile("male", "18-24", "writer"), history, Item(100 + i, "Target", "Drama"),
            k=k, mode="recency", spa=False,
        )  # fmt: skip
        label = i % 2
        offset = None if offsets is None else offsets[i]
        examples.append(
            LLMExample(i, "recency", prompt, tuple(answer_ids(tokenizer, label)), label, din_logit=offset)
        )
    return examples


def _plain_margins(tiny_llama, tokenizer, examples: list[LLMExample]) -> torch.Tensor:  # noqa: ANN001
    """logit_Yes - logit_No at each prompt's last token, each prompt alone, full-vocab logits."""
    yes, no = answer_token_ids(tokenizer)
    out = []
    for e in examples:
        logits = tiny_llama(input_ids=torch.tensor([e.prompt.input_ids])).logits[0, -1].float()
        out.append(logits[yes] - logits[no])
    return torch.stack(out)


def test_a_correction_to_din_trains_on_the_margin_plus_dins_logit(tokenizer, tiny_llama) -> None:  # noqa: ANN001
    """The DIN-residual variant: loss = BCE(sigmoid(margin + DIN logit), label), per padded batch."""
    offsets = [2.5, -1.0, 0.3, -3.0]
    examples = _examples(tokenizer, offsets)
    model = ScoringModel(tiny_llama, *answer_token_ids(tokenizer)).eval()
    with torch.no_grad():
        loss, decision = answer_loss(model, collate(examples, 0))
        margins = _plain_margins(tiny_llama, tokenizer, examples)
    labels = torch.tensor([float(e.label) for e in examples])
    want = F.binary_cross_entropy_with_logits(margins + torch.tensor(offsets), labels)
    assert abs(loss.item() - want.item()) < 1e-4 and decision.item() == loss.item()
    # Without offsets the same examples train on answer-token cross-entropy: another number.
    plain, _ = answer_loss(model, collate(_examples(tokenizer, None), 0))
    assert abs(plain.item() - want.item()) > 1e-3


def test_the_scorer_adds_offsets_before_the_sigmoid(tokenizer, tiny_llama) -> None:  # noqa: ANN001
    from rellax.scorer import Scorer

    offsets = [2.5, -1.0, 0.3, -3.0]
    examples = _examples(tokenizer, offsets)
    scorer = Scorer(ScoringModel(tiny_llama, *answer_token_ids(tokenizer)), dtype=torch.float32)
    prompts = [e.prompt for e in examples]
    with torch.no_grad():
        margins = _plain_margins(tiny_llama, tokenizer, examples).double()
    want = torch.sigmoid(margins + torch.tensor(offsets, dtype=torch.float64)).numpy()
    got = scorer.score(prompts, offsets=offsets, max_batch=3)
    assert abs(got - want).max() < 1e-5
    assert abs(scorer.score(prompts) - torch.sigmoid(margins).numpy()).max() < 1e-5
    with pytest.raises(ValueError, match="offsets"):
        scorer.score(prompts, offsets=offsets[:2])
