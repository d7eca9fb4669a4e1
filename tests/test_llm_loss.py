"""The training loss: cross-entropy on the answer tokens only, at the right positions, padding-proof."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rellax.entities import Item, Profile
from rellax.prompt import answer_ids, build_prompt
from rellax.scorer import ScoringModel
from rellax.tokens import answer_token_ids
from training.llm_data import LLMExample, collate
from training.llm_loop import answer_loss


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
