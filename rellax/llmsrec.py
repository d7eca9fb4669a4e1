"""LLM-SRec (DESIGN §11): a frozen LLM reads a user's sequence, small modules learn to use it.

Trained: `hist_proj` (SASRec item embedding -> LLM width, written at each `[hist]` of the user
prompt), the learned `[UserOut]` / `[ItemOut]` input vectors (written at the prompt's final
`[target]`), and the heads f_user, f_item (LLM width -> 128) and f_CF (SASRec width -> 128). The
LLM's last-layer hidden state at the read-out token, through f_user or f_item, is a user or item
vector in one 128-d space; score = their dot product. Item vectors do not depend on the user, so a
catalogue's are computed once and one LLM pass per user ranks any number of candidates.

Loss (the authors' code, weights 1:1:1): softmax retrieval over 1 positive + negatives
(unnormalised dot products), MSE between the L2-normalised f_user(h_U) and f_CF(SASRec user
vector), and a uniformity term (Wang & Isola) on the normalised user and item vectors.

Prompts are right-padded and run with an attention mask; the read-out position of each row is its
own (`Prompt.target_position`), so padding never moves what is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rellax import precision
from rellax.prompt import Prompt
from rellax.spa import inject_soft_tokens

__all__ = ["LLMSRec", "llmsrec_loss"]


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class LLMSRec(nn.Module):
    def __init__(self, lm: nn.Module, cf_dim: int = 64, out_dim: int = 128) -> None:
        super().__init__()
        self.lm = lm
        for p in self.lm.parameters():
            p.requires_grad_(False)
        hidden = lm.config.hidden_size
        self.hist_proj = _mlp(cf_dim, hidden)
        self.user_out = nn.Parameter(torch.randn(hidden) * 0.02)
        self.item_out = nn.Parameter(torch.randn(hidden) * 0.02)
        self.f_user, self.f_item, self.f_cf = (
            _mlp(hidden, out_dim),
            _mlp(hidden, out_dim),
            _mlp(cf_dim, out_dim),
        )

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("lm.")}

    def _read(self, prompts: Sequence[Prompt], soft: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, H) last-layer hidden states at each prompt's read-out token (right padding + mask)."""
        device = self.user_out.device
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, : len(p.input_ids)] = torch.tensor(p.input_ids)
            mask[b, : len(p.input_ids)] = 1
        embeds = self.lm.get_input_embeddings()(ids)
        positions = [[*p.hist_positions, p.target_position] for p in prompts]
        embeds = inject_soft_tokens(embeds, positions, [v.to(embeds.dtype) for v in soft])
        with precision.compute(self.lm):  # the bf16 recipe where the base is bf16, as the scorer runs it
            hidden = self.lm.model(
                inputs_embeds=embeds, attention_mask=mask, use_cache=False
            ).last_hidden_state
        at = torch.tensor([p.target_position for p in prompts], device=device)
        return hidden[torch.arange(len(prompts), device=device), at].float()

    def user_vectors(
        self, prompts: Sequence[Prompt], hist_embeddings: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """(B, out_dim) from user prompts and, per prompt, its (n_i, cf_dim) SASRec item embeddings."""
        soft = [torch.cat([self.hist_proj(e.float()), self.user_out[None]]) for e in hist_embeddings]
        return self.f_user(self._read(prompts, soft))

    def item_vectors(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """(B, out_dim) from item prompts."""
        return self.f_item(self._read(prompts, [self.item_out[None] for _ in prompts]))


def _uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log E exp(-t ||x_i - x_j||^2) over pairs of L2-normalised rows (lower = more uniform)."""
    x = F.normalize(x, dim=-1)
    return torch.pdist(x).pow(2).mul(-t).exp().mean().log() if len(x) > 1 else x.new_zeros(())


def llmsrec_loss(
    user: torch.Tensor, items: torch.Tensor, cf_user: torch.Tensor, f_cf: nn.Module
) -> dict[str, torch.Tensor]:
    """user (B, D); items (B, 1 + n_neg, D) with the positive first; cf_user (B, cf_dim) SASRec's."""
    logits = torch.einsum("bd,bcd->bc", user, items)
    retrieval = F.cross_entropy(logits, torch.zeros(len(user), dtype=torch.long, device=user.device))
    distill = F.mse_loss(F.normalize(user, dim=-1), F.normalize(f_cf(cf_user), dim=-1))
    uniform = _uniformity(user) + _uniformity(items.reshape(-1, items.shape[-1]))
    return {
        "loss": retrieval + distill + uniform,
        "retrieval": retrieval,
        "distill": distill,
        "uniform": uniform,
    }
