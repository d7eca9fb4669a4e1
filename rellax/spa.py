"""SPA, the soft prompt augmentation of ReLLaX (docs/design.md §7): DIN item embeddings become LLM inputs.

Each `[hist]` placeholder of a prompt gets P(e) for the DIN embedding e of that history item, in text
order, and `[target]` gets P(e) of the candidate, where P(e) = W2·GELU(W1·e + b1) + b2 maps the DIN
embedding size E to the LLM hidden size H. The collaborative signal then enters the LLM as tokens
it reads, not as text it has to decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SPAProjector", "inject_soft_tokens"]


class SPAProjector(nn.Module):
    """P(e) = fc2(GELU(fc1(e))): Linear(E, H) -> GELU -> Linear(H, H).

    Args:
        embed_dim: E, the DIN item-embedding size (64 in docs/design.md §6).
        hidden: H, the LLM hidden size (576 for SmolLM2-135M).
    """

    def __init__(self, embed_dim: int = 64, hidden: int = 576) -> None:
        super().__init__()
        if embed_dim <= 0 or hidden <= 0:
            raise ValueError(f"embed_dim and hidden must be > 0, got {embed_dim}, {hidden}")
        self.embed_dim, self.hidden = embed_dim, hidden
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """(..., E) -> (..., H)."""
        return self.fc2(self.act(self.fc1(e)))


def inject_soft_tokens(
    inputs_embeds: torch.Tensor,
    positions: Sequence[Sequence[int]],
    vectors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """A copy of `inputs_embeds` with each sample's soft vectors written at its positions.

    Args:
        inputs_embeds: (B, T, H) token embeddings.
        positions: per sample, the n_i token positions to overwrite, in the order of its vectors.
        vectors: per sample, an (n_i, H) tensor; cast to the embeddings' dtype.

    Returns:
        A new (B, T, H) tensor (the input is untouched, so this is safe on autograd leaves), or the
        input itself when there is nothing to write; gradients flow to `vectors` and to the
        embeddings that were not overwritten.
    """
    if len(positions) != inputs_embeds.shape[0] or len(vectors) != inputs_embeds.shape[0]:
        raise ValueError(
            f"need one positions list and one vector block per sample: batch {inputs_embeds.shape[0]}, "
            f"got {len(positions)} / {len(vectors)}"
        )
    counts, hidden = [len(p) for p in positions], inputs_embeds.shape[-1]
    for i, (n, v) in enumerate(zip(counts, vectors, strict=True)):
        if v.shape != (n, hidden):
            raise ValueError(f"sample {i}: {n} positions take ({n}, {hidden}) vectors, not {tuple(v.shape)}")
    if sum(counts) == 0:  # nothing to write: no copy needed
        return inputs_embeds
    device = inputs_embeds.device
    rows = torch.repeat_interleave(
        torch.arange(len(counts), device=device), torch.tensor(counts, device=device)
    )
    cols = torch.tensor([p for sample in positions for p in sample], dtype=torch.long, device=device)
    values = torch.cat(list(vectors)).to(inputs_embeds.dtype)
    return inputs_embeds.index_put((rows, cols), values)
