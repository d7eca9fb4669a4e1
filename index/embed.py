"""Item text and item semantic embeddings (docs/design.md §4).

An item's raw vector is one forward pass of the scoring LLM over its text, averaged over the real
tokens of the final-layer hidden states (after the model's final norm). Only the decoder body runs:
the LM head over the whole vocabulary would be wasted work here.

Texts are tokenised one by one, sorted by length and padded on the right per batch. Right padding
leaves every real token's position and causal context unchanged, so a text's vector does not depend
on the batch it lands in (tests pin this), and sorting keeps the padding — wasted compute — small.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rellax.domain import MOVIES, Domain
from rellax.entities import Item
from rellax.precision import compute_dtype, cpu_supports_bf16, resolve_dtype

__all__ = ["ITEM_TEXT_TEMPLATE", "cpu_supports_bf16", "embed_texts", "item_text", "resolve_dtype"]

ITEM_TEXT_TEMPLATE = "Here is a movie. Its title is {title}. The movie's genre is {genre}."


def item_text(item: Item, domain: Domain = MOVIES) -> str:
    """The text an item is embedded from (docs/design.md §4): for movies exactly as the papers write it."""
    return domain.describe(item)


def _decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final-layer post-norm hidden states (B, T, H) without running the LM head."""
    body = getattr(model, "model", None)
    if isinstance(body, torch.nn.Module):
        return body(input_ids=input_ids, attention_mask=mask).last_hidden_state
    # A model without a `.model` body: Hugging Face appends the post-norm state last.
    return model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


def _batches(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Indices of texts grouped by similar token length (stable, so equal lengths keep input order)."""
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def embed_texts(
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001 - any Hugging Face tokenizer
    texts: Sequence[str],
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Masked-mean final hidden state of each text, shape (N, H) float32, in input order.

    `dtype=None` runs matmuls in bf16 autocast where the device has native bf16 (see
    `cpu_supports_bf16`) and in fp32 otherwise; `torch.float32` disables autocast (the numerically
    checked reference). Weights already in bf16 (a bf16 copy, or `rellax.precision`'s recipe, whose
    embeddings and norms stay fp32) are not cast again by autocast: on AVX-512-BF16 CPUs that is
    faster than autocast over fp32 weights (benchmarks/subr.py). The pooling is always done in fp32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    compute = resolve_dtype(device, dtype)
    if compute == torch.float32 and compute_dtype(model) != torch.float32:
        raise ValueError(
            "the model's linear weights are not fp32: embed with dtype=None/bfloat16 or load it in fp32"
        )
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"text(s) at position(s) {empty[:10]} tokenise to nothing; cannot embed them")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    autocast = (
        torch.autocast(device.type, dtype=compute) if compute != torch.float32 else contextlib.nullcontext()
    )
    n_batches = -(-len(texts) // batch_size)
    with torch.inference_mode(), autocast:
        for idx in tqdm(_batches(lengths, batch_size), total=n_batches, desc="embed", unit="batch",
                        disable=not progress, leave=False):  # fmt: skip
            width = int(lengths[idx].max())
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : lengths[i]] = torch.tensor(encoded[i])
                mask[row, : lengths[i]] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = _decoder_hidden(model, ids, mask).float()
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            out[idx] = pooled.cpu().numpy()
    return out
